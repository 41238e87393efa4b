"""Fixtures: a real ``passerelle serve`` process, the same HTTP application in-process
(tests/inprocess.py), DICOM test files, SCU helpers."""

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from hypothesis import settings
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from tests.inprocess import InProcessService
from tests.postgres import PostgresCluster
from tests.processes import PasserelleProcess
from tests.scu import send
from tests.synthetic import write_ct_study

# Fuzz targets (tests/test_fuzz.py): brief in the suite, long from bench/fuzz.py.
settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("long", deadline=None,
                          max_examples=int(os.environ.get("PASSERELLE_FUZZ_EXAMPLES", "50000")))
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    """Fail early and clearly when the dcmtk or dicom3tools programs are missing (the
    conformance checks of tests/conformance need dciodvfy and dcentvfy)."""
    for tool, package in (("storescu", "dcmtk"), ("echoscu", "dcmtk"),
                          ("dciodvfy", "dicom3tools"), ("dcentvfy", "dicom3tools")):
        if shutil.which(tool) is None:
            pytest.exit(f"{tool} not found: apt-get install {package} (done by .ci/run)", 2)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster (tests/postgres.py), started on first use."""
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


DIALECTS = ["sqlite", "postgresql"]


@pytest.fixture(params=DIALECTS)
def new_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """``new_database_url()``: the URL of a fresh, empty index database, of each dialect in
    turn (an SQLite file in tmp_path, a database of the session's PostgreSQL cluster)."""
    if request.param == "sqlite":
        names = itertools.count(1)
        return lambda: f"sqlite:///{tmp_path / f'index-{next(names)}.sqlite'}"
    return request.getfixturevalue("postgres_cluster").new_database


@pytest.fixture
def database_url(new_database_url: Callable[[], str]) -> str:
    """The URL of a fresh, empty index database, of each dialect in turn."""
    return new_database_url()


@pytest.fixture(scope="module", params=DIALECTS)
def module_database_url(request: pytest.FixtureRequest) -> str:
    """``database_url`` for a module's shared service: "" (the SQLite file of its data dir)
    or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("postgres_cluster").new_database()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PasserelleProcess]:
    """A running service on a fresh data dir, stopped (SIGTERM) after the test."""
    process = PasserelleProcess(tmp_path / "data").start()
    yield process
    process.stop()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[InProcessService]:
    """The service's HTTP application in-process on a fresh data dir, closed after the test."""
    with InProcessService(tmp_path / "data") as service:
        yield service


@pytest.fixture
def make_web(tmp_path: Path) -> Iterator[Callable[..., InProcessService]]:
    """``make_web(name, **settings)``: in-process services with settings of their own (flat
    names, as PasserelleProcess takes them), each on ``tmp_path / name``; all closed after the
    test."""
    made: list[InProcessService] = []

    def make(name: str = "data", **settings: object) -> InProcessService:
        made.append(InProcessService(tmp_path / name, **settings))
        return made[-1]

    yield make
    for service in reversed(made):
        service.close()


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A synthetic CT study: 3 series of 5 slices, 64x64, 16-bit."""
    return write_ct_study(tmp_path_factory.mktemp("ct"), series=3, per_series=5)


def _local_test_files() -> list[Path]:
    """pydicom's bundled files and pydicom-data's, read from disk.

    Not ``get_testdata_files``: it tries to download missing files and, without network,
    retries for minutes.
    """
    import data_store  # the pydicom-data package

    folders = [Path(DATA_ROOT) / "test_files", Path(data_store.__file__).parent / "data"]
    return sorted(path for folder in folders for path in folder.rglob("*.dcm"))


def _one_file_per_transfer_syntax() -> dict[UID, Path]:
    files: dict[UID, Path] = {}
    seen_instances: set[str] = set()
    for name in _local_test_files():
        try:
            ds = dcmread(name, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID")
        required = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        if syntax and syntax not in files and all(k in ds for k in required) \
                and ds.SOPInstanceUID not in seen_instances and "PixelData" in dcmread(name):
            files[syntax] = Path(name)
            seen_instances.add(ds.SOPInstanceUID)
    return files


@pytest.fixture(scope="session")
def files_by_syntax() -> dict[UID, Path]:
    """One pydicom test image per transfer syntax available locally."""
    return _one_file_per_transfer_syntax()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, ct_study: list[Path],
           files_by_syntax: dict[UID, Path]) -> Iterator[PasserelleProcess]:
    """One service holding the synthetic CT study and one file per transfer syntax."""
    with PasserelleProcess(tmp_path_factory.mktemp("wado") / "data") as server:
        for path in [*ct_study, *files_by_syntax.values()]:
            assert send(server.dicom_port, path)[0] == 0x0000
        yield server


@pytest.fixture(scope="module")
def loaded_web(tmp_path_factory: pytest.TempPathFactory, ct_study: list[Path],
               files_by_syntax: dict[UID, Path]) -> Iterator[InProcessService]:
    """``loaded`` in-process: the same content, stored as C-STORE would store it."""
    with InProcessService(tmp_path_factory.mktemp("wado") / "data") as service:
        service.ingest_all([*ct_study, *files_by_syntax.values()])
        yield service


@pytest.fixture(scope="module")
def client(loaded: PasserelleProcess) -> DICOMwebClient:
    """A dicomweb-client session on the loaded service."""
    return DICOMwebClient(url=f"{loaded.base_url}/dicom-web")
