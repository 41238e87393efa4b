"""Frames (PS3.18 10.4.1.1.3) and bulk data (10.4.1.1.5) of stored instances."""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.imaging.transcode import decoding_plugin
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.accept import BadAcceptError, MediaRange, parse_accept
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.responses import error
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.numbers import INT32_MAX, NumberError, parse_int
from storage.store import Store

OCTET_STREAM = "application/octet-stream"
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


def read_frames(path: Path, numbers: list[int] | None, decode: bool) -> list[bytes]:
    """Bytes of the requested frames (all when ``numbers`` is None), 1-based."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise FrameRangeError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    wanted = numbers or list(range(1, count + 1))
    if max(wanted) > count:
        raise FrameRangeError(f"the instance has {count} frame(s)")
    if decode:
        plugin = decoding_plugin(ds.file_meta.TransferSyntaxUID)
        return [pixel_array(ds, index=n - 1, decoding_plugin=plugin).tobytes() for n in wanted]
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in wanted]
    bits = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated
    if bits % 8 and count > 1:
        raise FrameRangeError("frames of 1-bit multi-frame pixel data are not byte aligned")
    size = (bits + 7) // 8
    return [ds.PixelData[(n - 1) * size:n * size] for n in wanted]


def _multipart(parts: list[bytes], content_type: str) -> Response:
    boundary = new_boundary()
    body = b"".join(part_head(boundary, content_type, len(part), i == 0) + part
                    for i, part in enumerate(parts)) + closing(boundary)
    media = content_type.split(";")[0]
    return Response(body, headers={
        "Content-Type": f'multipart/related; type="{media}"; boundary={boundary}'})


async def _instance(request: Request) -> StoredInstance | None:
    params = request.path_params
    found = await run_in_threadpool(services_of(request).store.index.instances, params["study"],
                                    params["series"], params["instance"])
    return found[0] if found else None


async def _frames_response(request: Request, numbers: list[int] | None) -> Response:
    store: Store = services_of(request).store
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
        parts = await run_in_threadpool(read_frames, store.blobs.absolute(instance.path),
                                        numbers, encoding.decode)
    except FrameRangeError as exc:
        return error(404, str(exc))
    return _multipart(parts, encoding.content_type)


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
    ds = await run_in_threadpool(partial(dcmread, stop_before_pixels=True),
                                 store.blobs.absolute(instance.path))
    element = ds.get(tag)
    if element is None or not isinstance(element.value, bytes):
        return error(404, f"no binary value ({tag:08X}) at the top level of this instance")
    return _multipart([element.value], OCTET_STREAM)
