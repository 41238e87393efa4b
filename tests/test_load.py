"""Load (issue 6): 8 C-STORE associations and 50 concurrent HTTP retrievals for 60 s against
one process: no error, no lost instance; the latency percentiles are printed
(``pytest -s tests/test_load.py``), bench/load.py compares them with Orthanc's."""

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.load import instance_count, run_load
from tests.processes import PasserelleProcess
from tests.scu import send

pytestmark = pytest.mark.slow  # a 60 s soak: pytest -m slow, and .ci/run

SECONDS = 60


def test_stores_and_retrievals_at_once(tmp_path: Path, ct_study: list[Path]) -> None:
    with PasserelleProcess(tmp_path / "data") as server:
        for path in ct_study:
            assert send(server.dicom_port, path)[0] == 0x0000
        study = str(dcmread(ct_study[0], stop_before_pixels=True).StudyInstanceUID)
        dicomweb = f"{server.base_url}/dicom-web"
        report = run_load(server.dicom_port, server.ae_title, dicomweb, study, SECONDS)
        print(f"\n{report.stored} instances stored ({report.stored / report.seconds:.0f}/s), "
              f"{len(report.latencies)} retrievals ({len(report.latencies) / report.seconds:.0f}"
              f"/s) in {report.seconds:.0f} s; latency p50 {report.percentile(50):.1f} ms, "
              f"p95 {report.percentile(95):.1f} ms, p99 {report.percentile(99):.1f} ms")
        assert report.store_failures == []
        assert report.request_failures == []
        assert report.stored > 8 * 10 and len(report.latencies) > 50 * 10
        # Every acknowledged instance is there; at most the one each sender had in flight
        # when it was stopped may be there unacknowledged.
        assert 0 <= instance_count(dicomweb) - len(ct_study) - report.stored <= 8
        assert server.largest_rss() < 1 << 30
