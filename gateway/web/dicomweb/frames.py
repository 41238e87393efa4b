"""Frames (PS3.18 10.4.1.1.3) and bulk data (10.4.1.1.5) of stored instances."""

import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import (
    OverBudget,
    Reservation,
    ResourceBudget,
    check_frame_list,
    frame_bytes,
)
from gateway.imaging.transcode import decoding_plugin
from gateway.web.dicomweb.wado import addressed_instances, check_uids
from gateway.web.http.accept import BadAcceptError, MediaRange, parse_accept
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.responses import error, over_budget
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.numbers import INT32_MAX, NumberError, parse_int
from storage.store import Store

OCTET_STREAM = "application/octet-stream"
log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
# Media type of a compressed frame by transfer syntax (PS3.18 Table 8.7.3-2).
_FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         "1.2.840.10008.1.2.1.99"}


class FrameRangeError(LookupError):
    """A requested frame number the instance does not have."""


class FrameDecodeError(ValueError):
    """A frame that the decoders cannot decode (HTTP 422)."""


@dataclass(frozen=True)
class FrameEncoding:
    """How frames are sent: as stored, or decoded to native little endian bytes."""

    decode: bool
    content_type: str


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` → ``[1, 3, 5]``; NumberError (a ValueError) for anything that is not
    numbers from 1 (NumberOfFrames is an IS: at most 2^31 - 1)."""
    return [parse_int(part, "frame number", 1, INT32_MAX) for part in text.split(",")]


def choose_frame_encoding(stored: str, ranges: list[MediaRange]) -> FrameEncoding | None:
    """First acceptable way to send frames of an instance stored in ``stored``."""
    stored_media = _FRAME_MEDIA_TYPES.get(stored, OCTET_STREAM)
    native = stored in _NATIVE_LITTLE_ENDIAN
    for media in ranges:
        if media.media_type == "multipart/related":
            wanted_type = media.params.get("type", OCTET_STREAM).lower()
            wanted_type = _MEDIA_TYPE_ALIASES.get(wanted_type, wanted_type)
        elif media.media_type in ("*/*", "multipart/*"):
            wanted_type = OCTET_STREAM
        else:
            continue
        syntax = media.params.get("transfer-syntax")
        if native:
            if wanted_type in (OCTET_STREAM, "*/*") and \
                    syntax in (None, "*", ExplicitVRLittleEndian, stored):
                return FrameEncoding(False, f"{OCTET_STREAM}; transfer-syntax="
                                            f"{ExplicitVRLittleEndian}")
        elif wanted_type == OCTET_STREAM and syntax in ("*", stored):
            return FrameEncoding(False, f"{OCTET_STREAM}; transfer-syntax={stored}")
        elif wanted_type == OCTET_STREAM and syntax in (None, ExplicitVRLittleEndian):
            return FrameEncoding(True, f"{OCTET_STREAM}; transfer-syntax="
                                       f"{ExplicitVRLittleEndian}")
        elif wanted_type in (stored_media, "*/*", "image/*") and syntax in (None, "*", stored):
            return FrameEncoding(False, f"{stored_media}; transfer-syntax={stored}")
    return None


class FrameReader:
    """Frames of one stored instance, read one at a time from its file (never the whole
    Pixel Data, except from a deflated file, which pydicom can only inflate whole), each
    within a reservation of the decode memory. Blocking: call it in the decode pool."""

    def __init__(self, path: Path, decode: bool, budget: ResourceBudget) -> None:
        self.path = path
        self.decode = decode
        self.memory = budget.memory
        # A deflated data set is kept whole while its frames are read: reserved until close.
        self._whole = budget.reserve_header_read(path)
        self._file = path.open("rb")
        try:
            self.ds = dcmread(self._file, stop_before_pixels=True)
            self.syntax = self.ds.file_meta.TransferSyntaxUID
            if "Rows" not in self.ds:
                raise FrameRangeError("the instance has no pixel data")
            self.count = int(self.ds.get("NumberOfFrames") or 1)
            self.frame_size = frame_bytes(self.ds)
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
        if self.syntax.is_implicit_VR:
            self._length = struct.unpack(f"{little}L", head[4:8])[0]
        else:  # OB or OW: 2 reserved bytes, then a 32-bit length (PS3.5 7.1.2)
            self._length = struct.unpack(f"{little}L", self._file.read(4))[0]
        return self._file.tell()

    def read(self, number: int) -> tuple[bytes, Reservation]:
        """Bytes of frame ``number`` (1-based), with the reservation that holds them:
        release it once they are sent."""
        if number > self.count:
            raise FrameRangeError(f"the instance has {self.count} frame(s)")
        held = self.memory.reserve(self.frame_size * (2 if self.decode else 1),
                                   f"frame {number} ({self.frame_size} bytes decoded)")
        try:
            data = self._decoded(number) if self.decode else self._as_stored(number)
            held.resize(len(data))
        except BaseException:
            held.release()
            raise
        return data, held

    def _decoded(self, number: int) -> bytes:
        try:
            return pixel_array(self._full or self.path, index=number - 1,
                               decoding_plugin=decoding_plugin(self.syntax)).tobytes()
        except Exception as exc:  # every pydicom decoder raises its own types
            raise FrameDecodeError(f"cannot decode frame {number}: {exc}") from exc

    def _as_stored(self, number: int) -> bytes:
        if self._full is not None:
            if self.syntax.is_encapsulated:
                return get_frame(self._full.PixelData, number - 1, number_of_frames=self.count)
            return self._full.PixelData[(number - 1) * self.frame_size:number * self.frame_size]
        self._file.seek(self._value_start)
        if self.syntax.is_encapsulated:
            offsets = None
            if "ExtendedOffsetTable" in self.ds:
                offsets = (self.ds.ExtendedOffsetTable, self.ds.ExtendedOffsetTableLengths)
            return get_frame(self._file, number - 1, number_of_frames=self.count,
                             extended_offsets=offsets)
        bits = int(self.ds.Rows) * int(self.ds.Columns) * \
            int(self.ds.get("SamplesPerPixel") or 1) * int(self.ds.BitsAllocated)
        if bits % 8 and self.count > 1:
            raise FrameRangeError("frames of 1-bit multi-frame pixel data are not byte aligned")
        size = (bits + 7) // 8
        self._file.seek(self._value_start + (number - 1) * size)
        return self._file.read(size)

    def close(self) -> None:
        """Close the file and give the reserved memory back."""
        self._file.close()
        self._full = None
        self._whole.release()


async def _stream(reader: FrameReader, budget: ResourceBudget, numbers: list[int],
                  first: tuple[bytes, Reservation], content_type: str,
                  boundary: str) -> AsyncIterator[bytes]:
    """The multipart body, one frame in memory at a time; a frame that cannot be read
    after the status was sent ends the stream without its closing boundary."""
    data, held = first
    try:
        for index, number in enumerate(numbers):
            if index:
                try:
                    data, held = await budget.decode.run(reader.read, number)
                except (OverBudget, FrameRangeError, FrameDecodeError) as exc:
                    log.warning("frames stream of %s cut at frame %d: %s", reader.path.name,
                                number, exc)
                    return
            yield part_head(boundary, content_type, len(data), index == 0)
            yield data
            held.release()
        yield closing(boundary)
    finally:  # also when the client leaves: nothing here may wait
        held.release()
        reader.close()


def _multipart(parts: list[bytes], content_type: str) -> Response:
    boundary = new_boundary()
    body = b"".join(part_head(boundary, content_type, len(part), i == 0) + part
                    for i, part in enumerate(parts)) + closing(boundary)
    return Response(body, headers={"Content-Type": _multipart_type(content_type, boundary)})


def _multipart_type(content_type: str, boundary: str) -> str:
    return f'multipart/related; type="{content_type.split(";")[0]}"; boundary={boundary}'


async def _instance(request: Request) -> StoredInstance | None:
    found = await addressed_instances(request)
    return found[0] if found else None


async def _frames_response(request: Request, numbers: list[int] | None) -> Response:
    store: Store = services_of(request).store
    budget: ResourceBudget = services_of(request).budget
    instance = await _instance(request)
    if instance is None:
        return error(404, "no such instance")
    try:
        encoding = choose_frame_encoding(instance.transfer_syntax,
                                         parse_accept(request.headers.get("accept")))
    except BadAcceptError as exc:
        return error(400, str(exc))
    if encoding is None:
        media = _FRAME_MEDIA_TYPES.get(instance.transfer_syntax, OCTET_STREAM)
        return error(406, 'frames of this instance are available as multipart/related; '
                     f'type="{OCTET_STREAM}" or type="{media}"')
    try:
        if numbers is not None:
            check_frame_list(numbers, instance.frames or 1)
            if instance.frames is not None and max(numbers) > instance.frames:
                raise FrameRangeError(f"the instance has {instance.frames} frame(s)")
        reader = await budget.decode.run(FrameReader, store.blobs.absolute(instance.path),
                                         encoding.decode, budget)
    except FrameRangeError as exc:
        return error(404, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
    wanted = numbers or list(range(1, reader.count + 1))
    try:
        first = await budget.decode.run(reader.read, wanted[0])
    except (FrameRangeError, FrameDecodeError, OverBudget) as exc:
        reader.close()
        if isinstance(exc, OverBudget):
            return over_budget(exc)
        return error(404 if isinstance(exc, FrameRangeError) else 422, str(exc))
    boundary = new_boundary()
    return StreamingResponse(
        _stream(reader, budget, wanted, first, encoding.content_type, boundary),
        headers={"Content-Type": _multipart_type(encoding.content_type, boundary)})


async def frames(request: Request) -> Response:
    """GET .../instances/{instance}/frames/{frames}."""
    if problem := check_uids(request):
        return problem
    try:
        numbers = parse_frame_list(request.path_params["frames"])
    except ValueError:
        return error(400, "frame list must be comma-separated numbers from 1, e.g. 1,3,5")
    return await _frames_response(request, numbers)


async def bulkdata(request: Request) -> Response:
    """GET .../instances/{instance}/bulkdata/{tag}: a top-level binary value, or, for
    Pixel Data, every frame."""
    if problem := check_uids(request):
        return problem
    try:
        tag = Tag(parse_int(request.path_params["tag"], "bulk data tag", 0, 0xFFFFFFFF, base=16))
    except NumberError:
        return error(400, "bulk data tag must be 8 hexadecimal digits, e.g. 7FE00010")
    if tag == PIXEL_DATA:
        return await _frames_response(request, None)
    store: Store = services_of(request).store
    instance = await _instance(request)
    if instance is None:
        return error(404, "no such instance")
    budget: ResourceBudget = services_of(request).budget
    try:
        element = await budget.decode.run(_top_level_value, store.blobs.absolute(instance.path),
                                          tag, budget)
    except OverBudget as refusal:
        return over_budget(refusal)
    if element is None or not isinstance(element.value, bytes):
        return error(404, f"no binary value ({tag:08X}) at the top level of this instance")
    return _multipart([element.value], OCTET_STREAM)


def _top_level_value(path: Path, tag: BaseTag, budget: ResourceBudget) -> DataElement | None:
    """The top-level element ``tag`` of the header of ``path``, read within the budget."""
    with budget.reserve_header_read(path):
        return dcmread(path, stop_before_pixels=True).get(tag)
