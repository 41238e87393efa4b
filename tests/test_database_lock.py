"""``Database.lock`` and ``Database.now`` on PostgreSQL, where replicas share them: the lock
is one transaction's (nothing is left held once its holder is done, however it ended), a
lock held elsewhere too long is a clear error, and the clock is the server's."""

import threading
import time

import pytest
from sqlalchemy import text

import storage.database
from storage.database import Database, LockTimeoutError


@pytest.fixture
def databases(postgres_cluster: object) -> tuple[Database, Database]:
    """Two replicas' handles on one database."""
    url = postgres_cluster.new_database()  # type: ignore[attr-defined]
    first, second = Database(url), Database(url)
    yield first, second
    first.close()
    second.close()


def _advisory_locks(database: Database) -> int:
    return database.fetch("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0]


def test_a_lock_excludes_other_replicas_and_nothing_outlives_its_holder(
        databases: tuple[Database, Database]) -> None:
    first, second = databases
    order: list[str] = []
    held = threading.Event()

    def hold() -> None:
        with first.lock("instance 1.2.3"):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    with second.lock("instance 1.2.3"):
        order.append("second in")
    holder.join()
    assert order == ["first done", "second in"]
    # A holder failing ends its lock with its transaction.
    with pytest.raises(RuntimeError), first.lock("instance 1.2.3"):
        raise RuntimeError("boom")
    assert _advisory_locks(first) == 0  # the pooled connections hold none


def test_a_lock_held_elsewhere_too_long_is_refused_by_name(
        databases: tuple[Database, Database], monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = databases
    monkeypatch.setattr(storage.database, "_PG_LOCK_TIMEOUT",
                        text("SET LOCAL lock_timeout = '200ms'"))
    refused = pytest.raises(LockTimeoutError, match=r"instance 1\.2\.3: held elsewhere")
    with first.lock("instance 1.2.3"), refused, second.lock("instance 1.2.3"):
        pass
    with second.lock("instance 1.2.3"):  # free again: granted
        pass


def test_the_clock_is_the_servers(databases: tuple[Database, Database]) -> None:
    first, _ = databases
    server = first.fetch("SELECT CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)")[0][0]
    with first.transaction() as db:
        inside = first.now(db)
    assert server <= first.now() and server <= inside
    assert abs(first.now() - time.time()) < 60  # this host's server: the same clock
