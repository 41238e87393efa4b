"""Structured Reports rendered as text (PS3.18 8.7.4, Table 8.7.4-1, Text category): the SR
Document Content Module (PS3.3 C.17.3) walked as its content tree, each content item its
concept name and its value by Value Type (PS3.3 Table C.17.3-7), into text/html (the
default), text/plain or text/xml.

Everything in an SR is outside input: every string is stripped of control characters
(what XML cannot carry replaced) and escaped for the output it goes to; the HTML has no
script, no link, no URL, and is served with a Content-Security-Policy that forbids
everything but its own style sheet.
The content tree is bounded (items, depth) before anything is rendered, and the output,
whose escaping makes up to six bytes of one, is reserved from its size as counted before
it is written, in one buffer.
"""

import base64
import hashlib
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from gateway.imaging.budget import ResourceBudget, refuse
from gateway.imaging.render import RenderError
from gateway.xml_text import xml_attribute, xml_characters, xml_text

# SR Storage SOP Classes (PS3.4 B.5: 1.2.840.10008.5.1.4.1.1.88.x, Key Object Selection
# included): the instances whose SR Document Content Module is rendered.
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TEXT_MEDIA_TYPES = ("text/html", "text/plain", "text/xml")  # the default first
# A content tree past these is refused rather than rendered: no report needs more, and the
# walk and the output stay small.
MAX_CONTENT_ITEMS = 10_000
MAX_CONTENT_DEPTH = 24

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:60em}"
          "dl.header{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}"
          "dt{font-weight:bold}dd{margin:0}section{margin-left:1em}"
          ".item{margin:.3em 0 .3em 1em}.concept{font-weight:bold}"
          ".relationship{color:#555;font-size:.85em}.text{white-space:pre-wrap}")
# Nothing but the inline style sheet above (its hash), no script, no form, no frame.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox")


def is_structured_report(sop_class_uid: str) -> bool:
    """True for the SOP Classes of SR documents."""
    return sop_class_uid.startswith(SR_CLASS_PREFIX)


@dataclass
class ContentItem:
    """One content item: relationship to its parent, concept name, value as text."""

    relationship: str
    value_type: str
    concept: str
    value: str
    children: list["ContentItem"] = field(default_factory=list)


@dataclass
class Report:
    """What is rendered of an SR document: its title, header lines, content."""

    title: str
    header: list[tuple[str, str]]
    content: list[ContentItem]


def _clean(value: object) -> str:
    """Text of a value, control characters (but tab and line ends) removed, and what XML
    cannot carry (U+FFFE, U+FFFF, a lone surrogate) replaced: the same text in every
    output."""
    if value is None:
        return ""
    return xml_characters(_CONTROL.sub("", str(value))).strip()


def _code(item: Dataset, keyword: str) -> str:
    """The meaning of the first code of sequence ``keyword`` of ``item``."""
    codes = item.get(keyword)
    if not codes:
        return ""
    code = codes[0]
    return _clean(code.get("CodeMeaning")) or _clean(code.get("CodeValue"))


def _person(value: object) -> str:
    """A PN as read: components separated by spaces, groups by ' = ' (PS3.5 6.2.1)."""
    groups = _clean(value).split("=")
    return " = ".join(" ".join(p for p in g.split("^") if p) for g in groups if g)


def _date(value: object) -> str:
    text = _clean(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if re.fullmatch(r"\d{8}", text) else text


def _time(value: object) -> str:
    text = _clean(value)
    return f"{text[:2]}:{text[2:4]}:{text[4:6]}".rstrip(":") if re.fullmatch(
        r"\d{2,6}(\.\d*)?", text) else text


def _reference(item: Dataset) -> str:
    """COMPOSITE, IMAGE, WAVEFORM: the SOP Class (its name) and Instance referenced."""
    refs = item.get("ReferencedSOPSequence")
    if not refs:
        return ""
    ref = refs[0]
    sop_class = _clean(ref.get("ReferencedSOPClassUID"))
    name = UID(sop_class).name if sop_class else ""
    text = f"{name or sop_class} {_clean(ref.get('ReferencedSOPInstanceUID'))}".strip()
    frames = ref.get("ReferencedFrameNumber")
    if frames is not None:
        numbers = frames if isinstance(frames, MultiValue) else [frames]
        text += " frame(s) " + ", ".join(_clean(n) for n in numbers)
    return text


def _value(item: Dataset, value_type: str) -> str:
    """The value of a content item as text, by Value Type (PS3.3 C.17.3.2.1)."""
    if value_type == "TEXT":
        return _clean(item.get("TextValue"))
    if value_type == "CODE":
        return _code(item, "ConceptCodeSequence")
    if value_type == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return _code(item, "NumericValueQualifierCodeSequence")
        units = measured[0].get("MeasurementUnitsCodeSequence")
        unit = _clean(units[0].get("CodeValue")) if units else ""
        return f"{_clean(measured[0].get('NumericValue'))} {unit}".strip()
    if value_type == "DATETIME":
        return _clean(item.get("DateTime"))
    if value_type == "DATE":
        return _date(item.get("Date"))
    if value_type == "TIME":
        return _time(item.get("Time"))
    if value_type == "PNAME":
        return _person(item.get("PersonName"))
    if value_type == "UIDREF":
        return _clean(item.get("UID"))
    if value_type in ("COMPOSITE", "IMAGE", "WAVEFORM"):
        return _reference(item)
    if value_type in ("SCOORD", "SCOORD3D"):
        data = item.get("GraphicData") or []
        points = len(data) // (2 if value_type == "SCOORD" else 3)
        return f"{_clean(item.get('GraphicType'))} ({points} point(s))"
    if value_type == "TCOORD":
        return _clean(item.get("TemporalRangeType"))
    return ""


class _Walk:
    """The content tree, counted as it is walked (refused past the limits)."""

    def __init__(self) -> None:
        self.items = 0

    def items_of(self, parent: Dataset, depth: int) -> list[ContentItem]:
        children = parent.get("ContentSequence") or []
        if children and depth > MAX_CONTENT_DEPTH:
            raise refuse(413, "sr_content", f"this report's content tree is nested more than "
                         f"{MAX_CONTENT_DEPTH} levels deep: not rendered")
        out = []
        for child in children:
            self.items += 1
            if self.items > MAX_CONTENT_ITEMS:
                raise refuse(413, "sr_content", f"this report has more than "
                             f"{MAX_CONTENT_ITEMS} content items: not rendered")
            relationship = _clean(child.get("RelationshipType"))
            if "ReferencedContentItemIdentifier" in child:  # by-reference (C.17.3.2.5)
                path = child.ReferencedContentItemIdentifier
                target = ".".join(_clean(n) for n in (path if isinstance(path, MultiValue)
                                                      else [path]))
                out.append(ContentItem(relationship, "REFERENCE", "",
                                       f"see content item {target}"))
                continue
            value_type = _clean(child.get("ValueType"))
            out.append(ContentItem(relationship, value_type,
                                   _code(child, "ConceptNameCodeSequence"),
                                   _value(child, value_type), self.items_of(child, depth + 1)))
        return out


def read_report(ds: Dataset) -> Report:
    """The report of an SR data set, its content tree bounded."""
    header = [
        ("Patient", _person(ds.get("PatientName"))),
        ("Patient ID", _clean(ds.get("PatientID"))),
        ("Birth date", _date(ds.get("PatientBirthDate"))),
        ("Sex", _clean(ds.get("PatientSex"))),
        ("Study date", _date(ds.get("StudyDate"))),
        ("Accession number", _clean(ds.get("AccessionNumber"))),
        ("Study", _clean(ds.get("StudyDescription"))),
        ("Content date", f"{_date(ds.get('ContentDate'))} "
                         f"{_time(ds.get('ContentTime'))}".strip()),
        ("Institution", _clean(ds.get("InstitutionName"))),
        ("Completion", _clean(ds.get("CompletionFlag"))),
        ("Verification", _clean(ds.get("VerificationFlag"))),
    ]
    for observer in ds.get("VerifyingObserverSequence") or []:
        header.append(("Verified by", _person(observer.get("VerifyingObserverName"))))
    title = _code(ds, "ConceptNameCodeSequence") or _clean(ds.get("SeriesDescription")) or \
        "Structured report"
    return Report(title, [(k, v) for k, v in header if v], _Walk().items_of(ds, 1))


def _relationship(item: ContentItem) -> str:
    return "" if item.relationship in ("CONTAINS", "") else item.relationship.lower()


def as_html(report: Report) -> Iterator[str]:
    """The report as a standalone HTML5 document, every value escaped: its pieces."""
    esc = html.escape
    yield '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
    yield esc(report.title)
    yield f"</title><style>{_STYLE}</style></head><body><h1>"
    yield esc(report.title)
    yield '</h1><dl class="header">'
    for name, value in report.header:
        yield f"<dt>{esc(name)}</dt><dd>"
        yield esc(value)
        yield "</dd>"
    yield "</dl>"

    def label(item: ContentItem) -> Iterator[str]:
        if relationship := _relationship(item):
            yield '<span class="relationship">('
            yield esc(relationship)
            yield ")</span> "

    def items(content: list[ContentItem], level: int) -> Iterator[str]:
        for item in content:
            if item.value_type == "CONTAINER":
                heading = min(level, 6)
                yield f"<section><h{heading}>"
                yield from label(item)
                yield esc(item.concept or "Section")
                yield f"</h{heading}>"
                yield from items(item.children, level + 1)
                yield "</section>"
                continue
            yield '<div class="item">'
            yield from label(item)
            if item.concept:
                yield '<span class="concept">'
                yield esc(item.concept)
                yield ":</span> "
            yield f'<span class="{"text" if item.value_type == "TEXT" else "value"}">'
            yield esc(item.value)
            yield "</span>"
            yield from items(item.children, level + 1)
            yield "</div>"

    yield from items(report.content, 2)
    yield "</body></html>\n"


def as_text(report: Report) -> Iterator[str]:
    """The report as indented plain text: its pieces."""
    yield f"{report.title}\n"
    yield "=" * len(report.title) + "\n"
    for name, value in report.header:
        yield f"{name}: "
        yield value
        yield "\n"
    yield "\n"

    def items(content: list[ContentItem], indent: str) -> Iterator[str]:
        for item in content:
            yield indent
            if relationship := _relationship(item):
                yield "("
                yield relationship
                yield ") "
            if item.value_type == "CONTAINER":
                yield (item.concept or "Section").upper()
            else:
                if item.concept:
                    yield item.concept.replace("\n", "\n" + indent + "  ")
                    yield ": "
                yield item.value.replace("\n", "\n" + indent + "  ")
            yield "\n"
            yield from items(item.children, indent + "  ")

    yield from items(report.content, "")


def as_xml(report: Report) -> Iterator[str]:
    """The report as XML, <report><title/><header><field name=""/></header><item/>...:
    its pieces."""
    yield '<?xml version="1.0" encoding="UTF-8"?>\n<report><title>'
    yield xml_text(report.title)
    yield "</title><header>"
    for name, value in report.header:
        yield f'<field name="{xml_attribute(name)}">'
        yield xml_text(value)
        yield "</field>"
    yield "</header>"

    def items(content: list[ContentItem]) -> Iterator[str]:
        for item in content:
            yield '<item relationship="'
            yield xml_attribute(item.relationship)
            yield '" type="'
            yield xml_attribute(item.value_type)
            yield '" concept="'
            yield xml_attribute(item.concept)
            yield '">'
            if item.value:
                yield "<value>"
                yield xml_text(item.value)
                yield "</value>"
            yield from items(item.children)
            yield "</item>"

    yield from items(report.content)
    yield "</report>\n"


_WRITERS = {"text/html": as_html, "text/plain": as_text, "text/xml": as_xml}
# What writing in each media type makes of one character, in bytes more at most: HTML's
# and XML's character references (&quot;: six bytes for one), a line break in an XML
# attribute (&#10;); in plain text, a line break indented to the item's depth, and case
# mapping of relationships and section titles (three bytes of one at most, SpecialCasing:
# U+0390 to three characters of two bytes).
_ESCAPE_GROWTH = {
    "text/html": (("&", 4), ("<", 3), (">", 3), ('"', 5), ("'", 5)),
    "text/xml": (("&", 4), ("<", 3), (">", 3), ('"', 5), ("\t", 4), ("\n", 4), ("\r", 4)),
    "text/plain": (),
}
_CASE_GROWTH = 3
# The markup around what is counted, in bytes at most: a document's (style sheet and
# all), a header field's, a content item's (a plain text item's indentation aside).
_DOCUMENT_MARKUP = 512 + len(_STYLE)
_FIELD_MARKUP, _ITEM_MARKUP = 64, 192


def _utf8_bound(text: str) -> int:
    """Bytes of ``text`` in UTF-8 at most: its length times that of its widest character;
    as much as the ``str`` itself holds (1, 2 or 4 bytes a character)."""
    if text.isascii():
        return len(text)
    widest = ord(max(text))
    return len(text) * (2 if widest < 0x800 else 3 if widest < 0x10000 else 4)


def _written_bound(text: str, media_type: str, depth: int, case_mapped: bool = False) -> int:
    """Bytes of ``text`` at most once written in ``media_type``, at ``depth`` in the
    content tree."""
    size = _utf8_bound(text)
    if media_type == "text/plain":
        size *= _CASE_GROWTH if case_mapped else 1
        size += (2 * depth + 2) * text.count("\n")
    return size + sum(growth * text.count(char) for char, growth in _ESCAPE_GROWTH[media_type])


def _output_bound(report: Report, media_type: str) -> tuple[int, int]:
    """Bytes at most of the report in ``media_type``, and of the largest of its written
    values (one piece of the output, held twice while it is encoded)."""
    title = _written_bound(report.title, media_type, 0)  # twice: a title and a heading
    fields = [_written_bound(value, media_type, 0) for _, value in report.header]
    size = _DOCUMENT_MARKUP + 2 * title + sum(fields) + _FIELD_MARKUP * len(fields)
    largest = max([title, *fields])

    def items(content: list[ContentItem], depth: int) -> None:
        nonlocal size, largest
        for item in content:
            pieces = (_written_bound(item.relationship, media_type, depth, case_mapped=True),
                      _written_bound(item.value_type, media_type, depth),
                      _written_bound(item.concept, media_type, depth,
                                     case_mapped=item.value_type == "CONTAINER"),
                      _written_bound(item.value, media_type, depth))
            size += _ITEM_MARKUP + 2 * depth + sum(pieces)
            largest = max(largest, *pieces)
            items(item.children, depth + 1)

    items(report.content, 0)
    return size, largest


def _encoded(pieces: Iterator[str]) -> bytes:
    """The pieces in UTF-8, one buffer: no list of them, no second copy of the whole."""
    out = BytesIO()
    for piece in pieces:
        out.write(piece.encode())
    return out.getvalue()


def render_report(path: Path, media_type: str, budget: ResourceBudget) -> bytes:
    """The SR document of ``path`` in ``media_type`` (one of TEXT_MEDIA_TYPES), read
    within the decode budget: its whole header reserved first, then what its output
    takes at most (escaping makes up to six bytes of one). Blocking: call it in the
    decode pool."""
    with budget.reserve_header_read(path, as_json=True) as held:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, ValueError, OSError) as exc:
            raise RenderError(f"cannot read this report: {exc}") from exc
        if ds.get("ValueType") != "CONTAINER":
            raise RenderError("this object has no SR document content to render")
        try:
            report = read_report(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # malformed items
            raise RenderError(f"cannot render this report: {exc}") from exc
        size, largest = _output_bound(report, media_type)
        # The output grows in one buffer (by an eighth past what it holds), and one piece
        # of it, escaped then encoded, is held twice meanwhile; the header stays read. One
        # reservation grown: one that could never fit is a 413, not a wait for room.
        held.what = "rendering this report"
        held.resize(held.size + size + size // 8 + 2 * largest)
        return _encoded(_WRITERS[media_type](report))
