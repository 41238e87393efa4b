"""Another site's page for the tests: served on a loopback port, it makes the visitor's
browser post a form (with a guessed form token) to a URL of the gateway."""

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def forged_form(target: str) -> Iterator[int]:
    """Serve, while in the block, a page that posts a form to ``target``; yield its port."""
    page = (f'<form id="f" method="post" action="{target}">'
            '<input name="csrf" value="guessed-guessed-guessed-guessed-guessed"></form>'
            '<script>document.getElementById("f").submit()</script>').encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
