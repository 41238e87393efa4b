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
