"""The publication outbox on a real SQLite index: stable-study queueing, states, restarts."""

import json
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from storage.outbox import Action, NotFailedError, Outbox, State
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
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def test_a_quiet_study_is_queued_once(store: Store) -> None:
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    assert outbox.queue_stable_studies(60) == []  # still arriving
    later = time.time() + 61
    assert outbox.queue_stable_studies(60, now=later) == [study]
    assert outbox.queue_stable_studies(60, now=later + 100) == []  # nothing new since
    [row] = outbox.due(now=later)
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


def test_queue_state_survives_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    study = generate_uid()
    _receive(store, study, 1)
    Outbox(store.index).queue_stable_studies(0, now=time.time() + 1)
    store.close()
    reopened = Outbox(Store(tmp_path / "data").index)
    assert reopened.queue_stable_studies(0, now=time.time() + 1) == []
    assert [row.study_uid for row in reopened.due(now=time.time() + 1)] == [study]


def test_states_retry_and_counts(store: Store) -> None:
    study = generate_uid()
    _receive(store, study, 1)
    outbox = Outbox(store.index)
    row = outbox.queue(study, Action.PUBLISH)
    outbox.fail(row, "400: missing patient", "{}")
    assert outbox.due() == []
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
    assert outbox.due() == [] and outbox.due(now=time.time() + 61) == [row]
    # on the wire, then a timeout: stays sent, so it is looked up before being sent again
    second = outbox.begin_attempt(row)
    outbox.mark_sent(second, "1.2.3.4", replaces_kos_uid="1.2.3.3")
    sent = outbox.get(row.id)
    assert (sent.state, sent.attempts, sent.kos_uid, sent.replaces_kos_uid) == (
        State.SENT, 2, "1.2.3.4", "1.2.3.3")
    outbox.reschedule(second, "timeout", 0, maybe_delivered=True)
    assert (outbox.get(row.id).state, outbox.get(row.id).attempts) == (State.SENT, 2)
    # next attempt finds it registered: acknowledged, three attempts in all
    third = outbox.begin_attempt(outbox.get(row.id))
    outbox.acknowledge(third, "DocumentReference/9", "{}")
    done = outbox.get(row.id)
    assert (done.state, done.kos_uid, done.last_error, done.attempts) == (
        State.ACKNOWLEDGED, "1.2.3.4", "", 3)


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
        assert {s["study_uid"] for s in service.get("/admin/studies").json()} == {first, second}
