"""Requests to the token issuer (JWKS, discovery document, token endpoint): certificate and
host name checked against the system's CAs, no redirect followed, an answer read up to a
bound and within a deadline, whatever the issuer (or whoever answers in its name) sends."""

import asyncio
import json
import ssl

import httpx


class IssuerAnswerError(ValueError):
    """The issuer's answer is too large or not a JSON document."""


async def fetch_json(url: str, limit: int, timeout: float, body: bytes | None = None,
                     headers: dict[str, str] | None = None) -> tuple[int, object]:
    """(status, JSON body) of a GET of ``url``, or of a POST of ``body``;
    IssuerAnswerError past ``limit`` bytes or when the body is not JSON, httpx.HTTPError
    when it cannot be had, TimeoutError when it takes more than ``timeout`` seconds."""
    method = "GET" if body is None else "POST"
    async with asyncio.timeout(timeout), \
            httpx.AsyncClient(verify=ssl.create_default_context(), timeout=timeout) as client, \
            client.stream(method, url, content=body, headers={
                "Accept": "application/json", **(headers or {})}) as response:
        answer = bytearray()
        async for chunk in response.aiter_bytes():
            answer += chunk
            if len(answer) > limit:
                raise IssuerAnswerError(f"{url} answered more than {limit} bytes")
    try:
        return response.status_code, json.loads(answer)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
        raise IssuerAnswerError(f"{url} answered HTTP {response.status_code}, not JSON"
                                ) from exc
