"""The resource budget under attack (issue 14, findings 1-4, 6 and 7).

Each attack test attacks a running ``passerelle serve`` over loopback with the budget lowered so
that the inputs stay small, and watches the service meanwhile: the peak RSS of its process
(psutil, sampled every 20 ms) is asserted under a bound above its RSS before the attack,
``/health`` must answer throughout (its latency is printed, not asserted), and each refusal
is checked for its status and reason. The last tests check the budget's own rules.
"""

import functools
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from gateway.imaging.budget import ByteBudget, DecodePool, OverBudget
from gateway.imaging.codestream import check_frame
from gateway.shared_tally import SharedTally, create_tally
from storage.part10 import dataset_bytes
from tests.processes import PasserelleProcess, wait_for
from tests.scu import associate, c_store_pdus
from tests.service_watch import MIB, Watch
from tests.synthetic import ct_slice, part10

NATIVE = {"Accept": f'multipart/related; type="application/octet-stream"; '
                    f'transfer-syntax={ExplicitVRLittleEndian}'}


def concurrently(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Every call at once, each in a thread of its own."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def serve(tmp_path: Path, objects: list[Dataset], **settings: str) -> PasserelleProcess:
    """A started service with ``objects`` imported (as C-STORE would store them)."""
    export = tmp_path / "export"
    export.mkdir()
    for number, ds in enumerate(objects):
        ds.save_as(export / f"{number}.dcm", enforce_file_format=True)
    server = PasserelleProcess(tmp_path / "data", render_cache_bytes="0", **settings)
    imported = server.cli("import", "--quiet", str(export))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    return server


def stored_path(server: PasserelleProcess, ds: Dataset) -> Path:
    """Where the service keeps the file of ``ds``."""
    return (server.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID /
            f"{ds.SOPInstanceUID}.dcm")


def instance_url(ds: Dataset) -> str:
    """The WADO-RS URL of ``ds``."""
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def wado_uri(ds: Dataset, **params: str) -> str:
    """The WADO-URI URL of ``ds`` with ``params``."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return (f"/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
            f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}&{query}")


def _ct(side: int = 64, frames: int = 1, **attributes: object) -> Dataset:
    """A CT of ``frames`` frames of ``side`` x ``side`` 16-bit pixels."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 1, size=4,
                  **{"Rows": side, "Columns": side, **attributes})
    ds.PixelData = np.arange(side * side * frames, dtype=np.uint16).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


@pytest.fixture
def running() -> Iterator[list[PasserelleProcess]]:
    """Services started by a test, stopped after it."""
    servers: list[PasserelleProcess] = []
    yield servers
    for server in servers:
        assert "Traceback" not in server.log()
        server.stop()


def start(servers: list[PasserelleProcess], server: PasserelleProcess) -> httpx.Client:
    """Start ``server`` (stopped after the test) and a client of it."""
    servers.append(server.start())
    return httpx.Client(base_url=server.base_url, timeout=120)


def test_deflate_bomb_already_stored_is_refused_on_every_read_path(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 1 (read side): a stored deflated object inflating to 128 MiB; the decode
    memory is 64 MiB. Render, frames, metadata, WADO-URI: 413 from a streamed measure."""
    small = _ct()
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    server = serve(tmp_path, [small], decode_memory_bytes=str(64 * MIB))
    # The bomb replaces the stored file, as an object received before ingest had a bound.
    small.add_new(0x60003000, "OW", bytes(128 * MIB))  # Overlay Data
    bomb = part10(small)
    del small[0x60003000]
    assert len(bomb) < 1 * MIB
    stored_path(server, small).write_bytes(bomb)
    client = start(running, server)
    url = instance_url(small)
    attacks = [f"{url}/rendered", f"{url}/frames/1", f"{url}/metadata",
               wado_uri(small, contentType="application/dicom")]
    with Watch(server, "deflate bomb x4") as watch:
        responses = concurrently([lambda u=u: client.get(u, headers={"Accept": "*/*"})
                                  for u in attacks])
    for response in responses:
        assert response.status_code == 413, (response.request.url, response.text)
        assert "decode_memory_bytes" in response.text
    watch.check(100 * MIB)
    assert server.metric("passerelle_budget_refusals_total", reason="decode_memory") == 4


def test_upscaling_past_the_output_pixels_is_refused(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 2: a viewport (rendered) or rows and columns (WADO-URI) of 8000 on a 64x64
    image; max_output_pixels is 1 M: 400 naming the setting. Smaller sizes still render."""
    ds = _ct()
    client = start(running, serve(tmp_path, [ds], max_output_pixels=str(1_000_000)))
    url = instance_url(ds)
    attacks = [f"{url}/rendered?viewport=8000,8000",
               wado_uri(ds, rows="8000", columns="8000")] * 3
    with Watch(running[0], "upscale to 8000x8000 x6") as watch:
        responses = concurrently([lambda u=u: client.get(u) for u in attacks])
    for response in responses:
        assert response.status_code == 400, (response.request.url, response.text)
        assert "max_output_pixels" in response.text
    watch.check(100 * MIB)
    fitting = client.get(f"{url}/rendered?viewport=1000,1000")
    assert fitting.status_code == 200
    assert fitting.headers["content-type"] == "image/jpeg"


def test_frame_lists_are_bounded_and_frames_streamed(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 3: frames/1,1,1,... (2 000 times a 128 KiB frame) is a 400 at once; a
    multi-frame of 64 MiB is streamed a frame at a time; more frames than the instance
    has is a 400."""
    single = _ct(256)
    multi = _ct(512, frames=128)
    client = start(running, serve(tmp_path, [single, multi]))
    repeated = f"{instance_url(single)}/frames/{','.join(['1'] * 2000)}"
    with Watch(running[0], "frames/1,1,1,... x4") as watch:
        responses = concurrently([lambda: client.get(repeated, headers=NATIVE)] * 4)
    for response in responses:
        assert response.status_code == 400, response.text
        assert "2000 frames asked of an instance that has 1" in response.text
    watch.check(64 * MIB)
    twice = client.get(f"{instance_url(multi)}/frames/1,2,1", headers=NATIVE)
    assert twice.status_code == 400 and "frame 1 is asked more than once" in twice.text
    every = ",".join(str(n) for n in range(1, 129))
    with Watch(running[0], "128 frames of 512 KiB, streamed") as watch, client.stream(
            "GET", f"{instance_url(multi)}/frames/{every}", headers=NATIVE) as response:
        assert response.status_code == 200
        received = sum(len(chunk) for chunk in response.iter_raw(1 << 20))
    assert received > 128 * 512 * 512 * 2
    watch.check(48 * MIB)


def test_decoded_size_is_checked_from_the_header_before_decoding(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 4: a JPEG 2000 object of about 1 KiB declaring 2896x2896 16-bit (16 MiB a
    frame, a render of about 150 MiB); the decode memory is 24 MiB: four renders and four
    frame decodes at once are 413, without decoding."""
    side = 2896
    ds = _ct(side, BitsStored=16, HighBit=15)
    ds.PixelData = bytes(side * side * 2)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    assert len(part10(ds)) < 4096
    client = start(running, serve(tmp_path, [ds], decode_memory_bytes=str(24 * MIB)))
    url = instance_url(ds)
    with Watch(running[0], "JPEG 2000 of 2896x2896 x8") as watch:
        responses = concurrently([lambda: client.get(f"{url}/rendered")] * 4 +
                                 [lambda: client.get(f"{url}/frames/1", headers=NATIVE)] * 4)
    for response in responses:
        assert response.status_code == 413, (response.request.url, response.text)
        assert "decode_memory_bytes" in response.text
    watch.check(64 * MIB)


def _stow_body(ds: Dataset, boundary: str, pace: float) -> Iterator[bytes]:
    """A one-part STOW-RS body, sent in 1 MiB chunks ``pace`` seconds apart."""
    data = part10(ds)
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    for offset in range(0, len(data), MIB):
        yield data[offset:offset + MIB]
        time.sleep(pace)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_concurrent_stow_parts_share_one_ingest_budget(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 6: four STOW-RS requests at once, each of one 32 MiB part (under
    max_instance_bytes), sent slowly; ingest_bytes_in_flight is 96 MiB (a part counts once,
    as it is spooled to disk): some are 503 with Retry-After, and the RSS stays a few MiB
    above its start (no part is held in memory)."""
    client = start(running, serve(tmp_path, [], ingest_bytes_in_flight=str(96 * MIB)))
    side = 4096  # 4096 x 4096 x 16 bits = 32 MiB
    boundary = "b0undary"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f'boundary={boundary}'}
    parts = [_ct(side) for _ in range(4)]

    def post(ds: Dataset) -> httpx.Response:
        return client.post("/dicom-web/studies", headers=headers,
                           content=_stow_body(ds, boundary, 0.03))

    with Watch(running[0], "4 concurrent STOW-RS of 32 MiB") as watch:
        responses = concurrently([lambda ds=ds: post(ds) for ds in parts])
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "ingest_bytes" in response.text
    watch.check(32 * MIB)
    assert running[0].metric("passerelle_budget_bytes_in_use", budget="ingest_bytes") == 0


def _held_stow(client: httpx.Client, ds: Dataset, hold: threading.Event) -> httpx.Response:
    """A one-part STOW-RS whose part is sent at once, its closing boundary only once
    ``hold`` is set: the part stays in flight meanwhile."""
    boundary = "b0undary"

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield part10(ds)
        hold.wait(60)
        yield f"\r\n--{boundary}--\r\n".encode()

    return client.post("/dicom-web/studies", content=body(), headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _held_c_store(port: int, ds: Dataset, hold: threading.Event) -> int:
    """A C-STORE of ``ds`` whose data set is sent at once but for its last fragment, sent
    once ``hold`` is set: the status of its C-STORE-RSP."""
    assoc = associate(port, [ds])
    assert assoc.is_established
    try:
        pdus = c_store_pdus(assoc, ds, max_pdu=1 << 20)
        # The requestor's reactor kept off its DIMSE queue, as its send_c_store does.
        assoc._reactor_checkpoint.clear()
        wait_for(lambda: assoc._is_paused, 5, "the requestor's reactor to pause")
        connection = assoc.dul.socket.socket
        connection.sendall(b"".join(pdus[:-1]))
        hold.wait(60)
        connection.sendall(pdus[-1])
        _, response = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert response is not None, "no C-STORE-RSP"
        return int(response.Status)
    finally:
        assoc.release()


def _echo_seconds(server: PasserelleProcess) -> float:
    started = time.monotonic()
    assoc = associate(server.dicom_port, timeout=30)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    return time.monotonic() - started


def _same_data_set(stored: Path, ds: Dataset) -> bool:
    return dataset_bytes(stored.read_bytes()) == dataset_bytes(part10(ds))


def test_stow_and_c_store_share_one_ingest_budget(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Findings 5 and 6: C-STORE and STOW-RS receptions count in one ingest budget (40 MiB
    here) as their bytes arrive. Two 16 MiB STOW-RS parts in flight: two C-STOREs of 16 MiB
    are refused with 0xA700 (Out of Resources) as they arrive, the STOW-RS parts stored;
    then the reverse: two C-STOREs in flight, two STOW-RS refused 503 with Retry-After.
    Everything acknowledged is stored byte for byte, nothing refused is, the RSS stays a few
    MiB above its start, /health and C-ECHO answer, and the budget ends at 0."""
    server = serve(tmp_path, [], ingest_bytes_in_flight=str(40 * MIB))
    client = start(running, server)
    in_flight = functools.partial(server.metric, "passerelle_budget_bytes_in_use",
                                  budget="ingest_bytes")
    echoes: list[float] = []
    outcomes: list[tuple[Dataset, str, int]] = []  # (object, way in, status)
    with Watch(server, "STOW-RS and C-STORE over one 40 MiB ingest budget") as watch, \
            ThreadPoolExecutor(4) as pool:
        for first, then in (("stow", "dimse"), ("dimse", "stow")):
            hold = threading.Event()
            held = [_ct(2896) for _ in range(2)]  # 2896 x 2896 x 16 bits = 16 MiB
            sends = {"stow": lambda ds, hold: _held_stow(client, ds, hold).status_code,
                     "dimse": lambda ds, hold: _held_c_store(server.dicom_port, ds, hold)}
            futures = [pool.submit(sends[first], ds, hold) for ds in held]
            # All but their last MiB in flight: 30 of the 40 MiB.
            wait_for(lambda: in_flight() >= 28 * MIB, 30, "both receptions in flight")
            echoes.append(_echo_seconds(server))
            refused = [_ct(2896) for _ in range(2)]
            now = threading.Event()
            now.set()
            refusals = [sends[then](ds, now) for ds in refused]
            hold.set()
            statuses = [future.result() for future in futures] + refusals
            outcomes += [(ds, way, status) for ds, way, status in zip(
                held + refused, [first] * 2 + [then] * 2, statuses, strict=True)]
            echoes.append(_echo_seconds(server))
    print(f"C-ECHO during and after: {', '.join(f'{s:.3f} s' for s in echoes)}")
    assert [status for _, _, status in outcomes] == [200, 200, 0xA700, 0xA700,
                                                     0x0000, 0x0000, 503, 503], outcomes
    for ds, _, status in outcomes:
        path = stored_path(server, ds)
        if status in (200, 0x0000):
            assert _same_data_set(path, ds)
        else:
            assert not path.exists()
    watch.check(48 * MIB)
    wait_for(lambda: in_flight() == 0, 10, "every reservation to be given back")
    assert server.metric("passerelle_budget_refusals_total", reason="ingest_bytes_busy") == 4
    assert not list((server.data_dir / "tmp").iterdir())


def test_stow_of_tiny_parts_is_bounded_in_parts(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Finding 7: a 4 MiB STOW-RS body of 80 000 tiny parts; max_parts_per_request is
    1 000: 413 naming the setting after 1 000 parts, RSS bounded."""
    client = start(running, serve(tmp_path, [], max_parts_per_request="1000"))
    part = b"--b\r\nContent-Type: application/dicom\r\n\r\nX\r\n"
    body = part * (4 * MIB // len(part)) + b"--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    with Watch(running[0], "STOW-RS of 4 MiB of tiny parts") as watch:
        response = client.post("/dicom-web/studies", headers=headers, content=body)
    assert response.status_code == 413, response.text[:200]
    assert "max_parts_per_request" in response.text
    watch.check(64 * MIB)
    assert running[0].metric("passerelle_budget_refusals_total", reason="parts") == 1


@pytest.mark.parametrize("settings, reason", [
    ({"decode_workers": "1"}, "decode_workers"),
    ({"decode_workers": "8", "decode_memory_bytes": str(100 * MIB)}, "decode_memory"),
])
def test_busy_decoding_is_503_with_retry_after(
        tmp_path: Path, running: list[PasserelleProcess], settings: dict[str, str],
        reason: str) -> None:
    """Every decode: one bounded pool and one memory budget. Eight renders at once of a
    2048x2048 image (about 72 MiB each) wait 0.1 s for a worker (one) or for memory (100
    MiB for eight workers), then are 503 with Retry-After; /health answers meanwhile."""
    ds = _ct(2048)
    client = start(running, serve(tmp_path, [ds], decode_wait_seconds="0.1", **settings))
    url = f"{instance_url(ds)}/rendered"
    with Watch(running[0], f"8 renders at once, {reason} busy") as watch:
        responses = concurrently([lambda q=q: client.get(f"{url}?quality={q}")
                                  for q in range(90, 98)])
    statuses = [response.status_code for response in responses]
    assert 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert f"busy ({reason}" in response.text
    watch.check(200 * MIB)


def test_byte_budget_rules() -> None:
    """Alone too large: 413 at once; no room in time: 503 after the wait; room made by a
    release in time: granted; a reservation dropped unreleased gives its bytes back."""
    budget = ByteBudget("test_bytes", "test_setting", 100, wait_seconds=0.2)
    with pytest.raises(OverBudget) as alone:
        budget.reserve(101)
    assert alone.value.status == 413 and "test_setting" in alone.value.message
    held = budget.reserve(80)
    start = time.monotonic()
    with pytest.raises(OverBudget) as busy:
        budget.reserve(30)
    assert busy.value.status == 503 and busy.value.retry_after == 1
    assert time.monotonic() - start >= 0.2
    threading.Timer(0.05, held.release).start()
    with budget.reserve(30) as granted:
        assert budget.in_use == 30
        granted.resize(10)
        assert budget.in_use == 10
    assert budget.in_use == 0
    budget.reserve(50)  # dropped at once
    assert budget.in_use == 0


def test_a_reservation_collected_inside_the_budget_locks_waits_on_nothing(
        tmp_path: Path) -> None:
    """The garbage collector may drop a reservation in a thread that holds the lock of the
    budget or of its shared tally (a collection inside ``try_hold``): giving the bytes back
    there would wait on that thread itself. They are given back by the next call instead,
    to the process and to the tally the other processes read."""
    path = tmp_path / "bytes.tally"
    create_tally(path, 2)
    budget = ByteBudget("test_bytes", "test_setting", 100, shared=SharedTally(path, 0))
    dropped = budget.reserve(60)
    finished = threading.Event()

    def collect_inside_the_locks() -> None:
        with budget._room, budget.shared._lock.held():  # type: ignore[union-attr]
            dropped.__del__()
        finished.set()

    threading.Thread(target=collect_inside_the_locks, daemon=True).start()
    assert finished.wait(5), "the collected reservation waited on its own thread's lock"
    assert SharedTally(path, 1).total() == 60  # until this process uses the budget again
    assert budget.in_use == 0
    assert SharedTally(path, 1).total() == 0
    with budget.reserve(100):
        pass


def test_decode_pool_rules() -> None:
    """A free worker is taken even with no time to wait; a busy one is 503 past the wait."""
    async def attempt(pool: DecodePool) -> list[object]:
        results: list[object] = []

        async def one() -> None:
            try:
                results.append(await pool.run(time.sleep, 0.2))
            except OverBudget as refusal:
                results.append(refusal.status)

        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)
        return results

    assert sorted(anyio.run(attempt, DecodePool(1, 0)), key=str) == [503, None]
    assert anyio.run(attempt, DecodePool(2, 0)) == [None, None]


def test_a_decode_waits_decode_wait_seconds_in_all() -> None:
    """The wait for a worker and the wait for memory share one deadline: with the memory
    taken for 1.5 s and 0.5 s to wait, the second decode is refused, not served after 1.5 s
    (each wait alone would have let it through)."""
    pool, memory = DecodePool(2, 0.5), ByteBudget("test_memory", "test_setting", 10, 5.0)

    def hold(size: int, seconds: float) -> str:
        with memory.reserve(size):
            time.sleep(seconds)
        return "served"

    async def both() -> list[object]:
        results: list[object] = []

        async def one(size: int, seconds: float, delay: float) -> None:
            await anyio.sleep(delay)
            try:
                results.append(await pool.run(hold, size, seconds))
            except OverBudget as refusal:
                results.append(refusal.status)

        async with anyio.create_task_group() as group:
            group.start_soon(one, 10, 1.5, 0)
            group.start_soon(one, 5, 0, 0.1)
        return results

    assert anyio.run(both) == [503, "served"]


# --- Codestreams, encapsulated frames and large values against the budget (review of
# issue 14, problems 2-4): what is decoded, read or sent is never more than was reserved.

def _lying_j2k(side: int) -> Dataset:
    """A 64x64 16-bit CT whose one JPEG 2000 frame is a real ``side`` x ``side`` codestream
    (zeros: a few KiB), so a decoder would allocate ``side``² samples."""
    from openjpeg import encode

    ds = _ct(BitsStored=16, HighBit=15)
    codestream = encode(np.zeros((side, side), np.uint16), bits_stored=16,
                              codec_format=0)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def _slowly(client: httpx.Client, url: str, headers: dict[str, str] | None = None
            ) -> tuple[int, int, str]:
    """GET ``url`` read 1 MiB at a time, 20 ms apart: status, bytes received, text of a
    refusal."""
    with client.stream("GET", url, headers=headers or {}) as response:
        if response.status_code != 200:
            return response.status_code, 0, response.read().decode()
        received = 0
        for chunk in response.iter_raw(MIB):
            received += len(chunk)
            time.sleep(0.02)
        return response.status_code, received, ""


def test_codestream_declaring_more_than_the_header_is_refused_before_decoding(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Problem 2: the DICOM header says 64x64 (8 KiB reserved), the JPEG 2000 SIZ marker
    4000x4000 (openjpeg would allocate 64 MiB of samples). Renders and decoded frames,
    four each at once: 422 codestream_mismatch before any decode."""
    ds = _lying_j2k(4000)
    assert len(part10(ds)) < 16 * 1024
    server = serve(tmp_path, [ds])
    client = start(running, server)
    url = instance_url(ds)
    with Watch(server, "JPEG 2000 declaring 4000x4000 under a 64x64 header x8") as watch:
        responses = concurrently([lambda: client.get(f"{url}/rendered")] * 4 +
                                 [lambda: client.get(f"{url}/frames/1", headers=NATIVE)] * 4)
    for response in responses:
        assert response.status_code == 422, (response.request.url, response.text)
        assert "codestream declares 4000x4000" in response.text
    watch.check(24 * MIB)
    assert server.metric("passerelle_budget_refusals_total",
                         reason="codestream_mismatch") == 8


def test_large_frames_are_reserved_until_sent(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Problem 3: a native frame of 16 MiB, the decode memory 32 MiB, six slow clients at
    once: each frame is reserved until its last slice is sent, so at most two are held
    (the others wait, then 503), and the server holds no copy of a whole frame."""
    ds = _ct(2896)
    client = start(running, serve(tmp_path, [ds], decode_memory_bytes=str(32 * MIB)))
    url = f"{instance_url(ds)}/frames/1"
    with Watch(running[0], "frames/1 of 16 MiB x6, slow readers") as watch:
        results = concurrently([lambda: _slowly(client, url, NATIVE)] * 6)
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and set(statuses) <= {200, 503}, results
    assert all(received > 2896 * 2896 * 2 for status, received, _ in results if status == 200)
    # Beyond the reservations: a slice a connection, and what the allocator keeps of
    # freed frames.
    watch.check(32 * MIB + 48 * MIB)


def test_fragments_are_measured_and_reserved_before_they_are_read(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Problem 3: the header says 64x64 but the one JPEG 2000 frame is 40 MiB of 100 KB
    fragments with no Basic Offset Table; the decode memory is 16 MiB. Frames as stored,
    decoded and rendered, four at once: 413 from the item headers, before any is read."""
    ds = _ct()
    fragment = b"\xff\x4f" + bytes(100_000 - 2)
    ds.PixelData = encapsulate([fragment * 400], fragments_per_frame=400, has_bot=False)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    client = start(running, serve(tmp_path, [ds], decode_memory_bytes=str(16 * MIB)))
    url = instance_url(ds)
    as_stored = {"Accept": 'multipart/related; type="image/jp2"'}
    with Watch(running[0], "40 MiB of fragments under a 64x64 header x4") as watch:
        responses = concurrently([lambda: client.get(f"{url}/frames/1", headers=as_stored)] * 2
                                 + [lambda: client.get(f"{url}/frames/1", headers=NATIVE),
                                    lambda: client.get(f"{url}/rendered")])
    for response in responses:
        assert response.status_code == 413, (response.request.url, response.text)
        assert "decode_memory_bytes" in response.text
    watch.check(12 * MIB)


def test_large_binary_values_are_streamed_from_the_file(
        tmp_path: Path, running: list[PasserelleProcess]) -> None:
    """Problem 4: a private OB of 48 MiB (not Pixel Data), the decode memory 32 MiB: its
    bulk data, four slow clients at once, is streamed from the file a slice at a time
    (found from the element's header, never read whole); a de-identified WADO-URI copy
    (which needs the whole object) is 413 before it is read."""
    ds = _ct()
    ds.add_new(0x00090010, "LO", "ATTACK")
    ds.add_new(0x00091010, "OB", b"\x01" * (48 * MIB))
    client = start(running, serve(tmp_path, [ds], decode_memory_bytes=str(32 * MIB)))
    url = f"{instance_url(ds)}/bulkdata/00091010"
    with Watch(running[0], "bulk data of 48 MiB x4, slow readers") as watch:
        results = concurrently([lambda: _slowly(client, url)] * 4)
    assert all(status == 200 and received > 48 * MIB for status, received, _ in results), \
        results
    watch.check(32 * MIB)  # a slice a connection in flight, with the server's own copies
    anonymized = wado_uri(ds, contentType="application/dicom", anonymize="yes")
    with Watch(running[0], "de-identified WADO-URI of 48 MiB x2") as watch:
        responses = concurrently([lambda: client.get(anonymized)] * 2)
    for response in responses:
        assert response.status_code == 413, response.text
        assert "decode_memory_bytes" in response.text
    watch.check(16 * MIB)


def test_a_jp2_file_is_checked_by_the_codestream_its_decoder_reads() -> None:
    """A JP2 file (T.800 I.5) decoded from its Contiguous Codestream box: a 64x64 SIZ hidden
    in an XML box before it must not stand for the 2000x2000 codestream after it."""
    from openjpeg import encode

    ds = _ct()
    small = encode(np.zeros((64, 64), dtype=np.uint16), codec_format=0)
    large = encode(np.zeros((2000, 2000), dtype=np.uint16), codec_format=1)  # JP2
    decoy = struct.pack(">I4s", 8 + 64, b"xml ") + small[:64]
    box = large.find(b"jp2c") - 4
    with pytest.raises(OverBudget) as refused:
        check_frame(ds, JPEG2000Lossless, large[:box] + decoy + large[box:])
    assert refused.value.status == 422 and "2000x2000" in refused.value.message
    check_frame(ds, JPEG2000Lossless, encode(np.zeros((64, 64), dtype=np.uint16),
                                             codec_format=1))  # an honest JP2: no refusal


def test_a_reception_that_trickles_gives_its_bytes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reservation that grows by less than min_bytes_per_minute in a minute is refused
    (408) and released: a STOW-RS body or a C-STORE data set sending a byte every 50 s
    (under every silence timeout) would hold its ingest bytes for as long as it likes."""
    budget = ByteBudget("test_ingest", "test_setting", 100_000, min_bytes_per_minute=1_000)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    steady, trickling = budget.reserve(0, "a steady one"), budget.reserve(0, "a trickling one")
    steady.resize(4_000)
    trickling.resize(4_000)
    now[0] += 61
    steady.resize(5_500)  # the first minutes: the bursts count
    trickling.resize(4_001)
    now[0] += 61
    steady.resize(7_000)  # 1 500 bytes in the minute: kept
    with pytest.raises(OverBudget) as slow:
        trickling.resize(4_002)  # 1 byte in the minute
    assert slow.value.status == 408 and "reception_min_bytes_per_minute" in slow.value.message
    assert budget.in_use == 7_000  # the trickling one's bytes are back
    now[0] += 30
    steady.resize(7_100)  # within the next minute: not judged yet
    assert budget.in_use == 7_100
