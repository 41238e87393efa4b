"""Pixels to displayable images (JPEG, PNG, GIF): the grayscale pipeline of PS3.4 N.2
(Modality LUT, VOI LUT, polarity) and the colour conversions, vectorised with numpy."""

import math
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from gateway.imaging.budget import (
    OverBudget,
    ResourceBudget,
    check_output_pixels,
    render_bytes,
)
from gateway.imaging.frame_reader import FrameDecodeError, FrameRangeError, FrameReader
from gateway.imaging.presentation_state import PresentationState

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}


class RenderError(ValueError):
    """The instance or frame cannot be rendered (no pixels, undecodable, bad parameter)."""


@dataclass(frozen=True)
class RenderParams:
    """What to render and how."""

    frame: int = 1  # 1-based
    window: tuple[float, float, str] | None = None  # (center, width, VOI LUT function)
    viewport: tuple[int, int] | None = None  # fit within (width, height), aspect kept
    region: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in 0..1
    source: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh in pixels; < 0 flips
    media_type: str = "image/jpeg"
    quality: int = 90
    sixteen_bit: bool = False  # 16-bit grayscale PNG
    presentation: PresentationState | None = None  # applied before region and viewport


def _windowed(values: np.ndarray, center: float, width: float, function: str,
              top: float) -> np.ndarray:
    """VOI windowing to [0, top] (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3 LINEAR_EXACT, SIGMOID)."""
    if not (math.isfinite(center) and math.isfinite(width)):
        raise RenderError("window center and width must be finite numbers")
    if function in ("SIGMOID", "LINEAR_EXACT") and width <= 0:
        # C.11.2.1.3: the width is greater than 0 for these functions (1 or more for LINEAR)
        raise RenderError(f"window width must be greater than 0 for a {function} VOI "
                          "function")
    values = values.astype(np.float64)
    if function == "SIGMOID":
        return top / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((values - center) / width + 0.5) * top, 0, top)
    if width < 1:
        raise RenderError("window width must be at least 1 for a LINEAR VOI function")
    low = center - 0.5 - (width - 1) / 2
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * top if width > 1 else \
        np.where(values > low, top, 0.0)
    return np.clip(scaled, 0, top)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS (PS3.3 C.11.2.1.2: the first pair applies)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _stored_values(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """Stored values with bits above BitsStored cleared (or sign-extended) (PS3.5 8.1.1),
    in as few bytes a value as they fit (the budget counts on it)."""
    bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    if frame.dtype.kind not in "iu" or bits_stored >= frame.dtype.itemsize * 8:
        return frame
    mask = (1 << bits_stored) - 1
    if int(ds.get("PixelRepresentation", 0)) != 1:
        return frame & frame.dtype.type(mask)
    values = frame.astype(np.int32 if frame.dtype.itemsize <= 2 else np.int64)
    values &= mask
    values[values >= 1 << (bits_stored - 1)] -= 1 << bits_stored
    return values


def _display(ds: Dataset, values: np.ndarray, value_range: tuple[float, float],
             window: tuple[float, float, str] | None, top: int) -> np.ndarray:
    """Modality values to display values in [0, top] (VOI then polarity, PS3.4 N.2.1).

    ``value_range`` is the min and max of the frame's values, for the min/max fallback.
    """
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
    if window is not None:
        out = _windowed(values, window[0], window[1], window[2], top)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = _windowed(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function, top)
    elif "VOILUTSequence" in ds:
        lut_out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = lut_out * top / (2 ** bits - 1)
    else:
        low, high = value_range
        out = (values - low) * (top / (high - low)) if high > low else np.zeros(values.shape)
    inverse = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverse = not inverse
    if inverse:
        out = top - out
    # A LUT's entries may pass its declared bits: clipped, not wrapped by the integer cast.
    return np.clip(np.rint(out), 0, top)


def grayscale(ds: Dataset, frame: np.ndarray, window: tuple[float, float, str] | None,
              top: int) -> np.ndarray:
    """A grayscale frame as display values in [0, top], polarity applied.

    Integer frames go through a lookup table built over the stored values they use: the
    pipeline then runs on at most 2^BitsStored values instead of every pixel.
    """
    stored = _stored_values(ds, frame)
    low, high = (int(stored.min()), int(stored.max())) if stored.dtype.kind in "iu" else (0, -1)
    if high < low or high - low >= stored.size:  # floats, or a table larger than the frame
        values = apply_modality_lut(stored, ds)
        return _display(ds, values, (float(values.min()), float(values.max())), window, top)
    offsets = stored
    if low:
        offsets = stored.astype(np.int32 if stored.dtype.itemsize <= 2 else np.int64)
        offsets -= low
    domain = apply_modality_lut(np.arange(low, high + 1, dtype=np.int64), ds)
    used = domain[np.bincount(offsets.ravel(), minlength=domain.size) > 0]
    table = _display(ds, domain, (float(used.min()), float(used.max())), window, top)
    return table.astype(np.uint16 if top > 255 else np.uint8)[offsets]


def colour(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """A colour frame as 8-bit RGB."""
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:  # RGB, or YBR converted to RGB by pydicom's decoders
        rgb = frame
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if bits > 8:
        rgb = np.right_shift(rgb.astype(np.uint32), bits - 8)
    return rgb.astype(np.uint8)


@dataclass(frozen=True)
class Geometry:
    """Where the output comes from in the frame, and its size."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in frame pixels
    flip: tuple[bool, bool]  # left-right, top-bottom
    size: tuple[int, int]  # width, height of the output

    @property
    def source_size(self) -> tuple[int, int]:
        """Width and height of the part of the frame shown."""
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def geometry(columns: int, rows: int, params: RenderParams) -> Geometry:
    """The output's geometry, known from the header before anything is decoded: the region
    (WADO-URI), then the viewport's source rectangle and its scaling (PS3.18 8.3.5.1.3,
    a negative source size flips), aspect kept."""
    left, top, right, bottom = 0, 0, columns, rows
    if params.region is not None:
        x1, y1, x2, y2 = params.region
        left, top = math.floor(x1 * columns), math.floor(y1 * rows)
        right, bottom = math.ceil(x2 * columns), math.ceil(y2 * rows)
    flip = (False, False)
    if params.source is not None:
        x, y, width, height = params.source
        shown = (right - left, bottom - top)
        left, top, right, bottom = (left + x, top + y, left + min(shown[0], x + abs(width)),
                                    top + min(shown[1], y + abs(height)))
        if left >= right or top >= bottom:
            raise RenderError(f"viewport source rectangle is outside the {shown[0]}x"
                              f"{shown[1]} image")
        flip = (width < 0, height < 0)
    size = (right - left, bottom - top)
    if params.viewport is not None:
        scale = min(params.viewport[0] / size[0], params.viewport[1] / size[1])
        size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    return Geometry((left, top, right, bottom), flip, size)


def _frame(ds: Dataset, frame: np.ndarray, params: RenderParams) -> Image.Image:
    """The decoded frame as a Pillow image, grayscale pipeline or colour applied; with a
    presentation state, its pipeline and spatial transformation."""
    if params.presentation is not None:
        pipeline = params.presentation.pipeline(ds)
        top = 65535 if params.sixteen_bit else 255
        values = grayscale(pipeline, frame, None, top)
        image = Image.fromarray(values.astype(np.uint16 if params.sixteen_bit else np.uint8))
        return params.presentation.transform(image)
    if int(ds.get("SamplesPerPixel", 1)) == 1 and \
            ds.get("PhotometricInterpretation") != "PALETTE COLOR":
        if params.sixteen_bit:
            return Image.fromarray(grayscale(ds, frame, params.window, 65535).astype(np.uint16))
        return Image.fromarray(grayscale(ds, frame, params.window, 255).astype(np.uint8))
    return Image.fromarray(colour(ds, frame), mode="RGB")


def _shaped(image: Image.Image, shape: Geometry) -> Image.Image:
    """``image`` cropped, flipped and resized as ``shape`` says."""
    if shape.box != (0, 0, image.width, image.height):
        image = image.crop(shape.box)
    if shape.flip[0]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if shape.flip[1]:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if shape.size != image.size:
        image = image.resize(shape.size, Image.Resampling.LANCZOS)
    return image


def encode(image: Image.Image, params: RenderParams) -> bytes:
    """The image in the requested media type."""
    out = BytesIO()
    fmt = MEDIA_TYPES[params.media_type]
    if fmt == "JPEG":
        image.save(out, fmt, quality=params.quality)
    elif fmt == "GIF":
        image.convert("P" if image.mode == "RGB" else "L").save(out, fmt)
    else:
        image.save(out, fmt)
    return out.getvalue()


def render(path: Path, params: RenderParams, budget: ResourceBudget) -> bytes:
    """Render one frame of a stored file within ``budget``; RenderError says why it cannot
    be, OverBudget why it may not.

    Reads the header, checks the output size and reserves the memory the rendering takes
    (until the image is encoded), then reads and decodes only the requested frame, so a
    huge multi-frame object is never loaded whole.
    """
    try:
        reader = FrameReader(path, budget)
    except FrameRangeError as exc:
        raise RenderError("this instance has no pixel data to render") from exc
    try:
        ds = reader.ds
        if not 1 <= params.frame <= reader.count:
            raise RenderError(f"frame {params.frame} does not exist (the instance has "
                              f"{reader.count})")
        columns, rows = int(ds.Columns), int(ds.Rows)
        presented = 0  # pixels of the presentation state's displayed area
        if params.presentation is not None:
            if int(ds.get("SamplesPerPixel", 1)) != 1 or \
                    ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                raise RenderError("a grayscale presentation state applies to grayscale "
                                  "images only")
            area = params.presentation.size(columns, rows)
            check_output_pixels((columns, rows), area, budget.max_output_pixels)
            columns, rows = area
            presented = area[0] * area[1]
        shape = geometry(columns, rows, params)
        check_output_pixels(shape.source_size, shape.size, budget.max_output_pixels)
        resized = shape.size[0] * shape.size[1] if shape.size != shape.source_size else 0
        with budget.memory.reserve(render_bytes(ds, resized + 2 * presented)
                                   + 2 * reader.stored_bytes(params.frame),
                                   f"rendering frame {params.frame}"):
            image = _frame(ds, reader.array(params.frame), params)
            return encode(_shaped(image, shape), params)
    except (RenderError, OverBudget):
        raise
    except FrameDecodeError as exc:
        raise RenderError(str(exc)) from exc
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError,
            ArithmeticError, NotImplementedError) as exc:
        # Malformed pixel attributes (e.g. a non-numeric NumberOfFrames, LUT entries past
        # their bits, a LUT of bits pydicom does not apply).
        raise RenderError(f"cannot render this instance: {exc}") from exc
    finally:
        reader.close()
