"""A pynetdicom Storage SCU for the tests."""

from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, Association, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from storage.part10 import dataset_bytes
from tests.synthetic import part10

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


def c_store_pdus(assoc: Association, ds: Dataset, message_id: int = 1,
                 max_pdu: int = 65536) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ of ``ds``, as ``assoc`` would send them (for a
    test that sends them itself, in pieces or out of turn)."""
    request = C_STORE()
    request.MessageID, request.Priority = message_id, 2
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.DataSet = BytesIO(bytes(dataset_bytes(part10(ds))))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID]
    pdus = []
    for primitive in message.encode_msg(context.context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus
