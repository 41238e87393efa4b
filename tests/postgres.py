"""A throwaway PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl`` of Debian's
``postgresql`` in a temporary directory, run as the ``postgres`` user, listening on a free
loopback port with trust authentication for 127.0.0.1 only; stopped at the end of the
session. Durability is off (fsync): the cluster dies with the tests."""

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.processes import free_port

# Debian's server programs, of its one (or newest) major version.
_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
               key=lambda initdb: int(initdb.parent.parent.name))
BIN = _BINS[-1].parent if _BINS else Path("/usr/lib/postgresql/bin")
_USER = "postgres"


class PostgresCluster:
    """A running cluster; ``new_database`` hands each test a database of its own."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            raise RuntimeError(f"{BIN}/initdb not found: apt-get install postgresql"
                               " (scripts/setup.sh --test does)")
        self.root = Path(tempfile.mkdtemp(prefix="passerelle-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        account = pwd.getpwnam(_USER)
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", _USER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8")
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n"
                                               "local all all trust\n")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                   f" -c unix_socket_directories={self.root} -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", options, "start")

    def _run(self, program: str, *arguments: str) -> None:
        # cwd: the postgres user may not read the directory the tests run in.
        subprocess.run(["runuser", "-u", _USER, "--", str(BIN / program), *arguments],
                       cwd=self.root, check=True, capture_output=True, timeout=120)

    def url(self, dbname: str) -> str:
        """The URL of database ``dbname`` of the cluster."""
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the cluster and remove its files."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
