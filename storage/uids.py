"""DICOM UIDs and OIDs: validation (PS3.5 9.1), applied before a UID becomes part of a path
or an identifier system, and UUID-derived UIDs (PS3.5 B.2) that depend only on what they
are derived from."""

import re
import uuid

# Digits and dots, no empty component. Leading zeros inside a component are forbidden by
# PS3.5 9.1 but common in the wild; they are harmless for paths, so they are tolerated.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64
# An ISO OID (ITU-T X.660) as PS3.5 9.1 writes it: two components at least, no leading zero.
_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a UID safe to store and to use as a file name."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def is_oid(value: str) -> bool:
    """True when ``value`` is a well-formed OID, fit to name an assigning authority or a
    code system (``urn:oid:<value>``)."""
    return len(value) <= MAX_UID_LENGTH and _OID.fullmatch(value) is not None


def oid_of(value: str) -> str:
    """The OID ``value`` names, bare or as ``urn:oid:<oid>``; "" when it names none."""
    value = value.strip().removeprefix("urn:oid:")
    return value if is_oid(value) else ""


def uid_from_digest(digest: bytes) -> str:
    """A ``2.25.<UUID>`` UID made from the first 16 bytes of a hash (PS3.5 B.2)."""
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
