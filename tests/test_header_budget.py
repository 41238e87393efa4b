"""Header reads under the resource budget (issue 14, finding 1 and the review after it): what
pydicom builds from a header, and the DICOM JSON made of it, is estimated by a walk of the
data set (elements, items, values of multi-valued text, bytes) and reserved before the read.
A 1 MB object of 500 000 DS values builds about 250 MiB; one of 60 000 empty items about
85 MiB. Each test attacks a running service with the decode memory lowered, asserts the peak
RSS and that ``/health`` answered, and that an ordinary instance is still served."""

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.processes import PasserelleProcess
from tests.test_resource_budget import (
    MIB,
    Watch,
    _ct,
    concurrently,
    instance_url,
    running,  # noqa: F401 (the fixture)
    serve,
    start,
)

JSON = {"Accept": "application/dicom+json"}


def _values_bomb() -> Dataset:
    """500 000 values in one DS element (Slice Thickness): implicit VR gives it 32 bits of
    length; 1 MB on disk."""
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.add_new(0x00180088, "DS", "\\".join(["0"] * 500_000))
    return ds


def _items_bomb() -> Dataset:
    """Two sequences of 30 000 empty items each: within the ingest limits."""
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    for tag in (0x00081115, 0x00081140):  # Referenced Series, Referenced Image Sequences
        ds.add_new(tag, "SQ", Sequence([Dataset() for _ in range(30_000)]))
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_header_that_builds_more_than_the_decode_memory_is_413(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:  # noqa: F811
    values, items, plain = _values_bomb(), _items_bomb(), _ct()
    server = serve(tmp_path, [values, items, plain], decode_memory_bytes=str(64 * MIB))
    client = start(running, server)
    attacks = [f"{instance_url(ds)}/metadata" for ds in (values, values, items, items)]
    with Watch(server, "header bombs x4") as watch:
        responses = concurrently([lambda u=u: client.get(u, headers=JSON) for u in attacks])
    for response in responses:
        assert response.status_code == 413, (response.request.url, response.text[:200])
        assert "decode_memory_bytes" in response.text
    watch.check(100 * MIB)
    # The study's metadata holds the bombs too; an ordinary instance is served.
    assert client.get(f"/dicom-web/studies/{values.StudyInstanceUID}/metadata",
                      headers=JSON).status_code == 413
    served = client.get(f"{instance_url(plain)}/metadata", headers=JSON)
    assert served.status_code == 200
    assert served.json()[0]["00080018"]["Value"] == [plain.SOPInstanceUID]
    # Within the budget, the same kind of object is served: the estimate is no refusal of
    # everything large.
    assert client.get(f"{instance_url(values)}/frames/1",
                      headers={"Accept": "multipart/related; "
                                         'type="application/octet-stream"'}).status_code == 200


def _private_values_bomb(explicit_un: bool) -> Dataset:
    """500 000 values in a private element pydicom reads as DS by its private creator's
    dictionary (GEMS_ACQU_01 (0019,xx03), Cell Spacing): explicit UN, or implicit VR."""
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit_un \
        else ImplicitVRLittleEndian
    ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    ds.add_new(0x00191003, "UN", b"\\".join([b"0"] * 500_000))
    return ds


@pytest.mark.parametrize("explicit_un", [True, False], ids=["explicit UN", "implicit VR"])
def test_values_whose_vr_the_walk_cannot_know_are_counted_as_text(
        tmp_path: Path, running: list[PasserelleProcess],  # noqa: F811
        explicit_un: bool) -> None:
    """A private element pydicom converts by its private dictionary builds one object a
    value, as a DS would: the walk, which cannot know that VR, counts it as text."""
    bomb = _private_values_bomb(explicit_un)
    server = serve(tmp_path, [bomb], decode_memory_bytes=str(64 * MIB))
    client = start(running, server)
    with Watch(server, "private DS values x2") as watch:
        responses = concurrently([lambda: client.get(f"{instance_url(bomb)}/metadata",
                                                     headers=JSON)] * 2)
    assert [r.status_code for r in responses] == [413, 413], responses[0].text[:200]
    watch.check(100 * MIB)


def test_cached_study_metadata_is_reserved_before_it_is_loaded(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:  # noqa: F811
    """Each instance's JSON fits the budget and is cached; the study's, 16 of them, does not:
    refused from the cached sizes, before the texts are loaded."""
    study = _ct()
    instances = []
    for number in range(16):
        ds = _ct(StudyInstanceUID=study.StudyInstanceUID)
        ds.InstanceNumber = number + 1
        ds.add_new(0x0040A160, "UT", "x" * (2 << 20))  # Text Value, 2 MiB
        instances.append(ds)
    server = serve(tmp_path, instances, decode_memory_bytes=str(32 * MIB))
    client = start(running, server)
    for ds in instances:  # computed and cached one at a time
        assert client.get(f"{instance_url(ds)}/metadata", headers=JSON).status_code == 200
    url = f"/dicom-web/studies/{study.StudyInstanceUID}/metadata"
    with Watch(server, "cached study metadata of 32 MiB x3") as watch:
        responses = concurrently([lambda: client.get(url, headers=JSON)] * 3)
    assert [r.status_code for r in responses] == [413] * 3
    assert "this metadata response" in responses[0].text
    watch.check(48 * MIB)
