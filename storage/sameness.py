"""Whether a re-sent object is the stored instance encoded otherwise.

The same SOP Instance may travel in any transfer syntax (PS3.5 10): a sender re-compressing
losslessly keeps its UID. It is the same instance when its data set decodes to the same one:
every element but the file meta group (0002), which describes the encoding, and the
encoding's own details (group lengths, trailing padding, VR of an implicit encoding), with
pixel data compared decoded. A lossy syntax changes the pixels, so an object re-encoded
lossily is never the same (its Lossy Image Compression (0028,2110) must then say 01,
PS3.3 C.7.6.1.1.5).

Decoding is bounded before anything is allocated: the memory a comparison holds is
estimated from the headers and reserved from a ``MemoryBudget`` (the service's decode
memory); a comparison that does not fit, or a pixel data that cannot be decoded, raises
``NotComparableError``: the caller must not call the object stored.
"""

import threading
from contextlib import AbstractContextManager
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from storage.part10 import read_file_meta
from storage.structure import DEFER_SIZE, DatasetTooLargeError, UnreadableDatasetError, inflate

# Syntaxes whose decoded pixels are exactly those encoded (PS3.5 Table A-1, 8.2). JPEG 2000
# (.4.91), HTJ2K (.4.203) and JPEG-LS near-lossless may be lossy: not listed.
LOSSLESS_SYNTAXES = frozenset({
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
    JPEG2000Lossless, HTJ2KLossless, HTJ2KLosslessRPCL,
    UID("1.2.840.10008.1.2.1.98"),  # Encapsulated Uncompressed Explicit VR Little Endian
})
PIXEL_DATA = 0x7FE00010
# Not content: group lengths are any group's element 0 (PS3.5 7.2), the padding (FFFC,FFFC)
# is an encoding detail (PS3.10 7.2).
_TRAILING_PADDING = 0xFFFCFFFC
# A decode holds the decoded frames and pydicom's intermediate buffer: twice the pixels.
_DECODE_FACTOR = 2


class NotComparableError(Exception):
    """The two objects could not be compared (over budget, undecodable pixel data)."""


class MemoryBudget(Protocol):
    """Bytes a comparison may hold (``gateway.imaging.budget.ByteBudget`` is one): ``reserve``
    returns a context manager holding them, or raises when they do not fit."""

    def reserve(self, size: int, what: str) -> AbstractContextManager[object]:
        """Hold ``size`` bytes for ``what`` until the context exits; raise if they do not fit."""
        ...


class FixedBudget:
    """A ``MemoryBudget`` of its own for a process without the service's (``passerelle
    import``): ``capacity`` bytes at once, refused at once when there is no room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int, what: str) -> "_Held":
        """Hold ``size`` bytes; NotComparableError when they do not fit now."""
        with self._lock:
            if self._used + size > self.capacity:
                raise NotComparableError(f"{what} needs {size} bytes, more than the"
                                         f" {self.capacity - self._used} free of {self.capacity}")
            self._used += size
        return _Held(self, size)

    def _give_back(self, size: int) -> None:
        with self._lock:
            self._used -= size


class _Held:
    def __init__(self, budget: FixedBudget, size: int) -> None:
        self._budget, self._size = budget, size

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._budget._give_back(self._size)


def _open(source: bytes | Path) -> BytesIO | Path:
    return BytesIO(source) if isinstance(source, bytes) else source


def _read_bytes(source: bytes | Path, cap: int) -> int:
    """Bytes a whole read of ``source`` holds: its size, or twice its inflated size when
    deflated (pydicom inflates it whole, then parses it)."""
    if isinstance(source, bytes):
        stream, size = BytesIO(source), len(source)
    else:
        stream, size = source.open("rb"), source.stat().st_size
    with stream:
        if read_file_meta(stream).transfer_syntax != DeflatedExplicitVRLittleEndian:
            return size
        try:
            return 2 * inflate(stream, None, cap)
        except DatasetTooLargeError:
            return 2 * cap + 1
        except UnreadableDatasetError:
            return size


def _decoded_pixel_bytes(header: Dataset) -> int:
    if "Rows" not in header or "Columns" not in header:
        return 0
    sample = max(1, (int(header.get("BitsAllocated") or 8) + 7) // 8)
    return (int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel") or 1)
            * sample * int(header.get("NumberOfFrames") or 1))


def _needs_decoding(syntax: UID) -> bool:
    return syntax.is_encapsulated or not syntax.is_little_endian


def comparison_bytes(stored: Path, received: bytes | Path, cap: int) -> int:
    """Memory ``same_instance`` holds for these two objects (above ``cap``: more)."""
    need = 0
    for source in (stored, received):
        need += _read_bytes(source, cap)
        header = dcmread(_open(source), stop_before_pixels=True, defer_size=DEFER_SIZE)
        if _needs_decoding(UID(header.file_meta.TransferSyntaxUID)):
            need += _DECODE_FACTOR * _decoded_pixel_bytes(header)
    return need


def same_instance(stored: Path, received: bytes | Path, budget: MemoryBudget) -> bool:
    """True when ``received`` decodes to the data set of ``stored``; NotComparableError
    when that cannot be known within ``budget`` or its pixel data cannot be decoded."""
    try:
        need = comparison_bytes(stored, received, getattr(budget, "capacity", 1 << 62))
        reservation = budget.reserve(need, "comparing a re-sent instance with the stored one")
    except NotComparableError:
        raise
    except Exception as exc:  # the budget's refusal (the service's OverBudget), a bad header
        raise NotComparableError(str(exc)) from exc
    with reservation:
        try:
            kept, again = dcmread(_open(stored)), dcmread(_open(received))
            return _same_elements(kept, again) and _same_pixels(kept, again)
        except NotComparableError:
            raise
        except Exception as exc:  # a value pydicom cannot convert, in either object
            raise NotComparableError(f"not readable as a whole: {exc}") from exc


def _same_elements(a: Dataset, b: Dataset) -> bool:
    """The same elements with the same values, recursively, but for pixel data (at the top
    level, compared decoded) and the encoding's details."""
    def content(ds: Dataset) -> set[int]:
        return {int(element.tag) for element in ds if element.tag.element != 0
                and element.tag not in (_TRAILING_PADDING, PIXEL_DATA)}

    tags = content(a)
    if tags != content(b):
        return False
    for tag in tags:
        x, y = a[tag], b[tag]
        if (x.VR == "SQ") != (y.VR == "SQ"):
            return False
        if x.VR == "SQ":
            if len(x.value) != len(y.value) or not all(
                    _same_elements(i, j) and _same_pixels_in_item(i, j)
                    for i, j in zip(x.value, y.value, strict=True)):
                return False
        elif x.value != y.value:
            return False
    return True


def _same_pixels_in_item(a: Dataset, b: Dataset) -> bool:
    # Pixel data inside an item (an Icon Image Sequence) is always native (PS3.5 8.2).
    return a.get(PIXEL_DATA) == b.get(PIXEL_DATA)


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    if (PIXEL_DATA in a) != (PIXEL_DATA in b):
        return False
    if PIXEL_DATA not in a:
        return True
    syntaxes = (UID(a.file_meta.TransferSyntaxUID), UID(b.file_meta.TransferSyntaxUID))
    if not any(_needs_decoding(syntax) for syntax in syntaxes):
        return a.PixelData == b.PixelData  # native little endian: the same bytes
    if not all(syntax in LOSSLESS_SYNTAXES for syntax in syntaxes):
        return False  # re-encoded lossily: other pixels
    try:
        left, right = a.pixel_array, b.pixel_array
    except Exception as exc:  # any decoder's failure: the plugins raise what they like
        raise NotComparableError(f"pixel data not decodable: {exc}") from exc
    return left.dtype == right.dtype and np.array_equal(left, right)
