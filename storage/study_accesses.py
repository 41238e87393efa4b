"""Who saw each stored study: the accesses the audit trail records, counted in the index per
study, user and client address (table ``study_accesses``), for the console and ``/admin``.

The trail's writer adds each batch in one transaction, off the request path; the trail's
files stay the record of each access. Only stored studies are counted (an access to an
unknown UID adds no row), in one row per (study, user, address) however many accesses: the
table grows with who reads what, not with the traffic.
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from sqlalchemy import text

from storage.index import Index

_MAX_TEXT = 256  # characters of a user or address kept (the same ones for every access)

# Counters added, first and last times widened; the kind is the newest access's. SET reads
# the row as it was on both dialects. CASE, not min/max: SQLite and PostgreSQL spell those
# apart.
_ADD = text("""
    INSERT INTO study_accesses (study_pk, user_id, address, accesses, refused, first_at,
                                last_at, last_kind)
    SELECT pk, :user_id, :address, :accesses, :refused, :first_at, :last_at, :last_kind
    FROM studies WHERE study_uid = :study_uid
    ON CONFLICT (study_pk, user_id, address) DO UPDATE SET
        accesses = study_accesses.accesses + excluded.accesses,
        refused = study_accesses.refused + excluded.refused,
        first_at = CASE WHEN excluded.first_at < study_accesses.first_at
                   THEN excluded.first_at ELSE study_accesses.first_at END,
        last_at = CASE WHEN excluded.last_at > study_accesses.last_at
                  THEN excluded.last_at ELSE study_accesses.last_at END,
        last_kind = CASE WHEN excluded.last_at >= study_accesses.last_at
                    THEN excluded.last_kind ELSE study_accesses.last_kind END
""")
_OF_STUDY = """FROM study_accesses a JOIN studies st ON a.study_pk = st.pk
    WHERE st.study_uid = :study_uid"""


@dataclass(frozen=True, slots=True)
class Access:
    """One access to a study as the audit trail recorded it: who (the trail's UserID), from
    where, what kind (``query``, ``retrieve``, ``access``: the audit event's type), whether
    it was refused or failed, and when (seconds since the epoch)."""

    study_uid: str
    user: str
    address: str
    kind: str
    refused: bool
    at: float


@dataclass(frozen=True, slots=True)
class SeenBy:
    """The accesses of one user from one address to a study: how many, how many of them
    were refused or failed, the first and last time and the last one's kind."""

    user: str
    address: str
    count: int
    refused: int
    first_at: float
    last_at: float
    last_kind: str


@dataclass(slots=True)
class _Total:
    """The accesses of one batch to one (study, user, address), as they add up."""

    accesses: int
    refused: int
    first_at: float
    last_at: float
    last_kind: str

    def add(self, access: Access) -> None:
        """One more access."""
        self.accesses += 1
        self.refused += access.refused
        self.first_at = min(self.first_at, access.at)
        if access.at >= self.last_at:
            self.last_at, self.last_kind = access.at, access.kind


def _totals(accesses: Iterable[Access]) -> list[dict[str, object]]:
    """The accesses added up per (study, user, address), as the parameters of ``_ADD``, in
    that order (every writer upserts its rows in one order: no two transactions wait for
    each other)."""
    totals: dict[tuple[str, str, str], _Total] = {}
    for access in accesses:
        key = (access.study_uid, access.user[:_MAX_TEXT], access.address[:_MAX_TEXT])
        total = totals.get(key)
        if total is None:
            totals[key] = _Total(1, int(access.refused), access.at, access.at, access.kind)
        else:
            total.add(access)
    return [{"study_uid": study_uid, "user_id": user, "address": address, **asdict(total)}
            for (study_uid, user, address), total in sorted(totals.items())]


class StudyAccesses:
    """The per-study access counts of the index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def add(self, accesses: Iterable[Access]) -> None:
        """Count ``accesses`` (those of unknown studies are left out), in one transaction."""
        rows = _totals(accesses)
        if rows:
            with self.index.transaction() as db:
                db.execute(_ADD, rows)

    def page(self, study_uid: str, limit: int, offset: int
             ) -> tuple[list[SeenBy], int] | None:
        """A page of who saw a stored study, the most recent access first, and how many
        (user, address) saw it in all; None when the study is not stored."""
        if not self.index.fetch("SELECT 1 FROM studies WHERE study_uid = :study_uid",
                                {"study_uid": study_uid}):
            return None
        params = {"study_uid": study_uid, "limit": limit, "offset": offset}
        rows = self.index.fetch(
            "SELECT a.user_id, a.address, a.accesses, a.refused, a.first_at, a.last_at,"
            f" a.last_kind {_OF_STUDY} ORDER BY a.last_at DESC, a.user_id, a.address"
            " LIMIT :limit OFFSET :offset", params)
        total = self.index.fetch(f"SELECT count(*) {_OF_STUDY}", params)[0][0]
        return [SeenBy(*row) for row in rows], total
