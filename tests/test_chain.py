"""The whole chain on one machine, as the README walks through it: a modality sends a study
with dcmtk's storescu, Passerelle publishes its manifest to the local registry, and a consumer
that only speaks HTTP finds it by accession number (ITI-67), downloads the KOS (ITI-68) and
follows its Retrieve URLs (WADO-RS) back to every instance, byte for byte."""

import subprocess
from io import BytesIO
from pathlib import Path

import httpx
from pydicom import dcmread

from storage.part10 import dataset_bytes
from tests.multipart import parts_of
from tests.processes import PasserelleProcess, RegistryProcess, wait_for

IPP_AUTHORITY = "1.2.250.1.999.1.1.1"
ACCESSION_AUTHORITY = "1.2.250.1.999.1.1.2"


def test_modality_to_shared_record_and_back(tmp_path: Path, ct_study: list[Path]) -> None:
    with RegistryProcess(tmp_path / "registry") as registry, PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, stable_seconds="1",
            patient_id_issuer_oid=IPP_AUTHORITY, accession_issuer_oid=ACCESSION_AUTHORITY,
            organization_finess="999000011") as server:
        sent = subprocess.run(["storescu", "-aec", "PASSERELLE", "127.0.0.1",
                               str(server.dicom_port), *map(str, ct_study)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert sent.returncode == 0, sent.stderr

        # Consumer: ITI-67 by patient and accession number.
        search = {"patient.identifier": f"urn:oid:{IPP_AUTHORITY}|PAT001", "status": "current",
                  "related:identifier": f"urn:oid:{ACCESSION_AUTHORITY}|ACC001"}

        def found() -> dict:
            return httpx.get(f"{registry.fhir_url}/DocumentReference", params=search).json()

        wait_for(lambda: found()["total"] == 1, 60, "the manifest in the registry")
        document = found()["entry"][0]["resource"]

        # ITI-68: the KOS itself.
        kos_response = httpx.get(document["content"][0]["attachment"]["url"],
                                 headers={"Accept": "application/dicom"})
        assert kos_response.status_code == 200
        kos = dcmread(BytesIO(kos_response.content))
        assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
        assert document["masterIdentifier"]["value"] == f"urn:oid:{kos.SOPInstanceUID}"

        # WADO-RS on each Retrieve URL of the evidence.
        originals = {dcmread(path, stop_before_pixels=True).SOPInstanceUID:
                     bytes(dataset_bytes(path.read_bytes())) for path in ct_study}
        retrieved: dict[str, bytes] = {}
        for study in kos.CurrentRequestedProcedureEvidenceSequence:
            for series in study.ReferencedSeriesSequence:
                response = httpx.get(series.RetrieveURL, headers={
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
                assert response.status_code == 200
                for _, body in parts_of(response):
                    retrieved[dcmread(BytesIO(body)).SOPInstanceUID] = \
                        bytes(dataset_bytes(body))
        assert retrieved == originals
