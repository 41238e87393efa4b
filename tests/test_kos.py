"""KOS manifests of the studies of a store: dciodvfy-clean, complete, and pointing at
series that this service really serves (in-process: the manifest and the HTTP application
over one store; the publication chain end to end is tests/test_chain.py)."""

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.publication.kos import KOS_SOP_CLASS, RetrieveOrigin, build_manifest
from storage.store import Outcome
from storage.study_contents import load_study_contents
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.synthetic import national_ct_slice

# SOP classes mixed into the studies, with the TID 2010 row (value type) that references each
# (PS3.16 TID 2010: images, waveforms, any other composite object): CT, MR and secondary
# capture images, a structured report, a waveform.
VALUE_TYPES = {"1.2.840.10008.5.1.4.1.1.2": "IMAGE", "1.2.840.10008.5.1.4.1.1.4": "IMAGE",
               "1.2.840.10008.5.1.4.1.1.7": "IMAGE", "1.2.840.10008.5.1.4.1.1.88.11": "COMPOSITE",
               "1.2.840.10008.5.1.4.1.1.9.1.1": "WAVEFORM"}
MIXED = list(VALUE_TYPES)
_NO_PIXELS = ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
              "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
              "RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth")


def _instance(study: str, series: str, number: int, index: int, sop_class: str) -> Dataset:
    ds = national_ct_slice(study, series, number, index, SOPClassUID=sop_class,
                           RequestedProcedureID="RP457")
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    if "Image" not in ds.SOPClassUID.name:
        for keyword in _NO_PIXELS:
            delattr(ds, keyword)
    return ds


def _study(series_count: int) -> list[Dataset]:
    study = generate_uid()
    datasets = []
    for number in range(1, series_count + 1):
        series = generate_uid()
        sop_class = MIXED[(number - 1) % len(MIXED)]
        datasets += [_instance(study, series, number, i, sop_class) for i in (1, 2)]
    return datasets


STUDIES = {count: _study(count) for count in (1, 3, 20)}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    with InProcessService(tmp_path_factory.mktemp("kos") / "data") as web:
        for datasets in STUDIES.values():
            web.ingest_all(datasets)
        yield web


def _manifest(service: InProcessService, study_uid: str) -> bytes:
    contents = load_study_contents(service.store.index, study_uid)
    assert contents is not None
    origin = RetrieveOrigin(service.base_url, "1.2.250.1.999.1.1.4")
    return build_manifest(contents, origin).data


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools")
@pytest.mark.parametrize("count", sorted(STUDIES))
def test_manifest_passes_dciodvfy(service: InProcessService, count: int, tmp_path) -> None:
    path = tmp_path / "kos.dcm"
    path.write_bytes(_manifest(service, STUDIES[count][0].StudyInstanceUID))
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                            check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == [], result.stderr


@pytest.mark.parametrize("count", sorted(STUDIES))
def test_manifest_references_every_instance_once(service: InProcessService,
                                                 count: int) -> None:
    datasets = STUDIES[count]
    kos = dcmread(BytesIO(_manifest(service, datasets[0].StudyInstanceUID)))
    assert kos.SOPClassUID == KOS_SOP_CLASS and kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113030", "DCM", "Manifest")
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = Counter(ref.ReferencedSOPInstanceUID
                         for series in evidence.ReferencedSeriesSequence
                         for ref in series.ReferencedSOPSequence)
    assert referenced == Counter(ds.SOPInstanceUID for ds in datasets)
    content = Counter(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                      for item in kos.ContentSequence)
    assert content == referenced
    # Each reference names the instance's own SOP class, in the row of its kind.
    sop_classes = {ds.SOPInstanceUID: ds.SOPClassUID for ds in datasets}
    for series in evidence.ReferencedSeriesSequence:
        for ref in series.ReferencedSOPSequence:
            assert ref.ReferencedSOPClassUID == sop_classes[ref.ReferencedSOPInstanceUID]
    for item in kos.ContentSequence:
        ref = item.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPClassUID == sop_classes[ref.ReferencedSOPInstanceUID]
        assert item.ValueType == VALUE_TYPES[ref.ReferencedSOPClassUID], ref.ReferencedSOPClassUID


def test_patient_and_request_identifiers(service: InProcessService) -> None:
    original = STUDIES[3][0]
    kos = dcmread(BytesIO(_manifest(service, original.StudyInstanceUID)))
    assert (kos.PatientID, kos.IssuerOfPatientID) == (original.PatientID, "HOSP")
    ins = kos.OtherPatientIDsSequence[0]
    assert ins.PatientID == "279035121518989"
    assert ins.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.250.1.213.1.4.10"
    request = kos.ReferencedRequestSequence[0]
    assert request.AccessionNumber == original.AccessionNumber
    assert request.IssuerOfAccessionNumberSequence[0].UniversalEntityID == "1.2.250.1.999.1.1.2"
    assert request.PlacerOrderNumberImagingServiceRequest == "CMD-2026-88812"
    assert request.RequestedProcedureID == "RP457"


def test_manifest_is_stable_and_changes_with_the_study(service: InProcessService) -> None:
    datasets = _study(1)  # a study of its own: STUDIES stays what the service holds
    service.ingest_all(datasets)
    first = _manifest(service, datasets[0].StudyInstanceUID)
    assert _manifest(service, datasets[0].StudyInstanceUID) == first
    late = _instance(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, 1, 3,
                     datasets[0].SOPClassUID)
    assert service.ingest(late).outcome is Outcome.STORED
    changed = dcmread(BytesIO(_manifest(service, datasets[0].StudyInstanceUID)))
    before = dcmread(BytesIO(first))
    assert changed.SOPInstanceUID != before.SOPInstanceUID
    assert changed.SeriesInstanceUID == before.SeriesInstanceUID


def test_retrieve_urls_serve_their_series(service: InProcessService) -> None:
    kos = dcmread(BytesIO(_manifest(service, STUDIES[3][0].StudyInstanceUID)))
    for series in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        assert "RetrieveAETitle" not in series  # no C-MOVE / C-GET served to name it for
        assert series.RetrieveLocationUID == "1.2.250.1.999.1.1.4"
        assert series.RetrieveURL.startswith(f"{service.base_url}/dicom-web/studies/")
        response = service.get(series.RetrieveURL, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert response.status_code == 200
        expected = {ref.ReferencedSOPInstanceUID for ref in series.ReferencedSOPSequence}
        got = {dcmread(BytesIO(body)).SOPInstanceUID for _, body in parts_of(response)}
        assert got == expected
