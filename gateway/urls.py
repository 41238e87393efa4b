"""Where this gateway serves a study, a series or an instance: the WADO-RS URLs written into
KOS manifests, QIDO-RS and STOW-RS answers and DICOM JSON bulk data references
(PS3.18 10.4.1: ``{root}/studies/{study}[/series/{series}[/instances/{instance}]]``)."""

DICOMWEB_PATH = "/dicom-web"


def dicomweb_root(public_url: str) -> str:
    """The DICOMweb root under the gateway's public base URL."""
    return public_url.rstrip("/") + DICOMWEB_PATH


def retrieve_url(root: str, study: str, series: str = "", instance: str = "") -> str:
    """The WADO-RS URL of a study, of one of its series, or of one instance of a series."""
    url = f"{root}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if instance:
            url += f"/instances/{instance}"
    return url


# An attribute path (PS3.18 10.4.1.1.5 leaves the Bulk Data URI to the origin server): the
# sequences and item numbers (from 1, as PS3.19 A.1.5 numbers items) that lead to the
# element, then its tag, each tag as 8 hexadecimal digits:
# ``.../bulkdata/00880200/1/7FE00010`` is the Pixel Data of the first Icon Image Sequence
# item, ``.../bulkdata/7FE00010`` the top-level Pixel Data.
ItemStep = tuple[int, int]  # (tag of a sequence, item number from 1)


def bulkdata_url(instance_url: str, steps: tuple[ItemStep, ...], tag: int) -> str:
    """The Bulk Data URI of the element ``tag`` reached through ``steps``."""
    path = "".join(f"{sequence:08X}/{number}/" for sequence, number in steps)
    return f"{instance_url}/bulkdata/{path}{tag:08X}"
