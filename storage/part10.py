"""Byte-level helpers for DICOM Part 10 files (PS3.10 7.1): preamble, prefix, meta group."""

import struct

PREAMBLE_LENGTH = 128
PREFIX = b"DICM"
# VRs whose explicit-VR header has a 4-byte length after two reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def is_part10(data: bytes) -> bool:
    """True when ``data`` starts with a 128-byte preamble followed by ``DICM``."""
    return data[PREAMBLE_LENGTH:PREAMBLE_LENGTH + 4] == PREFIX


def with_preamble(data: bytes) -> bytes | None:
    """``data`` as a Part 10 file, or None if it is not one.

    A file meta group without the preamble and prefix (what pydicom writes for a Dataset
    that has no preamble, e.g. dicomweb-client's STOW-RS bodies) gets them added: the data
    set bytes are untouched.
    """
    if is_part10(data):
        return data
    if data[:2] == b"\x02\x00" and data[4:6] in (b"UL", b"OB", b"UI"):
        return bytes(PREAMBLE_LENGTH) + PREFIX + data
    return None


def dataset_offset(data: bytes) -> int:
    """Offset of the first byte after the File Meta group (always explicit VR little endian).

    Walks the group-2 elements instead of trusting (0002,0000), which some writers omit or
    get wrong.
    """
    pos = PREAMBLE_LENGTH + len(PREFIX)
    while pos + 8 <= len(data):
        group, = struct.unpack_from("<H", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            length, = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return min(pos, len(data))


def dataset_bytes(data: bytes) -> memoryview:
    """The encoded data set of a Part 10 file, without preamble and meta group."""
    return memoryview(data)[dataset_offset(data):]


# Identifies files written by Passerelle (PS3.7 D.3.3.2); a 2.25 UUID-derived UID (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.226839675515972750423468003450261757781"
IMPLEMENTATION_VERSION_NAME = "PASSERELLE_0_1"


def _element(element: int, vr: bytes, value: str | bytes) -> bytes:
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "  # PS3.5 6.2: UI pads with NUL, text with space
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_preamble_and_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                           source_ae_title: str = "") -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received data set.

    Written by hand rather than through pydicom: this runs once per received instance.
    """
    elements = [
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", sop_class_uid),
        _element(0x0003, b"UI", sop_instance_uid),
        _element(0x0010, b"UI", transfer_syntax),
        _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID),
        _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME),
    ]
    if source_ae_title:
        elements.append(_element(0x0016, b"AE", source_ae_title))
    body = b"".join(elements)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * PREAMBLE_LENGTH + PREFIX + group_length + body
