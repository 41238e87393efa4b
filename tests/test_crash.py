"""Crash safety: ``kill -9`` at 20 random moments of a busy ingest. After each restart every
acknowledged instance is retrievable byte for byte, and nothing half-written is visible."""

import itertools
import random
import signal
import threading
import time
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from storage.part10 import dataset_bytes
from tests.multipart import parts_of
from tests.processes import PasserelleProcess
from tests.scu import associate
from tests.synthetic import ct_slice, part10

pytestmark = pytest.mark.slow  # twenty kills of a busy service, ~45 s: pytest -m slow

DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def _send_until_killed(port: int, study: str, acknowledged: dict[str, bytes]) -> None:
    """Send new slices over one association until it dies; record what got a success."""
    series = generate_uid()
    slices = (ct_slice(study, series, 1, n, size=128) for n in range(1, 10_000))
    first = next(slices)
    assoc = associate(port, [first], timeout=3)
    if not assoc.is_established:
        return
    try:
        for ds in itertools.chain([first], slices):
            status = assoc.send_c_store(ds)
            if status.get("Status") != 0x0000:
                return
            acknowledged[ds.SOPInstanceUID] = bytes(dataset_bytes(part10(ds)))
    except (RuntimeError, OSError, AttributeError):
        return
    finally:
        assoc.abort()


def _check(server: PasserelleProcess, study: str, acknowledged: dict[str, bytes],
           unacknowledged: set[str]) -> None:
    """Every acknowledged instance is listed and byte-identical, everything listed is whole;
    ``unacknowledged`` collects what was stored but never acknowledged (in flight at a kill)."""
    visible: set[str] = set()
    while True:  # QIDO answers a page at a time (1000 by default)
        listed = httpx.get(f"{server.base_url}/dicom-web/studies/{study}/instances",
                           headers={"Accept": "application/dicom+json"},
                           params={"offset": str(len(visible))})
        page = {item["00080018"]["Value"][0] for item in listed.json()} \
            if listed.status_code == 200 else set()
        if not page - visible:
            break
        visible |= page
    assert set(acknowledged) <= visible, "an acknowledged instance is missing"
    # Since the last kill, at most the instance each sender had in flight may be stored
    # without its acknowledgement having arrived.
    fresh = visible - set(acknowledged) - unacknowledged
    assert len(fresh) <= 2, fresh
    unacknowledged |= fresh
    if not visible:
        return
    response = httpx.get(f"{server.base_url}/dicom-web/studies/{study}", headers=DICOM,
                         timeout=60)
    assert response.status_code == 200
    retrieved = {}
    for _, body in parts_of(response):
        retrieved[dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID] = \
            bytes(dataset_bytes(body))
    assert set(retrieved) == visible  # everything listed is complete and readable
    for uid, data in acknowledged.items():
        assert retrieved[uid] == data, uid


def test_twenty_kills_lose_no_acknowledged_instance(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    study = generate_uid()
    acknowledged: dict[str, bytes] = {}
    unacknowledged: set[str] = set()
    data_dir = tmp_path / "data"
    for round_number in range(20):
        server = PasserelleProcess(data_dir).start()
        if round_number:
            _check(server, study, acknowledged, unacknowledged)
        senders = [threading.Thread(target=_send_until_killed,
                                    args=(server.dicom_port, study, acknowledged))
                   for _ in range(2)]
        for sender in senders:
            sender.start()
        time.sleep(rng.uniform(0.05, 0.8))
        server.stop(signal.SIGKILL)
        for sender in senders:
            sender.join(30)
    server = PasserelleProcess(data_dir).start()
    try:
        _check(server, study, acknowledged, unacknowledged)
        assert len(acknowledged) > 20
        assert not list((data_dir / "tmp").glob("*.part"))
    finally:
        server.stop()
