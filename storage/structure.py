"""The structure of a received data set, checked before anything parses it: a walk over the
encoded data set that reads it as pydicom does (same transfer syntax rules, same
implicit/explicit VR heuristics, same sequence and item boundaries) but keeps nothing: it
counts (``DatasetShape``), and stops at the first of the ``IngestLimits`` passed. A deflated
data set is inflated as a stream into a scratch file, bounded, never whole in memory."""

import io
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import BinaryIO

try:  # the lookup pydicom's reader makes for the VR of an implicit VR element
    from pydicom.datadict import _dictionary_vr_fast as _pydicom_vr
except ImportError:  # pragma: no cover - same result, pydicom's public spelling
    from pydicom.datadict import dictionary_VR as _pydicom_vr

from storage.part10 import LONG_LENGTH_VRS, is_part10, read_file_meta


class UnreadableDatasetError(ValueError):
    """The bytes are not a DICOM data set pydicom can parse."""


class DatasetTooLargeError(ValueError):
    """The data set is longer than accepted (inflated, for a deflated transfer syntax)."""


class DatasetTooComplexError(ValueError):
    """The data set has more items, nesting or elements than accepted."""


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """What one received instance may be: its size, and the structure of its data set
    (every reader materialises a sequence item as an object, about 1 KiB each in pydicom)."""

    max_instance_bytes: int = 1 << 30  # as received; a deflated data set also once inflated
    max_sequence_items: int = 50_000
    max_sequence_depth: int = 32
    max_dataset_elements: int = 1_000_000  # data elements and items, at every level


@dataclass(frozen=True, slots=True)
class DatasetShape:
    """What pydicom builds from a data set, as a walk counts it without building it."""

    elements: int  # data elements and items, at every level (max_dataset_elements)
    items: int
    values: int  # of multi-valued text elements: one object each once parsed
    text_bytes: int  # values of text VRs (decoded, then inlined in DICOM JSON)
    binary_bytes: int  # other values up to DEFER_SIZE bytes each
    deferred_bytes: int  # other values longer (pixel data included unless the walk stops
    #                      there): left on disk by a read with defer_size=DEFER_SIZE
    inflated_bytes: int = 0  # the whole data set once inflated, for a deflated one


PIXEL_DATA_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))  # float, double, pixels

# A walk over the encoded data set that reads it as pydicom does (same transfer syntax rules,
# same implicit/explicit VR heuristics, same sequence and item boundaries) but keeps nothing:
# it counts, and stops at the first limit passed, before any reader builds the data set.

_PREFIX_END = 132  # 128-byte preamble + "DICM" (PS3.10 7.1)
_UNDEFINED = 0xFFFFFFFF
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 1 << 20
# Values longer than this are left on disk by the readers that do not need them
# (pydicom's defer_size): what a walk counts apart as deferred_bytes.
DEFER_SIZE = 4096
# PS3.5 6.2: the VRs whose values are text; a backslash separates the values of the first.
_MULTI_VALUED_TEXT_VRS = frozenset(("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH",
                                    "TM", "UC", "UI"))
_TEXT_VRS = _MULTI_VALUED_TEXT_VRS | {"LT", "ST", "UR", "UT"}


class _Reader:
    """Forward reads over the data set; ``end`` stops reads where a value parsed on its own
    ends (pydicom parses a sequence of defined length from that value's bytes alone)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pos = 0
        self.end = float("inf")
        self._back = b""

    def read(self, size: int) -> bytes:
        size = max(0, int(min(size, self.end - self.pos)))
        if self._back:
            data, self._back = self._back[:size], self._back[size:]
            if len(data) < size:
                data += self.stream.read(size - len(data))
        else:
            data = self.stream.read(size)
        self.pos += len(data)
        return data

    def peek(self, size: int) -> bytes:
        data = self.read(size)
        self._back = data + self._back
        self.pos -= len(data)
        return data

    def skip(self, size: int) -> None:
        size = int(min(size, self.end - self.pos))
        if size <= 0:
            return
        if self._back:
            taken = min(size, len(self._back))
            self._back = self._back[taken:]
            self.pos += taken
            size -= taken
        self.stream.seek(size, io.SEEK_CUR)  # past the end of file: reads find nothing
        self.pos += size

    def rewind_to(self, position: int) -> None:
        """Back to an earlier position."""
        self.stream.seek(position - self.pos - len(self._back), io.SEEK_CUR)
        self._back = b""
        self.pos = position


def _dictionary_vr(tag: int) -> str | None:
    """The VR pydicom's reader gives an element whose VR is not encoded: its entry in the
    DICOM dictionary or, outside odd (private) groups, in the repeaters dictionary (50xx,
    60xx...); None where pydicom finds none (filereader.data_element_generator)."""
    try:
        return _pydicom_vr(tag)
    except KeyError:
        return None


def _is_sequence_tag(tag: int) -> bool:
    return _dictionary_vr(tag) == "SQ"


class _Walk:
    """Counts what pydicom would build from the data set; raises at the first limit."""

    def __init__(self, reader: _Reader, little: bool, limits: IngestLimits,
                 stop_at_pixels: bool = False) -> None:
        self.reader = reader
        self.limits = limits
        self.endian = "<" if little else ">"
        self.stop_at_pixels = stop_at_pixels
        self.elements = self.items = self.values = self.text_bytes = self.binary_bytes = 0
        self.deferred_bytes = 0

    def shape(self) -> DatasetShape:
        """What was counted so far."""
        return DatasetShape(self.elements, self.items, self.values, self.text_bytes,
                            self.binary_bytes, self.deferred_bytes)

    def _count(self) -> None:
        self.elements += 1
        if self.elements > self.limits.max_dataset_elements:
            raise DatasetTooComplexError(f"more than {self.limits.max_dataset_elements} "
                                         "elements and items (max_dataset_elements)")

    def _implicit_here(self, implicit: bool, in_item: bool) -> bool:
        """pydicom's check of the first element of a data set (filereader._is_implicit_vr):
        the VR found wins, except that an item of an implicit VR data set stays implicit."""
        if in_item and implicit:
            return True
        head = self.reader.peek(6)
        if len(head) < 6:
            return implicit
        return not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)

    def dataset(self, implicit: bool, length: int | None, in_item: bool, depth: int) -> None:
        """The elements of the top level data set (to the end), of an item of ``length``
        bytes, or of an item of undefined length (``None``: to its delimiter)."""
        reader, endian = self.reader, self.endian
        implicit = self._implicit_here(implicit, in_item)
        start = reader.pos
        while length is None or reader.pos - start < length:
            head = reader.read(8)
            if len(head) < 8:
                return
            vr: bytes | None
            if implicit:
                group, element, value_length = struct.unpack(endian + "HHL", head)
                vr = None
            else:
                group, element, vr, value_length = struct.unpack(endian + "HH2sH", head)
                if vr in LONG_LENGTH_VRS:
                    extra = reader.read(4)
                    if len(extra) < 4:
                        return
                    value_length, = struct.unpack(endian + "L", extra)
                elif not b"AA" <= vr <= b"ZZ":  # an implicit VR element amid explicit ones
                    group, element, value_length = struct.unpack(endian + "HHL", head)
                    vr = None
            tag = group << 16 | element
            if tag == _ITEM_END or (self.stop_at_pixels and not in_item
                                    and tag in PIXEL_DATA_TAGS):
                return
            self._count()
            self._value(tag, vr, value_length, implicit, depth)

    def _value(self, tag: int, vr: bytes | None, length: int, implicit: bool,
               depth: int) -> None:
        reader = self.reader
        private = bool(tag >> 16 & 1) and tag & 0xFFFF > 0xFF
        if length == _UNDEFINED:
            # PS3.5 6.2.2: a UN of undefined length is a sequence; pydicom also takes an
            # unknown tag whose value starts with an item for one.
            # As pydicom: the dictionary VR (repeating groups included) decides, and only a
            # tag it does not know is a sequence by the item its value starts with.
            if vr is None:
                known = _dictionary_vr(tag)
                if known == "SQ" or (known is None and self._item_follows()):
                    vr = b"SQ"
            elif vr == b"UN":
                vr = b"SQ"
            if vr == b"SQ":
                self._sequence(implicit, None, depth + 1)
            else:
                self._fragments()
            return
        # A value of defined length is parsed as a sequence when it is first used: by the VR
        # of its tag in pydicom's dictionary, or its private dictionary for a private tag
        # (told here by the item its value starts with).
        if vr == b"SQ" or (vr in (None, b"UN") and private and self._item_follows()) or (
                _is_sequence_tag(tag) and (vr is None or (vr == b"UN" and length < 0xFFFF))):
            end, outer = reader.pos + length, reader.end
            reader.end = min(end, outer)
            try:
                self._sequence(implicit, length, depth + 1)
            finally:
                reader.skip(end - reader.pos)
                reader.end = outer
            return
        self._tally(tag, vr, length)

    def _tally(self, tag: int, vr: bytes | None, length: int) -> None:
        """Count a value that is not a sequence, and pass it: the values of a multi-valued
        text element (pydicom makes an object of each, ~500 bytes), the bytes of the rest."""
        name = vr.decode("latin-1") if vr is not None else _dictionary_vr(tag)
        # UN, or no VR known (implicit VR, private): pydicom may read it by a dictionary VR
        # (a private creator's, a standard tag's UN under 64 KiB) as multi-valued text, so
        # it is counted as such, whatever it turns out to be.
        if name in _MULTI_VALUED_TEXT_VRS or name in (None, "UN"):
            self.text_bytes += length
            while length > 0 and (chunk := self.reader.read(min(length, _CHUNK))):
                self.values += chunk.count(b"\\")
                length -= len(chunk)
            self.values += 1
            return
        if name in _TEXT_VRS:
            self.text_bytes += length
        elif length > DEFER_SIZE:
            self.deferred_bytes += length
        else:
            self.binary_bytes += length
        self.reader.skip(length)

    def _item_follows(self) -> bool:
        return self.reader.peek(4) == struct.pack(self.endian + "HH", 0xFFFE, 0xE000)

    def _sequence(self, implicit: bool, length: int | None, depth: int) -> None:
        limits, reader = self.limits, self.reader
        if depth > limits.max_sequence_depth:
            raise DatasetTooComplexError(f"sequences nested over {limits.max_sequence_depth}"
                                         " deep (max_sequence_depth)")
        start, items = reader.pos, 0
        while length is None or reader.pos - start < length:
            head = reader.read(8)
            if len(head) < 8:
                return
            group, element, item_length = struct.unpack(self.endian + "HHL", head)
            if group << 16 | element == _SEQUENCE_END:
                return
            items += 1  # pydicom takes whatever tag comes here for an item
            if items > limits.max_sequence_items:
                raise DatasetTooComplexError(f"more than {limits.max_sequence_items} items "
                                             "in a sequence (max_sequence_items)")
            self._count()
            self.items += 1
            self.dataset(implicit, None if item_length == _UNDEFINED else item_length,
                         in_item=True, depth=depth)

    def _fragments(self) -> None:
        """An undefined-length value that is not a sequence (encapsulated pixel data,
        PS3.5 A.4): items up to a sequence delimiter, else, as pydicom does, up to the
        first delimiter found in the bytes."""
        reader, endian = self.reader, self.endian
        start = reader.pos
        item, delimiter = (struct.pack(endian + "HH", 0xFFFE, element)
                           for element in (0xE000, 0xE0DD))
        while len(head := reader.read(8)) == 8:
            if head[:4] == delimiter:
                return
            if head[:4] != item:
                break
            self._count()
            reader.skip(struct.unpack(endian + "L", head[4:])[0])
        reader.rewind_to(start)
        tail = b""
        while chunk := reader.read(_CHUNK):
            found = (tail + chunk).find(delimiter)
            if found >= 0:
                reader.rewind_to(reader.pos - len(tail) - len(chunk) + found + 8)
                return
            tail = chunk[-3:]


@contextmanager
def encoded_dataset(file: BinaryIO, limits: IngestLimits | None,
             scratch: Callable[[], BinaryIO] | None) -> Iterator[tuple[BinaryIO, str | None]]:
    """The encoded data set of the Part 10 file ``file`` as a seekable stream at its first
    byte (``file`` itself, or its inflated bytes in a scratch file), with its Transfer
    Syntax UID. Not Part 10: ``file`` at its end (nothing to walk; pydicom refuses it)."""
    file.seek(0)
    if not is_part10(file.read(_PREFIX_END)):
        file.seek(0, io.SEEK_END)
        yield file, None
        return
    syntax = read_file_meta(file).transfer_syntax
    if syntax != _DEFLATED:
        yield file, syntax
        return
    with (scratch or tempfile.TemporaryFile)() as inflated:
        inflate(file, inflated, limits.max_instance_bytes if limits else None)
        inflated.seek(0)
        yield inflated, syntax


def inflate(compressed: BinaryIO, inflated: BinaryIO | None, limit: int | None) -> int:
    """Inflate the deflated data set ``compressed`` (PS3.5 A.5) a chunk at a time into
    ``inflated`` (None: only count); return the bytes it inflates to.
    DatasetTooLargeError as soon as they pass ``limit`` bytes, before they are written;
    UnreadableDatasetError if they cannot be inflated."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or compressed.read(_CHUNK)
            if not data:
                break  # truncated: pydicom reads what there is
            chunk = inflater.decompress(data, _CHUNK)
            produced += len(chunk)
            if limit is not None and produced > limit:
                raise DatasetTooLargeError(f"inflates to more than {limit} bytes")
            if inflated is not None:
                inflated.write(chunk)
    except zlib.error as exc:
        raise UnreadableDatasetError(f"cannot inflate the data set: {exc}") from exc
    return produced


def walk(dataset: BinaryIO, syntax: str | None, limits: IngestLimits,
          stop_at_pixels: bool = False) -> DatasetShape:
    """Walk the encoded data set ``dataset`` (at its first byte) in ``syntax``: what
    ``check_structure`` does once the data set is found."""
    implicit, little = syntax == _IMPLICIT_LE, syntax != _EXPLICIT_BE
    if syntax is None:  # pydicom guesses from the first element
        head = dataset.read(6)
        dataset.seek(-len(head), io.SEEK_CUR)
        if len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper():
            implicit = False
            little = struct.unpack("<H", head[:2])[0] < 1024
        else:
            implicit = True
    walk = _Walk(_Reader(dataset), little, limits, stop_at_pixels)
    walk.dataset(implicit, None, False, 0)
    return walk.shape()


def check_structure(file: BinaryIO, limits: IngestLimits,
                    scratch: Callable[[], BinaryIO] | None = None,
                    stop_at_pixels: bool = False) -> DatasetShape:
    """Walk the data set of the Part 10 file ``file`` without building it:
    DatasetTooComplexError past a limit on items per sequence, nesting depth or elements,
    DatasetTooLargeError for a deflated data set inflating past max_instance_bytes (inflated
    into a ``scratch()`` file, as ``read_header`` does). Returns what it counted (never
    fewer elements than pydicom builds), up to the pixel data with ``stop_at_pixels``."""
    with encoded_dataset(file, limits, scratch) as (dataset, syntax):
        shape = walk(dataset, syntax, limits, stop_at_pixels)
        if dataset is file:
            return shape
        return replace(shape, inflated_bytes=dataset.seek(0, io.SEEK_END))
