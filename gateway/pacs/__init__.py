"""PACS peers as sources: fetching studies from them (``fetch``) and giving back, on demand,
the local copy of a study they hold (``restore``). Retention (``retention``) removes such
copies; ``studies.copy_removed_at`` and ``copy_held_by`` are what the two share."""

from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from gateway.dicom.peer import DicomPeer


@dataclass(frozen=True)
class PacsConfig:
    """The PACS peers of the service and how it talks to them."""

    peers: tuple[DicomPeer, ...]
    calling_ae: str  # our AE title: the C-MOVE destination the PACS must know
    timeout: float  # per DIMSE request (settings.pacs.pacs_timeout)
    wait_seconds: float  # what a client waits for a study retrieved on demand
    data_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> "PacsConfig":
        """The PACS configuration of ``settings``."""
        pacs = settings.pacs
        return cls(tuple(pacs.peers), settings.dicom.ae_title, pacs.pacs_timeout,
                   pacs.retrieve_wait_seconds, settings.data_dir)

    def named(self, ae_title: str) -> DicomPeer | None:
        """The configured peer of that AE title, if any."""
        return next((peer for peer in self.peers if peer.ae_title == ae_title), None)

    def holders_first(self, held_by: str) -> list[DicomPeer]:
        """Every peer, the one named ``held_by`` (confirmed to hold a study) first."""
        first = self.named(held_by)
        return ([first] if first else []) + [peer for peer in self.peers if peer != first]
