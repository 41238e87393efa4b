"""WADO-RS metadata in the Native DICOM Model (PS3.19 A.1; PS3.18 Table 10.4.4-1):
``multipart/related; type="application/dicom+xml"``, one NativeDicomModel part per instance,
checked against the rules of the normative schema (PS3.19 A.1.6, RELAX NG, written out
below as no RELAX NG validator is installed) and of Table A.1.5-2, and against the stored
objects read back with pydicom."""

import base64
import gc
import gzip
import json
import re
import tracemalloc
import xml.etree.ElementTree as ET

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from gateway.imaging.budget import ByteBudget
from tests.inprocess import InProcessService
from tests.multipart import parts_of
from tests.synthetic import ct_slice

NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
XML = {"Accept": 'multipart/related; type="application/dicom+xml"'}
# PS3.19 A.1.6: the VR attribute's choices.
VRS = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF",
       "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
       "UR", "US", "UT", "UV"}
NAME_GROUPS = ["Alphabetic", "Ideographic", "Phonetic"]
NAME_COMPONENTS = ["FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix"]
ICON = bytes(range(256)) * 4


def _local(element: ET.Element) -> str:
    namespace, _, name = element.tag[1:].partition("}")
    assert namespace == NS, element.tag
    return name


def _numbered(children: list[ET.Element]) -> None:
    """Number = attribute number { xsd:positiveInteger }, from 1 by 1 (Table A.1.5-2)."""
    assert [child.get("number") for child in children] == \
        [str(n) for n in range(1, len(children) + 1)]


def check_native_model(root: ET.Element) -> None:
    """The document follows PS3.19 A.1.6: ``start = element NativeDicomModel
    { DicomDataSet }``."""
    assert _local(root) == "NativeDicomModel" and not root.attrib
    assert not (root.text or "").strip()
    _check_dataset(root)


def _check_dataset(parent: ET.Element) -> None:
    """DicomDataSet = DicomAttribute*"""
    for attribute in parent:
        assert _local(attribute) == "DicomAttribute"
        _check_attribute(attribute)


def _check_attribute(attribute: ET.Element) -> None:
    """DicomAttribute = element DicomAttribute { Tag, VR, Keyword?, PrivateCreator?,
    (BulkData | Value+ | Item+ | PersonName+ | InlineBinary)? }"""
    assert set(attribute.attrib) <= {"tag", "vr", "keyword", "privateCreator"}
    tag, vr = attribute.get("tag", ""), attribute.get("vr")
    assert re.fullmatch("[0-9A-F]{8}", tag), tag
    assert vr in VRS, vr
    private = int(tag[:4], 16) % 2 == 1
    # Table A.1.5-2: privateCreator for private elements only, whose tag is gggg00ee; a
    # private element stored without a creator (PS3.5 7.8.1 forbids it) keeps its tag.
    if "privateCreator" in attribute.attrib:
        assert private and tag[4:6] == "00", tag
    elif private:
        assert int(tag[4:], 16) >= 0x1000, tag
    else:
        assert attribute.get("keyword"), tag  # every standard element is known here
    assert not (attribute.text or "").strip()
    kinds = [_local(child) for child in attribute]
    if not kinds:
        return
    kind = kinds[0]
    assert set(kinds) == {kind}, (tag, kinds)
    assert kind in ("BulkData", "Value", "Item", "PersonName", "InlineBinary"), kind
    if kind in ("BulkData", "InlineBinary"):
        assert len(kinds) == 1, tag
    children = list(attribute)
    # Table A.1.5-2: Value not for SQ or PN; Item for SQ only; PersonName for PN only.
    assert (kind == "Item") == (vr == "SQ"), tag
    assert (kind == "PersonName") == (vr == "PN"), tag
    if kind == "BulkData":
        [bulk] = children
        assert len(bulk.attrib) == 1 and set(bulk.attrib) <= {"uuid", "uri"}, bulk.attrib
        assert len(bulk) == 0 and not (bulk.text or "").strip()
    elif kind == "InlineBinary":
        [inline] = children
        assert not inline.attrib and len(inline) == 0
        base64.b64decode(inline.text or "", validate=True)  # xsd:base64Binary
    elif kind == "Value":
        _numbered(children)
        for value in children:
            assert set(value.attrib) == {"number"} and len(value) == 0
    elif kind == "Item":
        _numbered(children)
        for item in children:
            assert set(item.attrib) == {"number"}
            _check_dataset(item)
    else:
        _numbered(children)
        for name in children:
            assert set(name.attrib) == {"number"}
            groups = [_local(group) for group in name]
            assert groups == [g for g in NAME_GROUPS if g in groups], groups
            for group in name:
                components = [_local(component) for component in group]
                assert components == [c for c in NAME_COMPONENTS if c in components]
                assert all(len(component) == 0 for component in group)


def _study() -> list[Dataset]:
    """Two instances of one study: names in three groups (ISO_IR 192), multi-valued and
    empty values, an AT, a private block, an inline binary, an icon as bulk data."""
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 1, 1, size=8)
    first.SpecificCharacterSet = "ISO_IR 192"
    first.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    first.ImageType = ["ORIGINAL", "", "AXIAL"]
    first.OtherPatientNames = ["DUPONT^JEAN", "DURAND^ANNE"]
    first.StudyDescription = "CT <thorax> & \"abdomen\"\r\nsecond line"
    first.add_new(0x00209165, "AT", [0x00100010, 0x7FE00010])  # DimensionIndexPointer
    first.add_new(0x00290010, "LO", "PASSERELLE TEST")
    first.add_new(0x00291001, "LO", "private value")
    first.add_new(0x00291002, "OB", b"\x01\x02\x03\x04")
    icon = Dataset()
    icon.Rows = icon.Columns = 32
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = ICON
    first.IconImageSequence = Sequence([icon])
    return [first, ct_slice(study, series, 1, 2, size=8)]


@pytest.fixture
def xml_study(web: InProcessService) -> tuple[InProcessService, list[Dataset]]:
    study = _study()
    web.ingest_all(study)
    return web, study


def _documents(web: InProcessService, url: str, **headers: str) -> list[ET.Element]:
    response = web.get(url, headers={**XML, **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom+xml"; boundary=')
    roots = []
    for part_headers, body in parts_of(response):
        assert part_headers["Content-Type"] == "application/dicom+xml; charset=utf-8"
        assert int(part_headers["Content-Length"]) == len(body)
        assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
        roots.append(ET.fromstring(body))
    return roots


def _attribute(parent: ET.Element, keyword: str) -> ET.Element:
    [found] = parent.findall(f"{{{NS}}}DicomAttribute[@keyword='{keyword}']")
    return found


def _values(parent: ET.Element, keyword: str) -> list[str]:
    return [value.text or "" for value in _attribute(parent, keyword)]


def test_study_metadata_as_native_dicom_model(
        xml_study: tuple[InProcessService, list[Dataset]]) -> None:
    web, study = xml_study
    first = study[0]
    roots = _documents(web, f"/dicom-web/studies/{first.StudyInstanceUID}/metadata")
    assert len(roots) == 2
    for root in roots:
        check_native_model(root)
    [root] = [r for r in roots if _values(r, "SOPInstanceUID") == [first.SOPInstanceUID]]
    stored = dcmread(web.data_dir / "studies" / first.StudyInstanceUID /
                     first.SeriesInstanceUID / f"{first.SOPInstanceUID}.dcm")
    [name] = _attribute(root, "PatientName")
    groups = {f"{group.tag.partition('}')[2]}": [c.text for c in group] for group in name}
    assert groups == {"Alphabetic": ["Yamada", "Tarou"], "Ideographic": ["山田", "太郎"],
                      "Phonetic": ["やまだ", "たろう"]}
    assert [[c.text for c in group] for person in _attribute(root, "OtherPatientNames")
            for group in person] == [["DUPONT", "JEAN"], ["DURAND", "ANNE"]]
    assert _values(root, "ImageType") == ["ORIGINAL", "", "AXIAL"]
    assert [float(v) for v in _values(root, "PixelSpacing")] == [0.7, 0.7]
    assert _values(root, "DimensionIndexPointer") == ["00100010", "7FE00010"]
    assert _values(root, "StudyDescription") == [stored.StudyDescription]  # CR kept
    assert _values(root, "Rows") == ["8"]
    private = root.findall(f"{{{NS}}}DicomAttribute[@privateCreator='PASSERELLE TEST']")
    assert [(p.get("tag"), p.get("vr")) for p in private] == [("00290001", "LO"),
                                                             ("00290002", "OB")]
    assert [v.text for v in private[0]] == ["private value"]
    assert base64.b64decode(private[1][0].text) == b"\x01\x02\x03\x04"
    assert root.find(f"{{{NS}}}DicomAttribute[@tag='00290010']") is None
    [item] = _attribute(root, "IconImageSequence")
    assert item.get("number") == "1"
    [bulk] = _attribute(item, "PixelData")
    uri = bulk.get("uri")
    assert uri.endswith(f"/instances/{first.SOPInstanceUID}/bulkdata/00880200/1/7FE00010")
    [(_, icon)] = parts_of(web.get(uri))
    assert icon == ICON
    [pixels] = _attribute(root, "PixelData")
    assert pixels.get("uri").endswith("/bulkdata/7FE00010")


def test_each_level_and_the_response_details(
        xml_study: tuple[InProcessService, list[Dataset]]) -> None:
    web, study = xml_study
    first = study[0]
    series = f"/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    assert len(_documents(web, f"{series}/metadata")) == 2
    [one] = _documents(web, f"{series}/instances/{first.SOPInstanceUID}/metadata")
    assert _values(one, "SOPInstanceUID") == [first.SOPInstanceUID]
    # The same metadata is the same bytes: a strong ETag, a 304 on it; gzip on request.
    url = f"{series}/metadata"
    response = web.get(url, headers=XML)
    again = web.get(url, headers=XML)
    assert response.content == again.content and response.headers["etag"] == \
        again.headers["etag"]
    assert web.get(url, headers={**XML, "If-None-Match": response.headers["etag"]}
                   ).status_code == 304
    assert "Accept" in response.headers["vary"]
    packed, raw = web.raw("GET", url, headers={**XML, "Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == response.content
    # The JSON is what it was, and what a client that asks for nothing gets.
    assert web.get(url).headers["content-type"] == "application/dicom+json"
    assert web.get(url, headers={"Accept": "application/dicom+json"}).json()[0]


@pytest.mark.parametrize("accept, status", [
    ("multipart/related; type=\"application/dicom+xml\"", 200),
    ("multipart/related; type=application/dicom+xml; q=0.9, image/jpeg", 200),
    ("image/jpeg, multipart/related; type=\"application/dicom+xml\"; q=0.5", 200),
    ("application/dicom+json, multipart/related; type=\"application/dicom+xml\"", 200),
    ("application/dicom+xml", 406),
    ("multipart/related; type=\"application/dicom\"", 406),
    ("text/html", 406),
])
def test_accept_negotiation(xml_study: tuple[InProcessService, list[Dataset]], accept: str,
                            status: int) -> None:
    web, study = xml_study
    response = web.get(f"/dicom-web/studies/{study[0].StudyInstanceUID}/metadata",
                       headers={"Accept": accept})
    assert response.status_code == status, response.text
    if status == 406:
        assert 'multipart/related; type="application/dicom+xml"' in response.text


def test_characters_xml_cannot_carry_are_replaced(web: InProcessService) -> None:
    """A stray control code in a text value (XML 1.0 2.2 has no way to write it) does not
    make the document unreadable."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8,
                  StudyDescription="CT\x01THORAX\x1b")
    assert web.ingest(ds).accepted
    [root] = _documents(web, f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata")
    check_native_model(root)
    assert _values(root, "StudyDescription") == ["CT\ufffdTHORAX\ufffd"]


@pytest.mark.parametrize("instances", [1, 3])
def test_memory_of_a_study_of_many_small_values_stays_within_its_reservations(
        web: InProcessService, monkeypatch: pytest.MonkeyPatch, instances: int) -> None:
    """Values of a few JSON characters each take far more as XML: the parts are made one at
    a time as they are sent, each under a reservation from its count of values, so what the
    response holds at its peak (tracemalloc) is never more than what it reserved, beyond
    the body the test client gathers."""
    study, series = generate_uid(), generate_uid()
    for number in range(1, instances + 1):
        ds = ct_slice(study, series, 1, number, size=8)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # for an IS of 360 kB
        ds.add_new(0x00081160, "IS", [10] * 120_000)  # ReferencedFrameNumber
        assert web.ingest(ds).accepted
    url = f"/dicom-web/studies/{study}/metadata"
    assert web.get(url).status_code == 200  # the JSON is computed and cached
    memory = web.services.budget.memory
    most = [0]
    take = ByteBudget._take

    def taking(budget: ByteBudget, size: int, held: int, what: str) -> None:
        take(budget, size, held, what)
        most[0] = max(most[0], memory.in_use)

    monkeypatch.setattr(ByteBudget, "_take", taking)
    gc.collect()
    tracemalloc.start()
    try:
        response = web.get(url, headers=XML)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200
    assert len(parts_of(response)) == instances
    assert memory.in_use == 0
    client_copies = 2 * len(response.content)  # its chunks, then the body they make
    assert peak <= most[0] + client_copies, (peak, most[0], client_copies)


def test_non_finite_numbers_and_odd_private_creators(web: InProcessService) -> None:
    """NaN and infinities of FD, FL and DS are written as dcm4che writes them ("NaN",
    "Infinity", "-Infinity"), in XML and in JSON (a string: a bare NaN is no JSON, RFC 8259
    6); a private element whose creator is missing or is no text keeps its whole tag and
    has no privateCreator (as dcm4che)."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=8)
    ds.add_new(0x00189087, "FD", [float("nan"), float("inf"), float("-inf")])  # DiffusionBValue
    ds.add_new(0x00090010, "PN", "NOT^A^CREATOR")
    ds.add_new(0x00091001, "LO", "under a PN creator")
    ds.add_new(0x00110010, "SQ", Sequence([Dataset()]))
    ds.add_new(0x00111001, "LO", "under an SQ creator")
    ds.add_new(0x00131001, "LO", "without a creator")
    assert web.ingest(ds).accepted
    url = f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata"
    [root] = _documents(web, url)
    check_native_model(root)
    assert _values(root, "DiffusionBValue") == ["NaN", "Infinity", "-Infinity"]
    private = {a.get("tag"): a.get("privateCreator")
               for a in root.findall(f"{{{NS}}}DicomAttribute") if a.get("keyword") is None}
    assert private == {"00091001": None, "00111001": None, "00131001": None}
    answer = web.get(url)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    [instance] = json.loads(answer.text, parse_constant=refuse)
    assert instance["00189087"]["Value"] == ["NaN", "Infinity", "-Infinity"]
