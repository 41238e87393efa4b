"""Rendered SR documents, encapsulated PDFs and presentation states (issue 15, findings 15
and 16): the Text category of PS3.18 Table 8.7.4-1 through WADO-RS /rendered and
WADO-URI, and WADO-URI ``presentationUID`` applying a Grayscale Softcopy Presentation
State, checked pixel by pixel against pydicom's own Modality LUT and windowing."""

import copy
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from gateway.config import Settings
from gateway.imaging.budget import ResourceBudget
from gateway.imaging.structured_report import (
    MAX_CONTENT_DEPTH,
    MAX_CONTENT_ITEMS,
    render_report,
)
from tests.inprocess import InProcessService, received
from tests.multipart import parts_of
from tests.synthetic import ct_slice
from tests.test_access_model import publish
from tests.test_rendered import oracle_gray

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
STUDY, IMAGE_SERIES, SR_SERIES, HUGE_SERIES, PDF_SERIES, PR_SERIES = (
    generate_uid() for _ in range(6))
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _object(sop_class: str, series: str, number: int, modality: str, **attributes: object
            ) -> Dataset:
    """A non-image object of the study: patient and study modules of the CT slices."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "DUPONT^JEAN", "PAT001", "HOSP"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "M"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = STUDY, "20260110", "101500"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC001", "1", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, 1, number
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, meaning: str, scheme: str = "DCM") -> Sequence:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return Sequence([code])


def _item(value_type: str, meaning: str, relationship: str = "CONTAINS", **values: object
          ) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = _code("C" + str(abs(hash(meaning)) % 10**6), meaning, "99X")
    if value_type == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _report(content: list[Dataset], series: str = SR_SERIES, number: int = 10) -> Dataset:
    """A Basic Text SR (TID 2000-like) with ``content`` under its root container."""
    ds = _object(BASIC_TEXT_SR, series, number, "SR", ValueType="CONTAINER",
                 ContinuityOfContent="SEPARATE", CompletionFlag="COMPLETE",
                 VerificationFlag="UNVERIFIED", ContentDate="20260111", ContentTime="0930")
    ds.ConceptNameCodeSequence = _code("18748-4", "Compte rendu d'imagerie", "LN")
    ds.ContentSequence = Sequence(content)
    return ds


def _nested_report() -> Dataset:
    """Nested containers, non-ASCII text, a hostile text value, a number, a code."""
    measured = Dataset()
    measured.NumericValue = "23.5"
    measured.MeasurementUnitsCodeSequence = _code("mm", "millimeter", "UCUM")
    liver = _item("CONTAINER", "Foie")
    liver.ContentSequence = Sequence([
        _item("NUM", "Diamètre", MeasuredValueSequence=Sequence([measured])),
        _item("CODE", "Aspect", ConceptCodeSequence=_code("R-1", "hétérogène", "99X"))])
    findings = _item("CONTAINER", "Constatations")
    findings.ContentSequence = Sequence([
        _item("TEXT", "Constatation", TextValue="Hépatomégalie modérée.\nPas d'épanchement."),
        _item("TEXT", "Commentaire", TextValue=HOSTILE), liver])
    by_reference = Dataset()  # the findings, by reference (PS3.3 C.17.3.2.5), VM 1
    by_reference.RelationshipType, by_reference.ReferencedContentItemIdentifier = \
        "INFERRED FROM", 1
    conclusion = _item("TEXT", "Conclusion", TextValue="Contrôle à 3 mois 山田")
    conclusion.ContentSequence = Sequence([by_reference])
    return _report([findings, conclusion])


def _deep_report(levels: int) -> Dataset:
    root = _item("CONTAINER", "Niveau 1")
    node = root
    for level in range(2, levels + 1):
        child = _item("CONTAINER", f"Niveau {level}")
        node.ContentSequence = Sequence([child])
        node = child
    return _report([root], HUGE_SERIES, 11)


def _pdf(padding: int) -> bytes:
    """A valid one-page PDF (objects, cross-reference table with their offsets, trailer)
    whose content stream carries ``padding`` bytes of comment; its length is odd."""
    stream = b"BT /F1 24 Tf 72 720 Td (Compte rendu) Tj ET\n%" + b"x" * padding + b"\n"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF" % (
        len(objects) + 1, xref)
    if len(out) % 2 == 0:
        out += b"\n"
    return bytes(out)


def _encapsulated(pdf: bytes, number: int) -> Dataset:
    return _object(ENCAPSULATED_PDF, PDF_SERIES, number, "DOC", BurnedInAnnotation="YES",
                   DocumentTitle="Compte rendu", MIMETypeOfEncapsulatedDocument="application/pdf",
                   EncapsulatedDocument=pdf + b"\0", EncapsulatedDocumentLength=len(pdf),
                   ConceptNameCodeSequence=_code("18748-4", "Compte rendu", "LN"))


IMAGE = ct_slice(STUDY, IMAGE_SERIES, 1, 1, size=64, BitsStored=16, HighBit=15)
OTHER_IMAGE = ct_slice(STUDY, IMAGE_SERIES, 1, 2, size=64)


def _presentation(image: Dataset, rotation: int = 90, flip: str = "Y",
                  area: tuple[int, int, int, int] | None = None, series: str = PR_SERIES,
                  number: int = 20) -> Dataset:
    """A GSPS for ``image``: its own Modality LUT (intercept 0, not the image's -1024), a
    window, a rotation and flip, optionally a displayed area."""
    ps = _object(GSPS, series, number, "PR", ContentLabel="PS", PresentationCreationDate="20260111",
                 PresentationCreationTime="093000", RescaleSlope=1, RescaleIntercept=0,
                 RescaleType="US", ImageRotation=rotation, ImageHorizontalFlip=flip,
                 PresentationLUTShape="IDENTITY")
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series_item = Dataset()
    series_item.SeriesInstanceUID = image.SeriesInstanceUID
    series_item.ReferencedImageSequence = Sequence([reference])
    ps.ReferencedSeriesSequence = Sequence([series_item])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 1200, 1000
    ps.SoftcopyVOILUTSequence = Sequence([voi])
    if area is not None:
        selection = Dataset()
        selection.DisplayedAreaTopLeftHandCorner = list(area[:2])
        selection.DisplayedAreaBottomRightHandCorner = list(area[2:])
        selection.PresentationSizeMode = "SCALE TO FIT"
        selection.PresentationPixelAspectRatio = [1, 1]
        ps.DisplayedAreaSelectionSequence = Sequence([selection])
    return ps


REPORT = _nested_report()
SECOND_REPORT = _report([_item("TEXT", "Conclusion", TextValue="Normal")], number=12)
DEEP = _deep_report(MAX_CONTENT_DEPTH + 2)
WIDE = _report([_item("TEXT", "Ligne", TextValue=str(n)) for n in range(MAX_CONTENT_ITEMS + 1)],
               HUGE_SERIES, 13)
PDF = _pdf(9000)  # past the header read's deferral: streamed from the file
SMALL_PDF = _pdf(10)
DOCUMENT, SMALL_DOCUMENT = _encapsulated(PDF, 30), _encapsulated(SMALL_PDF, 31)
ROTATED = _presentation(IMAGE)
AREA = _presentation(IMAGE, rotation=270, flip="N", area=(5, 17, 44, 48), number=21)
ELSEWHERE = _presentation(OTHER_IMAGE, number=22)  # references the other image only


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    with InProcessService(tmp_path_factory.mktemp("documents") / "data") as web:
        web.ingest_all([IMAGE, OTHER_IMAGE, REPORT, SECOND_REPORT, DEEP, WIDE, DOCUMENT,
                        SMALL_DOCUMENT, ROTATED, AREA, ELSEWHERE])
        yield web


def rendered(web: InProcessService, ds: Dataset, accept: str | None = None) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    return web.get(f"/dicom-web/studies/{STUDY}/series/{ds.SeriesInstanceUID}/instances/"
                   f"{ds.SOPInstanceUID}/rendered", headers=headers)


def wado(web: InProcessService, ds: Dataset, **params: str) -> httpx.Response:
    return web.get("/wado", params={"requestType": "WADO", "studyUID": STUDY,
                                    "seriesUID": ds.SeriesInstanceUID,
                                    "objectUID": ds.SOPInstanceUID, **params})


class _Structure(HTMLParser):
    """The elements of an HTML document as (tag, depth of sections, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sections = 0
        self.headings: list[tuple[int, str]] = []
        self.text: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self.sections += tag == "section"
        if tag in ("h2", "h3", "h4"):
            self._heading = ""

    def handle_endtag(self, tag: str) -> None:
        self.sections -= tag == "section"
        if tag in ("h2", "h3", "h4") and self._heading is not None:
            self.headings.append((self.sections, self._heading))
            self._heading = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._heading is not None:
            self._heading += data


# --- finding 15: SR and PDF are rendered -----------------------------------------------------

def test_a_report_is_html_by_default_nested_escaped_and_confined(
        service: InProcessService) -> None:
    response = rendered(service, REPORT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy and "sandbox" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    page = _Structure()
    page.feed(response.text)
    assert "script" not in page.tags and "img" not in page.tags  # the hostile text is text
    text = "".join(page.text)
    assert HOSTILE in text
    assert "Hépatomégalie modérée." in text and "Contrôle à 3 mois 山田" in text
    assert "23.5 mm" in text and "hétérogène" in text and "DUPONT JEAN" in text
    assert "(inferred from) see content item 1" in text
    # The container of the liver is inside the findings': nested as in the content tree.
    assert (1, "Constatations") in page.headings and (2, "Foie") in page.headings


def test_a_report_as_plain_text_and_xml(service: InProcessService) -> None:
    plain = rendered(service, REPORT, "text/plain")
    assert plain.headers["content-type"] == "text/plain; charset=utf-8"
    lines = plain.text.splitlines()
    assert lines[0] == "Compte rendu d'imagerie"
    assert "CONSTATATIONS" in lines and "  FOIE" in lines and "    Diamètre: 23.5 mm" in lines
    xml = rendered(service, REPORT, "text/xml")
    root = ET.fromstring(xml.content)
    liver = root.find("./item[@concept='Constatations']/item[@concept='Foie']")
    assert liver is not None
    assert liver.find("./item[@concept='Diamètre']/value").text == "23.5 mm"
    assert HOSTILE in [v.text for v in root.iter("value")]


def test_a_report_refuses_what_its_category_does_not_offer(service: InProcessService) -> None:
    response = rendered(service, REPORT, "image/jpeg")
    assert response.status_code == 406
    assert "text/html, text/plain, text/xml" in response.text
    windowed = service.get(f"/dicom-web/studies/{STUDY}/series/{SR_SERIES}/instances/"
                           f"{REPORT.SOPInstanceUID}/rendered", params={"window": "40,400"})
    assert windowed.status_code == 400 and "apply to images" in windowed.text


def test_a_series_of_reports_is_one_multipart_of_html(service: InProcessService) -> None:
    response = service.get(f"/dicom-web/studies/{STUDY}/series/{SR_SERIES}/rendered",
                           headers={"Accept": "text/html"})
    assert response.status_code == 200, response.text
    assert 'type="text/html"' in response.headers["content-type"]
    parts = parts_of(response)
    assert len(parts) == 2
    assert all(headers["Content-Type"] == "text/html; charset=utf-8" for headers, _ in parts)
    assert "Hépatomégalie" in parts[0][1].decode() and "Normal" in parts[1][1].decode()
    # The study: images first for */* (the default category), reports when asked for.
    study = service.get(f"/dicom-web/studies/{STUDY}/rendered", headers={"Accept": "text/*"})
    assert study.status_code == 200 and 'type="text/html"' in study.headers["content-type"]


def test_a_huge_or_deep_report_is_refused_clearly(service: InProcessService) -> None:
    deep = rendered(service, DEEP)
    assert deep.status_code == 413 and f"more than {MAX_CONTENT_DEPTH} levels" in deep.text
    wide = rendered(service, WIDE, "text/plain")
    assert wide.status_code == 413 and f"more than {MAX_CONTENT_ITEMS} content" in wide.text


def test_a_pdf_is_served_as_itself(service: InProcessService) -> None:
    for document, pdf in ((DOCUMENT, PDF), (SMALL_DOCUMENT, SMALL_PDF)):
        response = rendered(service, document)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/pdf"
        assert response.content == pdf  # the padding dropped (Encapsulated Document Length)
        assert response.content.startswith(b"%PDF-1.4")
        assert response.content.rstrip().endswith(b"%%EOF")
        assert int(response.headers["content-length"]) == len(pdf)
    assert rendered(service, DOCUMENT, "text/html").status_code == 406
    uri = wado(service, DOCUMENT, contentType="application/pdf")
    assert uri.status_code == 200 and uri.content == PDF


def test_wado_uri_renders_reports_in_their_media_types(service: InProcessService) -> None:
    default = wado(service, REPORT)  # no contentType: the category's default, text/html
    assert default.status_code == 200 and default.headers["content-type"].startswith(
        "text/html")
    assert "&lt;script&gt;" in default.text and "<script" not in default.text
    plain = wado(service, REPORT, contentType="text/plain")
    assert plain.status_code == 200 and "Hépatomégalie" in plain.text
    assert wado(service, REPORT, contentType="image/jpeg").status_code == 406
    windowed = wado(service, REPORT, contentType="text/html", windowCenter="40",
                    windowWidth="400")
    assert windowed.status_code == 400 and "apply to images" in windowed.text
    image = wado(service, IMAGE, contentType="text/html")
    assert image.status_code == 406 and "image/jpeg" in image.text


# --- finding 16: WADO-URI presentationUID applies the presentation state ---------------------

def _png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(BytesIO(response.content))).astype(int)


def _expected(ps: Dataset) -> np.ndarray:
    """pydicom's Modality LUT (the presentation state's: intercept 0) and windowing."""
    ds = copy.deepcopy(IMAGE)
    ds.RescaleIntercept = ps.RescaleIntercept
    item = ps.SoftcopyVOILUTSequence[0]
    return oracle_gray(ds, IMAGE.pixel_array, item.WindowCenter, item.WindowWidth)


def test_the_presentation_state_window_rotation_and_flip_are_applied(
        service: InProcessService) -> None:
    got = _png(wado(service, IMAGE, contentType="image/png", presentationUID=ROTATED.SOPInstanceUID,
                    presentationSeriesUID=PR_SERIES))
    # Rotated 90 degrees clockwise, then flipped left-right (PS3.3 C.10.6).
    expected = np.fliplr(np.rot90(_expected(ROTATED), k=-1))
    assert np.abs(got - expected).max() <= 1
    plain = _png(wado(service, IMAGE, contentType="image/png"))
    assert np.abs(plain - expected).max() > 1  # without it: another picture


def test_the_displayed_area_is_cut_before_the_rotation(service: InProcessService) -> None:
    got = _png(wado(service, IMAGE, contentType="image/png", presentationUID=AREA.SOPInstanceUID,
                    presentationSeriesUID=PR_SERIES))
    # Columns 5..44 and rows 17..48 (from 1), then 270 degrees clockwise.
    expected = np.rot90(_expected(AREA)[16:48, 4:44], k=-3)
    assert got.shape == (40, 32)
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("params, status, message", [
    ({"presentationUID": "1.2.3.999", "presentationSeriesUID": PR_SERIES}, 404,
     "no presentation state 1.2.3.999"),
    ({"presentationUID": ROTATED.SOPInstanceUID, "presentationSeriesUID": IMAGE_SERIES}, 404,
     "no presentation state"),  # the series must be the presentation state's
    ({"presentationUID": ROTATED.SOPInstanceUID}, 400, "presentationSeriesUID must be"),
    ({"presentationUID": ELSEWHERE.SOPInstanceUID, "presentationSeriesUID": PR_SERIES}, 400,
     "does not apply"),
    ({"presentationUID": REPORT.SOPInstanceUID, "presentationSeriesUID": SR_SERIES}, 422,
     "not a Grayscale Softcopy Presentation State"),
    ({"presentationUID": ROTATED.SOPInstanceUID, "presentationSeriesUID": PR_SERIES,
      "windowCenter": "40", "windowWidth": "400"}, 400, "cannot be used with"),
])
def test_a_presentation_state_that_cannot_apply_is_refused(
        service: InProcessService, params: dict, status: int, message: str) -> None:
    response = wado(service, IMAGE, contentType="image/png", **params)
    assert response.status_code == status, response.text
    assert message in response.text


def test_a_presentation_state_outside_the_manifest_is_unknown(tmp_path_factory:
                                                               pytest.TempPathFactory) -> None:
    with InProcessService(tmp_path_factory.mktemp("scoped") / "data") as web:
        web.ingest_all([IMAGE, ROTATED])
        kos = publish(web, STUDY)
        web.ingest_all([AREA])  # stored after the publication: not in the manifest
        scoped = {"KOS-SOPInstanceUID": kos}
        query = {"requestType": "WADO", "studyUID": STUDY, "seriesUID": IMAGE_SERIES,
                 "objectUID": IMAGE.SOPInstanceUID, "contentType": "image/png",
                 "presentationSeriesUID": PR_SERIES}
        inside = web.get("/wado", params={**query, "presentationUID": ROTATED.SOPInstanceUID},
                         headers=scoped)
        assert inside.status_code == 200
        outside = web.get("/wado", params={**query, "presentationUID": AREA.SOPInstanceUID},
                          headers=scoped)
        assert outside.status_code == 404 and "no presentation state" in outside.text


# --- review of findings 15 and 16: hostile documents, presentation states, reports --------

CDA = "1.2.840.10008.5.1.4.1.1.104.2"
SCRIPTED_CDA = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3">'
                b'<html:script xmlns:html="http://www.w3.org/1999/xhtml">fetch("/dicom-web/studies")'
                b"</html:script></ClinicalDocument>\n")


def _cda(document: bytes) -> Dataset:
    return _object(CDA, PDF_SERIES, 40, "DOC", BurnedInAnnotation="NO", DocumentTitle="CDA",
                   MIMETypeOfEncapsulatedDocument="text/xml", EncapsulatedDocument=document,
                   EncapsulatedDocumentLength=len(document),
                   ConceptNameCodeSequence=_code("18748-4", "Compte rendu", "LN"))


def test_an_encapsulated_cda_runs_nothing_on_the_gateway_origin(
        service: InProcessService) -> None:
    cda = _cda(SCRIPTED_CDA)
    assert service.ingest(cda).accepted
    for response in (rendered(service, cda), wado(service, cda, contentType="text/xml")):
        assert response.status_code == 200, response.text
        assert response.content == SCRIPTED_CDA
        # The XML declaration names the encoding: no charset parameter overrides it.
        assert response.headers["content-type"] == "text/xml"
        assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
        assert response.headers["x-content-type-options"] == "nosniff"
    # The text/xml of an SR: the same confinement.
    xml = rendered(service, REPORT, "text/xml")
    assert xml.headers["content-security-policy"] == "default-src 'none'; sandbox"


def test_a_pdf_is_named_inline_and_never_sniffed(service: InProcessService) -> None:
    response = rendered(service, DOCUMENT)
    assert response.headers["content-disposition"] == \
        f'inline; filename="{DOCUMENT.SOPInstanceUID}.pdf"'
    assert response.headers["x-content-type-options"] == "nosniff"
    # No sandbox: the browsers' PDF viewers would not start (see gateway.web.dicomweb.rendered).
    assert "sandbox" not in response.headers.get("content-security-policy", "")


@pytest.mark.parametrize("pdf", [SMALL_PDF, PDF], ids=["read with the header", "streamed"])
@pytest.mark.parametrize("vr, value", [("LO", "abc"), ("UL", [5, 6]), ("SL", -5),
                                       ("UL", 1 << 30)],
                         ids=["text", "two values", "negative", "past the value"])
def test_a_hostile_encapsulated_document_length_is_ignored(
        service: InProcessService, pdf: bytes, vr: str, value: object) -> None:
    ds = _encapsulated(pdf, 41)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.EncapsulatedDocumentLength
    ds.add_new(0x00420015, vr, value)
    assert service.ingest(ds).accepted
    response = rendered(service, ds)
    assert response.status_code == 200, response.text
    assert response.content == pdf + b"\0"  # the stored value whole, padding and all
    assert int(response.headers["content-length"]) == len(pdf) + 1
    head = service.request("HEAD", f"/dicom-web/studies/{STUDY}/series/{PDF_SERIES}/"
                                   f"instances/{ds.SOPInstanceUID}/rendered")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(pdf) + 1)


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    lut = Dataset()
    lut.add_new(0x00283002, "US", descriptor)  # LUT Descriptor
    lut.add_new(0x00283006, "US", data)  # LUT Data
    return lut


def _voi(**attributes: object) -> Sequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return Sequence([item])


def _frame_text(ps: Dataset) -> None:
    reference = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    reference.add_new(0x00081160, "LO", "x")  # Referenced Frame Number, not a number


def _hostile(label: str, change: object) -> Dataset:
    ps = _presentation(IMAGE, rotation=0, flip="N", number=50)
    ps.SOPInstanceUID = ps.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ps.ContentLabel = label
    if callable(change):
        change(ps)
    else:
        for keyword, value in change.items():
            setattr(ps, keyword, value)
    return ps


def _area(corners: tuple[int, int, int, int]) -> object:
    def change(ps: Dataset) -> None:
        selection = Dataset()
        selection.DisplayedAreaTopLeftHandCorner = list(corners[:2])
        selection.DisplayedAreaBottomRightHandCorner = list(corners[2:])
        selection.PresentationSizeMode = "SCALE TO FIT"
        ps.DisplayedAreaSelectionSequence = Sequence([selection])
    return change


def _modality_lut(ps: Dataset) -> None:
    del ps.RescaleSlope, ps.RescaleIntercept, ps.RescaleType
    item = _lut_item([3, 0, 0], [1, 2, 3])
    item.ModalityLUTType = "HU"
    ps.ModalityLUTSequence = Sequence([item])


SL_MIN = -(1 << 31)


@pytest.mark.parametrize("ps, message", [
    (_hostile("AREA_MIN", _area((SL_MIN, SL_MIN, SL_MIN + 1, SL_MIN + 1))),
     "Displayed Area corner past 131070"),
    (_hostile("AREA_MAX", _area(((1 << 31) - 1,) * 4)),
     "Displayed Area corner past 131070"),
    (_hostile("VOI_BITS", {"SoftcopyVOILUTSequence": _voi(
        VOILUTSequence=Sequence([_lut_item([3, 0, 0], [1, 2, 3])]))}),
     "VOI LUT declares 0 bits an entry, not 8 to 16"),
    (_hostile("VOI_SHORT", {"SoftcopyVOILUTSequence": _voi(
        VOILUTSequence=Sequence([_lut_item([4096, 0, 12], [1, 2, 3])]))}),
     "VOI LUT declares 4096 entries and has 3"),
    (_hostile("VOI_WIDE", {"SoftcopyVOILUTSequence": _voi(
        VOILUTSequence=Sequence([_lut_item([2, 0, 8], [1, 300])]))}),
     "VOI LUT has entries past its 8 bits"),
    (_hostile("MODALITY", _modality_lut), "Modality LUT declares 0 bits an entry, not 8 or 16"),
    (_hostile("FRAME", _frame_text), "cannot be read"),
    (_hostile("SIGMOID", {"SoftcopyVOILUTSequence": _voi(
        WindowCenter=100, WindowWidth=0, VOILUTFunction="SIGMOID")}),
     "window width must be greater than 0 for a SIGMOID"),
    (_hostile("EXACT", {"SoftcopyVOILUTSequence": _voi(
        WindowCenter=100, WindowWidth=0, VOILUTFunction="LINEAR_EXACT")}),
     "window width must be greater than 0 for a LINEAR_EXACT"),
], ids=lambda value: value.ContentLabel if isinstance(value, Dataset) else None)
def test_a_malformed_presentation_state_is_a_clear_422(
        service: InProcessService, ps: Dataset, message: str) -> None:
    assert service.ingest(ps).accepted
    response = wado(service, IMAGE, contentType="image/png", presentationUID=ps.SOPInstanceUID,
                    presentationSeriesUID=PR_SERIES)
    assert response.status_code == 422, response.text
    assert message in response.text


def _own_voi_lut(descriptor: list[int], data: list[int], number: int) -> Dataset:
    """The image with a VOI LUT of its own in place of its window."""
    ds = ct_slice(STUDY, IMAGE_SERIES, 1, number, size=16)
    del ds.WindowCenter, ds.WindowWidth
    ds.VOILUTSequence = Sequence([_lut_item(descriptor, data)])
    return ds


def test_an_image_voi_lut_past_its_bits_is_clipped_or_refused(
        service: InProcessService) -> None:
    # 12 bits declared, 16 used: as white as can be, not wrapped around by the cast.
    loud = _own_voi_lut([4096, 0, 12], [65535] * 4096, 60)
    # 8 bits declared, a value pydicom cannot hold in them: refused, not a 500.
    wide = _own_voi_lut([2, 0, 8], [1, 300], 61)
    assert service.ingest(loud).accepted and service.ingest(wide).accepted
    assert (_png(wado(service, loud, contentType="image/png")) == 255).all()
    refused = wado(service, wide, contentType="image/png")
    assert refused.status_code == 422 and "cannot render this instance" in refused.text


def test_a_report_as_xml_is_well_formed_whatever_its_characters(
        service: InProcessService) -> None:
    """U+FFFE, U+FFFF (and C0 controls) are no XML 1.0 characters (2.2): replaced by U+FFFD
    as in the Native DICOM Model, so that the document still parses."""
    report = _report([_item("TEXT", "Bad\uffff", TextValue="a\uffffb\ufffe c\x85d\x01")],
                     number=71)
    report.StudyDescription = "\ufffe"
    assert service.ingest(report).accepted
    root = ET.fromstring(rendered(service, report, "text/xml").content)
    item = root.find("./item")
    assert item is not None and item.get("concept") == "Bad\ufffd"
    assert item.find("value").text == "a\ufffdb\ufffd c\x85d"
    assert root.find("./header/field[@name='Study']").text == "\ufffd"


MIB = 1 << 20


def _escaping_report(unit: str, size: int, depth: int) -> Dataset:
    """A report of ``size`` bytes of ``unit`` in 40 text items, ``depth`` containers deep:
    what escaping (or plain text's indentation) makes several bytes of."""
    text = unit * (size // 40 // len(unit))
    items = [_item("TEXT", "Texte", TextValue=text) for _ in range(40)]
    for level in range(depth):
        container = _item("CONTAINER", f"Niveau {level}")
        container.ContentSequence = Sequence(items)
        items = [container]
    return _report(items, HUGE_SERIES, 70)


@pytest.mark.parametrize("media, unit, depth", [
    ("text/html", '"', 0),  # &quot;: six bytes of one
    ("text/plain", "\n.", 6),  # each line break indented by the item's depth
    ("text/xml", "<", 0),  # &lt;
])
def test_a_report_is_rendered_within_the_memory_it_reserves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media: str, unit: str,
        depth: int) -> None:
    path = tmp_path / "report.dcm"
    path.write_bytes(received(_escaping_report(unit, 4 * MIB, depth)))
    settings = Settings(data_dir=tmp_path / "data").budget.model_dump()
    budget = ResourceBudget(**{**settings, "decode_memory_bytes": 4 << 30})
    held = [0]
    take = budget.memory._take

    def recorded(size: int, already: int, what: str) -> None:  # the high-water mark
        take(size, already, what)
        held[0] = max(held[0], budget.memory.in_use)

    monkeypatch.setattr(budget.memory, "_take", recorded)
    tracemalloc.start()
    try:
        out = render_report(path, media, budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) > 12 * MIB  # escaped (or indented) into several times the text
    assert peak <= held[0], f"{peak / MIB:.0f} MiB built, {held[0] / MIB:.0f} MiB reserved"
    assert budget.memory.in_use == 0


def test_a_report_whose_rendering_outgrows_the_budget_is_413(tmp_path: Path) -> None:
    quoted = _escaping_report('"', 6 * MIB, 0)
    with InProcessService(tmp_path / "data", decode_memory_bytes=64 * MIB) as web:
        web.ingest_all([quoted, REPORT])
        response = rendered(web, quoted)
        assert response.status_code == 413, response.status_code
        assert "rendering this report" in response.text
        assert "decode_memory_bytes" in response.text
        assert rendered(web, quoted, "text/plain").status_code == 200  # no escaping there
        assert rendered(web, REPORT).status_code == 200
