"""Byte-level helpers for DICOM Part 10 files (PS3.10 7.1): preamble, prefix, meta group."""

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

PREAMBLE_LENGTH = 128
PREFIX = b"DICM"
# VRs whose explicit VR header has a 4-byte length after two reserved bytes (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)


@dataclass(frozen=True, slots=True)
class FileMeta:
    """Where a Part 10 file's data set starts, and its Transfer Syntax UID (None if absent)."""

    dataset_offset: int
    transfer_syntax: str | None


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


def read_file_meta(file: BinaryIO) -> FileMeta:
    """Walk the File Meta group (explicit VR little endian) of the Part 10 file ``file``
    (seekable, at any position); ``file`` is left at the first byte of the data set.

    Walks the group-2 elements instead of trusting (0002,0000), which some writers omit or
    get wrong.
    """
    size = file.seek(0, io.SEEK_END)
    file.seek(PREAMBLE_LENGTH + len(PREFIX))
    syntax = None
    while len(head := file.read(8)) == 8:
        group, element, vr, length = struct.unpack("<HH2sH", head)
        if group != 0x0002:
            file.seek(-8, io.SEEK_CUR)
            break
        if vr in LONG_LENGTH_VRS:
            length, = struct.unpack("<L", file.read(4).ljust(4, b"\0"))
        if element == 0x0010 and length <= 64:
            syntax = file.read(length).rstrip(b"\0 ").decode("ascii", "replace")
        else:
            file.seek(length, io.SEEK_CUR)
    offset = min(file.tell(), size)
    file.seek(offset)
    return FileMeta(offset, syntax)


def dataset_offset(data: bytes) -> int:
    """Offset of the first byte after the File Meta group of the Part 10 file ``data``."""
    return read_file_meta(io.BytesIO(data)).dataset_offset


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
