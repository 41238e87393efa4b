"""The ``passerelle`` command: serve, import, studies, outbox, publish, unpublish,
confidentiality, audit, fetch, purge, retention, registry, install-viewer."""

import argparse
import json
import logging
import os
import shutil
import ssl
import sys
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from gateway.config import ENV_PREFIX, FLAT_NAMES, Settings, describe, load_settings
from gateway.importer import import_paths
from gateway.logs import EscapingFormatter
from gateway.publication.confidentiality import (
    CONFIDENTIALITY_CODES,
    MASKING_CODES,
    Confidentiality,
)
from gateway.run_dir import run_dir_of
from gateway.web.viewer.install import ViewerPackageError, install_viewer, verify_integrity
from storage.database import DatabaseUnavailableError
from storage.numbers import INT64_MAX, NumberError, parse_int
from storage.outbox import UNFINISHED, Action, NotFailedError, Outbox, Publication
from storage.recovery import DataDirBusyError, ServiceLock, service_name
from storage.schema import NewerSchemaError
from storage.store import Store
from storage.summaries import study_summaries


def configure_logging(level: str, with_process: bool = False) -> None:
    """Log records at ``level`` and above to stderr, one line each; ``with_process``: each
    names its process (role and pid), as the processes of ``passerelle serve`` do."""
    # One line per record whatever a peer sent: control characters escaped (gateway.logs).
    handler = logging.StreamHandler(sys.stderr)
    process = "%(processName)s[%(process)d] " if with_process else ""
    handler.setFormatter(EscapingFormatter(
        f"%(asctime)s %(levelname)s {process}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom logs every PDU at INFO; its warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # httpx logs every request at INFO; a command reports the outcome of its own.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    # Every process of the service counts its metrics in files of one directory
    # (prometheus_client's multiprocess mode, read when prometheus_client is first
    # imported: before the supervisor, whose children inherit it; gateway.metrics).
    service = service_name()
    run_dir = run_dir_of(settings, service)
    try:
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logging.getLogger("passerelle").error("cannot serve: %s", exc)
        return 1
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "metrics")
    from gateway.supervisor import ChildFailedError, serve

    try:
        serve(settings, service, run_dir)
    except (DataDirBusyError, ChildFailedError, OSError, ValueError) as exc:
        logging.getLogger("passerelle").error("cannot serve: %s", exc)
        return 1
    finally:
        # A replica's own, of no use once its processes are gone (or never started).
        if settings.is_replica():
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.service import audit_trail, open_store  # (imports the metrics: _cmd_serve)

    # Creates a missing data dir: importing an archive into a new data dir, then serving
    # it, is a legitimate first step.
    store = open_store(settings)
    audit = audit_trail(settings, store)  # IOCM rejection notes imported are audited
    try:
        summary = import_paths(store, args.paths, jobs=args.jobs,
                               progress=not args.quiet and sys.stderr.isatty())
    finally:
        audit.close()
        store.close()
    print(summary.report())
    return 1 if summary.rejected else 0


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in (headers, *rows))


def _cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.data_dir, settings.ingest.duplicate_policy,
                  database_url=settings.database_url)
    try:
        studies = study_summaries(store.index)
    finally:
        store.close()
    if args.json:
        print(json.dumps([asdict(s) for s in studies], ensure_ascii=False, indent=2))
    elif studies:
        print(_table(("PATIENT ID", "PATIENT NAME", "DATE", "ACCESSION", "MODALITIES", "SERIES",
                      "INSTANCES", "STUDY UID"),
                     [(s.patient_id, s.patient_name, s.study_date, s.accession_number,
                       ",".join(s.modalities), str(s.series_count), str(s.instance_count),
                       s.study_uid) for s in studies]))
    else:
        print("no study stored")
    return 0


def _cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.data_dir, settings.ingest.duplicate_policy,
                  database_url=settings.database_url)
    try:
        outbox = Outbox(store.index)
        rows = outbox.listing() if args.all else outbox.listing(
            UNFINISHED)
    finally:
        store.close()
    if args.json:
        print(json.dumps([asdict(row) for row in rows], ensure_ascii=False, indent=2))
    elif rows:
        print(_table(("ID", "STATE", "ACTION", "ATTEMPTS", "STUDY UID", "DOCUMENT", "LAST ERROR"),
                     [(str(r.id), r.state, r.action, str(r.attempts), r.study_uid,
                       r.document_id, r.last_error) for r in rows]))
    else:
        print("outbox empty")
    return 0


def _through_service(settings: Settings, path: str, body: dict[str, Any] | None,
                     here: Callable[[Outbox], Publication], done: Callable[[int], str]) -> int:
    """Ask the service running on the data dir to queue something (``POST path``), or, when
    none answers, queue it here with ``here``; then say what will become of it (``done``
    says what was queued, given the publication id)."""
    from gateway import control  # the server side pulls in uvicorn: only for these commands

    try:
        service = control.client(settings.data_dir)
    except OSError as exc:
        print(f"passerelle: cannot reach the service on {settings.data_dir}: {exc}",
              file=sys.stderr)
        return 1
    if service is None:
        return _queue_here(settings, here, done)
    try:
        with service:
            response = service.post(path, json=body)
    except httpx.HTTPError as exc:
        print(f"passerelle: the service on {settings.data_dir} did not answer ({exc}): "
              "whether it was queued, `passerelle outbox` tells", file=sys.stderr)
        return 1
    try:
        answer = response.json()
        if response.status_code != 202:
            print(f"passerelle: {answer['error']}", file=sys.stderr)
            return 1
        queued, will_send, registry = (answer["publication"]["id"], answer["will_send"],
                                       answer["registry"])
    except (ValueError, KeyError, TypeError):
        first_line = response.text.strip().splitlines()[0] if response.text.strip() else ""
        print(f"passerelle: unexpected answer from the service on {settings.data_dir}: "
              f"HTTP {response.status_code} {first_line}", file=sys.stderr)
        return 1
    print(done(queued) + (
        f": the running service sends it to {registry}" if will_send else
        ": the running service has no registry_url: it stays queued until one is configured"))
    return 0


def _queue_here(settings: Settings, here: Callable[[Outbox], Publication],
                done: Callable[[int], str]) -> int:
    """Queue in the data dir itself: no service answers on its control socket."""
    store = Store(settings.data_dir, settings.ingest.duplicate_policy,
                  database_url=settings.database_url)
    try:
        row = here(Outbox(store.index))
    except (LookupError, NotFailedError) as exc:
        print(f"passerelle: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if ServiceLock.is_held(settings.data_dir):
        # Its publisher reads the outbox on every pass: the row goes out, but what that
        # service is configured to do cannot be asked.
        print(done(row.id) + f": a service holds {settings.data_dir} but its control socket "
              "does not answer: queued in its index, sent on its next pass if it has a "
              "registry_url (`passerelle outbox` tells)")
        return 0
    registry = settings.publication.registry_url
    print(done(row.id) + f": no service is running on {settings.data_dir}: "
          "queued, sent when `passerelle serve` starts " +
          (f"(this configuration sends to {registry})" if registry else
           "(this configuration has no registry_url: it would stay queued)"))
    return 0


def _cmd_queue(settings: Settings, args: argparse.Namespace) -> int:
    """publish / unpublish / confidentiality: a row in the outbox, sent by the service."""
    action = Action(args.command)
    payload, body = "", None
    if action is Action.CONFIDENTIALITY:
        try:
            payload = Confidentiality(args.level, tuple(args.mask)).payload()
        except ValueError as exc:
            print(f"passerelle: {exc}", file=sys.stderr)
            return 2
        body = {"level": args.level, "masking": args.mask}
    return _through_service(
        settings, f"/admin/studies/{quote(args.study_uid, safe='')}/{action}", body,
        lambda outbox: outbox.queue(args.study_uid, action, payload),
        lambda pk: f"{action} of study {args.study_uid} queued as publication {pk}")


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    """outbox retry: a failed publication back in the queue."""
    return _through_service(settings, f"/admin/outbox/{args.id}/retry", None,
                            lambda outbox: outbox.retry(args.id),
                            lambda pk: f"publication {pk} queued again")


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """Who did what with a study (or everything), from the audit trail."""
    from gateway.security.audit import read_events  # (imports the metrics: see _cmd_serve)

    rows = []
    for message in read_events(settings.data_dir / "audit"):
        objects = message.get("ParticipantObjectIdentification", [])
        study = next((o["ParticipantObjectID"] for o in objects
                      if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"), "")
        if args.study and study != args.study:
            continue
        event = message["EventIdentification"]
        requestor = message["ActiveParticipant"][0]
        rows.append(message if args.json else (
            event["EventDateTime"], event["EventID"]["originalText"], requestor["UserID"],
            requestor.get("NetworkAccessPointID", ""),
            {"0": "success", "4": "refused", "8": "failed"}.get(
                event["EventOutcomeIndicator"], event["EventOutcomeIndicator"]),
            study, event.get("EventOutcomeDescription", "")))
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif rows:
        print(_table(("TIME (UTC)", "EVENT", "WHO", "FROM", "OUTCOME", "STUDY", "DETAIL"),
                     rows))  # type: ignore[arg-type]
    else:
        print("no audit event" + (f" for study {args.study}" if args.study else ""))
    return 0


def _cmd_fetch(settings: Settings, args: argparse.Namespace) -> int:
    """Retrieve studies from the PACS peers into the gateway (gateway.pacs.fetch_cli)."""
    # (imports the metrics: see _cmd_serve)
    from gateway.pacs.fetch import FetchQuery
    from gateway.pacs.fetch_cli import run_fetch

    try:
        query = FetchQuery.parse({"study": args.study, "accession": args.accession,
                                  "patient": args.patient, "since": args.since,
                                  "peer": args.peer})
    except ValueError as exc:
        print(f"passerelle: {exc}", file=sys.stderr)
        return 2
    return run_fetch(settings, query)


# --- Retention of local copies (gateway.pacs.retention): purge, retention ---------------

# How long a command waits for the service's answer: a pass asks the PACS about each study
# the policy wants gone, pacs_timeout at most per message.
_RETENTION_WAIT_SECONDS = 3600


def _retention_answer(settings: Settings, path: str,
                      here: Callable[[Any], Any]) -> tuple[int, dict[str, Any]] | None:
    """(HTTP status, JSON answer) of ``POST path`` to the service running on the data dir,
    as the admin API answers (gateway.web.admin_retention), or, when none answers, of
    ``here(retention)`` run in this process over the data dir; None, the problem printed,
    when the service cannot be asked. (The imports pull in the metrics: see _cmd_serve.)"""
    from gateway import control
    from gateway.service import standalone_retention

    try:
        service = control.client(settings.data_dir, timeout=_RETENTION_WAIT_SECONDS)
    except OSError as exc:
        print(f"passerelle: cannot reach the service on {settings.data_dir}: {exc}",
              file=sys.stderr)
        return None
    if service is None:
        with standalone_retention(settings) as retention:
            try:
                found = here(retention)
            except LookupError as exc:
                return 404, {"error": str(exc)}
        if isinstance(found, list):
            return 200, {"decisions": [asdict(decision) for decision in found]}
        return (409 if found.action == "keep" else 200), {"decision": asdict(found)}
    try:
        with service:
            response = service.post(path)
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except httpx.HTTPError as exc:
        print(f"passerelle: the service on {settings.data_dir} did not answer ({exc})",
              file=sys.stderr)
        return None
    except ValueError:
        print(f"passerelle: unexpected answer from the service on {settings.data_dir}: "
              f"HTTP {response.status_code}", file=sys.stderr)
        return None
    return response.status_code, answer


def _size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def _cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Remove one study's local copy, under the guarantee that a PACS holds all of it."""
    from gateway.web.admin_retention import LOCAL_OPERATOR

    study_uid = args.study
    got = _retention_answer(settings, f"/admin/studies/{quote(study_uid, safe='')}/purge",
                            lambda retention: retention.purge(study_uid, LOCAL_OPERATOR))
    if got is None:
        return 1
    status, answer = got
    decision = answer.get("decision")
    if status != 200 or not isinstance(decision, dict):
        reason = decision.get("reason") if isinstance(decision, dict) else None
        print(f"passerelle: local copy of study {study_uid} kept: {reason}" if reason else
              f"passerelle: {answer.get('error', f'HTTP {status}')}", file=sys.stderr)
        return 1
    if decision["action"] == "gone":
        print(f"study {study_uid}: {decision['reason']}")
    else:
        print(f"local copy of study {study_uid} removed: {decision['instances']} instances,"
              f" {_size_text(decision['bytes'])} freed; held by {decision['held_by']}")
    return 0


def _cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    """One pass of the retention policy, or (--dry-run) what it would do."""
    from gateway.web.admin_retention import LOCAL_OPERATOR

    dry_run = bool(args.dry_run)
    got = _retention_answer(settings, "/admin/retention" + ("?dry_run=true" if dry_run else ""),
                            lambda retention: retention.run(dry_run, LOCAL_OPERATOR))
    if got is None:
        return 1
    status, answer = got
    decisions = answer.get("decisions")
    if status != 200 or not isinstance(decisions, list):
        print(f"passerelle: {answer.get('error', f'HTTP {status}')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(decisions, ensure_ascii=False, indent=2))
        return 0
    if not decisions:
        print("no local copy of any study here")
        return 0
    print(_table(("ACTION", "STUDY UID", "INSTANCES", "SIZE", "LAST READ (UTC)", "WHY"),
                 [(d["action"], d["study_uid"], str(d["instances"]), _size_text(d["bytes"]),
                   _utc(d["last_access"]), d["reason"]) for d in decisions]))
    going = [d for d in decisions if d["action"] in ("remove", "removed")]
    freed = _size_text(sum(d["bytes"] for d in going))
    print(f"{'dry run: ' if dry_run else ''}{len(going)} of {len(decisions)} local copies"
          f" {'would go' if dry_run else 'removed'} ({freed}), {len(decisions) - len(going)}"
          " kept")
    return 0


def _utc(at: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M")


def _cmd_install_viewer(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.integrity:
            verify_integrity(args.tarball, args.integrity)
        version = install_viewer(args.tarball, settings.http.viewer_dir)
    except (ViewerPackageError, OSError) as exc:
        print(f"passerelle: the viewer was not installed: {exc}", file=sys.stderr)
        return 1
    print(f"OHIF {version} installed in {settings.http.viewer_dir}, served at /viewer/")
    return 0


def _cmd_registry(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.registry.app import create_registry_app

    tls = {}
    if args.tls_cert:
        tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
        if args.tls_client_ca:
            tls |= {"ssl_ca_certs": args.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    uvicorn.run(create_registry_app(args.data), host=args.host, port=args.port,
                log_config=None, access_log=False, server_header=False, **tls)
    return 0


def _publication_id(text: str) -> int:
    """An outbox row id, read as the admin API reads it (a usage error otherwise)."""
    try:
        return parse_int(text, "publication id", 1, INT64_MAX)
    except NumberError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setting(name: str) -> str:
    """``name (PASSERELLE_NAME)``; KeyError when config has no such setting."""
    if name not in FLAT_NAMES and name not in Settings.model_fields:
        raise KeyError(f"no setting {name!r}")
    return f"{name} ({ENV_PREFIX}{name.upper()})"


def _settings_help(reads: tuple[str, ...]) -> str:
    """The settings in ``reads``, a section standing for all of its own."""
    lines = ["settings it reads (config file key, environment variable):"]
    for name in reads:
        if name not in Settings.sections:
            lines.append(f"  {_setting(name)}")
            continue
        line = f"  [{name}]"
        for flat in (flat for flat, (section, _) in FLAT_NAMES.items() if section == name):
            entry = f" {_setting(flat)},"
            if len(line) + len(entry) > 92:
                lines.append(line)
                line = "   "
            line += entry
        lines.append(line.rstrip(","))
    return "\n".join(lines)


_SOURCES = f"""\
settings come from, each overriding the one before: the defaults; the config file (TOML),
named by --config FILE (before or after the command) or {ENV_PREFIX}CONFIG, none by default;
the environment variables {ENV_PREFIX}<NAME>. In the file, data_dir and log_level are top-level
keys and the others go in their component's section:
{textwrap.fill(", ".join(f"[{name}]" for name in Settings.sections), 92, initial_indent="  ",
               subsequent_indent="  ")};
a top-level key may also be a setting's flat name, its environment name without
{ENV_PREFIX} (dicom_port = 104 is [dicom] port = 104, {ENV_PREFIX}DICOM_PORT=104).
`passerelle COMMAND --help` lists the settings a command reads."""

_THROUGH_SERVICE = """\
When a `passerelle serve` runs on the data dir, this goes through it, over its control socket
<data_dir>/control.sock: the service queues it and sends it as its own settings say. When none
runs, this command queues it in the data dir, and the service sends it once started; the
registry_url read here only tells where that would be."""


_RETENTION_NOTES = """\
A local copy goes only when one PACS peer answers C-FIND with every instance of the study
(the index stays: the study is still published, retrieved again from that PACS on demand);
never without a PACS peer, while the study is still receiving, or while a publication of it
is not acknowledged. Exits 1 when a purge is refused, saying why. When a `passerelle serve`
runs on the data dir, this goes through it, over its control socket (its settings apply);
when none runs, this command does it over the data dir with the settings read here."""


def _version() -> str:
    try:
        return f"passerelle {version('passerelle')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "passerelle (not installed: version unknown)"


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command; after it, it wins.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML settings file (default: $PASSERELLE_CONFIG, else none)")
    parser = argparse.ArgumentParser(prog="passerelle", epilog=_SOURCES,
                                     description="Passerelle, an imaging producer gateway.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML settings file (default: $PASSERELLE_CONFIG, else none)")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")

    def command(name: str, summary: str, handler: Callable[[Settings, argparse.Namespace], int],
                reads: tuple[str, ...], *, existing_data_dir: bool = True, notes: str = "",
                under: Any = commands) -> argparse.ArgumentParser:
        """A subcommand whose help ends with ``notes`` and the settings it reads."""
        sub = under.add_parser(name, help=summary, description=summary, parents=[config],
                               epilog="\n\n".join(filter(None, (notes, _settings_help(reads)))),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler, existing_data_dir=existing_data_dir)
        return sub

    reads_data = ("data_dir", "log_level")
    queued = (*reads_data, "registry_url")
    command("serve", "run the DICOM SCP and the HTTP server", _cmd_serve,
            (*reads_data, *Settings.sections), existing_data_dir=False,
            notes="Creates the data dir on first start. Runs the DICOM receiver, http_workers "
                  "HTTP workers and\nthe background worker (stable studies, publisher) as "
                  "processes, each started again\nif it dies. Serves the admin API, without "
                  "token, to local commands\non <data_dir>/control.sock (mode 0600).")
    importer = command("import", "import Part 10 files or folders", _cmd_import,
                       (*reads_data, "duplicate_policy", "ae_title", "audit"),
                       existing_data_dir=False,
                       notes="Creates the data dir when it does not exist.")
    importer.add_argument("paths", nargs="+", type=Path)
    importer.add_argument("--jobs", type=int, default=4, help="parallel writers (default 4)")
    importer.add_argument("--quiet", action="store_true", help="no progress bar")
    studies = command("studies", "list stored studies", _cmd_studies, reads_data)
    studies.add_argument("--json", action="store_true", help="JSON output for scripts")
    outbox = command("outbox", "publications pending or failed", _cmd_outbox, reads_data)
    outbox.add_argument("--all", action="store_true", help="acknowledged ones too")
    outbox.add_argument("--json", action="store_true", help="JSON output for scripts")
    retry = command("retry", "send a failed publication again", _cmd_retry, queued,
                    notes=_THROUGH_SERVICE,
                    under=outbox.add_subparsers(metavar="COMMAND", title="commands"))
    retry.add_argument("id", type=_publication_id)
    for name, text in (("publish", "publish (or republish) a study's manifest now"),
                       ("unpublish", "withdraw a study's published manifest (status superseded)"),
                       ("confidentiality", "change the confidentiality of a study's manifest")):
        queue = command(name, text, _cmd_queue, queued, notes=_THROUGH_SERVICE)
        queue.add_argument("study_uid")
    queue.add_argument("--level", choices=CONFIDENTIALITY_CODES, default="N",
                       help="N normal, R restricted, V very restricted (default N)")
    queue.add_argument("--mask", action="append", default=[], choices=MASKING_CODES,
                       help="visibility code (TRE_A07), repeatable")
    audit = command("audit", "who accessed, sent or published what", _cmd_audit, reads_data)
    audit.add_argument("--study", help="only the events of this Study Instance UID")
    audit.add_argument("--json", action="store_true", help="the audit messages, as JSON")
    fetch = command("fetch", "retrieve studies from the PACS peers into the gateway",
                    _cmd_fetch, (*reads_data, "pacs", "ae_title"),
                    notes="C-FIND on the PACS peers (or the one --peer names), then C-MOVE to "
                          "our AE title\nor C-GET of each study found (at most 100); they "
                          "are ingested and published\nas pushed studies are. Goes through "
                          "the service running on the data dir (its\ncontrol socket); when "
                          "none runs, fetches here from peers retrieved by C-GET.\nExit "
                          "code 0 when every instance was retrieved, 1 otherwise, 2 for a "
                          "query\nrefused or no PACS configured.")
    wanted = fetch.add_mutually_exclusive_group(required=True)
    wanted.add_argument("--study", metavar="UID", help="the study of this Study Instance UID")
    wanted.add_argument("--accession", metavar="NUMBER", help="the studies of this "
                        "Accession Number")
    wanted.add_argument("--patient", metavar="ID", help="the studies of this Patient ID")
    fetch.add_argument("--since", metavar="DATE",
                       help="with --patient: studies of this date (YYYY-MM-DD) or later")
    fetch.add_argument("--peer", metavar="AE", help="ask only the PACS peer of this AE title")
    retention_reads = (*reads_data, "pacs", "stable_seconds", "ae_title")
    purge = command("purge", "remove one study's local copy, if a PACS holds all of it",
                    _cmd_purge, retention_reads, notes=_RETENTION_NOTES)
    purge.add_argument("--study", required=True, metavar="UID", help="its Study Instance UID")
    retention = command("retention", "remove the local copies the retention policy lets go",
                        _cmd_retention, retention_reads, notes=_RETENTION_NOTES)
    retention.add_argument("--dry-run", action="store_true",
                           help="only list what would go and what stays, and why")
    retention.add_argument("--json", action="store_true", help="JSON output for scripts")
    viewer = command("install-viewer", "install the OHIF viewer served at /viewer/",
                     _cmd_install_viewer, ("viewer_dir", "log_level"), existing_data_dir=False,
                     notes="TARBALL is the npm package @ohif/app (npm pack @ohif/app@VERSION); "
                           "scripts/setup.sh\nfetches the pinned version and runs this.")
    viewer.add_argument("tarball", type=Path, metavar="TARBALL")
    viewer.add_argument("--integrity", metavar="SHA512",
                        help="refuse a tarball whose npm integrity (sha512-...) differs")
    registry = command("registry", "run the local MHD document registry", _cmd_registry,
                       ("log_level",), existing_data_dir=False)
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=8090)
    registry.add_argument("--data", type=Path, default=Path("registry-data"),
                          help="folder of its SQLite store (default ./registry-data)")
    registry.add_argument("--tls-cert", type=Path, help="server certificate (PEM): HTTPS")
    registry.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    registry.add_argument("--tls-client-ca", type=Path,
                          help="CA (PEM) of the client certificates required (mutual TLS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``passerelle`` console script."""
    # Before anything is created: whatever a command creates (index, WAL, files, cache,
    # audit, sockets, the registry's store) has no world access and no group write.
    os.umask(os.umask(0o027) | 0o027)
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        print(f"passerelle: invalid configuration:\n{describe(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"passerelle: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.existing_data_dir and not settings.data_dir.is_dir():
        print(f"passerelle: the data dir {settings.data_dir.absolute()} does not exist "
              f"(setting data_dir, {ENV_PREFIX}DATA_DIR): point it at the service's data dir; "
              "`passerelle serve` creates it on first start", file=sys.stderr)
        return 1
    try:
        code = args.handler(settings, args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
    except (DatabaseUnavailableError, NewerSchemaError) as exc:
        print(f"passerelle: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader is gone (`passerelle studies | head -1`). Python's recipe: stdout to
        # devnull, so that the flush at exit does not fail again, and a non-zero exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
