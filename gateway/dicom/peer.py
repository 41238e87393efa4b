"""A remote DICOM application entity: ``AE@host:port``, for a PACS also how it gives studies
back (``/move`` or ``/get``)."""

import enum
import re
from dataclasses import dataclass

# PS3.5 6.2: AE titles are up to 16 characters of the default repertoire, no backslash.
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_PEER = re.compile(r"(?P<ae>[^@]{1,16})@(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/@\s\[\]]+))"
                   r":(?P<port>\d{1,5})(?:/(?P<retrieve>\w+))?")


class Retrieve(enum.StrEnum):
    """How a PACS gives a study back (PS3.4 C.4.2, C.4.3)."""

    # C-MOVE to our own AE title: the PACS opens associations to our C-STORE SCP, so it must
    # know our AE title, host and port. What nearly every PACS supports.
    MOVE = "move"
    # C-GET: the instances come back on the association we opened; nothing to configure on
    # the PACS side, but fewer PACS support it.
    GET = "get"


@dataclass(frozen=True)
class DicomPeer:
    """A remote AE: its title, address and, for a PACS, the retrieve service used."""

    ae_title: str
    host: str
    port: int
    retrieve: Retrieve = Retrieve.MOVE

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}/{self.retrieve}"


def parse_peer(text: str) -> DicomPeer:
    """``AE@host:port`` (``AE@[::1]:104`` for IPv6), optionally followed by ``/move`` (the
    default) or ``/get``. ValueError, saying what is wrong, for anything else."""
    text = text.strip()
    match = _PEER.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not AE@host:port (optionally /move or /get)")
    ae_title = match["ae"].strip()
    if not AE_TITLE.fullmatch(ae_title):
        raise ValueError(f"invalid AE title {ae_title!r}: 1 to 16 printable ASCII characters")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is not 1 to 65535")
    try:
        retrieve = Retrieve(match["retrieve"] or "move")
    except ValueError:
        raise ValueError(f"{text!r}: {match['retrieve']!r} is neither move nor get") from None
    return DicomPeer(ae_title, match["ipv6"] or match["host"], port, retrieve)
