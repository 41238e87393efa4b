"""Grayscale Softcopy Presentation States (PS3.3 A.33.1) applied to the image they
reference, as WADO-URI ``presentationUID`` asks (PS3.18 9.5.1.2.7, 9.5.2): the grayscale
pipeline of PS3.4 N.2 taken from the presentation state (Modality LUT C.11.1, Softcopy VOI
LUT C.11.8, Presentation LUT C.11.6) in place of the image's, then its Displayed Area
(C.10.4) and Spatial Transformation (C.10.6).

Not drawn: graphic annotations and layers, overlays, shutters; the displayed area is
shown pixel for pixel whatever its Presentation Size Mode (the size on a display is the
viewer's: the request's rows and columns scale it).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from gateway.imaging.budget import ResourceBudget

GRAYSCALE_SOFTCOPY_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
_ROTATIONS = {0: None, 90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_90}  # clockwise in DICOM, counter in Pillow

Lut = tuple[tuple[int, int, int], tuple[int, ...]]  # LUT Descriptor, LUT Data
# Bits of a LUT entry (LUT Descriptor's third value): 8 or 16 for a Modality LUT (PS3.3
# C.11.1.1.1), 8 to 16 for a VOI LUT (C.11.2.1.1).
_LUT_BITS = {"Modality LUT": ((8, 16), "8 or 16"), "VOI LUT": (tuple(range(8, 17)), "8 to 16")}
# Displayed Area corners (SL) may lie outside the image (C.10.4), not without bound: past
# twice the largest image (Rows and Columns are US), no area is meant.
_MAX_CORNER = 2 * 0xFFFF


class PresentationStateError(ValueError):
    """A presentation state that cannot be applied to this image, with the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PresentationState:
    """What of one presentation state applies to one frame of one image."""

    sop_uid: str
    rescale: tuple[float, float]  # slope, intercept (identity when the state has none)
    modality_lut: Lut | None
    window: tuple[float, float, str] | None  # center, width, VOI LUT Function
    voi_lut: Lut | None
    inverse: bool  # Presentation LUT Shape INVERSE
    rotation: int  # clockwise degrees
    flip: bool  # horizontal, after the rotation
    area: tuple[int, int, int, int] | None  # columns and rows of two corners, from 1

    def pipeline(self, image: Dataset) -> Dataset:
        """The attributes the grayscale pipeline reads: the image's pixel description,
        the presentation state's Modality, VOI and Presentation LUTs (PS3.4 N.2)."""
        ds = Dataset()
        for keyword in ("SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                        "PixelRepresentation"):
            if keyword in image:
                setattr(ds, keyword, image[keyword].value)
        # The Presentation LUT sets the polarity: MONOCHROME1 no longer inverts (N.2.1).
        ds.PhotometricInterpretation = "MONOCHROME2"
        if self.modality_lut is not None:
            ds.ModalityLUTSequence = Sequence([_lut_item(self.modality_lut)])
            ds.ModalityLUTSequence[0].ModalityLUTType = "US"
        else:
            ds.RescaleSlope, ds.RescaleIntercept = self.rescale
        if self.window is not None:
            ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = self.window
        elif self.voi_lut is not None:
            ds.VOILUTSequence = Sequence([_lut_item(self.voi_lut)])
        ds.PresentationLUTShape = "INVERSE" if self.inverse else "IDENTITY"
        return ds

    def box(self, columns: int, rows: int) -> tuple[int, int, int, int]:
        """The displayed area in the frame as left, top, right, bottom (from 0; it may
        extend past the image, shown black there)."""
        if self.area is None:
            return 0, 0, columns, rows
        c1, r1, c2, r2 = self.area
        return min(c1, c2) - 1, min(r1, r2) - 1, max(c1, c2), max(r1, r2)

    def size(self, columns: int, rows: int) -> tuple[int, int]:
        """Width and height of the presented image: the displayed area, rotated."""
        left, top, right, bottom = self.box(columns, rows)
        width, height = right - left, bottom - top
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def transform(self, image: Image.Image) -> Image.Image:
        """The displayed area of ``image``, rotated, then flipped (C.10.6)."""
        box = self.box(image.width, image.height)
        if box != (0, 0, image.width, image.height):
            image = image.crop(box)  # Pillow fills outside the image with 0 (black)
        if (rotation := _ROTATIONS[self.rotation]) is not None:
            image = image.transpose(rotation)
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def _lut_item(lut: Lut) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = list(lut[0])
    item.LUTData = list(lut[1])
    return item


def _lut(item: Dataset, name: str) -> Lut:
    """The LUT Descriptor and LUT Data of ``item``, checked against each other (PS3.3
    C.11.1.1.1: 0 entries means 2^16)."""
    try:
        descriptor = tuple(int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes):  # OW: 16-bit words
            data = np.frombuffer(data[:len(data) // 2 * 2], "<u2").tolist()
        values = tuple(int(v) for v in (data if isinstance(data, list | MultiValue)
                                        else [data]))
    except (AttributeError, TypeError, ValueError) as exc:
        raise PresentationStateError(422, f"the presentation state's {name} cannot be "
                                     f"read: {exc}") from exc
    if len(descriptor) != 3:
        raise PresentationStateError(422, f"the presentation state's {name} has a bad "
                                     "LUT Descriptor")
    entries, first, bits = descriptor
    entries = entries or 1 << 16
    problem = None
    if not 1 <= entries <= 1 << 16:
        problem = f"declares {entries} entries, not 1 to 65536"
    elif bits not in _LUT_BITS[name][0]:
        problem = f"declares {bits} bits an entry, not {_LUT_BITS[name][1]}"
    elif len(values) != entries:
        problem = f"declares {entries} entries and has {len(values)}"
    elif values and not 0 <= min(values) <= max(values) < 1 << bits:
        problem = f"has entries past its {bits} bits"
    if problem is not None:
        raise PresentationStateError(422, f"the presentation state's {name} {problem}")
    return (descriptor[0], first, bits), values


def _numbers(value: object) -> list[float]:
    return [float(v) for v in (value if isinstance(value, list | MultiValue) else [value])]


def _applies(item: Dataset, sop_uid: str, frame: int) -> bool:
    """True when an item with an optional Referenced Image Sequence applies to the frame
    (no sequence: to every image of the presentation state)."""
    references = item.get("ReferencedImageSequence")
    if not references:
        return True
    return any(_names(ref, sop_uid, frame) for ref in references)


def _names(reference: Dataset, sop_uid: str, frame: int) -> bool:
    """True when an Image SOP Instance Reference names the frame (no frame list: all)."""
    if reference.get("ReferencedSOPInstanceUID") != sop_uid:
        return False
    frames = reference.get("ReferencedFrameNumber")
    return frames is None or frame in [int(n) for n in _numbers(frames)]


def _references(ps: Dataset, series_uid: str, sop_uid: str, frame: int) -> bool:
    """True when the Presentation State Relationship Module (C.11.11) names the frame."""
    return any(series.get("SeriesInstanceUID") == series_uid
               and any(_names(ref, sop_uid, frame)
                       for ref in series.get("ReferencedImageSequence") or [])
               for series in ps.get("ReferencedSeriesSequence") or [])


def for_image(ps: Dataset, series_uid: str, sop_uid: str, frame: int) -> PresentationState:
    """What of the presentation state ``ps`` applies to frame ``frame`` of image
    ``sop_uid``; PresentationStateError when it does not apply or cannot be applied."""
    uid = str(ps.get("SOPInstanceUID", ""))
    if ps.get("SOPClassUID") != GRAYSCALE_SOFTCOPY_PRESENTATION_STATE:
        raise PresentationStateError(422, f"{uid} is not a Grayscale Softcopy Presentation "
                                     "State, the only kind applied here")
    try:
        applies = _references(ps, series_uid, sop_uid, frame)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a frame number "x"
        raise PresentationStateError(422, f"presentation state {uid} cannot be read: "
                                     f"{exc}") from exc
    if not applies:
        raise PresentationStateError(400, f"presentation state {uid} does not apply to "
                                     f"frame {frame} of {sop_uid}")
    if "PresentationLUTSequence" in ps:
        raise PresentationStateError(422, f"presentation state {uid} has a Presentation "
                                     "LUT Sequence, which is not applied here")
    try:
        rescale = (float(ps.get("RescaleSlope", 1)), float(ps.get("RescaleIntercept", 0)))
        modality = ps.get("ModalityLUTSequence")
        window, voi_lut = None, None
        for item in ps.get("SoftcopyVOILUTSequence") or []:
            if not _applies(item, sop_uid, frame):
                continue
            if item.get("WindowCenter") is not None and item.get("WindowWidth") is not None:
                function = str(item.get("VOILUTFunction") or "LINEAR").upper()
                window = (_numbers(item.WindowCenter)[0], _numbers(item.WindowWidth)[0],
                          function)
            elif item.get("VOILUTSequence"):
                voi_lut = _lut(item.VOILUTSequence[0], "VOI LUT")
            break
        area = None
        for item in ps.get("DisplayedAreaSelectionSequence") or []:
            if _applies(item, sop_uid, frame):
                c1, r1 = (int(v) for v in item.DisplayedAreaTopLeftHandCorner)
                c2, r2 = (int(v) for v in item.DisplayedAreaBottomRightHandCorner)
                area = (c1, r1, c2, r2)
                break
        rotation = int(ps.get("ImageRotation") or 0)
        flip = str(ps.get("ImageHorizontalFlip") or "N").upper() == "Y"
    except PresentationStateError:
        raise
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise PresentationStateError(422, f"presentation state {uid} cannot be read: "
                                     f"{exc}") from exc
    if area is not None and max(abs(corner) for corner in area) > _MAX_CORNER:
        raise PresentationStateError(422, f"presentation state {uid} has a Displayed Area "
                                     f"corner past {_MAX_CORNER} pixels: {area}")
    if rotation not in _ROTATIONS:
        raise PresentationStateError(422, f"presentation state {uid} has Image Rotation "
                                     f"{rotation}, not 0, 90, 180 or 270")
    shape = str(ps.get("PresentationLUTShape") or "IDENTITY").upper()
    return PresentationState(
        sop_uid=uid, rescale=rescale,
        modality_lut=_lut(modality[0], "Modality LUT") if modality else None,
        window=window, voi_lut=voi_lut, inverse=shape == "INVERSE",
        rotation=rotation, flip=flip, area=area)


def read_presentation_state(path: Path, series_uid: str, sop_uid: str, frame: int,
                            budget: ResourceBudget) -> PresentationState:
    """The presentation state stored at ``path`` as it applies to the frame, read within
    the decode budget. Blocking: call it in the decode pool."""
    with budget.reserve_header_read(path, as_json=True):
        try:
            ps = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, ValueError, OSError) as exc:
            raise PresentationStateError(422, f"cannot read the presentation state: "
                                         f"{exc}") from exc
        return for_image(ps, series_uid, sop_uid, frame)
