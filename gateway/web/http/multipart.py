"""multipart/related framing (RFC 2046 5.1, RFC 2387) for DICOMweb responses."""

import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol, TypeVar


def new_boundary() -> str:
    """A boundary that cannot occur in the parts (128 random bits)."""
    return uuid.uuid4().hex


def part_head(boundary: str, content_type: str, length: int | None, first: bool,
              location: str | None = None) -> bytes:
    """Delimiter and headers of one part; the delimiter's leading CRLF belongs to it."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if location is not None:
        lines.append(f"Content-Location: {location}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return (head if first else "\r\n" + head).encode("ascii")


def closing(boundary: str) -> bytes:
    """The close delimiter that ends the multipart body."""
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def body_length(boundary: str, parts: Iterable[tuple[str, int]]) -> int:
    """The exact length of a multipart body of ``parts`` (content type, length), each framed
    by ``part_head`` with its length, then ``closing``."""
    total = len(closing(boundary))
    for index, (content_type, length) in enumerate(parts):
        total += len(part_head(boundary, content_type, length, index == 0)) + length
    return total


class MultipartError(ValueError):
    """A multipart body that cannot be read (HTTP 400)."""


class PartTooLargeError(MultipartError):
    """A part over the size limit (HTTP 413)."""


_MAX_HEADERS = 16384
# Body bytes gathered before they are handed to the part's writer: one write (one thread hop
# for a file) per this many bytes, whatever the size of the chunks the client sends; with a
# chunk (uvicorn's 64 KiB at most) what one request holds.
_WRITE_BYTES = 64 << 10


class PartWriter(Protocol):
    """Where the body of a part goes as it arrives (a file being spooled)."""

    async def write(self, data: bytes) -> None:
        """Append ``data``; may raise to stop the reading (a budget, a write error)."""


W = TypeVar("W", bound=PartWriter)


def _part_headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, separator, value = line.partition(":")
        if not separator:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def iter_parts(chunks: AsyncIterator[bytes], boundary: str, max_part_size: int,
                     open_part: Callable[[dict[str, str]], W],
                     ) -> AsyncIterator[tuple[dict[str, str], W]]:
    """Parts of a multipart body read from ``chunks``: (lower-cased headers, the writer
    ``open_part(headers)`` made for the part), each yielded once its whole body was
    written to that writer.

    Holds a bounded window of the body, never a part: the bytes that cannot be the start of
    the next boundary go to the writer as they arrive. A part larger than ``max_part_size``
    is refused (PartTooLargeError) as soon as it is known to be.
    """
    buffer = bytearray()
    source = chunks.__aiter__()
    ended = False

    async def more() -> None:
        nonlocal ended
        try:
            buffer.extend(await source.__anext__())
        except StopAsyncIteration:
            ended = True

    async def find(token: bytes, limit: int, what: str) -> int:
        start = 0
        while (index := buffer.find(token, start)) < 0:
            if ended:
                raise MultipartError(f"body ended before {what}")
            if len(buffer) > limit:
                raise MultipartError(f"{what} not found within {limit} bytes")
            start = max(0, len(buffer) - len(token) + 1)
            await more()
        if index > limit:  # found, but further than allowed (it came in one large chunk)
            raise MultipartError(f"{what} not found within {limit} bytes")
        return index

    async def copy_body(writer: W) -> None:
        """Write the body up to the next boundary to ``writer``, consuming the boundary."""
        written, start = 0, 0
        while (index := buffer.find(separator, start)) < 0:
            if ended:
                raise MultipartError("body ended before the next boundary")
            # All but the last bytes, which may be the start of a boundary split across
            # chunks, belong to the body.
            start = max(0, len(buffer) - len(separator) + 1)
            if written + start > max_part_size:
                raise PartTooLargeError(f"a part of more than {max_part_size} bytes")
            if start >= _WRITE_BYTES:
                await writer.write(bytes(buffer[:start]))
                del buffer[:start]
                written, start = written + start, 0
            await more()
        if written + index > max_part_size:
            raise PartTooLargeError(f"a part of more than {max_part_size} bytes")
        if index:
            await writer.write(bytes(buffer[:index]))
        del buffer[:index + len(separator)]

    delimiter = b"--" + boundary.encode("latin-1")
    first = await find(delimiter, max_part_size, "the first boundary")
    del buffer[:first + len(delimiter)]
    separator = b"\r\n" + delimiter
    while True:
        while len(buffer) < 2 and not ended:
            await more()
        if buffer.startswith(b"--"):
            return  # close delimiter
        line_end = await find(b"\r\n", 1024, "the end of the boundary line")
        del buffer[:line_end + 2]
        while len(buffer) < 2 and not ended:
            await more()
        if buffer.startswith(b"\r\n"):  # a part without headers
            headers: dict[str, str] = {}
            del buffer[:2]
        else:
            end = await find(b"\r\n\r\n", _MAX_HEADERS, "the end of the part headers")
            headers = _part_headers(bytes(buffer[:end]))
            del buffer[:end + 4]
        writer = open_part(headers)
        await copy_body(writer)
        yield headers, writer
