"""Rendering parameters of HTTP requests: WADO-RS query parameters (PS3.18 8.3.5.1) and
WADO-URI parameters (PS3.18 9.1.2, 9.5.1.2), validated into ``RenderParams``, and the
rendered media type negotiated from what the instance's Resource Category offers
(PS3.18 8.7.2, Table 8.7.4-1)."""

from dataclasses import dataclass

from starlette.datastructures import QueryParams

from gateway.imaging.encapsulated import DOCUMENT_MEDIA_TYPES
from gateway.imaging.render import MEDIA_TYPES, RenderParams
from gateway.imaging.structured_report import TEXT_MEDIA_TYPES, is_structured_report
from gateway.web.http.accept import BadAcceptError, MediaRange, NotAcceptableError, parse_accept
from storage.index import StoredInstance
from storage.numbers import INT32_MAX, parse_decimal, parse_int
from storage.uids import is_valid_uid

_VOI_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
THUMBNAIL_VIEWPORT = (128, 128)
MAX_IMAGE_SIDE = 0xFFFF  # Rows and Columns are US: no image side, asked or stored, is longer
IMAGE_MEDIA_TYPES = tuple(MEDIA_TYPES)  # image/jpeg, the default, first
# Parameters that apply to images only (PS3.18 8.3.5.1, 9.5.1.2: "only ... if the
# Resource Category ... is Single Frame, Multi-Frame, or Video").
RS_IMAGE_PARAMETERS = ("window", "viewport", "quality", "bitdepth")
URI_IMAGE_PARAMETERS = ("windowCenter", "windowWidth", "rows", "columns", "region",
                        "frameNumber", "imageQuality", "presentationUID",
                        "presentationSeriesUID")


class BadRenderRequestError(ValueError):
    """Rendering parameters that cannot be honoured (HTTP 400)."""


def _items(text: str, name: str, count: tuple[int, ...]) -> list[str]:
    """The comma-separated values of a parameter, spaces around them dropped."""
    values = [v.strip(" ") for v in text.split(",")]
    if len(values) not in count:
        raise BadRenderRequestError(f"{name} takes {' or '.join(map(str, count))} values")
    return values


def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[float]:
    return [parse_decimal(v, name) for v in _items(text, name, count)]


def _integer(query: QueryParams, name: str, default: int, low: int, high: int) -> int:
    return parse_int(query.get(name, str(default)), name, low, high)


def offered_media_types(instance: StoredInstance) -> tuple[str, ...]:
    """The rendered media types of the instance's Resource Category (PS3.18 8.7.2), its
    default first: images, SR documents (Text: text/html, text/plain, text/xml), and the
    encapsulated documents served as themselves (PDF, CDA); none for the others."""
    if instance.frames is not None:
        return IMAGE_MEDIA_TYPES
    if is_structured_report(instance.sop_class_uid):
        return TEXT_MEDIA_TYPES
    document = DOCUMENT_MEDIA_TYPES.get(instance.sop_class_uid)
    return (document,) if document else ()


def negotiate(ranges: list[MediaRange], offered: tuple[str, ...]) -> str:
    """The first of ``offered`` the ranges (by preference) accept, ``*/*`` and ``type/*``
    taking the first offered that matches; NotAcceptableError (406) when none."""
    for media in ranges:
        if media.media_type in offered:
            return media.media_type
        if media.media_type == "*/*" and offered:
            return offered[0]
        if media.media_type.endswith("/*"):
            kind = media.media_type[:-1]
            match = next((o for o in offered if o.startswith(kind)), None)
            if match is not None:
                return match
    asked = ", ".join(m.media_type for m in ranges)[:200]
    raise NotAcceptableError(f"{asked} not offered: this is rendered as "
                             f"{', '.join(offered)}")


def check_image_parameters(query: QueryParams, names: tuple[str, ...], media: str) -> None:
    """BadRenderRequestError when an image parameter comes with a non-image rendering."""
    if media not in MEDIA_TYPES and (given := [name for name in names if name in query]):
        raise BadRenderRequestError(f"{', '.join(given)} apply to images, not to {media}")


def media_type(accept: str | None) -> str:
    """The image media type of a thumbnail asked for by Accept."""
    for media in parse_accept(accept):
        if media.media_type in MEDIA_TYPES:
            return media.media_type
        if media.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise BadAcceptError("rendered images are image/jpeg, image/png or image/gif")


def _viewport(text: str) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """``vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3): the viewport and the source rectangle."""
    values = _items(text, "viewport", (2, 6))
    width, height = (parse_int(v, "viewport sizes (vw, vh)", 1, MAX_IMAGE_SIDE)
                     for v in values[:2])
    if len(values) == 2:
        return (width, height), None
    sx, sy = (parse_int(v, "viewport source origin (sx, sy)", 0, MAX_IMAGE_SIDE)
              for v in values[2:4])
    sw, sh = (parse_int(v, "viewport source size (sw, sh)", -MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
              for v in values[4:])
    if sw == 0 or sh == 0:
        raise BadRenderRequestError("viewport source size (sw, sh) must be non-zero")
    return (width, height), (sx, sy, sw, sh)


def rendered_params(query: QueryParams, media: str, thumbnail: bool = False) -> RenderParams:
    """RenderParams of a WADO-RS rendered or thumbnail request (PS3.18 8.3.5.1).

    ``bitdepth=16`` (with image/png) is an extension of ours: 16-bit grayscale PNG for
    clients that window themselves.
    """
    window = None
    if "window" in query and not thumbnail:
        parts = query["window"].split(",")
        center, width = _numbers(",".join(parts[:2]), "window", (2,))
        function = _VOI_FUNCTIONS.get(parts[2].strip().lower() if len(parts) > 2 else "linear")
        if function is None:
            raise BadRenderRequestError("window function must be linear, linear-exact or sigmoid")
        window = (center, width, function)
    viewport, source = (THUMBNAIL_VIEWPORT, None) if thumbnail else (None, None)
    if "viewport" in query:
        viewport, source = _viewport(query["viewport"])
    quality = _integer(query, "quality", 90, 1, 100)
    bitdepth = query.get("bitdepth", "8")
    if bitdepth not in ("8", "16"):
        raise BadRenderRequestError("bitdepth must be 8 or 16")
    sixteen_bit = bitdepth == "16"
    if sixteen_bit and media != "image/png":
        raise BadRenderRequestError("bitdepth=16 needs image/png")
    return RenderParams(window=window, viewport=viewport, source=source, media_type=media,
                        quality=quality, sixteen_bit=sixteen_bit)


@dataclass(frozen=True)
class UriRendering:
    """A WADO-URI Retrieve Rendered Instance request (PS3.18 9.5), before the object's
    Resource Category is known: its acceptable media types, its image parameters, the
    presentation state it names (series, instance)."""

    accepted: list[MediaRange]
    params: RenderParams
    presentation: tuple[str, str] | None


def uri_params(query: QueryParams) -> tuple[dict[str, str], UriRendering | None]:
    """Identifiers and, unless contentType is application/dicom, the rendering of a
    WADO-URI request."""
    if query.get("requestType") != "WADO":
        raise BadRenderRequestError("requestType must be WADO")
    uids = {key: query.get(key, "") for key in ("studyUID", "seriesUID", "objectUID")}
    for key, value in uids.items():
        if not is_valid_uid(value):
            raise BadRenderRequestError(f"{key} must be a valid UID")
    # contentType: media types in order of preference (9.1.2.2.1); none, the default of
    # the object's category (Table 8.7.4-1).
    accepted = parse_accept(query.get("contentType"))
    if accepted and accepted[0].media_type == "application/dicom":
        return uids, None
    presentation = None
    if "presentationUID" in query or "presentationSeriesUID" in query:
        # 9.5.1.2.7: both name the presentation state, of the study of the image.
        presentation = (query.get("presentationSeriesUID", ""), query.get("presentationUID", ""))
        for key, value in zip(("presentationSeriesUID", "presentationUID"), presentation,
                              strict=True):
            if not is_valid_uid(value):
                raise BadRenderRequestError(f"{key} must be a valid UID when a presentation "
                                            "state is asked for (both are needed)")
        if "windowCenter" in query or "windowWidth" in query:
            raise BadRenderRequestError("windowCenter and windowWidth cannot be used with "
                                        "a presentation state, which has its own")
    window = None
    if "windowCenter" in query or "windowWidth" in query:
        center = _numbers(query.get("windowCenter", ""), "windowCenter", (1,))[0]
        width = _numbers(query.get("windowWidth", ""), "windowWidth", (1,))[0]
        window = (center, width, "LINEAR")
    viewport = None
    if "rows" in query or "columns" in query:
        viewport = (_integer(query, "columns", MAX_IMAGE_SIDE, 1, MAX_IMAGE_SIDE),
                    _integer(query, "rows", MAX_IMAGE_SIDE, 1, MAX_IMAGE_SIDE))
    region = None
    if "region" in query:
        x1, y1, x2, y2 = _numbers(query["region"], "region", (4,))
        if not 0 <= x1 < x2 <= 1 or not 0 <= y1 < y2 <= 1:
            raise BadRenderRequestError("region is x1,y1,x2,y2 with 0 <= x1 < x2 <= 1")
        region = (x1, y1, x2, y2)
    params = RenderParams(frame=_integer(query, "frameNumber", 1, 1, INT32_MAX),
                          window=window, viewport=viewport, region=region,
                          quality=_integer(query, "imageQuality", 90, 1, 100))
    return uids, UriRendering(accepted, params, presentation)
