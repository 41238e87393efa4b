"""Bounded memory: the server streams a large study without holding it."""

import threading
from pathlib import Path

import httpx
import numpy as np
from pydicom.uid import generate_uid

from tests.processes import PasserelleProcess
from tests.synthetic import ct_slice

INSTANCES = 120
SIDE = 1448  # 1448 x 1448 x 16 bits = 4 MiB a slice; 120 slices = 480 MiB
RSS_LIMIT = 200 * 1024 * 1024


def test_study_retrieve_streams_with_bounded_rss(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    study, series = generate_uid(), generate_uid()
    pixels = np.zeros((SIDE, SIDE), dtype=np.uint16).tobytes()
    for number in range(1, INSTANCES + 1):
        ds = ct_slice(study, series, 1, number, size=4, Rows=SIDE, Columns=SIDE,
                      PixelData=pixels)
        ds.save_as(export / f"{number}.dcm", enforce_file_format=True)
    server = PasserelleProcess(tmp_path / "data")
    imported = server.cli("import", "--quiet", str(export))
    assert imported.returncode == 0, imported.stdout
    server.start()
    try:
        peak = server.largest_rss()
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.largest_rss())
                done.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        received = 0
        try:
            with httpx.stream("GET", f"{server.base_url}/dicom-web/studies/{study}",
                              timeout=120) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw(1 << 20):
                    received += len(chunk)
        finally:
            done.set()
            sampler.join()
        assert received > INSTANCES * len(pixels)
        assert peak < RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
        # A client that goes away mid-stream costs one log line, not a traceback.
        with httpx.stream("GET", f"{server.base_url}/dicom-web/studies/{study}") as response:
            next(response.iter_raw(1 << 20))
        assert server.healthy()
        assert "Traceback" not in server.log()
    finally:
        server.stop()
