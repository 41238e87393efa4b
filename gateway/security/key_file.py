"""Secrets kept in the data dir: random bytes created once (mode 0600, never overwritten) and
read by every process of the service, and after a restart."""

import contextlib
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def load_or_create(path: Path) -> bytes:
    """The secret in ``path``, made of ``KEY_BYTES`` random bytes if there is none yet.

    Several processes may ask at once (HTTP workers of a service, two commands): the key is
    written whole to a file of this process's own (``O_EXCL``, 0600), then linked to
    ``path``, which only one of them can do; the others read the winner's. No reader ever
    sees a half-written key."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process's came first: it wins
            os.link(draft, path)
    finally:
        draft.unlink()
    return _read(path)


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a key: remove it to make one")
    return key
