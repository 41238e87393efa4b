"""The publication outbox on a real index (SQLite and PostgreSQL): stable-study queueing,
states, restarts, and the leases that let replicas share it."""

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text

from storage.outbox import Action, LeaseLostError, NotFailedError, Outbox, Publication, State
from storage.store import Outcome, Store
from tests.inprocess import InProcessService
from tests.processes import PasserelleProcess, wait_for
from tests.scu import send
from tests.synthetic import ct_slice


def _receive(store: Store, study: str, number: int) -> None:
    out = BytesIO()
    ct_slice(study, generate_uid(), 1, number, size=4).save_as(out, enforce_file_format=True)
    assert store.ingest(out.getvalue(), "test").outcome is Outcome.STORED


@pytest.fixture
def store(tmp_path: Path, database_url: str) -> Iterator[Store]:
    store = Store(tmp_path / "data", database_url=database_url)
    yield store
    store.close()


@pytest.fixture
def replica(tmp_path: Path, database_url: str) -> Iterator[Callable[[], Outbox]]:
    """``replica()``: an Outbox on an Index of its own over the test's database, as another
    service sharing it would have."""
    stores: list[Store] = []

    def make() -> Outbox:
        stores.append(Store(tmp_path / "data", database_url=database_url))
        return Outbox(stores[-1].index)

    yield make
    for store in stores:
        store.close()


def test_a_quiet_study_is_queued_once(store: Store) -> None:
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    assert outbox.queue_stable_studies(60) == []  # still arriving
    later = time.time() + 61
    assert outbox.queue_stable_studies(60, now=later) == [study]
    assert outbox.queue_stable_studies(60, now=later + 100) == []  # nothing new since
    row = outbox.claim("replica", 60, now=later)
    assert (row.study_uid, row.action, row.state) == (study, Action.PUBLISH, State.PENDING)


def test_a_late_instance_queues_the_study_again(store: Store) -> None:
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    assert outbox.queue_stable_studies(0, now=time.time() + 1) == [study]
    time.sleep(0.01)
    _receive(store, study, 2)
    assert outbox.queue_stable_studies(0, now=time.time() + 1) == [study]
    assert len(outbox.listing()) == 2


def test_an_instance_stamped_earlier_than_the_queued_time_still_queues_the_study(
        store: Store, tmp_path: Path, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued, then an instance written by a replica whose clock is behind (or whose commit
    came late): its time is earlier than the one already queued, yet the study changed and
    is queued again; its quiet time never goes back."""
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    [(queued_at,)] = store.index.fetch("SELECT last_received_at FROM studies")
    assert outbox.queue_stable_studies(0, now=queued_at + 1) == [study]
    behind = Store(tmp_path / "data", database_url=database_url)
    try:
        monkeypatch.setattr(behind.index.database, "now",
                            lambda connection=None: queued_at - 600)
        _receive(behind, study, 2)
    finally:
        behind.close()
    assert store.index.fetch("SELECT last_received_at FROM studies")[0][0] == queued_at
    assert outbox.queue_stable_studies(0, now=queued_at + 1) == [study]
    assert outbox.queue_stable_studies(0, now=queued_at + 2) == []


def test_queue_state_survives_reopening(tmp_path: Path, database_url: str) -> None:
    store = Store(tmp_path / "data", database_url=database_url)
    study = generate_uid()
    _receive(store, study, 1)
    Outbox(store.index).queue_stable_studies(0, now=time.time() + 1)
    store.close()
    reopened = Store(tmp_path / "data", database_url=database_url)
    outbox = Outbox(reopened.index)
    assert outbox.queue_stable_studies(0, now=time.time() + 1) == []
    assert outbox.claim("replica", 60, now=time.time() + 1).study_uid == study
    reopened.close()


def test_states_retry_and_counts(store: Store) -> None:
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    row = outbox.queue(study, Action.PUBLISH)
    outbox.fail(row, "400: missing patient", "{}")
    assert outbox.claim("replica", 60) is None
    assert outbox.counts()["failed"] == 1
    assert outbox.listing((State.FAILED,))[0].last_error == "400: missing patient"
    assert outbox.retry(row.id).state is State.PENDING
    with pytest.raises(NotFailedError):
        outbox.retry(row.id)  # pending now, nothing to retry
    with pytest.raises(LookupError):
        outbox.retry(row.id + 1)
    outbox.acknowledge(outbox.get(row.id), "DocumentReference/7", "{}", kos_uid="1.2.3.4")
    published = outbox.published_document(study)
    assert (published.document_id, published.kos_uid) == ("DocumentReference/7", "1.2.3.4")
    with pytest.raises(LookupError):
        outbox.queue("1.2.3.999", Action.UNPUBLISH)


def test_transitions_of_an_attempt(store: Store) -> None:
    """The publisher's sequence: begin an attempt, maybe mark it sent, then acknowledge,
    fail or reschedule with the row as the attempt began."""
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    queued = outbox.queue(study, Action.PUBLISH)
    # refused connection before anything left: pending again, due after the delay
    first = outbox.begin_attempt(queued)
    outbox.reschedule(first, "refused", 60, maybe_delivered=False)
    row = outbox.get(queued.id)
    assert (row.state, row.attempts, row.last_error) == (State.PENDING, 1, "refused")
    assert outbox.claim("replica", 60) is None
    claimed = outbox.claim("replica", 60, now=time.time() + 61)
    assert (claimed.id, claimed.leased_by) == (row.id, "replica")
    # on the wire, then a timeout: stays sent, so it is looked up before being sent again
    second = outbox.begin_attempt(claimed)
    outbox.mark_sent(second, "1.2.3.4", replaces_kos_uid="1.2.3.3")
    sent = outbox.get(row.id)
    assert (sent.state, sent.attempts, sent.kos_uid, sent.replaces_kos_uid, sent.leased_by) == (
        State.SENT, 2, "1.2.3.4", "1.2.3.3", "replica")
    outbox.reschedule(second, "timeout", 0, maybe_delivered=True)
    after = outbox.get(row.id)
    assert (after.state, after.attempts, after.leased_by) == (State.SENT, 2, "")
    # next attempt finds it registered: acknowledged, three attempts in all
    third = outbox.begin_attempt(outbox.claim("replica", 60))
    outbox.acknowledge(third, "DocumentReference/9", "{}")
    done = outbox.get(row.id)
    assert (done.state, done.kos_uid, done.last_error, done.attempts, done.leased_by) == (
        State.ACKNOWLEDGED, "1.2.3.4", "", 3, "")


def _studies(store: Store, count: int) -> list[str]:
    studies = [generate_uid() for _ in range(count)]
    for study in studies:
        _receive(store, study, 1)
    return studies


def _at_once(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` in threads released together; their results, in order."""
    start, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(n: int) -> None:
        start.wait()
        results[n] = calls[n]()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _claim_all(outbox: Outbox, name: str) -> list[Publication]:
    claimed = []
    while (row := outbox.claim(name, 600)) is not None:
        claimed.append(row)
    return claimed


def test_replicas_claiming_at_once_never_get_the_same_row(
        store: Store, replica: Callable[[], Outbox]) -> None:
    studies = _studies(store, 40)
    for study in studies:
        Outbox(store.index).queue(study, Action.PUBLISH)
    a, b = replica(), replica()
    got_a, got_b = _at_once(lambda: _claim_all(a, "a"), lambda: _claim_all(b, "b"))
    ids_a, ids_b = {row.id for row in got_a}, {row.id for row in got_b}
    assert not ids_a & ids_b
    assert ids_a | ids_b == {row.id for row in a.listing()}
    assert all(row.leased_by == ("a" if row.id in ids_a else "b") for row in a.listing())


def test_a_row_being_claimed_is_skipped_not_waited_for(
        store: Store, replica: Callable[[], Outbox], database_url: str) -> None:
    """PostgreSQL: while a replica's claim holds the oldest row locked, another replica's
    claim takes the next one at once (FOR UPDATE SKIP LOCKED)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite claims one at a time (BEGIN IMMEDIATE): nothing to skip")
    first, second = (Outbox(store.index).queue(s, Action.PUBLISH)
                     for s in _studies(store, 2))
    other = replica()
    with store.index.transaction() as db:  # a claim in progress elsewhere
        db.execute(text("SELECT pk FROM publications WHERE pk = :pk FOR UPDATE"),
                   {"pk": first.id})
        [claimed] = _at_once(lambda: other.claim("b", 60))
    assert claimed is not None and claimed.id == second.id


def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(
        store: Store, replica: Callable[[], Outbox]) -> None:
    [study] = _studies(store, 1)
    queued = Outbox(store.index).queue(study, Action.PUBLISH)
    a, b = replica(), replica()
    now = time.time()
    held = a.begin_attempt(a.claim("a", 30, now=now))
    assert b.claim("b", 30, now=now + 29) is None  # still held
    taken = b.claim("b", 30, now=now + 31)
    assert (taken.id, taken.leased_by, taken.attempts) == (queued.id, "b", 1)
    with pytest.raises(LeaseLostError):
        a.mark_sent(held, "1.2.3.4")  # the old holder sends nothing
    with pytest.raises(LeaseLostError):
        a.renew(held, 30)
    b.acknowledge(b.begin_attempt(taken), "DocumentReference/1", "{}", kos_uid="1.2.3.5")
    done = a.get(queued.id)
    assert (done.state, done.kos_uid, done.attempts, done.leased_by) == (
        State.ACKNOWLEDGED, "1.2.3.5", 2, "")
    # Renewing a lease that ended with its row (finished between two renewals) is no
    # loss to warn about: nothing to renew.
    assert b.renew(taken, 30) is False


def test_a_renewed_lease_is_not_taken_over(store: Store, replica: Callable[[], Outbox]) -> None:
    [study] = _studies(store, 1)
    Outbox(store.index).queue(study, Action.PUBLISH)
    a, b = replica(), replica()
    held = a.claim("a", 1)
    assert a.renew(held, 600) is True
    assert b.claim("b", 30, now=time.time() + 60) is None
    assert b.claim("b", 30, now=time.time() + 601).leased_by == "b"


def test_a_study_rows_are_worked_on_in_order_across_replicas(
        store: Store, replica: Callable[[], Outbox]) -> None:
    [study] = _studies(store, 1)
    queue = Outbox(store.index)
    publish, unpublish = queue.queue(study, Action.PUBLISH), queue.queue(study, Action.UNPUBLISH)
    a, b = replica(), replica()
    held = a.claim("a", 60)
    assert held.id == publish.id
    assert b.claim("b", 60) is None  # the withdrawal waits for the publication
    a.reschedule(a.begin_attempt(held), "registry down", 0, maybe_delivered=True)
    assert b.claim("b", 60).id == publish.id  # released, still first
    b.acknowledge(b.get(publish.id), "DocumentReference/1", "{}", kos_uid="1.2.3.4")
    assert a.claim("a", 60).id == unpublish.id


def test_replicas_detecting_stable_studies_at_once_queue_each_once(
        store: Store, replica: Callable[[], Outbox]) -> None:
    replicas = [replica() for _ in range(3)]
    for _round in range(3):
        studies = _studies(store, 30)
        later = time.time() + 10
        found = _at_once(*(partial(r.queue_stable_studies, 1, later) for r in replicas))
        queued = [study for part in found for study in part]  # type: ignore[attr-defined]
        assert sorted(queued) == sorted(studies)
    rows = replicas[0].listing()
    assert len(rows) == len({row.study_uid for row in rows}) == 90


def test_service_queues_a_stable_study(tmp_path: Path) -> None:
    study = generate_uid()
    with PasserelleProcess(tmp_path / "data", stable_seconds="1") as server:
        assert send(server.dicom_port, ct_slice(study, generate_uid(), 1, 1, size=4))[0] == 0
        wait_for(lambda: "pending" in server.cli("outbox").stdout, 15, "a queued publication")
        listed = json.loads(server.cli("outbox", "--json").stdout)
        assert [(row["study_uid"], row["action"], row["state"]) for row in listed] == [
            (study, "publish", "pending")]
        failed = server.cli("outbox", "retry", str(listed[0]["id"]))
        assert failed.returncode == 1 and "not failed" in failed.stderr


def test_admin_study_shows_that_study_and_its_publications_only(tmp_path: Path) -> None:
    with InProcessService(tmp_path / "data") as service:
        first, second = generate_uid(), generate_uid()
        for study in (first, second):
            service.ingest(ct_slice(study, generate_uid(), 1, 1, size=4))
            assert service.post(f"/admin/studies/{study}/publish").status_code == 202
        one = service.get(f"/admin/studies/{second}").json()
        assert one["study"]["study_uid"] == second
        assert [p["study_uid"] for p in one["publications"]] == [second]
        assert service.get(f"/admin/studies/{generate_uid()}").status_code == 404
        assert {s["study_uid"] for s in service.get("/admin/studies").json()["studies"]} == {
            first, second}
