"""Is a request one the browser says another site made? (The ``Origin`` and
``Sec-Fetch-Site`` request headers: RFC 6454 7, Fetch Metadata.) Browsers send ``Origin``
with every cross-origin POST, so a state-changing request naming another origin is refused;
scripts and the CLI send none and are judged by their credentials alone."""

from urllib.parse import urlsplit

from starlette.requests import Request


def foreign_origin(request: Request, public_url: str) -> str:
    """Why ``request`` must be refused as coming from another site; "" when it does not.
    Its own origin is the one it was sent to (``Host``: in the loopback demo mode only
    names of this machine are served, gateway.web.middleware.allowed_hosts) or
    ``public_url``'s."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return "cross-site request"
    origin = request.headers.get("origin")
    if origin is None:
        return ""
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    public = urlsplit(public_url)
    if public.scheme and public.netloc:
        own.add(f"{public.scheme}://{public.netloc}")
    return "" if origin in own else f"request from another origin ({origin[:100]})"
