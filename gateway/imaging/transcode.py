"""Transfer syntax conversion of stored instances on retrieval (PS3.18 8.7.3.5).

Decoding uses pydicom's pixel backends (pylibjpeg plugins); encoding is offered for the
lossless syntaxes pydicom can encode here (RLE, JPEG 2000 lossless, JPEG-LS lossless when
pyjpegls is installed).
"""

from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from gateway.imaging.budget import Reservation, ResourceBudget, reserve_conversion
from gateway.imaging.codestream import check_frame

ANY = "*"
NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
          DeflatedExplicitVRLittleEndian}
_ENCODABLE = (RLELossless, JPEG2000Lossless, JPEGLSLossless)


def decoding_plugin(stored: str) -> str:
    """The pydicom decoding plugin to use for ``stored`` ('' = pydicom's own choice):
    CharLS (pyjpegls) decodes JPEG-LS about 4x faster than pylibjpeg-libjpeg."""
    return "pyjpegls" if stored in (JPEGLSLossless, JPEGLSNearLossless) else ""


def _can_decode(stored: str) -> bool:
    if stored == ExplicitVRBigEndian:
        return False  # retired (PS3.5 A.3); pydicom cannot rewrite it as little endian
    if stored in NATIVE:
        return True
    try:
        return get_decoder(UID(stored)).is_available
    except NotImplementedError:
        return False


def _can_encode(target: str) -> bool:
    return target in _ENCODABLE and get_encoder(UID(target)).is_available


def choose_syntax(stored: str, has_pixels: bool, acceptable: list[str]) -> str | None:
    """The first acceptable syntax this instance can be sent in, or None.

    ``acceptable`` is in the client's order of preference; ``*`` means as stored.
    """
    for target in acceptable:
        if target in (ANY, stored):
            return stored
        if target in NATIVE - {DeflatedExplicitVRLittleEndian} and _can_decode(stored):
            return target
        if has_pixels and _can_encode(target) and _can_decode(stored):
            return target
    return None


def transcode(data: bytes, target: str) -> bytes:
    """Re-encode a Part 10 file in ``target`` (one of those ``choose_syntax`` offers).

    The SOP Instance UID is kept: the object is the same one, in another encoding (pydicom
    would otherwise give every decompressed or compressed copy a new UID).
    """
    ds = dcmread(BytesIO(data))
    stored = ds.file_meta.TransferSyntaxUID
    if "PixelData" in ds and stored.is_compressed:
        # The decode memory was reserved from the header: no codestream may declare more.
        for frame in generate_frames(ds.PixelData, number_of_frames=int(ds.get(
                "NumberOfFrames") or 1)):
            check_frame(ds, stored, frame)
        # Also converts YBR JPEG colour to RGB (pydicom's default).
        ds.decompress(decoding_plugin=decoding_plugin(stored), generate_instance_uid=False)
    if UID(target).is_compressed:
        ds.compress(UID(target), generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(target)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def transcode_file(path: Path, target: str, budget: ResourceBudget
                   ) -> tuple[bytes, Reservation]:
    """``transcode`` of a stored file within the decode memory of ``budget`` (OverBudget
    when it does not fit), and the reservation that holds it: release it once sent.
    Blocking: run it in ``budget.decode``."""
    held = reserve_conversion(budget, path, f"converting this instance to {target}")
    try:
        return transcode(path.read_bytes(), target), held
    except BaseException:
        held.release()
        raise
