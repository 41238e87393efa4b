"""The structure walk run before anything parses a received data set (storage/structure.py
``check_structure``) against pydicom's reader: the walk must read the bytes as pydicom does,
so that what it counts bounds what pydicom then builds. In-process, no service."""

import io
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources
from pydicom.data.download import get_data_dir
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from storage.store import Outcome, Rejection, Store
from storage.structure import DatasetTooComplexError, IngestLimits, check_structure

_UNDEFINED = 0xFFFFFFFF


def _element(group: int, element: int, length: int) -> bytes:
    """An implicit VR little endian element header (or item, delimiter)."""
    return struct.pack("<HHL", group, element, length)


def _implicit_part10(tail: bytes) -> bytes:
    """An implicit VR little endian Part 10 file: a secondary capture header, then ``tail``."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "WALKER"
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return out.getvalue() + tail


def _overlay_hiding_a_sequence(items: int) -> bytes:
    """Part 10 bytes whose (6000,3000) Overlay Data (OB or OW, a repeating group) has
    undefined length and starts with an item. Read as a sequence, that item holds a Patient
    Comments value that is skipped; pydicom reads the overlay as a value up to the first
    sequence delimiter bytes, inside that comment, then parses what follows at top level: a
    Referenced Image Sequence of ``items`` items."""
    hidden = (_element(0xFFFE, 0xE0DD, 0)  # where pydicom ends the overlay value
              + _element(0x0008, 0x1140, _UNDEFINED)
              + _element(0xFFFE, 0xE000, 0) * items
              + _element(0xFFFE, 0xE0DD, 0))
    comment = _element(0x0010, 0x4000, len(hidden)) + hidden
    return _implicit_part10(_element(0x6000, 0x3000, _UNDEFINED)
                            + _element(0xFFFE, 0xE000, len(comment)) + comment)


def test_repeating_group_element_hiding_a_sequence_is_refused(tmp_path: Path) -> None:
    data = _overlay_hiding_a_sequence(2000)
    # What pydicom builds from these bytes: the walk must bound exactly that.
    assert len(dcmread(io.BytesIO(data)).ReferencedImageSequence) == 2000

    limits = IngestLimits(max_sequence_items=100)
    with pytest.raises(DatasetTooComplexError, match="max_sequence_items"):
        check_structure(io.BytesIO(data), limits)
    store = Store(tmp_path / "data", limits=limits)
    try:
        result = store.ingest(data, "test")
    finally:
        store.close()
    assert result.outcome is Outcome.REJECTED
    assert result.reason is Rejection.TOO_COMPLEX

    # Within the limit it is walked, and counted, as pydicom reads it.
    small = _overlay_hiding_a_sequence(50)
    assert check_structure(io.BytesIO(small), limits).elements >= _built(dcmread(io.BytesIO(small)))


def _built(ds: Dataset) -> int:
    """Data elements and sequence items pydicom built, at every level."""
    count = 0
    for element in ds:
        count += 1
        if element.VR == "SQ":
            count += len(element.value) + sum(_built(item) for item in element.value)
    return count


def _testdata_files() -> list[Path]:
    """The Part 10 files ``pydicom.data.get_testdata_files("*.dcm")`` finds on this machine
    (bundled, external sources such as pydicom-data, download cache) without its attempt to
    download the rest, which takes seconds offline."""
    found = {path.name: path for path in Path(DATA_ROOT, "test_files").rglob("*.dcm")}
    for source in external_data_sources().values():
        for name in source.get_paths("**/*.dcm", DataTypes.DATASET):
            found.setdefault(Path(name).name, Path(name))
    for path in get_data_dir().glob("*.dcm"):
        found.setdefault(path.name, path)
    part10 = []
    for path in sorted(found.values(), key=lambda path: path.name):
        with path.open("rb") as file:
            if file.read(132)[128:] == b"DICM":
                part10.append(path)
    return part10


@pytest.mark.parametrize("path", _testdata_files(), ids=lambda path: path.name)
def test_walk_agrees_with_pydicom_on_its_test_files(path: Path) -> None:
    try:
        ds = dcmread(path)
        built = _built(ds)  # converts every raw element, as any later use would
    except Exception as exc:  # pydicom's own malformed samples: nothing to agree with
        pytest.skip(f"pydicom cannot read it: {exc}")
    with path.open("rb") as file:
        counted = check_structure(file, IngestLimits())
    assert counted.elements >= built
