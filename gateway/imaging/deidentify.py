"""De-identified copies for WADO-URI ``anonymize=yes`` (PS3.18 9.1.2.4): the PS3.15
Annex E Basic Application Level Confidentiality Profile, applied by dicom-anonymizer.

UIDs are replaced by UIDs derived from the original and a secret of this installation, so
the instances of a study stay a study across requests and nobody without the secret can go
back to the originals.
"""

import hashlib
import hmac
import threading
from io import BytesIO
from pathlib import Path

from dicomanonymizer import anonymize_dataset, simpledicomanonymizer
from pydicom import dcmread

from gateway.security import key_file
from storage.uids import uid_from_digest

_KEY_FILE = "deidentify.key"
# dicom-anonymizer keeps its original -> new UID map in a module-level dict: one caller at a
# time, and the map is emptied after each use so it cannot grow with every request.
_LOCK = threading.Lock()


def load_or_create_key(data_dir: Path) -> bytes:
    """The installation's secret (32 random bytes in ``data_dir``, created on first use)."""
    return key_file.load_or_create(data_dir / _KEY_FILE)


def derived_uid(key: bytes, uid: str) -> str:
    """A UUID-derived UID (PS3.5 B.2) that depends only on ``key`` and ``uid``."""
    return uid_from_digest(hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).digest())


def deidentify(data: bytes, key: bytes) -> bytes:
    """A de-identified copy of a Part 10 file, in the same transfer syntax."""
    ds = dcmread(BytesIO(data))
    uids = {str(value) for element in ds.iterall() if element.VR == "UI"
            for value in (element.value if isinstance(element.value, list) else [element.value])
            if value}
    with _LOCK:
        mapping = simpledicomanonymizer.dictionary
        mapping.clear()
        mapping.update({uid: derived_uid(key, uid) for uid in uids})
        try:
            anonymize_dataset(ds, delete_private_tags=True)
        finally:
            mapping.clear()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 E.1-1 Basic Application Level Confidentiality Profile"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
