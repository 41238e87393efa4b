"""multipart/related framing (RFC 2046 5.1, RFC 2387) for DICOMweb responses."""

import uuid


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
