"""One request model for every access decision (issue 14, findings 11 to 13): the manifest
scope, the audit and the handler read the same parsed request, whatever the method, and a
manifest opens what it references and nothing else, at every level.

The attacks over real sockets against ``passerelle serve`` first (HEAD as uvicorn answers
it, Content-Length included), then the level-by-level rules in-process.
"""

import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway.publication.kos import RetrieveOrigin, build_manifest
from gateway.security.audit import read_events
from storage.outbox import Action
from storage.search import Level
from storage.study_contents import load_study_contents
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.synthetic import ct_slice, national_ct_slice

DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
JSON = {"Accept": "application/dicom+json"}
BIRTH_DATE = "19851203"  # patient B's, what the HEAD oracle recovered
RSS_BOUND = 1 << 30  # far above an idle service: the attacks here are about access, not size


class Studies:
    """Study A, published (its KOS references one instance of one series), with an instance
    and a series stored after the publication; study B of another patient, never
    published."""

    def __init__(self, web: InProcessService) -> None:
        self.a, self.a_series, self.b, self.b_series = (generate_uid() for _ in range(4))
        first = national_ct_slice(self.a, self.a_series, 1, 1)
        other = ct_slice(self.b, self.b_series, 1, 1, size=4, patient_id="PAT002",
                         PatientName="MARTIN^ALICE", PatientBirthDate=BIRTH_DATE)
        web.ingest_all([first, other])
        self.referenced, self.b_instance = first.SOPInstanceUID, other.SOPInstanceUID
        self.kos = publish(web, self.a)
        self.late_series = generate_uid()
        late = national_ct_slice(self.a, self.a_series, 1, 2)
        late_series = national_ct_slice(self.a, self.late_series, 2, 1, Modality="MR")
        web.ingest_all([late, late_series])
        self.late, self.late_in_new_series = late.SOPInstanceUID, late_series.SOPInstanceUID

    def instance_path(self, sop_uid: str | None = None, series: str | None = None) -> str:
        return (f"/dicom-web/studies/{self.a}/series/{series or self.a_series}/instances/"
                f"{sop_uid or self.referenced}")

    def wado_uri(self, *uids: tuple[str, str, str]) -> str:
        query = "&".join(f"studyUID={st}&seriesUID={se}&objectUID={sop}" for st, se, sop in uids)
        return f"/wado?requestType=WADO&contentType=application/dicom&{query}"


def publish(web: InProcessService, study_uid: str) -> str:
    """Publish the study's manifest as the publisher does once the registry acknowledged it
    (manifest file, outbox row acknowledged with its KOS UID); the KOS UID."""
    contents = load_study_contents(web.store.index, study_uid)
    assert contents is not None
    manifest = build_manifest(contents, RetrieveOrigin(web.base_url, "1.2.3.4"))
    web.store.blobs.put(web.store.blobs.manifest_path(study_uid, manifest.sop_uid),
                        [manifest.data])
    outbox = web.services.outbox
    row = outbox.queue(study_uid, Action.PUBLISH)
    outbox.mark_sent(row, manifest.sop_uid)
    outbox.acknowledge(row, "DocumentReference/1", "{}", kos_uid=manifest.sop_uid)
    return manifest.sop_uid


def _events(data_dir: Path, detail: str) -> list[dict]:
    return [m for m in read_events(data_dir / "audit")
            if detail in m["EventIdentification"].get("EventOutcomeDescription", "")]


def _studies_of(message: dict) -> list[str]:
    return [o["ParticipantObjectID"] for o in message.get("ParticipantObjectIdentification", [])
            if o["ParticipantObjectIDTypeCode"].get("csd-code") == "110180"]


def _sops(response: httpx.Response) -> list[str]:
    return [dcmread(BytesIO(body)).SOPInstanceUID for _, body in parts_of(response)]


def _same_answer(get: httpx.Response, head: httpx.Response) -> None:
    """HEAD is GET without the body (RFC 9110 9.3.2): same status, same headers."""
    assert head.status_code == get.status_code
    for name in ("content-type", "content-length"):
        assert head.headers.get(name) == get.headers.get(name), name
    assert head.content == b""


# --- against a running service ------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Studies]:
    """A data dir holding the studies (written in-process, served by a process after)."""
    data_dir = tmp_path_factory.mktemp("access") / "data"
    with InProcessService(data_dir) as web:
        return data_dir, Studies(web)


@pytest.fixture(scope="module")
def served(prepared: tuple[Path, Studies]) -> Iterator[tuple[PasserelleProcess, Studies]]:
    data_dir, studies = prepared
    with PasserelleProcess(data_dir, stable_seconds="3600",
                           require_kos_reference="true") as server:
        yield server, studies


def test_the_attacks_of_findings_11_to_13_over_sockets(
        served: tuple[PasserelleProcess, Studies]) -> None:
    server, studies = served
    client = httpx.Client(base_url=server.base_url, timeout=30)
    scoped = {"KOS-SOPInstanceUID": studies.kos}
    latencies = []

    def health() -> None:
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        latencies.append(time.monotonic() - started)

    # 11: A's UIDs first (what the scope check read), B's last (what the handler served).
    polluted = studies.wado_uri((studies.a, studies.a_series, studies.referenced),
                                (studies.b, studies.b_series, studies.b_instance))
    response = client.get(polluted, headers=scoped)
    assert response.status_code == 400, response.content[:200]
    assert "studyUID" in response.text and "more than once" in response.text
    health()
    assert client.get(studies.wado_uri((studies.a, studies.a_series, studies.referenced)),
                      headers=scoped).status_code == 200

    # 12: HEAD is checked as GET: B through A's manifest ...
    for path in (f"/dicom-web/studies/{studies.b}",
                 f"/dicom-web/studies/{studies.b}/metadata",
                 studies.instance_path(studies.late)):
        get, head = client.get(path, headers={**DICOM, **scoped}), \
            client.head(path, headers={**DICOM, **scoped})
        assert get.status_code == 403, path
        _same_answer(get, head)
    # ... and the birth date oracle: without a manifest (required here), every range the
    # same refusal, the same length.
    answers = set()
    for low, high in (("19800101", "19891231"), ("19900101", "19991231"),
                      ("19851201", "19851203"), ("19851204", "19851231")):
        path = f"/dicom-web/studies?PatientName=MARTIN*&PatientBirthDate={low}-{high}"
        get, head = client.get(path, headers=JSON), client.head(path, headers=JSON)
        _same_answer(get, head)
        answers.add((head.status_code, head.headers.get("content-length")))
    assert len(answers) == 1 and answers.pop()[0] == 403
    health()

    # 13: the study retrieve through A's manifest leaves out what came after it.
    study = client.get(f"/dicom-web/studies/{studies.a}", headers={**DICOM, **scoped})
    assert study.status_code == 200
    assert _sops(study) == [studies.referenced]
    rss = server.largest_rss()
    health()
    print(f"RSS {rss >> 20} MiB; /health latency max {max(latencies) * 1000:.1f} ms "
          f"over {len(latencies)}")
    assert rss < RSS_BOUND
    client.close()
    server.stop()
    [refused] = _events(server.data_dir, f"GET /wado via KOS {studies.kos} -> 400")
    assert _studies_of(refused) == []  # neither A (checked) nor B (would have been served)
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == "4"
    heads = _events(server.data_dir, f"HEAD /dicom-web/studies/{studies.b} via KOS")
    assert [_studies_of(m) for m in heads] == [[studies.b]]


# --- in-process: every level, every method ------------------------------------------------

@pytest.fixture
def scoped_web(make_web: Callable[..., InProcessService]) -> tuple[InProcessService, Studies]:
    web = make_web()
    return web, Studies(web)


def test_a_manifest_scopes_every_level_to_what_it_references(
        scoped_web: tuple[InProcessService, Studies]) -> None:
    web, s = scoped_web
    kos = {"KOS-SOPInstanceUID": s.kos}

    def get(path: str, accept: dict[str, str] = DICOM) -> httpx.Response:
        return web.get(path, headers={**accept, **kos})

    study, series = f"/dicom-web/studies/{s.a}", f"/dicom-web/studies/{s.a}/series/{s.a_series}"
    # Unscoped, everything stored is there (the late instance and series included).
    assert len(_sops(web.get(study, headers=DICOM))) == 3
    # Retrieve, study and series level.
    assert _sops(get(study)) == [s.referenced]
    assert _sops(get(series)) == [s.referenced]
    # Metadata, study and series level.
    for path in (f"{study}/metadata", f"{series}/metadata"):
        items = get(path, JSON).json()
        assert [i["00080018"]["Value"] for i in items] == [[s.referenced]], path
    # QIDO-RS: rows, counts and modalities of the referenced instances only.
    [row] = get(f"{study}/series?includefield=NumberOfStudyRelatedInstances"
                "&includefield=NumberOfStudyRelatedSeries&includefield=ModalitiesInStudy",
                JSON).json()
    assert row["0020000E"]["Value"] == [s.a_series]
    assert row["00201209"]["Value"] == [1]  # NumberOfSeriesRelatedInstances
    assert row["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances
    assert row["00201206"]["Value"] == [1]  # NumberOfStudyRelatedSeries
    assert row["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy: not the late MR series
    assert get(f"{study}/series?ModalitiesInStudy=MR", JSON).json() == []
    for path in (f"{study}/instances", f"{series}/instances"):
        assert [i["00080018"]["Value"] for i in get(path, JSON).json()] == [[s.referenced]]
    assert get(f"{study}/instances?SOPInstanceUID={s.late}", JSON).json() == []
    # (A study-level search names no study, so no manifest opens it; the index confines
    # that level too.)
    assert web.store.index.search(
        Level.STUDY, [], ["StudyInstanceUID", "NumberOfStudyRelatedInstances",
                          "NumberOfStudyRelatedSeries", "ModalitiesInStudy"], False, 10, 0,
        within=frozenset({s.referenced})) == [
            {"StudyInstanceUID": s.a, "NumberOfStudyRelatedInstances": 1,
             "NumberOfStudyRelatedSeries": 1, "ModalitiesInStudy": "CT"}]
    # Instance level: the late instances, whatever the resource, are refused whole.
    late = s.instance_path(s.late)
    for path in (late, f"{late}/metadata", f"{late}/frames/1", f"{late}/rendered",
                 f"{late}/thumbnail", f"{late}/bulkdata/7FE00010",
                 s.instance_path(s.late_in_new_series, s.late_series),
                 f"{study}/series/{s.late_series}", f"{study}/series/{s.late_series}/instances",
                 s.wado_uri((s.a, s.a_series, s.late))):
        assert get(path, {"Accept": "*/*"}).status_code == 403, path
    # Rendered images of a whole study or series: the referenced instance's only.
    for path in (f"{study}/rendered", f"{series}/rendered"):
        unscoped = web.get(path, headers={"Accept": "image/jpeg"})
        scoped = get(path, {"Accept": "image/jpeg"})
        assert scoped.status_code == 200, path
        assert _jpeg_parts(scoped.content) == 1 < _jpeg_parts(unscoped.content), path
    assert get(f"{series}/thumbnail", {"Accept": "image/jpeg"}).status_code == 200
    referenced = s.instance_path()
    for path in (referenced, f"{referenced}/metadata", f"{referenced}/rendered",
                 s.wado_uri((s.a, s.a_series, s.referenced))):
        assert get(path, {"Accept": "*/*"}).status_code == 200, path
    # A store is no read of what the manifest references.
    assert web.post(study, headers={**kos, "Content-Type": 'multipart/related; '
                                   'type="application/dicom"; boundary=x'},
                    content=b"--x--\r\n").status_code == 403


def _jpeg_parts(body: bytes) -> int:
    return body.count(b"\xff\xd8\xff")


def test_head_is_get_for_every_decision(scoped_web: tuple[InProcessService, Studies],
                                        make_web: Callable[..., InProcessService]) -> None:
    web, s = scoped_web
    kos = {"KOS-SOPInstanceUID": s.kos}
    for path, headers in ((f"/dicom-web/studies/{s.b}", {**DICOM, **kos}),
                          (f"/dicom-web/studies/{s.a}/series/{s.late_series}", {**DICOM, **kos}),
                          ("/dicom-web/studies?PatientBirthDate=19800101-19891231", kos),
                          (s.wado_uri((s.a, s.a_series, s.late)), kos)):
        get, head = web.get(path, headers=headers), web.request("HEAD", path, headers=headers)
        assert get.status_code == 403, path
        _same_answer(get, head)
    # Allowed, the same representation: HEAD of the scoped study retrieve, of QIDO.
    ok = web.request("HEAD", f"/dicom-web/studies/{s.a}/instances", headers={**JSON, **kos})
    assert ok.status_code == 200
    assert ok.headers["content-length"] == web.get(f"/dicom-web/studies/{s.a}/instances",
                                                   headers={**JSON, **kos}
                                                   ).headers["content-length"]
    strict = make_web("strict", require_kos_reference="true")
    path = f"/dicom-web/studies?PatientName=MARTIN*&PatientBirthDate={BIRTH_DATE}"
    get, head = strict.get(path, headers=JSON), strict.request("HEAD", path, headers=JSON)
    assert get.status_code == 403 and "header is required" in get.text
    _same_answer(get, head)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_a_method_no_route_serves_is_405_before_anything(
        scoped_web: tuple[InProcessService, Studies], method: str) -> None:
    web, s = scoped_web
    refused = web.metric("passerelle_http_requests_refused_total", reason="method")
    response = web.request(method, f"/dicom-web/studies/{s.b}",
                           headers={"KOS-SOPInstanceUID": s.kos})
    assert response.status_code == 405  # not the manifest's 403: never reached
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert web.request(method, "/wado").headers["allow"] == "GET, HEAD"
    assert web.metric("passerelle_http_requests_refused_total", reason="method") == refused + 2


@pytest.mark.parametrize("query", [
    "requestType=WADO&requestType=WADO&studyUID={a}&seriesUID={se}&objectUID={i}",
    "requestType=WADO&studyUID={a}&seriesUID={se}&objectUID={i}&objectUID={i}",
    "requestType=WADO&studyUID={a}&seriesUID={se}&objectUID={i}&contentType=image/png"
    "&contentType=application/dicom",
    "requestType=WADO&studyUID={a}&seriesUID={se}&objectUID={i}&contentType=application/dicom"
    "&anonymize=no&anonymize=yes",
    # The same name, percent-encoded: decoded before it is compared.
    "requestType=WADO&studyUID={a}&study%55ID={a}&seriesUID={se}&objectUID={i}",
])
def test_repeated_wado_uri_parameters_are_refused(
        scoped_web: tuple[InProcessService, Studies], query: str) -> None:
    web, s = scoped_web
    response = web.get("/wado?" + query.format(a=s.a, se=s.a_series, i=s.referenced))
    assert response.status_code == 400
    assert "more than once" in response.text


def test_repeated_qido_parameters(scoped_web: tuple[InProcessService, Studies]) -> None:
    """Once each (PS3.18 Table 8.3.4-1), but includefield, 0-n."""
    web, _ = scoped_web
    for query, status in (("limit=1&limit=1000", 400), ("offset=0&offset=1", 400),
                          ("fuzzymatching=true&fuzzymatching=false", 400),
                          ("PatientName=DUPONT*&PatientName=MARTIN*", 400),
                          ("PatientID=PAT001&00100020=PAT002", 400),  # by keyword and tag
                          ("includefield=StudyDescription&includefield=PatientAge", 200)):
        response = web.get(f"/dicom-web/studies?{query}", headers=JSON)
        assert response.status_code == status, query


def test_other_repeated_inputs_are_refused(scoped_web: tuple[InProcessService, Studies]) -> None:
    web, s = scoped_web
    rendered = f"{s.instance_path()}/rendered?quality=10&quality=90"
    assert web.get(rendered, headers={"Accept": "image/jpeg"}).status_code == 400
    two_manifests = [("KOS-SOPInstanceUID", s.kos), ("KOS-SOPInstanceUID", generate_uid()),
                     *DICOM.items()]
    response = web.get(f"/dicom-web/studies/{s.a}", headers=two_manifests)
    assert response.status_code == 400 and "KOS-SOPInstanceUID" in response.text


def test_the_audit_names_what_was_served(scoped_web: tuple[InProcessService, Studies]) -> None:
    web, s = scoped_web
    kos = {"KOS-SOPInstanceUID": s.kos}
    assert web.get(s.wado_uri((s.a, s.a_series, s.referenced)), headers=kos).status_code == 200
    assert web.request("HEAD", f"/dicom-web/studies/{s.b}/series/{s.b_series}",
                       headers=kos).status_code == 403
    web.close()
    [served] = _events(web.data_dir, f"GET /wado via KOS {s.kos} -> 200")
    assert _studies_of(served) == [s.a]
    [head] = _events(web.data_dir, f"HEAD /dicom-web/studies/{s.b}/series/{s.b_series} via KOS")
    assert _studies_of(head) == [s.b]
    assert head["EventIdentification"]["EventOutcomeIndicator"] == "4"


def test_a_refusal_before_any_access_names_no_patient(
        scoped_web: tuple[InProcessService, Studies]) -> None:
    """A 405 or a repeated parameter is refused before credentials or data are read: the
    audit trail records the attempt, but as an access to no study (and no patient)."""
    web, s = scoped_web
    assert web.request("PUT", f"/dicom-web/studies/{s.b}").status_code == 405
    assert web.get(f"/dicom-web/studies/{s.b}?limit=1&limit=2", headers=JSON).status_code == 400
    web.close()
    for detail in (f"PUT /dicom-web/studies/{s.b}", f"GET /dicom-web/studies/{s.b}"):
        [refused] = _events(web.data_dir, detail)
        assert refused["EventIdentification"]["EventOutcomeIndicator"] == "4"
        assert refused.get("ParticipantObjectIdentification", []) == [], detail


def test_require_kos_reference_closes_the_admin_api_to_anonymous_readers(
        make_web: Callable[..., InProcessService]) -> None:
    """Without an issuer, the admin listing of every patient would defeat a deployment that
    confines reads to manifests; the control socket (the CLI) still serves it."""
    strict = make_web("strict-admin", require_kos_reference="true")
    for path in ("/admin/studies", "/admin/outbox", f"/admin/studies/{generate_uid()}"):
        response = strict.get(path)
        assert response.status_code == 403 and "administrator" in response.text, path
