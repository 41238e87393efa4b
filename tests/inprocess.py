"""The HTTP side of ``passerelle serve`` inside the test process: no subprocess, no socket.

``InProcessService`` builds the application exactly as an HTTP worker of ``passerelle serve``
does (the same ``Settings``, ``Store``, ``AuditTrail``, ``http_services`` and ``create_app``)
and answers requests through ``httpx.ASGITransport``. The tests stay synchronous: an anyio
blocking portal runs the event loop in a thread of its own, and each request is a call into
it, so requests from several test threads at once are concurrent in the application as they
would be in uvicorn.

What this layer does not have, by construction: the DICOM listener, uvicorn's HTTP parser and
connection guards (head deadline, per-client connections, ``Transfer-Encoding: chunked``),
TLS, the publisher. Tests of those start a real process (``tests.processes``).

Metrics live in the global prometheus registry of the test process, shared by every
in-process service of the session: tests compare a counter before and after, never with an
absolute value.
"""

import functools
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from gateway.config import Settings
from gateway.security.audit import AuditTrail
from gateway.service import http_services
from gateway.web.app import create_app
from storage.part10 import dataset_bytes, file_preamble_and_meta, with_preamble
from storage.store import IngestResult, Store
from storage.study_accesses import StudyAccesses
from tests.synthetic import part10

# Where the test client sends requests, and the public URL of an in-process service unless a
# test gives another: no such host exists, so nothing can reach a real server by mistake.
BASE_URL = "http://passerelle.test"


def received(item: Dataset | Path, calling: str = "TESTSCU") -> bytes:
    """The bytes the C-STORE SCP would store for ``item`` sent by ``calling``: a new file
    meta naming the sender (gateway.dicom.scp) before the data set as encoded (a Path is
    taken as it is on disk, as tests.scu sends it)."""
    if isinstance(item, Path):
        meta = read_file_meta_info(item)
        raw = with_preamble(item.read_bytes())
        assert raw is not None, f"{item} is not a Part 10 file"
    else:
        meta = item.file_meta
        raw = part10(item)
    return file_preamble_and_meta(meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID,
                                  meta.TransferSyntaxUID, calling) + bytes(dataset_bytes(raw))


class InProcessService:
    """``passerelle serve``'s HTTP application on ``data_dir``, reached without a socket.

    ``settings`` are flat setting names, as ``PasserelleProcess`` takes them.
    """

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        settings.setdefault("public_url", BASE_URL)
        # Requests go to BASE_URL's host whatever public_url says.
        settings.setdefault("http_allowed_hosts", urlsplit(BASE_URL).hostname)
        self.settings = Settings(data_dir=data_dir, **settings)
        self.data_dir = self.settings.data_dir
        self.base_url = BASE_URL  # what requests go to; public_url may add a path prefix
        self.ae_title = self.settings.dicom.ae_title
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # As gateway.service.run_http_role composes them (minus the other processes and syslog).
        self.store = Store(self.data_dir, self.settings.ingest.duplicate_policy,
                           database_url=self.settings.database_url)
        self.audit = AuditTrail(self.data_dir / "audit", self.settings.dicom.ae_title,
                                self.store.index.patient_id_of, self.settings.audit,
                                count_accesses=StudyAccesses(self.store.index).add)
        self.services = http_services(self.settings, self.store, self.audit)
        self.app = create_app(self.services, self.settings.http, self.settings.auth)
        self._portal_context: AbstractContextManager[BlockingPortal] | None = \
            start_blocking_portal("asyncio")
        self._portal = self._portal_context.__enter__()
        # raise_app_exceptions=False: an unhandled error is a 500, as uvicorn answers it.
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(self.app, raise_app_exceptions=False),
            base_url=self.base_url, timeout=60)

    def __enter__(self) -> "InProcessService":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and the event loop, drain the audit trail, release the index."""
        if self._portal_context is None:
            return
        try:
            self._portal.call(self._client.aclose)
        finally:
            self._portal_context.__exit__(None, None, None)
            self._portal_context = None
            self.audit.close()
            self.store.close()

    # --- content ------------------------------------------------------------------------

    def ingest(self, item: Dataset | Path, calling: str = "TESTSCU") -> IngestResult:
        """Store ``item`` as a C-STORE from ``calling`` would (same bytes, same ingest)."""
        return self.store.ingest(received(item, calling), source=calling)

    def ingest_all(self, items: Iterable[Dataset | Path]) -> None:
        """Store every item; fail on the first that is not accepted."""
        for item in items:
            result = self.ingest(item)
            assert result.accepted, (item if isinstance(item, Path) else
                                     item.SOPInstanceUID, result.message)

    # --- HTTP ---------------------------------------------------------------------------

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, answered in full (``url``: a path, or an absolute URL on
        ``base_url``)."""
        return self._portal.call(functools.partial(self._client.request, method, url,
                                                   **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("OPTIONS", url, **kwargs)

    def raw(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, bytes]:
        """A response and its body as sent, before any Content-Encoding is undone."""

        async def read() -> tuple[httpx.Response, bytes]:
            async with self._client.stream(method, url, **kwargs) as response:
                return response, b"".join([chunk async for chunk in response.aiter_raw()])

        return self._portal.call(read)

    def metric(self, name: str, **labels: str) -> float:
        """Current value of a Prometheus sample of ``/metrics`` (0 when absent); global to
        the test process, see the module docstring."""
        text = self.get("/metrics").text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{name}(?:{{{re.escape(wanted)}}})? (\S+)$" if labels else rf"^{name} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0
