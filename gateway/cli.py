"""The ``passerelle`` command: serve, import, studies, outbox, publish, unpublish,
confidentiality, audit, registry."""

import argparse
import json
import logging
import ssl
import sys
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from gateway.config import Settings, describe, load_settings
from gateway.importer import import_paths
from gateway.publication.mhd import CONFIDENTIALITY_CODES, MASKING_CODES, Confidentiality
from gateway.security.audit import read_events
from storage.outbox import Action, Outbox, State
from storage.recovery import DataDirBusyError
from storage.store import Store


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO; its warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.service import serve

    try:
        serve(settings)
    except (DataDirBusyError, OSError, ValueError) as exc:
        logging.getLogger("passerelle").error("cannot serve: %s", exc)
        return 1
    return 0


def _cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.data_dir, settings.ingest.duplicate_policy)
    try:
        summary = import_paths(store, args.paths, jobs=args.jobs,
                               progress=not args.quiet and sys.stderr.isatty())
    finally:
        store.close()
    print(summary.report())
    return 1 if summary.rejected else 0


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in (headers, *rows))


def _cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.data_dir, settings.ingest.duplicate_policy)
    try:
        studies = store.index.list_studies()
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
    store = Store(settings.data_dir, settings.ingest.duplicate_policy)
    try:
        outbox = Outbox(store.index)
        if args.outbox_command == "retry":
            if not outbox.retry(args.id):
                print(f"publication {args.id} is not failed: nothing to retry", file=sys.stderr)
                return 1
            print(f"publication {args.id} will be sent again")
            return 0
        rows = outbox.listing() if args.all else outbox.listing(
            (State.PENDING, State.SENT, State.FAILED))
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


def _cmd_queue(settings: Settings, args: argparse.Namespace) -> int:
    """publish / unpublish / confidentiality: a row in the outbox, sent by the service."""
    action = Action(args.command)
    payload = ""
    if action is Action.CONFIDENTIALITY:
        try:
            payload = Confidentiality(args.level, tuple(args.mask)).payload()
        except ValueError as exc:
            print(f"passerelle: {exc}", file=sys.stderr)
            return 2
    store = Store(settings.data_dir, settings.ingest.duplicate_policy)
    try:
        row = Outbox(store.index).queue(args.study_uid, action, payload)
    except LookupError as exc:
        print(f"passerelle: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    where = "sent by the running service" if settings.publication.registry_url else \
        "queued: registry_url is not set, nothing is sent until it is"
    print(f"{action} of study {args.study_uid} queued as publication {row.id} ({where})")
    return 0


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """Who did what with a study (or everything), from the audit trail."""
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passerelle", description=__doc__)
    parser.add_argument("--config", type=Path,
                        help="TOML settings file (default: $PASSERELLE_CONFIG, else none)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the DICOM SCP and the HTTP server"
                        ).set_defaults(handler=_cmd_serve)
    importer = commands.add_parser("import", help="import Part 10 files or folders")
    importer.add_argument("paths", nargs="+", type=Path)
    importer.add_argument("--jobs", type=int, default=4, help="parallel writers (default 4)")
    importer.add_argument("--quiet", action="store_true", help="no progress bar")
    importer.set_defaults(handler=_cmd_import)
    studies = commands.add_parser("studies", help="list stored studies")
    studies.add_argument("--json", action="store_true", help="JSON output for scripts")
    studies.set_defaults(handler=_cmd_studies)
    outbox = commands.add_parser("outbox", help="publications pending or failed")
    outbox.add_argument("--all", action="store_true", help="acknowledged ones too")
    outbox.add_argument("--json", action="store_true", help="JSON output for scripts")
    outbox.set_defaults(handler=_cmd_outbox, outbox_command=None)
    retry = outbox.add_subparsers(dest="outbox_command").add_parser(
        "retry", help="send a failed publication again")
    retry.add_argument("id", type=int)
    for name, text in (("publish", "publish (or republish) a study's manifest now"),
                       ("unpublish", "withdraw a study's published manifest (status superseded)"),
                       ("confidentiality", "change the confidentiality of a study's manifest")):
        command = commands.add_parser(name, help=text)
        command.add_argument("study_uid")
        command.set_defaults(handler=_cmd_queue)
    command.add_argument("--level", choices=CONFIDENTIALITY_CODES, default="N",
                         help="N normal, R restricted, V very restricted (default N)")
    command.add_argument("--mask", action="append", default=[], choices=MASKING_CODES,
                         help="visibility code (TRE_A07), repeatable")
    audit = commands.add_parser("audit", help="who accessed, sent or published what")
    audit.add_argument("--study", help="only the events of this Study Instance UID")
    audit.add_argument("--json", action="store_true", help="the audit messages, as JSON")
    audit.set_defaults(handler=_cmd_audit)
    registry = commands.add_parser("registry", help="run the local MHD document registry")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=8090)
    registry.add_argument("--data", type=Path, default=Path("registry-data"),
                          help="folder of its SQLite store (default ./registry-data)")
    registry.add_argument("--tls-cert", type=Path, help="server certificate (PEM): HTTPS")
    registry.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    registry.add_argument("--tls-client-ca", type=Path,
                          help="CA (PEM) of the client certificates required (mutual TLS)")
    registry.set_defaults(handler=_cmd_registry)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``passerelle`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        print(f"passerelle: invalid configuration:\n{describe(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"passerelle: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    return args.handler(settings, args)


if __name__ == "__main__":
    sys.exit(main())
