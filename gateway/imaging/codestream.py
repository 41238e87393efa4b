"""Encapsulated frames (PS3.5 A.4): where a frame's fragments are, and the size its
codestream declares, both known before a byte of the frame is decoded.

The decode memory is reserved from the DICOM header (Rows, Columns, SamplesPerPixel,
BitsAllocated); a decoder allocates what the codestream itself declares. A codestream that
declares more than the header is refused before it is decoded.
"""

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments

from gateway.imaging.budget import refuse

_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203"}
RLE = "1.2.840.10008.1.2.5"
# Start of frame markers (T.81 B.1.1.3: C0-CF but DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55
# (T.87 C.2.2).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD


@dataclass(frozen=True)
class Declared:
    """What a codestream declares: its rows, columns, components and bits a sample."""

    rows: int
    columns: int
    components: int
    precision: int


class CodestreamError(ValueError):
    """A codestream whose header cannot be read."""


def declared_jpeg(data: bytes) -> Declared:
    """The frame header (SOFn, T.81 B.2.2; SOF55, T.87 C.2.2) of a JPEG or JPEG-LS stream."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("the JPEG codestream does not start with SOI")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise CodestreamError(f"no JPEG marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte (T.81 B.1.1.2)
            at += 1
            continue
        length = struct.unpack_from(">H", data, at + 2)[0]
        if marker in _SOF:
            if at + 10 > len(data):
                break
            precision, rows, columns, components = struct.unpack_from(">BHHB", data, at + 4)
            return Declared(rows, columns, components, precision)
        if marker in (0xDA, 0xD9):  # start of scan or end of image before any frame header
            break
        at += 2 + length
    raise CodestreamError("the JPEG codestream has no frame header (SOFn)")


def declared_j2k(data: bytes) -> Declared:
    """The image and tile size (SIZ, T.800 A.5.1) of a JPEG 2000 / HTJ2K codestream, or of
    the codestream box of a JP2 file (T.800 I.5.4), where a decoder looks for it: SIZ
    immediately follows SOC at the start of the codestream (A.4.1)."""
    at = _codestream_start(data)
    if data[at:at + 4] != b"\xff\x4f\xff\x51" or at + 42 > len(data):
        raise CodestreamError("the JPEG 2000 codestream does not start with SOC and SIZ")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 8)
    components = struct.unpack_from(">H", data, at + 40)[0]
    depths = data[at + 42:at + 42 + 3 * components:3]
    if len(depths) < components or xsiz < xosiz or ysiz < yosiz:
        raise CodestreamError("the JPEG 2000 SIZ marker is truncated or inconsistent")
    return Declared(ysiz - yosiz, xsiz - xosiz, components,
                    max((d & 0x7F) + 1 for d in depths) if depths else 0)


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _codestream_start(data: bytes) -> int:
    """Where the codestream of ``data`` starts: 0 for a bare codestream; in a JP2 file, in
    its first top-level Contiguous Codestream box (``jp2c``), found by walking the boxes
    (a SIZ elsewhere, in an XML box say, is not what the decoder reads)."""
    if not data.startswith(_JP2_SIGNATURE):
        return 0
    at = 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1:  # XLBox: a 64-bit length follows
            length, header = struct.unpack_from(">Q", data, at + 8)[0], 16
        if kind == b"jp2c":
            return at + header
        if length == 0 or length < header:  # the last box, or a malformed one
            break
        at += length
    raise CodestreamError("the JP2 file has no codestream box")


def check_frame(ds: Dataset, syntax: str, frame: bytes) -> None:
    """OverBudget 422 ``codestream_mismatch`` when the encoded ``frame`` declares more rows,
    columns, components or bits than the header of ``ds`` (the decode memory was reserved
    from it), or no readable size at all; RLE: more segments than SamplesPerPixel x bytes
    a sample (PS3.5 G.3.1; pydicom decodes into an array sized from the header)."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
    try:
        if syntax == RLE:
            if len(frame) < 64:
                raise CodestreamError("the RLE header is shorter than 64 bytes")
            segments = struct.unpack_from("<L", frame)[0]
            if segments > samples * ((bits + 7) // 8):
                raise CodestreamError(f"the RLE frame has {segments} segments, more than "
                                      f"{samples} sample(s) of {bits} bits have")
            return
        if syntax in _JPEG:
            declared = declared_jpeg(frame)
        elif syntax in _J2K:
            declared = declared_j2k(frame)
        else:
            return
    except (CodestreamError, struct.error) as exc:
        raise refuse(422, "codestream_mismatch", f"cannot read the frame's codestream "
                     f"header: {exc}") from exc
    if declared.rows > rows or declared.columns > columns or declared.components > samples \
            or declared.precision > bits or not (declared.rows and declared.columns):
        raise refuse(422, "codestream_mismatch",
                     f"the frame's codestream declares {declared.columns}x{declared.rows}, "
                     f"{declared.components} component(s) of {declared.precision} bits; the "
                     f"DICOM header says {columns}x{rows}, {samples} sample(s) of {bits} bits")


def frame_fragments(file: BinaryIO, index: int, count: int,
                    extended: tuple[bytes, bytes] | None = None) -> list[tuple[int, int]]:
    """(offset, length) of the values of the fragments of frame ``index`` (0-based) of
    ``count``, from the item headers only: ``file`` is positioned at the start of the
    encapsulated Pixel Data value (its Basic Offset Table item), nothing else is read.

    With neither an Extended nor a Basic Offset Table, and more fragments than frames, the
    frame's end cannot be known without reading it: every fragment is then returned (an
    upper bound on what reading the frame holds)."""
    start = file.tell()
    basic = parse_basic_offsets(file)
    first = file.tell()
    if extended is not None:
        offsets = list(struct.unpack(f"<{len(extended[0]) // 8}Q", extended[0]))
        lengths = list(struct.unpack(f"<{len(extended[1]) // 8}Q", extended[1]))
        file.seek(start)
        # One fragment a frame (PS3.5 A.4); lengths exclude the item header (PS3.3 C.7.6.3).
        return [(first + offsets[index] + 8, lengths[index])]
    _, items = parse_fragments(file)
    fragments = []
    for item in items:
        file.seek(item + 4)
        fragments.append((item + 8, struct.unpack("<L", file.read(4))[0]))
    file.seek(start)
    if basic:
        low = first + basic[index]
        high = first + basic[index + 1] if index + 1 < len(basic) else float("inf")
        return [(at, n) for at, n in fragments if low <= at - 8 < high]
    if len(fragments) == count:
        return [fragments[index]]
    return fragments


def read_fragments(file: BinaryIO, fragments: list[tuple[int, int]]) -> bytes | bytearray:
    """The frame made of ``fragments`` (from ``frame_fragments``), read into one buffer of
    their total length (shorter when the file ends early)."""
    if len(fragments) == 1:
        file.seek(fragments[0][0])
        return file.read(fragments[0][1])
    out = bytearray(sum(length for _, length in fragments))
    with memoryview(out) as view:
        filled = 0
        for at, length in fragments:
            file.seek(at)
            got = file.readinto(view[filled:filled + length])
            filled += got
            if got < length:
                break
    del out[filled:]
    return out
