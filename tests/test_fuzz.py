"""Fuzz targets (hypothesis) for the parsers that read what clients send: the Accept header,
QIDO query strings (run against a real SQLite index), the multipart reader, and the UID to
path mapping. Each either succeeds or raises its own documented error, nothing else.

CI runs the ``ci`` profile (a few hundred examples each); ``bench/fuzz.py`` runs the same
targets under the ``long`` profile."""

import asyncio
import string
from collections.abc import AsyncIterator
from pathlib import PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from gateway.web.dicomweb.qido import BadQueryError, parse_query
from gateway.web.http.accept import BadAcceptError, dicom_transfer_syntaxes, parse_accept
from gateway.web.http.multipart import MultipartError, closing, iter_parts
from storage.blobs import BlobStore, InvalidUIDError
from storage.header import read_header
from storage.index import Index
from storage.search import ATTRIBUTES, Level, QueryError
from tests.synthetic import ct_slice, part10
from tests.test_multipart_reader import Collected

# --- Accept ---------------------------------------------------------------------------

MEDIA = st.sampled_from(["application/dicom", "multipart/related", "*/*", "image/jpeg",
                         "application/dicom+json", "multipart/*", "text/html"])
PARAMS = st.sampled_from(["q", "type", "transfer-syntax", "boundary", "charset", ""])
ACCEPT_ITEM = st.builds(
    lambda media, params: media + "".join(f"; {k}={v}" for k, v in params),
    MEDIA, st.lists(st.tuples(PARAMS, st.text(max_size=30)), max_size=4))
ACCEPT = st.one_of(st.text(max_size=400),
                   st.lists(ACCEPT_ITEM, max_size=12).map(", ".join))


@given(ACCEPT)
def test_accept_parser(header: str) -> None:
    try:
        ranges = parse_accept(header)
    except BadAcceptError:
        return
    assert all(0 < media.q <= 1 for media in ranges)
    assert [media.q for media in ranges] == sorted((m.q for m in ranges), reverse=True)
    assert all(isinstance(syntax, str) for syntax in dicom_transfer_syntaxes(ranges))


# --- QIDO -----------------------------------------------------------------------------

KEYS = st.one_of(st.sampled_from([*ATTRIBUTES, "limit", "offset", "fuzzymatching",
                                  "includefield", "00100020", "0020000D", "all"]),
                 st.text(max_size=12))
VALUES = st.one_of(st.text(max_size=40),
                   st.sampled_from(["*", "?", "%", "_", "20260110-", "-20260110", "1015-",
                                    "all", "true", "' OR 1=1 --", "\\", "1.2.3,4.5.6"]))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    index = Index(tmp_path_factory.mktemp("fuzz-index") / "index.sqlite")
    study = generate_uid()
    for number in (1, 2):
        record = read_header(bytes(part10(ct_slice(study, generate_uid(), number, 1, size=4))))
        index.add_instance(record, f"studies/{record.sop_uid}.dcm", 100, "fuzz")
    return index


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(KEYS, VALUES), max_size=8), st.sampled_from(list(Level)[1:]))
def test_qido_query_parser_and_search(index: Index, items: list[tuple[str, str]],
                                      level: Level) -> None:
    try:
        matches, returned, fuzzy, limit, offset, _ = parse_query(items, level, {})
        rows = index.search(level, matches, returned, fuzzy, limit, offset)
    except (BadQueryError, QueryError):
        return
    # One study of two series of one instance each: no query can find more.
    assert len(rows) <= (1 if level is Level.STUDY else 2)


# --- multipart ------------------------------------------------------------------------

TOKEN = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=12)
# (lower-cased headers, content) pairs, as the reader gives them back.
PARTS = st.lists(st.tuples(st.dictionaries(TOKEN.map(str.lower), TOKEN, max_size=3),
                           st.binary(max_size=300)), min_size=1, max_size=5)


async def _chunks(body: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    start, turn = 0, 0
    while start < len(body):
        size = sizes[turn % len(sizes)]
        yield body[start:start + size]
        start, turn = start + size, turn + 1


def _read(body: bytes, sizes: list[int], boundary: str, limit: int) -> list:
    async def collect() -> list:
        return [(headers, bytes(part.data)) async for headers, part in
                iter_parts(_chunks(body, sizes), boundary, limit, lambda headers: Collected())]

    return asyncio.run(collect())


def _encode(parts: list[tuple[dict[str, str], bytes]], boundary: str) -> bytes:
    body = b""
    for headers, content in parts:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        body += f"\r\n--{boundary}\r\n{lines}\r\n".encode() + content
    return body + closing(boundary)


@given(PARTS, st.lists(st.integers(1, 64), min_size=1, max_size=5))
def test_multipart_round_trip_whatever_the_chunking(parts: list, sizes: list[int]) -> None:
    boundary = "b0und4ry-x"
    if any(boundary.encode() in content for _, content in parts):
        return
    assert _read(_encode(parts, boundary), sizes, boundary, 10_000) == parts


@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), min_size=1, max_size=3))
def test_multipart_reader_on_arbitrary_bytes(body: bytes, sizes: list[int]) -> None:
    try:
        parts = _read(b"--XyZ\r\n" + body, sizes, "XyZ", 500)
    except MultipartError:
        return
    assert all(len(content) <= 500 for _, content in parts)


# --- UIDs to paths --------------------------------------------------------------------

UID_LIKE = st.one_of(st.text(max_size=70),
                     st.text("0123456789./\\\x00", max_size=70),
                     st.sampled_from(["..", "../..", "/etc/passwd", "1.2\x00", "1..2", ".1",
                                      "1.2.", "1." * 40, "C:\\x", "~"]))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("fuzz-blobs"))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(UID_LIKE, UID_LIKE, UID_LIKE)
def test_uid_path_mapping_stays_inside_the_store(store: BlobStore, study: str, series: str,
                                                 sop: str) -> None:
    for make in (lambda: store.relative_path(study, series, sop),
                 lambda: store.manifest_path(study, sop)):
        try:
            relative = PurePosixPath(make())
        except InvalidUIDError:
            continue
        assert not relative.is_absolute()
        assert ".." not in relative.parts and "\x00" not in str(relative)
        assert relative.parts[0] in ("studies", "manifests")
        assert all(part and set(part) <= set("0123456789.") for part in relative.parts[1:-1])
