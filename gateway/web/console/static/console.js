// Refresh in place each element with data-refresh="URL" (an HTML fragment of the same
// page) every data-every seconds; the page stays readable without it.
document.querySelectorAll("[data-refresh]").forEach((element) => {
  const every = Number(element.dataset.every || 5) * 1000;
  const refresh = async () => {
    try {
      const response = await fetch(element.dataset.refresh, {credentials: "same-origin"});
      if (response.ok) element.innerHTML = await response.text();
    } catch (error) { /* the service is restarting: try again at the next turn */ }
    setTimeout(refresh, every);
  };
  setTimeout(refresh, every);
});
