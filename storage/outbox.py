"""The publication outbox, in the index: one row per thing to tell the registry, from
``pending`` to ``acknowledged`` (or ``failed`` when the registry refused it for good).

A row is created in the same transaction that marks its study as queued, so a crash can
neither lose a publication nor queue one twice; the sender works from these rows only.

Replicas (several services on one PostgreSQL index) share the outbox: a sender works on a
row only while it holds the row's lease (``claim``), renews it while the attempt runs and
releases it with the attempt's outcome. A replica that dies keeps its lease until it
expires; another replica then claims the row, and a row left ``sent`` is looked up in the
registry before it is sent again. Every change a sender makes to a row is conditional on
its lease (LeaseLostError otherwise), so a replica that lost a lease cannot overwrite the
work of the one that took the row over.
"""

import enum
from dataclasses import dataclass

from sqlalchemy import Connection, text

from storage.index import Index


class State(enum.StrEnum):
    """Where a publication stands."""

    PENDING = "pending"  # to send (again) at next_attempt_at
    SENT = "sent"  # on the wire: after a crash, ask the registry before sending again
    ACKNOWLEDGED = "acknowledged"  # the registry answered success
    FAILED = "failed"  # the registry refused it (4xx): needs a person, then `outbox retry`


# Rows a person may still have to look at: not yet acknowledged.
UNFINISHED = (State.PENDING, State.SENT, State.FAILED)


class NotFailedError(Exception):
    """Only a failed publication can be retried."""


class LeaseLostError(Exception):
    """The row's lease is no longer the one its writer holds: another replica took it."""


class Action(enum.StrEnum):
    """What a publication asks of the registry."""

    PUBLISH = "publish"  # ITI-65: first manifest of a study, or one replacing the previous
    UNPUBLISH = "unpublish"  # status of the current manifest to superseded
    CONFIDENTIALITY = "confidentiality"  # new security labels (payload), now and from now on


@dataclass(frozen=True, slots=True)
class Publication:
    """One outbox row; ``leased_by`` is the replica working on it ("" when none)."""

    id: int
    study_uid: str
    action: Action
    kos_uid: str
    replaces_kos_uid: str
    state: State
    attempts: int
    next_attempt_at: float
    last_error: str
    response: str
    document_id: str
    created_at: float
    updated_at: float
    payload: str
    leased_by: str
    lease_expires_at: float


_COLUMNS = """pk, study_uid, action, kos_uid, replaces_kos_uid, state, attempts, next_attempt_at,
    last_error, response, document_id, created_at, updated_at, payload, leased_by,
    lease_expires_at"""

# Rows a sender may take: due, not leased (or the lease expired), and no older row of their
# study unfinished, so a study's changes reach the registry in the order they were asked for.
_DUE = """FROM publications p WHERE state IN ('pending', 'sent') AND next_attempt_at <= :now
    AND NOT EXISTS (SELECT 1 FROM publications older WHERE older.study_uid = p.study_uid
                    AND older.pk < p.pk AND older.state IN ('pending', 'sent'))"""


@dataclass(frozen=True, slots=True)
class OutboxActivity:
    """The rows per state; when the oldest row still to send was queued, when the registry
    last acknowledged one; the newest error of a row being tried again, and when."""

    counts: dict[str, int]
    oldest_waiting: float | None
    last_acknowledged: float | None
    last_error: str
    last_error_at: float | None


def _publication(row: tuple) -> Publication:
    values = list(row)
    values[2], values[5] = Action(values[2]), State(values[5])
    return Publication(*values)


class Outbox:
    """Publication rows of an index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def queue_stable_studies(self, stable_seconds: float, now: float | None = None) -> list[str]:
        """Queue a publication for each study quiet for ``stable_seconds`` and changed since it
        was last queued; the study UIDs queued. Replicas may run this at the same moment: the
        one UPDATE marks each study queued and returns it to one of them only (on PostgreSQL
        the other waits for the row lock, then finds the study queued already)."""
        with self.index.transaction() as db:
            now = self.index.database.now(db) if now is None else now
            studies = sorted(row[0] for row in db.execute(text(
                """UPDATE studies SET queued_changes = changes
                   WHERE last_received_at <= :cutoff
                   AND (queued_changes IS NULL OR queued_changes < changes)
                   RETURNING study_uid"""), {"cutoff": now - stable_seconds}))
            for study_uid in studies:
                self._insert(db, study_uid, Action.PUBLISH, now)
        return studies

    def queue(self, study_uid: str, action: Action, payload: str = "") -> Publication:
        """Queue ``action`` for a study now (manual publish, unpublish, confidentiality)."""
        with self.index.transaction() as db:
            pk = self.queue_in(db, study_uid, action, payload)
        return self.get(pk)  # type: ignore[return-value]

    def queue_in(self, db: Connection, study_uid: str, action: Action,
                 payload: str = "") -> int:
        """``queue`` within the caller's write transaction ``db``; the new row's id."""
        now = self.index.database.now(db)
        if db.execute(text("SELECT 1 FROM studies WHERE study_uid = :study_uid"),
                      {"study_uid": study_uid}).first() is None:
            raise LookupError(f"no such study {study_uid}")
        if action is Action.PUBLISH:
            db.execute(text("UPDATE studies SET queued_changes = changes "
                            "WHERE study_uid = :study_uid"), {"study_uid": study_uid})
        return self._insert(db, study_uid, action, now, payload)

    @staticmethod
    def _insert(db: Connection, study_uid: str, action: Action, now: float,
                payload: str = "") -> int:
        return db.execute(text(
            """INSERT INTO publications (study_uid, action, kos_uid, state, next_attempt_at,
                                         created_at, updated_at, payload)
               VALUES (:study_uid, :action, '', :state, :now, :now, :now, :payload)
               RETURNING pk"""),
            {"study_uid": study_uid, "action": action.value, "state": State.PENDING.value,
             "now": now, "payload": payload}).scalar_one()

    def get(self, pk: int) -> Publication | None:
        """One row by id."""
        rows = self.index.fetch(f"SELECT {_COLUMNS} FROM publications WHERE pk = :pk",
                                {"pk": pk})
        return _publication(rows[0]) if rows else None

    def claim(self, replica: str, lease_seconds: float,
              now: float | None = None) -> Publication | None:
        """Lease the oldest due row no replica holds to ``replica`` for ``lease_seconds``;
        the row as leased, or None when there is none. An expired lease is taken over."""
        now = self.index.database.now() if now is None else now
        # PostgreSQL: rows another replica is claiming right now are skipped, not waited for.
        # SQLite: the write transaction (BEGIN IMMEDIATE) already runs alone.
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.index.dialect == "postgresql" else ""
        candidate = f"SELECT pk {_DUE} AND lease_expires_at <= :now ORDER BY pk LIMIT 1"
        if not self.index.fetch(candidate, {"now": now}):
            return None  # nothing to do: no write transaction (the idle publisher's case)
        with self.index.transaction() as db:
            pk = db.execute(text(candidate + skip_locked), {"now": now}).scalar()
            if pk is None:
                return None
            row = db.execute(text(
                f"""UPDATE publications SET leased_by = :replica, lease_expires_at = :until
                    WHERE pk = :pk AND lease_expires_at <= :now RETURNING {_COLUMNS}"""),
                {"replica": replica, "until": now + lease_seconds, "pk": pk, "now": now}
            ).first()
        return None if row is None else _publication(row)

    def renew(self, row: Publication, lease_seconds: float) -> bool:
        """Extend the lease of ``row`` (claimed) by ``lease_seconds`` from now; False when
        the lease has ended (the row finished: nothing to renew), LeaseLostError when
        another replica holds it."""
        with self.index.transaction() as db:
            holder = db.execute(text(
                """UPDATE publications SET lease_expires_at = CASE WHEN leased_by = :replica
                       THEN :until ELSE lease_expires_at END
                   WHERE pk = :pk RETURNING leased_by"""),
                {"until": self.index.database.now(db) + lease_seconds, "pk": row.id,
                 "replica": row.leased_by}).scalar()
        if holder == row.leased_by:
            return True
        if not holder:  # "" once ended
            return False
        raise LeaseLostError(f"publication {row.id}: lease of {row.leased_by} taken over by "
                             f"{holder}")

    def lease_holders(self) -> list[str]:
        """The replicas holding a lease now or when they stopped."""
        return [row[0] for row in self.index.fetch(
            "SELECT DISTINCT leased_by FROM publications WHERE leased_by != ''")]

    def release_leases(self, replica: str) -> int:
        """End every lease of ``replica`` (known dead: its rows need not wait for their
        leases to expire); how many rows it held."""
        with self.index.transaction() as db:
            return db.execute(text(
                """UPDATE publications SET leased_by = '', lease_expires_at = 0
                   WHERE leased_by = :replica"""), {"replica": replica}).rowcount

    def listing(self, states: tuple[State, ...] = tuple(State),
                study_uid: str | None = None) -> list[Publication]:
        """Rows in the given states (of one study, if given), oldest first."""
        names = {f"state{n}": state.value for n, state in enumerate(states)}
        of_study = " AND study_uid = :study_uid" if study_uid else ""
        return [_publication(row) for row in self.index.fetch(
            f"SELECT {_COLUMNS} FROM publications WHERE state IN "
            f"({', '.join(':' + name for name in names)}){of_study} ORDER BY pk",
            {**names, "study_uid": study_uid})]

    def page(self, states: tuple[State, ...], limit: int, offset: int,
             study_uid: str | None = None) -> tuple[list[Publication], int]:
        """One page of the rows in ``states`` (of one study, if given), failed first (a
        person must act on them), then newest first; and how many there are in all."""
        names = {f"state{n}": state.value for n, state in enumerate(states)}
        where = f"state IN ({', '.join(':' + name for name in names)})" + (
            " AND study_uid = :study_uid" if study_uid else "")
        params = {**names, "study_uid": study_uid}
        rows = self.index.fetch(
            f"""SELECT {_COLUMNS} FROM publications WHERE {where}
                ORDER BY CASE WHEN state = 'failed' THEN 0 ELSE 1 END, pk DESC
                LIMIT :limit OFFSET :offset""", {**params, "limit": limit, "offset": offset})
        total = self.index.fetch(f"SELECT count(*) FROM publications WHERE {where}", params)
        return [_publication(row) for row in rows], int(total[0][0])

    def latest_of(self, study_uids: list[str]) -> dict[str, Publication]:
        """The newest row of each of ``study_uids`` that has one."""
        params = {f"uid{n}": uid for n, uid in enumerate(study_uids)}
        if not params:
            return {}
        rows = self.index.fetch(
            f"""SELECT {_COLUMNS} FROM publications WHERE pk IN (
                    SELECT max(pk) FROM publications
                    WHERE study_uid IN ({', '.join(':' + name for name in params)})
                    GROUP BY study_uid)""", params)
        return {row.study_uid: row for row in map(_publication, rows)}

    def published_document(self, study_uid: str) -> Publication | None:
        """The acknowledged publication whose manifest is the study's current document in
        the registry; None when nothing is published or the last one was withdrawn."""
        rows = self.index.fetch(
            f"""SELECT {_COLUMNS} FROM publications WHERE study_uid = :study_uid
                AND state = 'acknowledged' AND action IN ('publish', 'unpublish')
                ORDER BY pk DESC LIMIT 1""", {"study_uid": study_uid})
        latest = _publication(rows[0]) if rows else None
        return latest if latest is not None and latest.action is Action.PUBLISH else None

    def manifest_publication(self, kos_uid: str) -> Publication | None:
        """The acknowledged publication that registered the manifest ``kos_uid``."""
        rows = self.index.fetch(
            f"""SELECT {_COLUMNS} FROM publications WHERE kos_uid = :kos_uid
                AND action = 'publish' AND state = 'acknowledged' ORDER BY pk LIMIT 1""",
            {"kos_uid": kos_uid})
        return _publication(rows[0]) if rows else None

    def was_withdrawn(self, kos_uid: str) -> bool:
        """True when a withdrawal of the manifest ``kos_uid`` was acknowledged."""
        return bool(self.index.fetch(
            """SELECT 1 FROM publications WHERE kos_uid = :kos_uid AND action = 'unpublish'
               AND state = 'acknowledged' LIMIT 1""", {"kos_uid": kos_uid}))

    def withdrawals(self, study_uid: str) -> int:
        """How many times the study's manifest was withdrawn (acknowledged unpublish rows)."""
        return self.index.fetch(
            """SELECT count(*) FROM publications WHERE study_uid = :study_uid
               AND action = 'unpublish' AND state = 'acknowledged'""",
            {"study_uid": study_uid})[0][0]

    def confidentiality(self, study_uid: str) -> str:
        """Payload of the study's latest confidentiality update not refused; "" if none."""
        rows = self.index.fetch(
            """SELECT payload FROM publications WHERE study_uid = :study_uid
               AND action = :action AND state != 'failed' ORDER BY pk DESC LIMIT 1""",
            {"study_uid": study_uid, "action": Action.CONFIDENTIALITY.value})
        return rows[0][0] if rows else ""

    def begin_attempt(self, row: Publication) -> Publication:
        """Count one more attempt at ``row`` (the one place attempts are counted); the row as
        it stands now."""
        self._set(row, attempts=row.attempts + 1)
        return self.get(row.id)  # type: ignore[return-value]

    def mark_sent(self, row: Publication, kos_uid: str, replaces_kos_uid: str = "") -> None:
        """The row's request is about to leave: from now on, a crash or a lost answer means
        "maybe delivered", and the registry is asked before anything is sent again."""
        self._set(row, state=State.SENT, kos_uid=kos_uid, replaces_kos_uid=replaces_kos_uid)

    def acknowledge(self, row: Publication, document_id: str, response: str,
                    kos_uid: str | None = None) -> None:
        """The registry holds what the row asked for (``document_id``: its
        DocumentReference); the lease is released."""
        fields: dict[str, object] = {} if kos_uid is None else {"kos_uid": kos_uid}
        self._set(row, state=State.ACKNOWLEDGED, document_id=document_id, response=response,
                  last_error="", release=True, **fields)

    def fail(self, row: Publication, reason: str, response: str) -> None:
        """Refused for good: the row waits for a person (``retry``); the lease is released."""
        self._set(row, state=State.FAILED, last_error=reason, response=response, release=True)

    def reschedule(self, row: Publication, reason: str, delay: float,
                   maybe_delivered: bool) -> None:
        """A transient failure: try again in ``delay`` seconds (the lease is released).
        ``row`` is the row as the attempt began: one that may have reached the registry
        (now, or in an earlier attempt) stays ``sent``, to be looked up before it is sent
        again."""
        state = State.SENT if maybe_delivered or row.state is State.SENT else State.PENDING
        self._set(row, state=state, last_error=reason,
                  next_attempt_at=self.index.database.now() + delay, release=True)

    def retry(self, pk: int) -> Publication:
        """Put a failed row back to pending, to send now; the row as it is now. LookupError
        when there is no such row, NotFailedError when it is not failed."""
        row = self.get(pk)
        if row is None:
            raise LookupError(f"no publication {pk}")
        if row.state is not State.FAILED:
            raise NotFailedError(f"publication {pk} is {row.state}, not failed: nothing to "
                                 "retry")
        self._set(row, state=State.PENDING, next_attempt_at=self.index.database.now(), attempts=0)
        return self.get(pk)  # type: ignore[return-value]  # rows are never deleted

    def _set(self, row: Publication, release: bool = False, **fields: object) -> None:
        """Set columns of ``row`` (``state`` as a State), stamping ``updated_at``, if the
        row's lease is still the one ``row`` carries (LeaseLostError otherwise); ``release``
        ends the lease."""
        values = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in fields.items()}
        if release:
            values.update(leased_by="", lease_expires_at=0.0)
        with self.index.transaction() as db:
            values["updated_at"] = self.index.database.now(db)
            assignments = ", ".join(f"{name} = :{name}" for name in values)
            changed = db.execute(text(
                f"UPDATE publications SET {assignments} WHERE pk = :pk AND leased_by = :lease"),
                {**values, "pk": row.id, "lease": row.leased_by}).rowcount
        if not changed:
            raise LeaseLostError(f"publication {row.id} is no longer leased by "
                                 f"{row.leased_by or 'nobody'}")

    def activity(self) -> "OutboxActivity":
        """How the outbox stands, for a health page."""
        waiting, acknowledged = self.index.fetch(
            """SELECT (SELECT min(created_at) FROM publications
                       WHERE state IN ('pending', 'sent')),
                      (SELECT max(updated_at) FROM publications
                       WHERE state = 'acknowledged')""")[0]
        failing = self.index.fetch(
            """SELECT last_error, updated_at FROM publications WHERE state IN ('pending', 'sent')
               AND attempts > 0 AND last_error != '' ORDER BY updated_at DESC LIMIT 1""")
        return OutboxActivity(self.counts(), waiting, acknowledged,
                              *(tuple(failing[0]) if failing else ("", None)))

    def counts(self) -> dict[str, int]:
        """Number of rows per state."""
        counts = {state.value: 0 for state in State}
        counts.update({state: n for state, n in self.index.fetch(
            "SELECT state, count(*) FROM publications GROUP BY state")})
        return counts
