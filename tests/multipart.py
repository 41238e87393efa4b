"""Reading multipart/related responses in tests, independently of the server's code."""

import re

import httpx


def parts_of(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """Headers and body of each part; fails on a body not ended by the close delimiter."""
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"]).group(1)
    body = response.content
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    parts = []
    for chunk in body.split(f"--{boundary}".encode())[1:-1]:
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((headers, content.removesuffix(b"\r\n")))
    return parts
