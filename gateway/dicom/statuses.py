"""Storage status codes (PS3.4 Table B.2-1), shared by C-STORE and STOW-RS (whose
FailureReason uses the same codes, PS3.18 10.5.3)."""

from storage.store import Rejection

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # A7xx
DATASET_MISMATCH = 0xA900  # A9xx: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # Cxxx

_BY_REJECTION = {
    Rejection.NOT_PART10: CANNOT_UNDERSTAND,
    Rejection.UNREADABLE: CANNOT_UNDERSTAND,
    Rejection.MISSING_UID: DATASET_MISMATCH,
    Rejection.INVALID_UID: DATASET_MISMATCH,
    Rejection.UID_MISMATCH: DATASET_MISMATCH,
    Rejection.TOO_LARGE: OUT_OF_RESOURCES,
    Rejection.TOO_COMPLEX: DATASET_MISMATCH,
    Rejection.DISK_FULL: OUT_OF_RESOURCES,
    Rejection.IO_ERROR: OUT_OF_RESOURCES,
}


def failure_status(reason: Rejection | None) -> int:
    """The failure status code for a rejection."""
    return _BY_REJECTION[reason] if reason else CANNOT_UNDERSTAND
