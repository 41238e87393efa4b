"""Access through a manifest: with ``KOS-SOPInstanceUID`` a consumer reaches what that
published, non-withdrawn KOS references, and nothing else. End to end with a real
publication; the refusals that need none, in-process. On an SQLite and a PostgreSQL index."""

from collections.abc import Callable
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from gateway.security.audit import read_events
from storage.database import Database
from storage.index import Index
from storage.outbox import Outbox, State
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import national_ct_slice

DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def _published(database_url: str, count: int) -> list[str]:
    """KOS UIDs of the acknowledged publications, once there are ``count``."""
    index = Index(Database(database_url))
    try:
        outbox = Outbox(index)
        wait_for(lambda: sum(r.state is State.ACKNOWLEDGED for r in outbox.listing()) >= count,
                 30, f"{count} acknowledged publication(s)")
        return [r.kos_uid for r in outbox.listing() if r.state is State.ACKNOWLEDGED]
    finally:
        index.close()


def _trail(data_dir: Path, detail: str) -> list[dict]:
    """EventIdentification of the audit messages whose description contains ``detail``."""
    return [m["EventIdentification"] for m in read_events(data_dir / "audit")
            if detail in m["EventIdentification"].get("EventOutcomeDescription", "")]


def test_a_manifest_opens_what_it_references_and_nothing_else(tmp_path: Path,
                                                               database_url: str) -> None:
    study, series, other_study = generate_uid(), generate_uid(), generate_uid()
    late = generate_uid()
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, stable_seconds="3600",
            order_issuer_oid="1.2.250.1.999.1.1.3", database_url=database_url) as server:
        first = national_ct_slice(study, series, 1, 1)
        for ds in (first, national_ct_slice(other_study, generate_uid(), 1, 1)):
            assert send(server.dicom_port, ds)[0] == 0
        assert server.cli("publish", study).returncode == 0
        [kos] = _published(database_url, 1)
        assert send(server.dicom_port, national_ct_slice(study, series, 1, 2, sop_uid=late)
                    )[0] == 0  # arrives after the publication: not in the manifest

        def get(path: str, kos_uid: str | None = kos, **headers: str) -> int:
            scoped = {"KOS-SOPInstanceUID": kos_uid} if kos_uid else {}
            return httpx.get(server.base_url + path, headers={**DICOM, **scoped, **headers}
                             ).status_code

        base = f"/dicom-web/studies/{study}"
        assert get(f"{base}/series/{series}") == 200
        assert get(f"{base}/metadata", Accept="application/dicom+json") == 200
        assert get(f"{base}/series/{series}/instances/{late}") == 403
        assert get(f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
                   f"&objectUID={late}&contentType=application/dicom") == 403
        assert get(f"/dicom-web/studies/{other_study}") == 403
        # (Refusals that need no publication: test_refusals_that_need_no_publication.)
        assert server.metric("passerelle_manifest_access_total", result="denied") == 3
        wait_for(lambda: len(_trail(tmp_path / "data", "via KOS")) >= 5, 10, "the audit")
        assert (_trail(tmp_path / "data", f"GET {base}/series/{series} via KOS {kos} -> 200")
                [0]["EventOutcomeIndicator"]) == "0"

        assert server.cli("unpublish", study).returncode == 0
        _published(database_url, 2)
        assert get(f"{base}/series/{series}") == 403  # withdrawn

        assert server.cli("publish", study).returncode == 0  # published again: a new KOS
        [*_, republished] = _published(database_url, 3)

    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, require_kos_reference="true",
            database_url=database_url) as server:
        url = (f"{server.base_url}/dicom-web/studies/{study}/series/{series}/instances/"
               f"{first.SOPInstanceUID}")
        for headers, status in (({}, 403), ({"KOS-SOPInstanceUID": kos}, 403),
                                ({"KOS-SOPInstanceUID": republished}, 200)):
            response = httpx.get(url, headers={**DICOM, **headers})
            assert response.status_code == status, headers
        assert "header is required" in httpx.get(url, headers=DICOM).text


def test_refusals_that_need_no_publication(make_web: Callable[..., InProcessService],
                                           database_url: str) -> None:
    """A manifest never published here, a UID that is not one, a listing that names no
    study: refused without any publication; no header at all, when none is required: served.
    """
    web = make_web(database_url=database_url)
    study, series, late = generate_uid(), generate_uid(), generate_uid()
    assert web.ingest(national_ct_slice(study, series, 1, 1, sop_uid=late)).accepted
    denied = web.metric("passerelle_manifest_access_total", result="denied")

    def get(path: str, kos_uid: str | None, **headers: str) -> httpx.Response:
        scoped = {"KOS-SOPInstanceUID": kos_uid} if kos_uid else {}
        return web.get(path, headers={**DICOM, **scoped, **headers})

    base = f"/dicom-web/studies/{study}"
    listing = get("/dicom-web/studies", generate_uid(), Accept="application/dicom+json")
    assert listing.status_code == 403
    assert "must name its study" in listing.text
    assert get(f"{base}/series/{series}", "1.2.3.4").status_code == 403
    assert get(f"{base}/series/{series}", "../../etc/passwd").status_code == 403
    assert get(f"{base}/series/{series}/instances/{late}", None).status_code == 200
    assert web.metric("passerelle_manifest_access_total", result="denied") == denied + 3
    web.close()  # drains the audit trail
    assert (_trail(web.data_dir, "via KOS 1.2.3.4 -> 403")[0]["EventOutcomeIndicator"]) == "4"
