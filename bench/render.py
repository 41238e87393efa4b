"""Rendering benchmark, passerelle beside Orthanc + DICOMweb plugin, same data, same run.

WADO-RS ``/rendered`` as image/jpeg of 512x512 16-bit CT slices:
- cold: each of ``--slices`` slices asked once (nothing rendered before);
- cached: one slice asked ``--repeat`` times (Orthanc renders again, we serve our cache);
- JPEG-LS: the same slices compressed lossless with dcmtk's ``dcmcjpls``, asked once each.
p50 and p95 latency of sequential requests over one keep-alive connection.

Usage: python bench/render.py [--slices 60] [--repeat 200]
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import REPO, ct_study, markdown_table, run_checked
from pydicom import dcmread

from tests.orthanc import OrthancProcess
from tests.processes import PasserelleProcess


def latencies(client: httpx.Client, urls: list[str]) -> tuple[float, float]:
    """p50 and p95 in ms of GETs of ``urls``, one after the other."""
    times = []
    for url in urls:
        start = time.perf_counter()
        response = client.get(url, headers={"Accept": "image/jpeg"})
        times.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200 or response.headers["content-type"] != "image/jpeg":
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)]


def rendered_urls(root: str, files: list[Path]) -> list[str]:
    """The /rendered URL of each file."""
    urls = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        urls.append(f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}/rendered")
    return urls


def jpeg_ls_copies(files: list[Path], folder: Path) -> list[Path]:
    """Lossless JPEG-LS copies (new SOP Instance UIDs) made by dcmcjpls."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in files:
        copy = folder / path.name
        run_checked(["dcmcjpls", "--encode-lossless", "--uid-always", str(path), str(copy)])
        copies.append(copy)
    return copies


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-", dir=REPO / "bench"))
    ours = PasserelleProcess(work / "data", log_level="WARNING")
    theirs = OrthancProcess(work / "orthanc")
    rows: dict[str, dict[str, float]] = {"passerelle": {}, "orthanc": {}}
    try:
        plain = ct_study(work / "study", instances=args.slices)
        jls = jpeg_ls_copies(plain, work / "jls")
        ours.start()
        theirs.start()
        for peer in (ours, theirs):
            for folder, proposal in (("study", "-xs"), ("jls", "-xt")):
                run_checked(["storescu", proposal, "-aec", peer.ae_title, "127.0.0.1",
                             str(peer.dicom_port), "+sd", str(work / folder)])
        roots = {"passerelle": f"{ours.base_url}/dicom-web",
                 "orthanc": f"{theirs.base_url}/dicom-web"}
        with httpx.Client(timeout=60) as client:
            for name, root in roots.items():
                urls = rendered_urls(root, plain)
                latencies(client, urls[-1:])  # connection and code paths warm; not measured
                rows[name]["cold p50"], rows[name]["cold p95"] = latencies(client, urls[:-1])
                rows[name]["cached p50"], rows[name]["cached p95"] = latencies(
                    client, urls[:1] * args.repeat)
                jls_urls = rendered_urls(root, jls)
                rows[name]["JPEG-LS cold p50"], rows[name]["JPEG-LS cold p95"] = latencies(
                    client, jls_urls)
                print(f"{name}: done", file=sys.stderr)
    finally:
        ours.stop()
        theirs.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = [[f"{metric} ms", f"{rows['passerelle'][metric]:.2f}",
              f"{rows['orthanc'][metric]:.2f}",
              f"{rows['passerelle'][metric] / rows['orthanc'][metric]:.2f}x"]
             for metric in rows["passerelle"]]
    print(f"/rendered image/jpeg of 512x512 CT slices: {args.slices} slices, "
          f"{args.repeat} cached requests")
    print(markdown_table(["measure", "passerelle", "orthanc", "passerelle / orthanc"], table))


if __name__ == "__main__":
    main()
