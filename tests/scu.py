"""A pynetdicom Storage SCU for the tests."""

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, Association, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# Send files as they are on disk (only their file meta is parsed), so the server is shown the
# exact bytes of the test file, malformed ones included.
_config.STORE_SEND_CHUNKED_DATASET = True


def associate(port: int, items: list[Dataset | Path] = (), calling: str = "TESTSCU",
              called: str = "PASSERELLE", timeout: float = 30) -> Association:
    """An association proposing each object's SOP class in its own transfer syntax;
    ``timeout`` bounds negotiation, each DIMSE exchange and network silence."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    for item in items:
        meta = read_file_meta_info(item) if isinstance(item, Path) else item.file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    return ae.associate("127.0.0.1", port, ae_title=called)


def send(port: int, item: Dataset | Path, calling: str = "TESTSCU") -> tuple[int, str]:
    """Send one object over a fresh association: the C-STORE status and its ErrorComment.

    A Path is sent as stored, without decoding (pynetdicom reads only its file meta).
    """
    assoc = associate(port, [item], calling)
    assert assoc.is_established, "association rejected"
    try:
        status = assoc.send_c_store(item)
        assert "Status" in status, "no C-STORE response"
        return int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()
