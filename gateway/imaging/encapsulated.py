"""Encapsulated documents (PS3.3 C.24.2) served as their rendered media type (PS3.18
Table 8.7.4-1, Text category): the Encapsulated Document (0042,0011) value located in the
stored file and streamed from there, never read whole."""

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError

from gateway.imaging.budget import ResourceBudget, is_deflated
from gateway.imaging.render import RenderError
from storage.structure import DEFER_SIZE

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
ENCAPSULATED_CDA = "1.2.840.10008.5.1.4.1.1.104.2"
# The media type each served document class is rendered as: the document itself.
DOCUMENT_MEDIA_TYPES = {ENCAPSULATED_PDF: "application/pdf", ENCAPSULATED_CDA: "text/xml"}
_ENCAPSULATED_DOCUMENT = 0x00420011

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocumentPlace:
    """Where the document's bytes are in the stored file, or the bytes when small."""

    offset: int
    length: int
    data: bytes | None = None  # a value short enough to have been read with the header


def locate_document(path: Path, budget: ResourceBudget) -> DocumentPlace:
    """Where the Encapsulated Document of ``path`` is, from a header read within the
    decode budget; Encapsulated Document Length (0042,0015), when given as one length
    within the stored value, drops the padding byte (PS3.3 C.24.2.1). Blocking: call it
    in the decode pool."""
    with budget.reserve_header_read(path):
        if is_deflated(path):
            raise RenderError("a deflated encapsulated document is not served rendered; "
                              "retrieve it as application/dicom")
        try:
            ds = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
            raw = ds.get_item(_ENCAPSULATED_DOCUMENT, keep_deferred=True)
            declared = ds.get("EncapsulatedDocumentLength")
        except (InvalidDicomError, ValueError, TypeError, OSError) as exc:
            raise RenderError(f"cannot read this document: {exc}") from exc
        if raw is None:
            raise RenderError("this object has no encapsulated document")
        if isinstance(raw, DataElement) or raw.value is not None:  # short: read already
            data = bytes(raw.value or b"")
            length = _length(declared, len(data), path)
            return DocumentPlace(0, length, data[:length])
        if raw.length == 0xFFFFFFFF:
            raise RenderError("the encapsulated document has an undefined length")
        return DocumentPlace(raw.value_tell, _length(declared, raw.length, path))


def _length(declared: object, stored: int, path: Path) -> int:
    """The document's length: the Encapsulated Document Length when it is one length
    (UL, VM 1) of at most the ``stored`` value's, else the stored value whole (its
    padding byte, if any, with it: a trailing NUL or space that PDF and XML readers
    ignore)."""
    if declared is None:
        return stored
    if isinstance(declared, int) and not isinstance(declared, bool) and \
            0 <= declared <= stored:
        return declared
    log.warning("%s: Encapsulated Document Length %.40r is not a length within the "
                "%d bytes stored: ignored", path.name, declared, stored)
    return stored
