"""Everything a local registry (``passerelle registry``) stored, checked: each
DocumentReference and SubmissionSet against its PDSm profile, each KOS by dicom3tools and
against its metadata. Read from the registry's own store (``registry.sqlite`` in its data
dir, the file gateway.registry.documents writes), after the registry has stopped.

What a test's services published is told apart from what a test posted itself (the
registry's own tests post hand-written and deliberately altered bundles) by the KOS itself:
Manufacturer "Passerelle". Its instances are those a service of the test stores beside the
registry's data dir (``<sibling>/studies/<study>/<series>/<sop>.dcm``, the layout of
storage.blobs), where dcentvfy reads them: a Passerelle KOS whose study no service beside the
registry stores is a problem (the check would otherwise check nothing), as is a registry
that left no store.
"""

import json
import sqlite3
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conformance import (
    DICOM,
    DOCUMENT_PROFILE,
    SUBMISSION_SET_PROFILE,
    profile_problems,
)
from tests.conformance.consistency import metadata_problems
from tests.conformance.dicom3tools import kos_problems


def _instances(data_dir: Path, manifest: Dataset) -> tuple[list[Path], list[str]] | None:
    """The referenced instance files found beside ``data_dir`` and the ones missing there;
    None when no service beside it stores the study."""
    roots = sorted(data_dir.parent.glob(f"*/studies/{manifest.StudyInstanceUID}"))
    if not roots:
        return None
    found, missing = [], []
    for study in manifest.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for reference in series.ReferencedSOPSequence:
                path = roots[0] / series.SeriesInstanceUID / \
                    f"{reference.ReferencedSOPInstanceUID}.dcm"
                (found if path.exists() else missing).append(path)
    return found, [str(path) for path in missing]


def registry_problems(data_dir: Path) -> list[str]:
    """Every problem of every document the registry on ``data_dir`` holds."""
    path = data_dir / "registry.sqlite"
    if not path.exists():
        return [f"no {path}: the registry stored nothing that could be checked"]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        resources = [(kind, json.loads(text)) for kind, text in db.execute(
            "SELECT type, json FROM resources WHERE version > 0 ORDER BY id")]
        binaries = {str(n): (kind, bytes(data)) for n, kind, data in
                    db.execute("SELECT id, content_type, data FROM binaries")}
    lists = {entry["item"]["reference"]: resource for kind, resource in resources
             if kind == "List" for entry in resource.get("entry", [])}
    problems = []
    for kind, resource in resources:
        name = f"{kind}/{resource.get('id')}"
        if kind != "DocumentReference":
            continue
        for content in resource.get("content", []):
            binary_id = content.get("attachment", {}).get("url", "").rpartition("/Binary/")[2]
            content_type, data = binaries.get(binary_id, ("", b""))
            if content_type != DICOM:
                continue
            manifest = dcmread(BytesIO(data), stop_before_pixels=True)
            if manifest.get("Manufacturer") != "Passerelle":
                continue  # posted by a test, not published by a service
            found = _instances(data_dir, manifest)
            if found is None:
                problems.append(f"{name}: a Passerelle KOS of study "
                                f"{manifest.StudyInstanceUID} that no service beside "
                                f"{data_dir} stores: its instances cannot be checked")
                continue
            instances, missing = found
            if resource.get("status") == "superseded":
                # Replaced or withdrawn: what it named may have been corrected or rejected
                # since (IHE IOCM), so the KOS is checked by itself, not against them.
                instances, missing = [], []
            problems += [f"{name}: profile: {p}" for p in profile_problems(resource,
                                                                           DOCUMENT_PROFILE)]
            if name in lists:
                problems += [f"{name}: its SubmissionSet: profile: {p}"
                             for p in profile_problems(lists[name], SUBMISSION_SET_PROFILE)]
            problems += [f"{name}: the KOS references {m}, not stored" for m in missing]
            problems += [f"{name}: {p}" for p in kos_problems(data, instances)]
            problems += [f"{name}: metadata vs KOS: {p}" for p in metadata_problems(
                resource, data, lists.get(name), instances)]
    return problems
