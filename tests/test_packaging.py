"""The wheel on its own: built from the files the Dockerfile's builder stage copies, installed
in a fresh virtual environment (dependencies from the package index), run from outside the
repository. ``passerelle registry`` and ``passerelle serve`` from that environment take a study
over DICOM and publish its manifest, so a module or a file read at run time (package data, such
as event_codes.toml) missing from the wheel fails here, which the editable install of the
repository's .venv would hide; so does a third-party module imported without being declared."""

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.processes import REPO, PasserelleProcess, RegistryProcess, wait_for
from tests.scu import send
from tests.synthetic import national_ct_slice

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# What the builder stage of the Dockerfile copies: the wheel is built from these alone.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "gateway", "storage")


def _without_pythonpath(env: dict[str, str]) -> dict[str, str]:
    """``env`` less PYTHONPATH: a repository on it would be imported instead of the wheel."""
    return {name: value for name, value in env.items() if name != "PYTHONPATH"}


Process = TypeVar("Process", PasserelleProcess, RegistryProcess)


def _run(*command: str | Path, cwd: Path) -> str:
    """Run ``command``; its standard output, or a failure showing everything it wrote."""
    done = subprocess.run([str(part) for part in command], cwd=cwd,
                          env=_without_pythonpath(dict(os.environ)), capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the passerelle wheel installed in it."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy: building in place would write build/ into the tree
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", root / "wheels",
         source, cwd=root)
    [wheel] = (root / "wheels").glob("passerelle-*.whl")
    _run(sys.executable, "-m", "venv", root / "venv", cwd=root)
    _run(root / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=root)
    return root / "venv"


def _start_installed(process: Process, venv: Path, cwd: Path) -> Process:
    """Start ``process`` as the venv's ``passerelle`` console script in ``cwd``, instead of
    ``python -m gateway.cli`` in the repository; ready once its health path answers."""
    with process.log_path.open("ab") as log:
        process.proc = subprocess.Popen(
            [str(venv / "bin" / "passerelle"), *process.command], cwd=cwd,
            env=_without_pythonpath(process.env),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(process.healthy, 60, f"the installed {process.command[0]}")
    except BaseException:
        process.stop()
        raise
    return process


def _site_packages(venv: Path) -> Path:
    return Path(_run(venv / "bin" / "python", "-c",
                     "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=venv).strip())


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503


def test_gateway_is_imported_from_the_venv(venv: Path, tmp_path: Path) -> None:
    site_packages = _site_packages(venv)
    assert site_packages.is_relative_to(venv)
    printed = _run(venv / "bin" / "python", "-c",
                   "import gateway, storage; print(gateway.__file__, storage.__file__)",
                   cwd=tmp_path)
    assert printed.split() == [str(site_packages / "gateway" / "__init__.py"),
                               str(site_packages / "storage" / "__init__.py")]


def test_every_module_imported_comes_from_a_declared_dependency(venv: Path) -> None:
    """Not only present in the venv as a dependency of a dependency (pydantic of
    pydantic-settings, h11 of uvicorn...): declared by the wheel itself."""
    site_packages = _site_packages(venv)
    [wheel] = metadata.distributions(name="passerelle", path=[str(site_packages)])
    declared = {_normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group())
                for requirement in wheel.requires or () if "extra ==" not in requirement}
    providers: dict[str, set[str]] = {}  # top-level module -> the distributions installing it
    for dist in metadata.distributions(path=[str(site_packages)]):
        for file in dist.files or ():
            providers.setdefault(file.parts[0].removesuffix(".py"), set()).add(
                _normalized(dist.metadata["Name"]))
    imported: set[str] = set()
    for package in ("gateway", "storage"):
        for module in (site_packages / package).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"gateway", "storage"}
    assert {"h11", "pydicom"} <= third_party  # the scan sees imports
    assert {module for module in third_party if not providers.get(module, set()) & declared
            } == set()


def test_the_installed_service_publishes_a_study(venv: Path, tmp_path: Path) -> None:
    study = generate_uid()
    sent = [national_ct_slice(study, series, number, instance)
            for number, series in enumerate((generate_uid(), generate_uid()), start=1)
            for instance in (1, 2)]
    registry = _start_installed(RegistryProcess(tmp_path / "registry"), venv, tmp_path)
    with registry:
        server = _start_installed(PasserelleProcess(
            tmp_path / "data", registry_url=registry.fhir_url, stable_seconds="1",
            patient_id_issuer_oid="1.2.250.1.999.1.1.1",
            accession_issuer_oid="1.2.250.1.999.1.1.2",
            order_issuer_oid="1.2.250.1.999.1.1.3"), venv, tmp_path)
        with server:
            for ds in sent:
                assert send(server.dicom_port, ds)[0] == 0x0000
            wait_for(lambda: registry.documents(study), 60, "the published manifest")
            [document] = registry.documents(study)
            assert document["status"] == "current"
            # ITI-68, answered by the installed service: the KOS lists every instance sent.
            kos = dcmread(BytesIO(httpx.get(document["content"][0]["attachment"]["url"],
                                            headers={"Accept": "application/dicom"},
                                            ).raise_for_status().content))
            referenced = {instance.ReferencedSOPInstanceUID
                          for evidence in kos.CurrentRequestedProcedureEvidenceSequence
                          for series in evidence.ReferencedSeriesSequence
                          for instance in series.ReferencedSOPSequence}
            assert referenced == {ds.SOPInstanceUID for ds in sent}
            # The console's templates and static files are in the wheel.
            page = httpx.get(f"{server.base_url}/ui/studies/{study}")
            assert page.status_code == 200 and study in page.text
            assert httpx.get(f"{server.base_url}/ui/static/console.js").status_code == 200
            assert server.stop() == 0, server.log()
        # uvicorn re-raises the SIGTERM it handled, once shut down.
        assert registry.stop() in (0, -signal.SIGTERM), registry.log()
        assert "Application shutdown complete" in registry.log()
