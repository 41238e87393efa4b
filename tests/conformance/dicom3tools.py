"""A KOS manifest checked by David Clunie's dicom3tools (Debian ``dicom3tools``, installed by
scripts/setup.sh --test): ``dciodvfy`` validates it against the Key Object Selection IOD
specialised for an XDS-I.b manifest (``-profile IHEXDSIManifest``), ``dcentvfy`` checks that
the KOS and the instances it references agree on every patient and study attribute.

What counts as a problem (every ``Error`` line, and warnings chosen deliberately):

dciodvfy, on the KOS (the file we produce, so every warning is ours to explain):
  accepted
  * "Attribute is not present in standard DICOM IOD" for Retrieve URL (0008,1190) in the
    Referenced Series items only (anywhere else it is a problem), and the "Standard
    Extended SOP Class" line it implies: IHE RAD
    XDS-I.b (RAD TF-3 4.68.4.1.2.3) puts the WADO-RS Retrieve URL there, which the IOD
    tables of this dicom3tools release do not list;
  * "Missing attribute or value that would be needed to build DICOMDIR" for Study Date, Study
    Time and Study ID only: the media directory (PS3.11) does not apply to a manifest sent to
    a registry, and these Type 2 values are empty when the instances have none (whether the
    KOS carries them as the instances do is what dcentvfy and the consistency check verify).
    Any other attribute so reported (an empty Patient ID) is a problem.
  every other warning is a problem.
  Errors are problems, but one:
  * "Missing attribute for Type 1 Required" for Retrieve AE Title (0008,0054) in the Referenced
    Series items (the IHEXDSIManifest profile's Hierarchical Series Reference macro): RAD TF-3
    4.68.4.1.2.3 requires it of a source offering DIMSE retrieve; Passerelle serves no C-FIND /
    C-MOVE / C-GET yet and offers WADO-RS only (Retrieve URL, Retrieve Location UID), so the
    KOS names no AE title (issue 15 finding 7). Issue 18 adds query/retrieve and the AE title
    with it; this acceptance goes then.

dcentvfy, on the KOS and its instances:
  * between two instances (the sender's data, not the KOS): not a problem;
  * "Different information entities for attribute": the two IODs place an attribute in
    different entities (Accession Number is Study in a KOS, Series in a CT in this release):
    not a problem;
  * "Attribute present in one instance but not the other" involving the KOS: a problem when
    the instance has a value and the KOS none (it lost the patient's or the study's
    attribute); the KOS may carry more (an issuer from the settings), or an empty Type 2
    attribute where the instance has none;
  * any other warning involving the KOS is a problem.
  * "String attribute has different value" (an Error) is compared again on the values
    pydicom decodes with each file's Specific Character Set: dcentvfy compares the encoded
    bytes, so the same name in ISO_IR 100 and in ISO_IR 192 differs for it; equal decoded
    values are not a problem (PS3.5 6.1.2.4: the encoding differs, not the value).
"""

import re
import subprocess
import tempfile
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

_DCIODVFY_ACCEPTED = (
    re.compile(r"^Warning - </CurrentRequestedProcedureEvidenceSequence\(0040,a375\)\[[0-9]+\]"
               r"/ReferencedSeriesSequence\(0008,1115\)\[[0-9]+\]/RetrieveURL\(0008,1190\)> "
               r"- Attribute is not present in standard DICOM IOD$"),
    re.compile(r"^Warning - Dicom dataset contains attributes not present in standard DICOM IOD"
               r" - this is a Standard Extended SOP Class$"),
    re.compile(r"^Warning - </(StudyDate\(0008,0020\)|StudyTime\(0008,0030\)"
               r"|StudyID\(0020,0010\))> "
               r"- Missing attribute or value that would be needed to build DICOMDIR$"),
)
# Issue 15 finding 7 / issue 18: no Retrieve AE Title until query/retrieve is served.
_DCIODVFY_ACCEPTED_ERRORS = (
    re.compile(r"^Error - </CurrentRequestedProcedureEvidenceSequence\(0040,a375\)\[[0-9]+\]"
               r"/ReferencedSeriesSequence\(0008,1115\)\[[0-9]+\]/RetrieveAETitle\(0008,0054\)> "
               r"- Missing attribute for Type 1 Required - "
               r"Module=<HierarchicalSeriesReferenceIHEXDSIManifestProfileMacro>$"),
)
_FILES = re.compile(r"for file <([^>]*)> versus <([^>]*)>")
_ELEMENT = re.compile(r"Element=<([A-Za-z0-9]+)>")


def _run(command: list[str]) -> list[str]:
    """The lines a dicom3tools command writes (its messages go to standard error)."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                            timeout=300, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def dciodvfy_problems(kos: Path) -> list[str]:
    """dciodvfy's errors and unaccepted warnings on a KOS file."""
    lines = _run(["dciodvfy", "-new", "-profile", "IHEXDSIManifest", str(kos)])
    return [line for line in lines
            if (line.startswith("Error")
                and not any(p.search(line) for p in _DCIODVFY_ACCEPTED_ERRORS))
            or (line.startswith("Warning")
                and not any(p.search(line) for p in _DCIODVFY_ACCEPTED))]


def _present(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value not in (None, "", [])


def dcentvfy_problems(kos: Path, instances: Sequence[Path]) -> list[str]:
    """dcentvfy's errors and the warnings that involve the KOS (see the module docstring)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(str(path) for path in [kos, *instances]) + "\n")
        listing.flush()
        lines = _run(["dcentvfy", "-f", listing.name])
    problems = []
    for line in lines:
        files, element = _FILES.search(line), _ELEMENT.search(line)
        pair = [dcmread(name, stop_before_pixels=True) for name in files.groups()] \
            if files and element else []
        keyword = element.group(1) if element else ""
        if line.startswith("Error"):
            if "String attribute has different value" in line and pair \
                    and all(keyword in ds for ds in pair) \
                    and str(pair[0][keyword].value) == str(pair[1][keyword].value):
                continue
            problems.append(line)
            continue
        if not line.startswith("Warning") or files is None or str(kos) not in files.groups():
            continue  # between instances: the sender's data
        if "Different information entities for attribute" in line:
            continue
        if "present in one instance but not the other" in line and pair:
            manifest, other = pair if files.group(1) == str(kos) else pair[::-1]
            if _present(manifest, keyword) or not _present(other, keyword):
                continue  # the KOS has it, or neither has a value
        problems.append(line)
    return problems


def kos_problems(kos: bytes | Path, instances: Sequence[Path]) -> list[str]:
    """Every dicom3tools problem of a KOS (its Part 10 bytes or file) and of the KOS with
    the instances it references (their files); ``instances`` empty: dciodvfy only."""
    with tempfile.TemporaryDirectory() as folder:
        path = kos if isinstance(kos, Path) else Path(folder) / "kos.dcm"
        if not isinstance(kos, Path):
            path.write_bytes(kos)
        dcmread(BytesIO(path.read_bytes()), stop_before_pixels=True)  # a Part 10 file at all
        return [f"dciodvfy: {p}" for p in dciodvfy_problems(path)] + \
            ([f"dcentvfy: {p}" for p in dcentvfy_problems(path, instances)] if instances
             else [])
