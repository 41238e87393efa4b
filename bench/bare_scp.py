"""Baselines: pynetdicom C-STORE SCPs that write the received bytes (no parsing, no index),
with ``--fsync`` durably (the file and its directory fsynced before the response, as a
C-STORE success needs), or with ``--no-io`` do nothing at all but answer success.

Usage: python bench/bare_scp.py PORT FOLDER MAX_PDU [--no-io | --fsync]
"""

import os
import sys
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> None:
    """Serve until killed."""
    port, folder, max_pdu = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    write, durable = "--no-io" not in sys.argv[4:], "--fsync" in sys.argv[4:]
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        if write:
            path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
            with path.open("wb") as file:
                file.write(event.encoded_dataset())
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            if durable:
                directory = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
