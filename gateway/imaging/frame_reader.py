"""Frames of one stored instance, read one at a time from its file within the decode
memory; a compressed frame's codestream is checked against the header before it is
decoded (``codestream.check_frame``)."""

import copy
import struct
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget, frame_bytes
from gateway.imaging.codestream import check_frame, frame_fragments, read_fragments
from gateway.imaging.transcode import decoding_plugin
from storage.structure import DEFER_SIZE


class FrameRangeError(LookupError):
    """A requested frame number the instance does not have."""


class FrameDecodeError(ValueError):
    """A frame that the decoders cannot decode (HTTP 422)."""


class FrameReader:
    """Frames of one stored instance, read one at a time from its file (never the whole
    Pixel Data, except from a deflated file, which pydicom can only inflate whole), each
    within a reservation of the decode memory. Blocking: call it in the decode pool."""

    def __init__(self, path: Path, budget: ResourceBudget) -> None:
        self.path = path
        self.memory = budget.memory
        # A deflated data set is kept whole while its frames are read: reserved until close.
        self._whole = budget.reserve_header_read(path)
        self._file = path.open("rb")
        try:
            self.ds = dcmread(self._file, stop_before_pixels=True, defer_size=DEFER_SIZE)
            self.syntax = self.ds.file_meta.TransferSyntaxUID
            if "Rows" not in self.ds:
                raise FrameRangeError("the instance has no pixel data")
            self.count = int(self.ds.get("NumberOfFrames") or 1)
            self.frame_size = frame_bytes(self.ds)
            bits = int(self.ds.Rows) * int(self.ds.Columns) * \
                int(self.ds.get("SamplesPerPixel") or 1) * int(self.ds.BitsAllocated)
            self._native_size = (bits + 7) // 8  # a native frame as stored: 1-bit packed
            self._aligned = not bits % 8 or self.count == 1
            self._full: Dataset | None = None
            if self.syntax == DeflatedExplicitVRLittleEndian:
                self._whole.resize(budget.whole_read_bytes(path))
                self._full = dcmread(path)
                if "PixelData" not in self._full:
                    raise FrameRangeError("the instance has no pixel data")
            else:
                self._value_start = self._pixel_data_value()
        except BaseException:
            self.close()
            raise

    def _pixel_data_value(self) -> int:
        """Offset of the Pixel Data value; the file is positioned at its element (pydicom
        stops there with ``stop_before_pixels``)."""
        little = "<" if self.syntax.is_little_endian else ">"
        head = self._file.read(8)
        if len(head) < 8 or struct.unpack(f"{little}HH", head[:4]) != (0x7FE0, 0x0010):
            raise FrameRangeError("the instance has no pixel data")
        if not self.syntax.is_implicit_VR:  # OB or OW: 2 reserved bytes, a 32-bit length
            self._file.read(4)
        return self._file.tell()

    def _check_number(self, number: int) -> None:
        if not 1 <= number <= self.count:
            raise FrameRangeError(f"the instance has {self.count} frame(s)")

    def _fragments(self, number: int) -> list[tuple[int, int]]:
        self._file.seek(self._value_start)
        offsets = None
        if "ExtendedOffsetTable" in self.ds:
            offsets = (self.ds.ExtendedOffsetTable, self.ds.ExtendedOffsetTableLengths)
        try:
            return frame_fragments(self._file, number - 1, self.count, offsets)
        except (ValueError, IndexError, struct.error) as exc:
            raise FrameDecodeError(f"cannot find frame {number}: {exc}") from exc

    def stored_bytes(self, number: int) -> int:
        """Bytes frame ``number`` (1-based) holds as stored, known before it is read: from
        the fragments' item headers when encapsulated (an upper bound when they do not say
        where the frame ends)."""
        self._check_number(number)
        if not self.syntax.is_encapsulated:
            return self._native_size
        if self._full is not None:
            return self.frame_size  # bounded by the inflated data set reserved whole
        return sum(length for _, length in self._fragments(number))

    def read(self, number: int, decode: bool) -> tuple[bytes | bytearray, Reservation]:
        """Bytes of frame ``number`` (1-based), as stored or decoded to native little endian,
        with the reservation that holds them: release it once they are sent."""
        stored = self.stored_bytes(number)
        # Decoding holds the frame read, its encapsulated copy, the array and its bytes.
        held = self.memory.reserve(2 * (stored + self.frame_size) if decode else stored,
                                   f"frame {number} ({self.frame_size} bytes decoded)")
        try:
            data = self.array(number).tobytes() if decode else self.stored(number)
            held.resize(len(data))
        except BaseException:
            held.release()
            raise
        return data, held

    def stored(self, number: int) -> bytes | bytearray:
        """Frame ``number`` as stored; the caller reserved ``stored_bytes``."""
        self._check_number(number)
        if self.syntax.is_encapsulated:
            if self._full is not None:
                return get_frame(self._full.PixelData, number - 1, number_of_frames=self.count)
            return read_fragments(self._file, self._fragments(number))
        if not self._aligned:
            raise FrameRangeError("frames of 1-bit multi-frame pixel data are not byte aligned")
        size = self._native_size
        if self._full is not None:
            return self._full.PixelData[(number - 1) * size:number * size]
        self._file.seek(self._value_start + (number - 1) * size)
        return self._file.read(size)

    def array(self, number: int) -> np.ndarray:
        """Frame ``number`` decoded; a compressed frame's codestream is checked against the
        header first (OverBudget 422 when it declares more). The caller reserved twice
        ``stored_bytes`` and ``frame_size``."""
        plugin = decoding_plugin(self.syntax)
        try:
            if not self.syntax.is_encapsulated:
                return pixel_array(self._full or self.path, index=number - 1,
                                   decoding_plugin=plugin)
            frame = self.stored(number)
            check_frame(self.ds, self.syntax, frame)
            single = copy.copy(self._full or self.ds)
            single.NumberOfFrames = 1
            for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
                single.pop(keyword, None)
            single["PixelData"] = DataElement(0x7FE00010, "OB", encapsulate([frame]))
            del frame
            return get_decoder(self.syntax).as_array(single, index=0,
                                                     decoding_plugin=plugin)[0]
        except (FrameRangeError, FrameDecodeError, OverBudget):
            raise
        except Exception as exc:  # every pydicom decoder raises its own types
            raise FrameDecodeError(f"cannot decode frame {number}: {exc}") from exc

    def close(self) -> None:
        """Close the file and give the reserved memory back."""
        self._file.close()
        self._full = None
        self._whole.release()
