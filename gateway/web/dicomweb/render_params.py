"""Rendering parameters of HTTP requests: WADO-RS query parameters (PS3.18 8.3.5.1) and
WADO-URI parameters (PS3.18 9.1.2), validated into ``RenderParams``."""

from starlette.datastructures import QueryParams

from gateway.imaging.render import MEDIA_TYPES, RenderParams
from gateway.web.http.accept import BadAcceptError, parse_accept
from storage.numbers import INT32_MAX, parse_decimal, parse_int
from storage.uids import is_valid_uid

_VOI_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
THUMBNAIL_VIEWPORT = (128, 128)
MAX_IMAGE_SIDE = 0xFFFF  # Rows and Columns are US: no image side, asked or stored, is longer


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


def media_type(accept: str | None, requested: str | None = None) -> str:
    """The image media type asked for by WADO-URI ``contentType`` or else by Accept."""
    if requested is not None:
        if requested not in MEDIA_TYPES:
            raise BadRenderRequestError(f"contentType {requested[:40]!r} is not one of "
                                        f"{', '.join(MEDIA_TYPES)} or application/dicom")
        return requested
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


def rendered_params(query: QueryParams, accept: str | None,
                    thumbnail: bool = False) -> RenderParams:
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
    media = media_type(accept)
    bitdepth = query.get("bitdepth", "8")
    if bitdepth not in ("8", "16"):
        raise BadRenderRequestError("bitdepth must be 8 or 16")
    sixteen_bit = bitdepth == "16"
    if sixteen_bit and media != "image/png":
        raise BadRenderRequestError("bitdepth=16 needs image/png")
    return RenderParams(window=window, viewport=viewport, source=source, media_type=media,
                        quality=quality, sixteen_bit=sixteen_bit)


def uri_params(query: QueryParams) -> tuple[dict[str, str], RenderParams | None]:
    """Identifiers and, for an image contentType, the RenderParams of a WADO-URI request."""
    if query.get("requestType") != "WADO":
        raise BadRenderRequestError("requestType must be WADO")
    uids = {key: query.get(key, "") for key in ("studyUID", "seriesUID", "objectUID")}
    for key, value in uids.items():
        if not is_valid_uid(value):
            raise BadRenderRequestError(f"{key} must be a valid UID")
    content_type = query.get("contentType", "image/jpeg").split(",")[0].strip()
    if content_type == "application/dicom":
        return uids, None
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
    return uids, RenderParams(frame=_integer(query, "frameNumber", 1, 1, INT32_MAX),
                              window=window, viewport=viewport, region=region,
                              media_type=media_type(None, content_type),
                              quality=_integer(query, "imageQuality", 90, 1, 100))
