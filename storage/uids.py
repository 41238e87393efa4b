"""DICOM UIDs: validation (PS3.5 9.1), applied before a UID becomes part of a path, and
UUID-derived UIDs (PS3.5 B.2) that depend only on what they are derived from."""

import re
import uuid

# Digits and dots, no empty component. Leading zeros inside a component are forbidden by
# PS3.5 9.1 but common in the wild; they are harmless for paths, so they are tolerated.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a UID safe to store and to use as a file name."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def uid_from_digest(digest: bytes) -> str:
    """A ``2.25.<UUID>`` UID made from the first 16 bytes of a hash (PS3.5 B.2)."""
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
