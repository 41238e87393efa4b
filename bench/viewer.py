"""Time to first image in OHIF, and until every slice is loaded, for the 300-instance CT:
the same OHIF (the one scripts/setup.sh installs) pointed at Passerelle and at Orthanc +
DICOMweb holding the same study, one server at a time, in a headless Chromium.

Both viewers are served by one small static server of this script with an app-config
naming the DICOMweb root of the server measured (Chromium runs with web security off, so
neither server needs CORS), so the only difference is the DICOMweb server. Each run is a
fresh browser (empty cache) opening ``/viewer/viewer?StudyInstanceUIDs=...``:

- first image: navigation start until the viewport's canvas holds a non-blank image; and
  the same from the viewer's first QIDO-RS request, once OHIF's own files are loaded (what
  the DICOMweb server alone decides);
- every slice: navigation start until the last of the study's frames has arrived
  (resource timing of the ``/frames/`` requests; OHIF's prefetcher fetches the whole
  series once the first image is up).

A last column gives Passerelle's own ``/viewer/`` (same origin, the gzip copies).

Usage: python bench/viewer.py [--repeat 3] [--instances 300]
"""

import argparse
import statistics
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import REPO, ct_study, install_bench_packages, markdown_table, run_checked
from pydicom import dcmread
from selenium.webdriver.remote.webdriver import WebDriver

from gateway.web.viewer.routes import app_config
from tests.browser import chromium, ohif_notice_acknowledged
from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess, free_port

VIEWER = REPO / "viewer"
_DRAWN = """
const done = arguments[arguments.length - 1];
const poll = () => {
  const canvas = document.querySelector('canvas.cornerstone-canvas');
  const context = canvas && canvas.width && canvas.getContext('2d');
  if (context) {
    const {data} = context.getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < data.length; i += 4 * 97) {
      if (data[i] > 16) { done(performance.now()); return; }
    }
  }
  setTimeout(poll, 10);
};
poll();
"""
_FRAMES = """
return performance.getEntriesByType('resource').filter(e => e.name.includes('/frames/'))
  .map(e => [e.name, e.responseEnd]);
"""
_FIRST_QUERY = """
return Math.min(...performance.getEntriesByType('resource')
  .filter(e => e.name.includes('/studies')).map(e => e.startTime));
"""


def _static_server(root: str) -> tuple[ThreadingHTTPServer, int]:
    """OHIF's files at /viewer/ with an app-config naming ``root``; its page for its routes."""
    config = app_config(f'"{root}"').encode()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(VIEWER), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            path = self.path.split("?")[0].removeprefix("/viewer")
            if path == "/app-config.js":
                self.send_response(200)
                self.send_header("Content-Type", "text/javascript")
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                self.wfile.write(config)
                return
            if not (VIEWER / path.lstrip("/")).is_file() or path == "/":
                path = "/index.html"
            self.path = path
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def _measure(url: str, instances: int) -> tuple[float, float, float]:
    """(first image, first image after the viewer's first query, every slice) in seconds,
    opening ``url`` in a fresh browser."""
    with chromium("en", web_security=False) as driver:
        driver.set_script_timeout(120)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
            "source": "performance.setResourceTimingBufferSize(100000);"})
        ohif_notice_acknowledged(driver)
        driver.get(url)
        first = driver.execute_async_script(_DRAWN)
        return (first / 1000, (first - driver.execute_script(_FIRST_QUERY)) / 1000,
                _every_slice(driver, instances) / 1000)


def _through_static_server(study_uid: str, origin: str, instances: int, repeat: int
                           ) -> list[tuple[float, float, float]]:
    server, port = _static_server(origin)
    url = f"http://127.0.0.1:{port}/viewer/viewer?StudyInstanceUIDs={study_uid}"
    try:
        _measure(url, instances)  # warms the DICOMweb server's caches
        return [_measure(url, instances) for _ in range(repeat)]
    finally:
        server.shutdown()


def _every_slice(driver: WebDriver, instances: int, seconds: float = 300) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ends = {}
        for name, end in driver.execute_script(_FRAMES):
            if end > 0:
                ends[name.split("/frames/")[0]] = end
        if len(ends) >= instances:
            return max(ends.values())
        time.sleep(0.2)
    raise RuntimeError(f"only {len(ends)} of {instances} slices arrived in {seconds} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    if not (VIEWER / "VERSION").is_file():
        raise SystemExit("the viewer is not installed: ./scripts/setup.sh")
    install_bench_packages()
    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-viewer-"))
    files = ct_study(REPO / "bench" / "results" / f"ct-{args.instances}", args.instances)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    results: dict[str, list[tuple[float, float, float]]] = {}
    for name in ("passerelle", "orthanc"):
        peer = (PasserelleProcess(work / "passerelle", http_workers="2")
                if name == "passerelle" else OrthancProcess(work / "orthanc"))
        peer.start()
        try:
            run_checked(["storescu", "-aec", peer.ae_title, "127.0.0.1", str(peer.dicom_port),
                         *map(str, files)])
            origin = f"http://127.0.0.1:{peer.http_port}"
            results[name] = _through_static_server(study_uid, origin, args.instances,
                                                   args.repeat)
            if name == "passerelle":  # its own /viewer/: same origin, gzip copies
                results["own"] = [_measure(f"{origin}/viewer/viewer?StudyInstanceUIDs="
                                           f"{study_uid}", args.instances)
                                  for _ in range(args.repeat)]
        finally:
            peer.stop()
    rows = []
    for index, label in enumerate(("first image (s)",
                                   "first image, from the viewer's first query (s)",
                                   "every slice loaded (s)")):
        ours, own, theirs = (statistics.median(run[index] for run in results[name])
                             for name in ("passerelle", "own", "orthanc"))
        rows.append([label, f"{ours:.2f}", f"{theirs:.2f}", f"{ours / theirs:.2f}x",
                     f"{own:.2f}"])
    print(f"OHIF {(VIEWER / 'VERSION').read_text().strip()}, {args.instances}-instance CT, "
          f"median of {args.repeat} fresh browsers")
    print(markdown_table(["measure", "passerelle", "orthanc", "passerelle / orthanc "
                          "(lower is better)", "passerelle, its own /viewer/"], rows))


if __name__ == "__main__":
    main()
