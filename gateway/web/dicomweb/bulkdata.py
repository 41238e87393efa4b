"""Bulk data (PS3.18 10.4.1.1.5): the value of one binary element of a stored instance,
named by its attribute path (``gateway.urls.bulkdata_url``), at the top level or inside
sequence items; the top-level Pixel Data as its frames."""

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiofiles
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.imaging.budget import OverBudget, Reservation, ResourceBudget, is_deflated
from gateway.urls import ItemStep
from gateway.web.dicomweb.frames import (
    OCTET_STREAM,
    addressed_instance,
    frames_etag,
    frames_response,
    multipart_type,
)
from gateway.web.dicomweb.validators import conditional, validator_headers
from gateway.web.dicomweb.wado import READ_CHUNK, check_uids, slices
from gateway.web.http.multipart import closing, new_boundary, part_head
from gateway.web.http.responses import error, over_budget
from gateway.web.services import services_of
from storage.numbers import INT32_MAX
from storage.store import Store
from storage.structure import DEFER_SIZE

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
# Sequences a path may go through: as deep as a header read walks (the budget's read depth),
# far deeper than any real object.
MAX_PATH_DEPTH = 100
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW"}


@dataclass(frozen=True)
class AttributePath:
    """One element of a data set: the (sequence, item number) steps to its item, its tag."""

    steps: tuple[ItemStep, ...]
    tag: BaseTag

    def __str__(self) -> str:
        return "".join(f"{sequence:08X}/{number}/" for sequence, number in self.steps) + \
            f"{self.tag:08X}"


class PathError(ValueError):
    """A bulk data path that is not one (HTTP 400)."""


class NotServed(Exception):  # noqa: N818 (an answer, not a bug)
    """A path that names no value this serves: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# One spelling per element, as the metadata writes it (no leading zeros, no sign), so that
# one value has one URL (one entry in a cache).
_TAG = re.compile("[0-9A-Fa-f]{8}")
_ITEM_NUMBER = re.compile("[1-9][0-9]{0,9}")


def parse_attribute_path(text: str) -> AttributePath:
    """``"00880200/1/7FE00010"`` → the Pixel Data of the first Icon Image Sequence item;
    PathError for anything else than tags (8 hexadecimal digits) and item numbers (from 1)
    alternating, a tag first and last, at most ``MAX_PATH_DEPTH`` sequences deep."""
    segments = text.split("/")
    if len(segments) > 2 * MAX_PATH_DEPTH + 1:
        raise PathError(f"bulk data path goes through more than {MAX_PATH_DEPTH} sequences")
    if len(segments) % 2 == 0:
        raise PathError("bulk data path must alternate tags and item numbers, a tag last, "
                        "e.g. 00880200/1/7FE00010")
    if not all(_TAG.fullmatch(segment) for segment in segments[0::2]):
        raise PathError("bulk data tag must be 8 hexadecimal digits, e.g. 7FE00010")
    tags = [Tag(int(segment, 16)) for segment in segments[0::2]]
    if not all(_ITEM_NUMBER.fullmatch(segment) and int(segment) <= INT32_MAX
               for segment in segments[1::2]):
        raise PathError("bulk data item number must be a number from 1 without leading "
                        "zeros, e.g. 00880200/1/7FE00010")
    numbers = [int(segment) for segment in segments[1::2]]
    return AttributePath(tuple(zip(tags[:-1], numbers, strict=True)), tags[-1])


async def bulkdata(request: Request) -> Response:
    """GET .../instances/{instance}/bulkdata/{path}: a binary value, or, for the top-level
    Pixel Data, every frame."""
    if problem := check_uids(request):
        return problem
    try:
        target = parse_attribute_path(request.path_params["path"])
    except PathError as exc:
        return error(400, str(exc))
    if target.tag == PIXEL_DATA and not target.steps:
        return await frames_response(request, None)
    store: Store = services_of(request).store
    instance = await addressed_instance(request)
    if instance is None:
        return error(404, "no such instance")
    budget: ResourceBudget = services_of(request).budget
    path = store.blobs.absolute(instance.path)
    try:
        if target.steps:
            value, held = await budget.decode.run(_nested_value, path, target, budget)
        else:
            value, held = await budget.decode.run(_top_level_value, path, target.tag, budget)
    except OverBudget as refusal:
        return over_budget(refusal)
    except NotServed as exc:
        return error(exc.status, str(exc))
    # Evaluated once the value is known to exist (RFC 9110 13.2.1).
    etag = frames_etag(instance, OCTET_STREAM)
    if unchanged := conditional(request, [instance], etag):
        held.release()
        return unchanged
    boundary = new_boundary()
    return StreamingResponse(_value_stream(path, value, held, boundary), headers={
        "Content-Type": multipart_type(OCTET_STREAM, boundary),
        **validator_headers([instance], etag)})


Found = tuple[bytes | tuple[int, int], Reservation]


def _top_level_value(path: Path, tag: BaseTag, budget: ResourceBudget) -> Found:
    """The binary value of the top-level element ``tag`` of ``path`` and the reservation
    that holds it until sent (NotServed when there is none): a small value (or one of a
    deflated data set, inflated whole) read, a large one as its (offset, length) in the
    file, found from the element's header and read in slices as it is sent."""
    missing = f"no binary value {tag:08X} at the top level of this instance"
    held = budget.reserve_header_read(path)
    try:
        if is_deflated(path):  # the whole data set is inflated (and reserved) to read it
            element = dcmread(path, stop_before_pixels=True).get(tag)
            if element is None or not isinstance(element.value, bytes):
                raise NotServed(404, missing)
            return element.value, held
        raw = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE).get_item(
            tag, keep_deferred=True)
        if isinstance(raw, DataElement):  # a small value, parsed already
            if not isinstance(raw.value, bytes):
                raise NotServed(404, missing)
            held.resize(len(raw.value))
            return raw.value, held
        vr = (raw.VR if raw is not None else None) or _dictionary_vr(tag)
        if raw is None or vr not in _BINARY_VRS or raw.length == 0xFFFFFFFF:
            raise NotServed(404, missing)
        held.what = f"the value of ({tag:08X})"
        if raw.value is not None:
            held.resize(len(raw.value))
            return raw.value, held
        held.resize(READ_CHUNK)
        return (raw.value_tell, raw.length), held
    except BaseException:
        held.release()
        raise


def _nested_value(path: Path, target: AttributePath, budget: ResourceBudget) -> Found:
    """The binary value of the element ``target`` names inside sequence items of ``path``
    (NotServed when there is none), read with the header and held until sent."""
    # pydicom reads the values inside sequences whole, however long (defer_size applies at
    # the top level only): the estimate of a read with its DICOM JSON counts them.
    held = budget.reserve_header_read(path, as_json=True)
    try:
        item: Dataset = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
        for depth, (sequence, number) in enumerate(target.steps):
            element = item.get(sequence)
            where = AttributePath(target.steps[:depth], sequence)
            if element is None or element.VR != "SQ":
                raise NotServed(404, f"no sequence {where} in this instance")
            if number > len(element.value):
                raise NotServed(404, f"sequence {where} has {len(element.value)} item(s), "
                                f"not {number}")
            item = element.value[number - 1]
        element = item.get(target.tag)
        if element is None or element.VR not in _BINARY_VRS or \
                not isinstance(element.value, bytes):
            raise NotServed(404, f"no binary value {target} in this instance")
        if element.is_undefined_length:
            # Encapsulated (an icon image of a compressed object, PS3.5 A.4): its fragments
            # are no value a client could use as application/octet-stream.
            raise NotServed(422, f"{target} is encapsulated pixel data, which is not served "
                            "as bulk data inside a sequence")
        value = element.value
        del item, element
        held.what = f"the value of {target}"
        held.resize(len(value))
        return value, held
    except BaseException:
        held.release()
        raise


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"  # a private or unknown element read as implicit VR (PS3.5 6.2.2)


async def _value_stream(path: Path, value: bytes | tuple[int, int], held: Reservation,
                        boundary: str) -> AsyncIterator[bytes | memoryview]:
    """A single-part multipart body, handed to the server in slices (read from ``path``
    when ``value`` is an (offset, length) there), ``held`` until the last slice is sent."""
    try:
        if isinstance(value, bytes):
            yield part_head(boundary, OCTET_STREAM, len(value), True)
            for piece in slices(value):
                yield piece
        else:
            offset, length = value
            yield part_head(boundary, OCTET_STREAM, length, True)
            async with aiofiles.open(path, "rb") as stored:
                await stored.seek(offset)
                while length > 0 and (chunk := await stored.read(min(READ_CHUNK, length))):
                    length -= len(chunk)
                    yield chunk
            if length:  # the file ended early: no closing boundary, the client sees it cut
                log.warning("bulk data of %s cut: %d bytes missing", path.name, length)
                return
        yield closing(boundary)
    finally:
        held.release()
