"""``passerelle fetch``: through the service running on the data dir (``POST /admin/fetch``
on its control socket: its C-STORE SCP receives what a C-MOVE sends, its worker publishes
what arrives), or, when none runs, in this process for peers retrieved by C-GET (published
once the service starts). A progress bar per study on a terminal, a line per study
otherwise, then the summary on stdout; what a PACS answered is printed with its control
characters escaped (a terminal would obey its escape sequences)."""

import json
import sys
from typing import IO, Any

import httpx
from tqdm import tqdm

from gateway import control
from gateway.config import Settings
from gateway.dicom.peer import Retrieve
from gateway.logs import escape_controls
from gateway.pacs import PacsConfig
from gateway.pacs.fetch import FetchQuery, FetchRefusedError, find, peers_of, retrieve
from gateway.pacs.restore import Restorer
from storage.store import Store

_HEADERS = ("STUDY UID", "PEER", "PATIENT ID", "ACCESSION", "DATE", "EXPECTED", "RETRIEVED",
            "FAILED", "STORED", "ERROR")


class FetchView:
    """Shows a fetch's events: bars (or lines) on ``err``, the summary on ``out``."""

    def __init__(self, out: IO[str], err: IO[str], bars: bool) -> None:
        self.out, self.err, self.bars = out, err, bars
        self._bars: dict[str, tqdm] = {}
        self.summary: dict[str, Any] | None = None
        self.error = ""

    def show(self, event: dict[str, Any]) -> None:
        """Show one event of ``gateway.pacs.fetch``."""
        kind = event.get("event")
        if kind == "found":
            studies = event["studies"]
            print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} found"
                  + "".join(f"\nwarning: {escape_controls(problem)}"
                            for problem in event["problems"]),
                  file=self.err, flush=True)
        elif kind == "progress" and self.bars:
            bar = self._bars.get(event["study_uid"])
            if bar is None:
                bar = self._bars[event["study_uid"]] = tqdm(
                    total=event["total"], desc=event["study_uid"][-24:], unit="instance",
                    file=self.err, leave=True, dynamic_ncols=True)
            bar.total = max(event["total"], event["done"])
            bar.update(event["done"] - bar.n)
        elif kind == "study":
            bar = self._bars.pop(event["study_uid"], None)
            if bar is not None:
                bar.close()
            if not self.bars or bar is None:
                print(_study_line(event), file=self.err, flush=True)
        elif kind == "summary":
            self.summary = event
            self._print_summary(event)
        elif kind == "error":
            self.error = str(event.get("error", ""))
            print(f"passerelle: {escape_controls(self.error)}", file=self.err)

    def _print_summary(self, summary: dict[str, Any]) -> None:
        rows = [tuple(escape_controls(str(value)) if value is not None else "?" for value in (
            s["study_uid"], s["peer"], s["patient_id"], s["accession_number"], s["study_date"],
            s["expected"], s["completed"], s["failed"], s["stored"], s["error"]))
            for s in summary["studies"]]
        widths = [max(map(len, column)) for column in zip(_HEADERS, *rows, strict=False)]
        for row in (_HEADERS, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
                  file=self.out)
        print(f"{summary['found']} stud{'y' if summary['found'] == 1 else 'ies'} found, "
              f"{summary['retrieved']} instance(s) retrieved, {summary['failed']} failed",
              file=self.out)

    def exit_code(self) -> int:
        """0 when every instance of every study was retrieved, else 1."""
        return 0 if self.summary is not None and self.summary["complete"] else 1


def _study_line(event: dict[str, Any]) -> str:
    line = (f"study {event['study_uid']} from {event['peer']}: {event['completed']} "
            f"retrieved, {event['failed']} failed, {event['stored']} stored")
    return escape_controls(line + (f": {event['error']}" if event["error"] else ""))


def run_fetch(settings: Settings, query: FetchQuery) -> int:
    """``passerelle fetch``: its exit code (2: no PACS configured or a query refused)."""
    if not settings.pacs.peers:
        print("passerelle: no PACS peer is configured (setting pacs, PASSERELLE_PACS): "
              "there is nothing to fetch from", file=sys.stderr)
        return 2
    view = FetchView(sys.stdout, sys.stderr, sys.stderr.isatty())
    try:
        # Reads wait at most one DIMSE response of the peer between two events.
        service = control.client(settings.data_dir, timeout=settings.pacs.pacs_timeout + 30)
    except OSError as exc:
        print(f"passerelle: cannot reach the service on {settings.data_dir}: {exc}",
              file=sys.stderr)
        return 1
    if service is None:
        return _fetch_here(settings, query, view)
    try:
        with service, service.stream("POST", "/admin/fetch", json=query.body()) as response:
            if response.status_code != 200:
                response.read()
                print(f"passerelle: {_error_of(response)}", file=sys.stderr)
                return 2 if response.status_code == 400 else 1
            for line in response.iter_lines():
                if line.strip():
                    view.show(json.loads(line))
    except httpx.HTTPError as exc:
        print(f"passerelle: the service on {settings.data_dir} stopped answering ({exc}): "
              "the fetch may go on there, its log tells", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"passerelle: unexpected answer from the service: {exc}", file=sys.stderr)
        return 1
    return view.exit_code()


def _error_of(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} {response.text.strip()[:200]}"


def _fetch_here(settings: Settings, query: FetchQuery, view: FetchView) -> int:
    """The fetch in this process: no service runs on the data dir."""
    config = PacsConfig.of(settings)
    store = Store(settings.data_dir, settings.ingest.duplicate_policy,
                  settings.ingest.limits(), database_url=settings.database_url)
    try:
        restorer = Restorer(config, store)
        moving = [p.ae_title for p in peers_of(restorer, query) if p.retrieve is Retrieve.MOVE]
        if moving:
            print(f"passerelle: no service runs on {settings.data_dir}, and {', '.join(moving)}"
                  " retrieves by C-MOVE, which sends to the service's C-STORE SCP: start "
                  "`passerelle serve` (or name a peer retrieved by C-GET with --peer)",
                  file=sys.stderr)
            return 1
        retrieve(restorer, find(restorer, query), view.show)
    except FetchRefusedError as exc:
        print(f"passerelle: {exc}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    finally:
        store.close()
    print(f"no service runs on {settings.data_dir}: what was fetched is published once "
          "`passerelle serve` starts", file=sys.stderr)
    return view.exit_code()
