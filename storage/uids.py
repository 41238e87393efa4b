"""DICOM UID validation (PS3.5 9.1), applied before a UID becomes part of a path."""

import re

# Digits and dots, no empty component. Leading zeros inside a component are forbidden by
# PS3.5 9.1 but common in the wild; they are harmless for paths, so they are tolerated.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a UID safe to store and to use as a file name."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None
