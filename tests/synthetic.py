"""Synthetic studies for tests and benchmarks: real Part 10 files, generated, never downloaded."""

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def ct_slice(study_uid: str, series_uid: str, series_number: int, instance_number: int,
             size: int = 64, patient_id: str = "PAT001", accession: str = "ACC001",
             sop_uid: str | None = None, **attributes: object) -> Dataset:
    """One 16-bit CT slice of ``size`` x ``size`` with deterministic pixels; ``attributes``
    (DICOM keywords) override the defaults."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "DUPONT^JEAN"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260110"
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = "CT THORAX"
    ds.ReferringPhysicianName = "MARTIN^PAUL"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"SERIES {series_number}"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0, 0, instance_number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    rng = np.random.default_rng(instance_number + 1000 * series_number)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# The INS of national_ct_slice, as a FHIR token (system|value).
NATIONAL_INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"


def national_ct_slice(study_uid: str, series_uid: str, series_number: int,
                      instance_number: int, ins: bool = True, **attributes: object) -> Dataset:
    """A small CT slice carrying the identifiers of the national ITI-65 example: the INS
    (test OID 1.2.250.1.213.1.4.10), the accession number with its issuer, the placer order."""
    ds = ct_slice(study_uid, series_uid, series_number, instance_number, size=4,
                  accession="ACC-2026-000457",
                  PlacerOrderNumberImagingServiceRequest="CMD-2026-88812", **attributes)
    issuer = Dataset()
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.250.1.999.1.1.2", "ISO"
    ds.IssuerOfAccessionNumberSequence = Sequence([issuer])
    if ins:
        other, qualifier = Dataset(), Dataset()
        other.PatientID, other.TypeOfPatientID = "279035121518989", "TEXT"
        qualifier.UniversalEntityID = "1.2.250.1.213.1.4.10"
        qualifier.UniversalEntityIDType = "ISO"
        other.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
        ds.OtherPatientIDsSequence = Sequence([other])
    return ds


def part10(ds: Dataset) -> bytes:
    """The Part 10 bytes of a data set."""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_ct_study(folder: Path, series: int = 3, per_series: int = 5, size: int = 64,
                   patient_id: str = "PAT001", accession: str = "ACC001") -> list[Path]:
    """Write a CT study of ``series`` x ``per_series`` slices as Part 10 files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    paths = []
    for s in range(1, series + 1):
        series_uid = generate_uid()
        for i in range(1, per_series + 1):
            ds = ct_slice(study_uid, series_uid, s, i, size, patient_id, accession)
            path = folder / f"s{s:02d}_i{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
