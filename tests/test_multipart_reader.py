"""The streaming multipart reader on bodies split at every possible place, and the memory it
holds: a bounded window, never a part."""

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from gateway.web.http.multipart import MultipartError, PartTooLargeError, iter_parts

BODY = (b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--XyZ\r\n"
        b"\r\nsecond part\r\n\r\n--XyZ--\r\nepilogue")


class Collected:
    """A part writer keeping what it is given, and the size of each write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: list[int] = []

    async def write(self, data: bytes) -> None:
        self.data += data
        self.writes.append(len(data))


class Counted:
    """A part writer keeping only the number of bytes it is given."""

    def __init__(self) -> None:
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


def read(body: bytes, size: int = 7, limit: int = 1000) -> list[tuple[dict, bytes]]:
    async def collect() -> list[tuple[dict, bytes]]:
        return [(headers, bytes(part.data)) async for headers, part in
                iter_parts(_chunks(body, size), "XyZ", limit, lambda headers: Collected())]

    return asyncio.run(collect())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_parts_whatever_the_chunking(size: int) -> None:
    assert read(BODY, size) == [({"content-type": "application/dicom"}, b"first"),
                                ({}, b"second part\r\n")]


@pytest.mark.parametrize("size", [1, 3, 7, 4096, 65536])
def test_boundary_prefixes_in_a_large_body_split_across_chunks(size: int) -> None:
    """Bytes that start like the boundary, at every offset against the chunk edges and the
    reader's write window, belong to the body."""
    near = b"\r\n--XyZ"[:-1] + b"\r\n-" + b"\r\n--Xy" + b"\r\n"
    content = (bytes(range(256)) * 1100 + near) * 3
    body = b"--XyZ\r\n\r\n" + content + b"\r\n--XyZ--\r\n"
    assert read(body, size, limit=len(content)) == [({}, content)]


@pytest.mark.parametrize("body, message", [
    (b"no boundary at all", "first boundary"),
    (b"--XyZ\r\nContent-Type: a\r\n\r\nunterminated", "next boundary"),
    (b"--XyZ\r\nbroken header\r\n\r\nx\r\n--XyZ--", "malformed part header"),
])
def test_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        read(body)


@pytest.mark.parametrize("size", [7, 1000, 5000])
def test_a_part_over_the_limit_is_refused_as_it_arrives(size: int) -> None:
    body = b"--XyZ\r\n\r\n" + b"x" * 2000 + b"\r\n--XyZ--"
    with pytest.raises(PartTooLargeError, match="more than 1000 bytes"):
        read(body, size)
    assert read(body, size, limit=2000)[0][1] == b"x" * 2000


def test_a_large_part_goes_to_its_writer_in_bounded_writes_and_memory() -> None:
    """A 64 MiB part read in 64 KiB chunks: the reader holds a window of the body (one
    write's worth and a chunk), never the part."""
    chunk, count = 65536, 1024
    head, tail = b"--XyZ\r\n\r\n", b"\r\n--XyZ--\r\n"

    async def body() -> AsyncIterator[bytes]:
        yield head
        block = b"\x00\r\n-" * (chunk // 4)
        for _ in range(count):
            yield block
        yield tail

    async def collect() -> list[int]:
        return [part.size async for _, part in
                iter_parts(body(), "XyZ", chunk * count, lambda headers: Counted())]

    tracemalloc.start()
    try:
        sizes = asyncio.run(collect())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [chunk * count]
    assert peak < 2 << 20, f"the reader held {peak} bytes"
