"""Frames (PS3.18 10.4.1.1.3) of stored instances."""

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import (
    OverBudget,
    Reservation,
    ResourceBudget,
    check_frame_list,
)
from gateway.imaging.frame_reader import FrameDecodeError, FrameRangeError, FrameReader
from gateway.web.dicomweb.validators import conditional, validator_headers
from gateway.web.dicomweb.wado import addressed_instances, check_uids, slices
from gateway.web.http.accept import BadAcceptError, MediaRange, parse_accept
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.responses import entity_tag, error, over_budget
from gateway.web.services import services_of
from storage.index import StoredInstance
from storage.numbers import INT32_MAX, parse_int
from storage.store import Store

OCTET_STREAM = "application/octet-stream"
log = logging.getLogger(__name__)

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


async def _stream(reader: FrameReader, budget: ResourceBudget, numbers: list[int],
                  decode: bool, first: tuple[bytes | bytearray, Reservation], content_type: str,
                  boundary: str) -> AsyncIterator[bytes | memoryview]:
    """The multipart body, one frame in memory at a time, each handed to the server in
    slices and reserved until its last slice is sent; a frame that cannot be read after
    the status was sent ends the stream without its closing boundary."""
    data, held = first
    try:
        for index, number in enumerate(numbers):
            if index:
                try:
                    data, held = await budget.decode.run(reader.read, number, decode)
                except (OverBudget, FrameRangeError, FrameDecodeError) as exc:
                    log.warning("frames stream of %s cut at frame %d: %s", reader.path.name,
                                number, exc)
                    return
            yield part_head(boundary, content_type, len(data), index == 0)
            for piece in slices(data):
                yield piece
            del data
            held.release()
        yield closing(boundary)
    finally:  # also when the client leaves: nothing here may wait
        held.release()
        reader.close()


def frames_etag(instance: StoredInstance, content_type: str) -> str:
    """A weak ETag (RFC 9110 8.8.3: each body has its own random boundary) of frames or bulk
    data of ``instance`` sent as ``content_type`` (the URL names which)."""
    return "W/" + entity_tag(instance.sop_uid, instance.received_at, content_type)


def multipart_type(content_type: str, boundary: str) -> str:
    return f'multipart/related; type="{content_type.split(";")[0]}"; boundary={boundary}'


async def addressed_instance(request: Request) -> StoredInstance | None:
    found = await addressed_instances(request)
    return found[0] if found else None


async def frames_response(request: Request, numbers: list[int] | None) -> Response:
    """The frames ``numbers`` (every frame when None) of the instance the request names, as
    a multipart body in the encoding its Accept header asks for."""
    store: Store = services_of(request).store
    budget: ResourceBudget = services_of(request).budget
    instance = await addressed_instance(request)
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
                                         budget)
    except FrameRangeError as exc:
        return error(404, str(exc))
    except OverBudget as refusal:
        return over_budget(refusal)
    # Evaluated once the frames are known to exist (RFC 9110 13.2.1); the ETag names the
    # encoding, so that a copy in one is never taken for the other.
    etag = frames_etag(instance, encoding.content_type)
    if unchanged := conditional(request, [instance], etag):
        reader.close()
        return unchanged
    wanted = numbers or list(range(1, reader.count + 1))
    try:
        first = await budget.decode.run(reader.read, wanted[0], encoding.decode)
    except (FrameRangeError, FrameDecodeError, OverBudget) as exc:
        reader.close()
        if isinstance(exc, OverBudget):
            return over_budget(exc)
        return error(404 if isinstance(exc, FrameRangeError) else 422, str(exc))
    boundary = new_boundary()
    return StreamingResponse(
        _stream(reader, budget, wanted, encoding.decode, first, encoding.content_type,
                boundary),
        headers={"Content-Type": multipart_type(encoding.content_type, boundary),
                 **validator_headers([instance], etag)})


async def frames(request: Request) -> Response:
    """GET .../instances/{instance}/frames/{frames}."""
    if problem := check_uids(request):
        return problem
    try:
        numbers = parse_frame_list(request.path_params["frames"])
    except ValueError:
        return error(400, "frame list must be comma-separated numbers from 1, e.g. 1,3,5")
    return await frames_response(request, numbers)
