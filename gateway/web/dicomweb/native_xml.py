"""The Native DICOM Model (PS3.19 A.1) of an instance, written from its DICOM JSON (PS3.18
Annex F): both models carry the same things (VR, values, person name groups, sequence
items, inline binary, bulk data references), so the metadata cached as JSON serves both."""

import json
from collections.abc import Callable
from typing import Any

from pydicom.datadict import keyword_for_tag

from gateway.xml_text import xml_attribute, xml_text

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
_CREATOR_MAX = 64
_NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_NAME_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def native_xml(instance_json: str, bulk_uri: Callable[[str], str]) -> str:
    """The NativeDicomModel document of the DICOM JSON object ``instance_json``, each
    BulkDataURI passed through ``bulk_uri``. Numbers are written as the JSON spells them, a
    non-finite FD, FL or DS as "NaN", "Infinity" or "-Infinity" (as dcm4che writes them)."""
    # PS3.19 A.1 wants a DS or IS value as its DICOM string; the cached JSON has it as the
    # number pydicom makes of it (PS3.18 F.2.3), so "1.50" is written 1.5, "+0012" 12, and a
    # DS beyond a double's precision as the nearest double: a known limitation.
    body = json.loads(instance_json, parse_int=str, parse_float=str, parse_constant=str)
    out = [_DECLARATION, f'<NativeDicomModel xmlns="{NAMESPACE}">']
    _dataset(body, out, bulk_uri)
    out.append("</NativeDicomModel>\n")
    return "".join(out)


def _dataset(body: dict[str, Any], out: list[str], bulk_uri: Callable[[str], str]) -> None:
    for key, element in body.items():
        tag = int(key, 16)
        group, number = tag >> 16, tag & 0xFFFF
        vr = element["vr"]
        if group % 2:
            if number < 0x1000:
                # Private creators (and group lengths): the creator is carried by the
                # elements of its block, whose tag leaves the block out (PS3.19 A.1.5).
                continue
            if creator := _creator(body, group, number >> 8):
                out.append(f'<DicomAttribute tag="{group:04X}00{number & 0xFF:02X}" vr="{vr}" '
                           f'privateCreator="{xml_attribute(creator)}"')
            else:  # no (usable) creator: the whole tag, no privateCreator (as dcm4che)
                out.append(f'<DicomAttribute tag="{key.upper()}" vr="{vr}"')
        else:
            keyword = keyword_for_tag(tag)
            out.append(f'<DicomAttribute tag="{key.upper()}" vr="{vr}"' +
                       (f' keyword="{keyword}"' if keyword else ""))
        out.append(">")
        _value(element, vr, out, bulk_uri)
        out.append("</DicomAttribute>")


def _creator(body: dict[str, Any], group: int, block: int) -> str | None:
    """The private creator of ``block`` of ``group``: its first value when that is a
    non-empty string of at most 64 characters (an LO, PS3.5 6.2), None for none, for an
    element of another VR, or for a longer text (which each element would repeat)."""
    element = body.get(f"{group:04X}00{block:02X}")
    values = element.get("Value") if isinstance(element, dict) else None
    first = values[0] if isinstance(values, list) and values else None
    return first if isinstance(first, str) and 0 < len(first) <= _CREATOR_MAX else None


def _value(element: dict[str, Any], vr: str, out: list[str],
           bulk_uri: Callable[[str], str]) -> None:
    if "BulkDataURI" in element:
        out.append(f'<BulkData uri="{xml_attribute(bulk_uri(element["BulkDataURI"]))}"/>')
        return
    if "InlineBinary" in element:
        out.append(f"<InlineBinary>{element['InlineBinary']}</InlineBinary>")
        return
    for number, value in enumerate(element.get("Value", ()), start=1):
        if vr == "SQ":
            out.append(f'<Item number="{number}">')
            _dataset(value or {}, out, bulk_uri)
            out.append("</Item>")
        elif vr == "PN":
            out.append(f'<PersonName number="{number}">')
            for group in _NAME_GROUPS:
                if text := (value or {}).get(group):
                    out.append(f"<{group}>")
                    for name, component in zip(_NAME_COMPONENTS, text.split("^"), strict=False):
                        if component:
                            out.append(f"<{name}>{xml_text(component)}</{name}>")
                    out.append(f"</{group}>")
            out.append("</PersonName>")
        elif value is None:
            out.append(f'<Value number="{number}"/>')
        else:
            out.append(f'<Value number="{number}">{xml_text(str(value))}</Value>')
