"""Rendered images kept on disk, least recently used evicted first, and rendered once
however many clients ask for the same image at the same time."""

import asyncio
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio.to_thread

from gateway.metrics import RENDER_CACHE

log = logging.getLogger(__name__)
_TMP_SUFFIX = ".tmp"


def cache_key(*parts: object) -> str:
    """A file name for the rendering identified by ``parts`` (their ``repr`` is hashed)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class RenderCache:
    """Size-bounded on-disk LRU of rendered images with single-flight production.

    The cache is a cache: files are written without fsync, a crash may lose entries, and a
    file that disappears is rendered again. Recency survives restarts through file mtimes.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._total = 0
        self._lock = threading.Lock()  # entries are touched from worker threads
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        if max_bytes > 0:
            self._load()

    @property
    def total_bytes(self) -> int:
        """Bytes currently held."""
        return self._total

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def _load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.directory.glob("*/*"):
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            stat = path.stat()
            found.append((stat.st_mtime, path.name, stat.st_size))
        for _, key, size in sorted(found):
            self._entries[key] = size
            self._total += size
        self._evict()

    def _read(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:  # removed behind our back: forget it
            with self._lock:
                self._total -= self._entries.pop(key, 0)
            return None
        return data

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(key + _TMP_SUFFIX)
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as exc:  # a full disk must not fail the request that rendered
            tmp.unlink(missing_ok=True)
            log.warning("render cache: cannot write %s: %s", path, exc)
            return
        with self._lock:
            self._total += len(data) - self._entries.pop(key, 0)
            self._entries[key] = len(data)
        self._evict()

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._total <= self.max_bytes or not self._entries:
                    return
                key, size = self._entries.popitem(last=False)
                self._total -= size
            self._path(key).unlink(missing_ok=True)

    async def get(self, key: str, produce: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached bytes for ``key``, else the result of ``produce()``, stored.

        Concurrent calls for one key share one ``produce()``; a caller that goes away does
        not cancel it for the others.
        """
        if self.max_bytes <= 0:
            return await produce()
        if key in self._entries:
            data = await anyio.to_thread.run_sync(self._read, key)
            if data is not None:
                RENDER_CACHE.labels("hit").inc()
                return data
        task = self._inflight.get(key)
        if task is None:
            RENDER_CACHE.labels("miss").inc()
            task = asyncio.ensure_future(self._produce(key, produce))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        else:
            RENDER_CACHE.labels("shared").inc()
        return await asyncio.shield(task)

    async def _produce(self, key: str, produce: Callable[[], Awaitable[bytes]]) -> bytes:
        data = await produce()
        await anyio.to_thread.run_sync(self._write, key, data)
        return data

    def _done(self, key: str, task: asyncio.Task[bytes]) -> None:
        del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so that a failure nobody awaited is not logged
