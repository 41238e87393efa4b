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
