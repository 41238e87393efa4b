"""multipart/related framing (RFC 2046 5.1, RFC 2387) for DICOMweb responses."""

import uuid
from collections.abc import AsyncIterator, Callable


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


class MultipartError(ValueError):
    """A multipart body that cannot be read (HTTP 400)."""


class PartTooLargeError(MultipartError):
    """A part over the size limit (HTTP 413)."""


_MAX_HEADERS = 16384


def _part_headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, separator, value = line.partition(":")
        if not separator:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def iter_parts(chunks: AsyncIterator[bytes], boundary: str, max_part_size: int,
                     on_buffer: Callable[[int], None] = lambda size: None,
                     ) -> AsyncIterator[tuple[dict[str, str], bytes]]:
    """Parts of a multipart body read from ``chunks``: (lower-cased headers, content).

    Holds one part at a time; a part larger than ``max_part_size`` is an error.
    ``on_buffer(size)`` is told the bytes held each time they grow (a chunk at a time); it
    may raise to stop the reading (a memory budget).
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
        on_buffer(len(buffer))

    async def find(token: bytes, limit: int, what: str,
                   too_long: type[MultipartError] = MultipartError) -> int:
        start = 0
        while (index := buffer.find(token, start)) < 0:
            if ended:
                raise MultipartError(f"body ended before {what}")
            if len(buffer) > limit:
                raise too_long(f"{what} not found within {limit} bytes")
            start = max(0, len(buffer) - len(token) + 1)
            await more()
        if index > limit:  # found, but further than allowed (it came in one large chunk)
            raise too_long(f"{what} not found within {limit} bytes")
        return index

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
        end = await find(separator, max_part_size, "the next boundary", PartTooLargeError)
        content = bytes(buffer[:end])
        del buffer[:end + len(separator)]  # before the part is used: one copy of it is held
        yield headers, content
