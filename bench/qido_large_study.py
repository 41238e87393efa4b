"""QIDO-RS on one large study: 1 study x ``--series`` series x ``--instances`` instances.

Reproduces the issue 15 review's measures: small CT slices are built with pydicom, stored
through ``storage.store.Store`` on a fresh data dir, then queried in-process: the HTTP
application is composed as ``gateway.service`` composes it (``Settings``, ``Store``,
``AuditTrail``, ``http_services``, ``create_app``) and reached through
``httpx.ASGITransport``, without a socket, the DICOM side or the publisher. The KOS-scope
rows scope each request by ``KOS-SOPInstanceUID``: the study's manifest is built, written
where the publisher writes it and recorded as acknowledged in the outbox, as if the
registry had accepted it (nothing is sent anywhere). The last two rows call
``Index.search`` (the default page of 1 000 instances) and ``Index.count`` (the Warning's
total) directly, within the manifest's instances. Each row is the median of ``--runs``.

It also runs against another checkout (its ``gateway``, ``storage`` and ``tests.synthetic``):
``PYTHONPATH=<checkout> python bench/qido_large_study.py`` (the checkout on PYTHONPATH comes
before this repository).

Usage: python bench/qido_large_study.py [--series 10] [--instances 1000] [--runs 3] [--size 4]
                                         [--quick]
"""

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # after PYTHONPATH: a checkout given there is the one measured

import httpx  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

import gateway  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.publication.kos import RetrieveOrigin, build_manifest  # noqa: E402
from gateway.security.audit import AuditTrail  # noqa: E402
from gateway.service import http_services  # noqa: E402
from gateway.web.app import create_app  # noqa: E402
from gateway.web.dicomweb.qido import parse_query  # noqa: E402
from storage.outbox import Action, Outbox  # noqa: E402
from storage.search import Level  # noqa: E402
from storage.store import Store  # noqa: E402
from storage.study_contents import load_study_contents  # noqa: E402
from tests.synthetic import ct_slice, part10  # noqa: E402

BASE_URL = "http://passerelle.bench"  # no such host: nothing leaves the process
JSON = {"Accept": "application/dicom+json"}
SOURCE = "BENCHSCU"


def review_slice(study_uid: str, series_uid: str, series_number: int, instance_number: int,
                 size: int) -> Dataset:
    """One small CT slice with the attributes of the review's data set (a request attributes
    item, a timezone offset, performed procedure step date and time)."""
    request = Dataset()
    request.ScheduledProcedureStepID = "SPS0"
    request.RequestedProcedureID = "RP0"
    return ct_slice(study_uid, series_uid, series_number, instance_number, size=size,
                    patient_id="P0", accession="A0", TimezoneOffsetFromUTC="+0100",
                    PerformedProcedureStepStartDate="20260110",
                    PerformedProcedureStepStartTime="101000",
                    RequestAttributesSequence=[request])


def build_study(store: Store, series: int, instances: int, size: int) -> str:
    """Store one study of ``series`` x ``instances`` slices; its Study Instance UID."""
    study_uid = generate_uid()
    for series_number in range(1, series + 1):
        series_uid = generate_uid()
        for number in range(1, instances + 1):
            result = store.ingest(part10(review_slice(study_uid, series_uid, series_number,
                                                  number, size)), source=SOURCE)
            if not result.accepted:
                raise RuntimeError(f"instance refused: {result.message}")
    return study_uid


def acknowledge_manifest(store: Store, outbox: Outbox, study_uid: str
                         ) -> tuple[str, frozenset[str]]:
    """Record the study's manifest as the publisher does once the registry acknowledged it
    (manifest file, outbox row acknowledged with its KOS UID); its UID and instances."""
    contents = load_study_contents(store.index, study_uid)
    if contents is None:
        raise RuntimeError(f"study {study_uid} not indexed")
    manifest = build_manifest(contents, RetrieveOrigin(BASE_URL, "1.2.3.4"))
    store.blobs.put(store.blobs.manifest_path(study_uid, manifest.sop_uid), [manifest.data])
    row = outbox.queue(study_uid, Action.PUBLISH)
    outbox.mark_sent(row, manifest.sop_uid)
    outbox.acknowledge(row, "DocumentReference/1", "{}", kos_uid=manifest.sop_uid)
    sops = frozenset(sop for series in contents.series for _, sop in series.instances)
    return manifest.sop_uid, sops


async def median_ms(run: Callable[[], Awaitable[object]], runs: int) -> float:
    """Median wall time of ``runs`` awaits of ``run()``, in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fmt(ms: float) -> str:
    """Milliseconds as the README writes them."""
    return f"{thousands(round(ms))} ms" if ms >= 100 else f"{ms:.1f} ms"


def thousands(number: int) -> str:
    """An integer with spaces between its groups of three digits, as the README writes it."""
    return f"{number:,}".replace(",", " ")


async def measure(data_dir: Path, args: argparse.Namespace) -> list[list[str]]:
    """Build the data set in ``data_dir`` and time every row; the table's rows."""
    settings = Settings(data_dir=data_dir, public_url=BASE_URL)
    store = Store(settings.data_dir, settings.ingest.duplicate_policy,
                  database_url=settings.database_url)  # PASSERELLE_DATABASE_URL
    audit = AuditTrail(settings.data_dir / "audit", settings.dicom.ae_title,
                       store.index.patient_id_of, settings.audit)
    try:
        services = http_services(settings, store, audit, dicom_serving=lambda: True)
        app = create_app(services, settings.http, settings.auth)
        start = time.perf_counter()
        study = build_study(store, args.series, args.instances, args.size)
        print(f"ingested {args.series * args.instances} instances in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        kos, within = acknowledge_manifest(store, services.outbox, study)
        scoped = {**JSON, "KOS-SOPInstanceUID": kos}
        total = args.series * args.instances
        rows: list[list[str]] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE_URL,
                                     timeout=600) as client:
            queries = [
                (f"`/series` ({args.series} rows)", "/dicom-web/series", {}, JSON),
                ("`/instances?limit=100`", "/dicom-web/instances", {"limit": "100"}, JSON),
                ("`/instances` (default page of 1 000)", "/dicom-web/instances", {}, JSON),
                ("`/studies/{s}/series`", f"/dicom-web/studies/{study}/series", {}, JSON),
                ("`/studies/{s}/instances?limit=100`", f"/dicom-web/studies/{study}/instances",
                 {"limit": "100"}, JSON),
                (f"KOS scope of {thousands(total)}: `/studies/{{s}}/instances?limit=100`",
                 f"/dicom-web/studies/{study}/instances", {"limit": "100"}, scoped),
                ("KOS scope: `/studies/{s}/series?includefield=all`",
                 f"/dicom-web/studies/{study}/series", {"includefield": "all"}, scoped),
            ]
            for label, path, params, headers in queries:
                answers: list[httpx.Response] = []

                async def get(path: str = path, params: dict[str, str] = params,
                              headers: dict[str, str] = headers,
                              answers: list[httpx.Response] = answers) -> None:
                    response = await client.get(path, params=params, headers=headers)
                    if response.status_code != 200:
                        raise RuntimeError(f"{path}: {response.status_code} {response.text}")
                    answers.append(response)

                ms = await median_ms(get, args.runs)
                print(f"{label}: {len(answers[-1].json())} results", file=sys.stderr)
                rows.append([label, fmt(ms)])

        # The default page of /studies/{s}/instances under the manifest, as QIDO asks it.
        parsed = parse_query([], Level.INSTANCE, {"StudyInstanceUID": study})
        matches, returned, fuzzy, limit, offset = parsed[:5]
        returned = [*returned, "SeriesInstanceUID", "SOPInstanceUID"]

        async def search() -> None:
            store.index.search(Level.INSTANCE, matches, returned, fuzzy, limit, offset, within)

        async def count() -> None:
            store.index.count(Level.INSTANCE, matches, fuzzy, within)

        rows.append([f"KOS scope: `Index.search`, default page of {thousands(limit)}",
                     fmt(await median_ms(search, args.runs))])
        rows.append(["KOS scope: `Index.count` for the Warning",
                     fmt(await median_ms(count, args.runs))])
        return rows
    finally:
        audit.close()
        store.close()


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--instances", type=int, default=1000, help="per series")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=4, help="rows and columns of a slice")
    parser.add_argument("--quick", action="store_true",
                        help="smoke size: 2 series x 50 instances, 1 run")
    args = parser.parse_args()
    if args.quick:
        args.series, args.instances, args.runs = 2, 50, 1

    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-qido-"))
    try:
        rows = asyncio.run(measure(work / "data", args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code = Path(gateway.__file__).resolve().parent.parent
    print(f"1 study x {args.series} series x {args.instances} instances, in-process, "
          f"median of {args.runs}, code at {code}:")
    print("| query | time |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
