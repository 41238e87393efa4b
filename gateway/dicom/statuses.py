"""DIMSE status codes: storage (PS3.4 Table B.2-1), shared by C-STORE and STOW-RS (whose
FailureReason uses the same codes, PS3.18 10.5.3), and query/retrieve (PS3.4 Tables C.4-1,
C.4-2, C.4-3)."""

from storage.store import Rejection

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # A7xx
DATASET_MISMATCH = 0xA900  # A9xx: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # Cxxx
# "Duplicate SOP Instance", a general status of PS3.7 Annex C (it is defined for
# N-CREATE): the SOP Instance UID is already registered, with another data set or elsewhere
# in the hierarchy. It is NOT in the C-STORE status table of PS3.4 Table B.2-1, which has no
# failure for a duplicate; the conformance statement says so, and a peer that does not
# know the code still reads a failure (neither 0000 nor Bxxx).
DUPLICATE_SOP_INSTANCE = 0x0111
# Implementation-specific Cxxx codes (PS3.4 B.2.3 "cannot understand", with Offending
# Element and Error Comment; PS3.18 I.2.2 lets the FailureReason use them too).
STUDY_OF_OTHER_PATIENT = 0xC510  # the study is indexed under another Patient ID or issuer
SERIES_OF_OTHER_STUDY = 0xC511  # the series is indexed in another study
PREVIOUSLY_REJECTED = 0xC512  # an IHE IOCM rejection note took this instance out of use
REJECTION_NOTE_OUTSIDE_STUDY = 0xC513  # a rejection note naming what is not of its study

# Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
PENDING = 0xFF00  # a match (C-FIND), or sub-operations continuing (C-GET, C-MOVE)
PENDING_UNSUPPORTED_KEYS = 0xFF01  # a match; an optional key was not used for matching
CANCEL = 0xFE00
IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000  # Cxxx: Unable to process
TOO_MANY_MATCHES = OUT_OF_RESOURCES  # C-FIND A700: Refused, out of resources
UNABLE_TO_COUNT_MATCHES = 0xA701  # C-GET/C-MOVE: out of resources, number of matches
UNABLE_TO_SUBOPERATE = 0xA702  # C-GET/C-MOVE: out of resources, sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801

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
    Rejection.SOP_INSTANCE_CONFLICT: DUPLICATE_SOP_INSTANCE,
    Rejection.STUDY_OF_OTHER_PATIENT: STUDY_OF_OTHER_PATIENT,
    Rejection.SERIES_OF_OTHER_STUDY: SERIES_OF_OTHER_STUDY,
    Rejection.PREVIOUSLY_REJECTED: PREVIOUSLY_REJECTED,
    Rejection.REJECTION_NOTE_OUTSIDE_STUDY: REJECTION_NOTE_OUTSIDE_STUDY,
    # Current Requested Procedure Evidence Sequence missing, empty or invalid (PS3.3 C.17.6.2)
    Rejection.REJECTION_NOTE_INVALID: DATASET_MISMATCH,
}


def failure_status(reason: Rejection | None) -> int:
    """The failure status code for a rejection."""
    return _BY_REJECTION[reason] if reason else CANNOT_UNDERSTAND
