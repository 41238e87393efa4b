"""The streaming multipart reader on bodies split at every possible place."""

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.web.http.multipart import MultipartError, iter_parts

BODY = (b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--XyZ\r\n"
        b"\r\nsecond part\r\n\r\n--XyZ--\r\nepilogue")


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


def read(body: bytes, size: int = 7, limit: int = 1000) -> list[tuple[dict, bytes]]:
    async def collect() -> list[tuple[dict, bytes]]:
        return [part async for part in iter_parts(_chunks(body, size), "XyZ", limit)]

    return asyncio.run(collect())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_parts_whatever_the_chunking(size: int) -> None:
    assert read(BODY, size) == [({"content-type": "application/dicom"}, b"first"),
                                ({}, b"second part\r\n")]


@pytest.mark.parametrize("body, message", [
    (b"no boundary at all", "first boundary"),
    (b"--XyZ\r\nContent-Type: a\r\n\r\nunterminated", "next boundary"),
    (b"--XyZ\r\nbroken header\r\n\r\nx\r\n--XyZ--", "malformed part header"),
    (b"--XyZ\r\n\r\n" + b"x" * 2000 + b"\r\n--XyZ--", "not found within 1000 bytes"),
])
def test_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        read(body)



def test_the_bytes_held_are_reported_and_a_budget_can_stop_the_reading() -> None:
    body = BODY.replace(b"first", b"f" * 100)
    held: list[int] = []

    def count(size: int) -> None:
        held.append(size)

    async def collect(on_buffer: Callable[[int], None]) -> list[tuple[dict, bytes]]:
        return [part async for part in iter_parts(_chunks(body, 7), "XyZ", 1000, on_buffer)]

    assert len(asyncio.run(collect(count))) == 2
    assert 100 < max(held) < 100 + 60  # one part, its headers and a chunk: never the body

    def budget(size: int) -> None:
        if size > 60:
            raise OverflowError("over budget")

    with pytest.raises(OverflowError):
        asyncio.run(collect(budget))
