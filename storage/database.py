"""The index's database: SQLite (the file ``index.sqlite`` of the data dir, the default) or
PostgreSQL (``postgresql://user@host:port/db``, psycopg 3), through one SQLAlchemy engine.

Writers go through ``Database.transaction``: on SQLite ``BEGIN IMMEDIATE`` (one writer at a
time, waiting up to the busy timeout), on PostgreSQL a READ COMMITTED transaction. Readers
take a pooled connection of their own (SQLite WAL: readers never wait for the writer). The
few SQL fragments the two dialects spell differently are the small functions at the end.
"""

import fcntl
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from psycopg.errors import LockNotAvailable
from sqlalchemy import URL, Connection, Engine, Row, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, OperationalError

SQLITE_FILE = "index.sqlite"
_BUSY_TIMEOUT_S = 30
_IMMEDIATE = "passerelle_immediate"  # execution option: the next BEGIN is BEGIN IMMEDIATE
# Database.lock: names hash to this many stripes (a thread lock each, and on SQLite a file to
# flock), so at most this many holders per process; on PostgreSQL to advisory locks of this
# class (their first key), each held on a connection of a pool of its own.
_LOCK_STRIPES = 32
_LOCK_CLASS = 0x5053  # "PS"
_PG_CONNECT = {"application_name": "passerelle", "connect_timeout": 10}
_PG_NOW = text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
_PG_LOCK_TIMEOUT = text(f"SET LOCAL lock_timeout = '{_BUSY_TIMEOUT_S}s'")
# The lock's transaction idles while its holder works (an fsync, a rename): a server's
# idle_in_transaction_session_timeout must not end it, and the lock with it, meanwhile.
_PG_HOLD_IDLE = text("SET LOCAL idle_in_transaction_session_timeout = 0")


class DatabaseURLError(ValueError):
    """A database URL this program cannot use."""


class DatabaseUnavailableError(ConnectionError):
    """The database cannot be reached (or refuses this program's login)."""


class LockTimeoutError(DatabaseUnavailableError):
    """A ``Database.lock`` not granted in time: its holder elsewhere takes too long."""


def sqlite_url(path: Path) -> str:
    """The URL of the SQLite file at ``path``."""
    return f"sqlite:///{path.resolve()}"


def database_url(setting: str, data_dir: Path) -> str:
    """The URL of the index: ``setting`` when given, else the SQLite file of ``data_dir``."""
    return setting or sqlite_url(data_dir / SQLITE_FILE)


def _parsed(url: str) -> URL:
    """``url`` with its driver: psycopg 3 for PostgreSQL, the standard sqlite3 for SQLite."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # the URL is not repeated: it may hold a password
        raise DatabaseURLError("not a database URL (expected postgresql://"
                               "user@host:port/database or sqlite:////path/index.sqlite)"
                               ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite") and parsed.database:
        return parsed.set(drivername="sqlite+pysqlite")
    raise DatabaseURLError(f"unsupported database URL {parsed.render_as_string()!r}: use"
                           " postgresql://user@host:port/database or sqlite:////path/file")


def sqlite_file(url: str) -> Path | None:
    """The SQLite file of ``url``; None for PostgreSQL."""
    parsed = _parsed(url)
    return Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def check_database_url(url: str) -> None:
    """DatabaseURLError (a ValueError) when ``url`` is not one the index can use."""
    _parsed(url)


def dialect_of(url: str) -> str:
    """The dialect of a database URL: "sqlite" or "postgresql" (DatabaseURLError if none)."""
    return _parsed(url).get_backend_name()


def masked(url: str) -> str:
    """``url`` fit for a log: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def _on_sqlite_connect(connection: sqlite3.Connection, _record: object) -> None:
    # Imported here: storage.search builds its SQL with this module's fragments.
    from storage.search import fold_name, name_group

    connection.isolation_level = None  # write transactions are begun by _on_sqlite_begin
    connection.execute("PRAGMA journal_mode = WAL")
    # NORMAL: a commit survives a process crash but not a power cut; the files, always
    # fsynced, are the truth, and Store.recover re-indexes them after an unclean stop.
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.create_function("fold_name", 1, fold_name, deterministic=True)
    connection.create_function("name_group", 2, name_group, deterministic=True)


def _on_sqlite_begin(connection: Connection) -> None:
    # Reads run each statement on its own (SQLite's autocommit), as one BEGIN and ROLLBACK
    # around them would add two statements to each.
    if connection.get_execution_options().get(_IMMEDIATE, False):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """The index's database: an SQLAlchemy engine on SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        parsed = _parsed(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        # SQLite's (see ``lock``): index-locks/ beside index.sqlite.
        database = Path(parsed.database or "")
        self._lock_dir = database.with_name(f"{database.stem}-locks")
        self._lock_files: dict[int, int] = {}
        self._stripes = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))
        self._opening = threading.Lock()
        if self.dialect == "sqlite":
            self.engine: Engine = create_engine(
                parsed, connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False},
                pool_size=8, max_overflow=24, pool_timeout=_BUSY_TIMEOUT_S)
            event.listen(self.engine, "connect", _on_sqlite_connect)
            event.listen(self.engine, "begin", _on_sqlite_begin)
        else:
            # Named in pg_stat_activity; an unreachable server is an error within seconds,
            # not the minutes of TCP's timeout (the URL may set either otherwise).
            arguments = {name: value for name, value in _PG_CONNECT.items()
                         if name not in parsed.query}
            self.engine = create_engine(parsed, connect_args=arguments, pool_size=5,
                                        max_overflow=15, pool_timeout=_BUSY_TIMEOUT_S,
                                        pool_pre_ping=True)
            # A holder of a lock then takes connections of self.engine: from the same pool,
            # holders could take every connection and wait for one forever.
            self._locks_engine = create_engine(parsed, connect_args=arguments, pool_size=2,
                                               max_overflow=_LOCK_STRIPES - 2,
                                               pool_pre_ping=True)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction: committed on exit, rolled back on any exception."""
        with self.engine.connect() as connection:
            if self.dialect == "sqlite":
                connection.execution_options(**{_IMMEDIATE: True})
            with connection.begin():
                yield connection

    def now(self, connection: Connection | None = None) -> float:
        """Seconds since the epoch by the one clock every writer shares: PostgreSQL's (the
        replicas' own clocks may disagree), on ``connection`` when given; with SQLite this
        host's, the only one writing."""
        if self.dialect == "sqlite":
            return time.time()
        if connection is not None:
            return connection.execute(_PG_NOW).scalar_one()
        with self.engine.connect() as pooled:
            return pooled.execute(_PG_NOW).scalar_one()

    def fetch(self, sql: str, params: Mapping[str, object] | None = None) -> list[Row]:
        """Rows of one read-only statement, on a pooled connection."""
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), dict(params or {})))

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Held by one holder of ``name`` at a time among the threads and processes using
        this database, and the replicas sharing it (PostgreSQL: an advisory lock on a
        connection of the locks' own pool; SQLite: a thread lock and flock on one of the
        files of the directory beside the database). Distinct names may share a lock. A
        holder may use the database, but must not take another lock."""
        key = zlib.crc32(name.encode())
        stripe = key % _LOCK_STRIPES
        with self._stripes[stripe]:
            if self.dialect == "sqlite":
                fd = self._stripe_file(stripe)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
            keys = {"classid": _LOCK_CLASS, "objid": key - (1 << 32) if key >> 31 else key}
            # Held by a transaction of its own: ended with it, whatever ends it (its
            # connection lost, returned to the pool), so it never outlives its holder.
            with self._locks_engine.connect() as connection, connection.begin():
                connection.execute(_PG_LOCK_TIMEOUT)
                connection.execute(_PG_HOLD_IDLE)
                try:
                    connection.execute(text("SELECT pg_advisory_xact_lock(:classid, :objid)"),
                                       keys)
                except OperationalError as exc:
                    if not isinstance(exc.orig, LockNotAvailable):
                        raise
                    raise LockTimeoutError(f"{name}: held elsewhere for more than "
                                           f"{_BUSY_TIMEOUT_S:.0f} s") from exc
                yield

    def _stripe_file(self, stripe: int) -> int:
        """The open file of lock stripe ``stripe`` (flock is per open file: one each)."""
        with self._opening:
            if stripe not in self._lock_files:
                self._lock_dir.mkdir(mode=0o750, exist_ok=True)
                self._lock_files[stripe] = os.open(self._lock_dir / f"{stripe:02d}",
                                                   os.O_RDWR | os.O_CREAT, 0o640)
            return self._lock_files[stripe]

    def close(self) -> None:
        """Close every pooled connection (and the lock files)."""
        self.engine.dispose()
        if self.dialect == "postgresql":
            self._locks_engine.dispose()
        with self._opening:
            for fd in self._lock_files.values():
                os.close(fd)
            self._lock_files.clear()


def json_values(dialect: str, param: str) -> str:
    """A one-column subquery of the strings of the JSON list bound as ``:param``."""
    if dialect == "postgresql":
        return f"SELECT jsonb_array_elements_text(CAST(:{param} AS jsonb))"
    return f"SELECT value FROM json_each(:{param})"


def group_concat(dialect: str, expr: str, distinct: bool = False) -> str:
    """The values of ``expr`` in a group, comma separated (NULL for none)."""
    unique = "DISTINCT " if distinct else ""
    if dialect == "postgresql":
        return f"string_agg({unique}CAST({expr} AS TEXT), ',')"
    return f"group_concat({unique}{expr})"


def json_array_agg(dialect: str, expr: str) -> str:
    """The values of ``expr`` in a group as the text of a JSON list (in the group's order)."""
    if dialect == "postgresql":
        return f"CAST(COALESCE(json_agg({expr}), '[]') AS TEXT)"
    return f"json_group_array({expr})"
