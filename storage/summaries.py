"""What the people who run the gateway see of the stored studies and their series (the
``passerelle studies`` command, the ``/admin`` read API and the console): identity, counts,
reception times and disk size, read from the index alone."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.database import group_concat

if TYPE_CHECKING:
    from storage.index import Index


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One line of the study list. Times are seconds since the epoch; ``size`` is the
    bytes of its stored files."""

    study_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modalities: list[str]
    series_count: int
    instance_count: int
    first_received_at: float
    last_received_at: float
    size: int


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """One series of a study, as its study's page lists it."""

    series_uid: str
    series_number: int | None
    modality: str
    series_description: str
    instance_count: int
    first_received_at: float
    last_received_at: float
    size: int


# Correlated, not a join on every study's totals: a page of 50 studies among 100 000 reads
# the instances of those 50 only.
_OF_STUDY = ("SELECT {} FROM instances i JOIN series se ON i.series_pk = se.pk"
             " WHERE se.study_pk = st.pk")


def _studies_sql(dialect: str, where: str) -> str:
    return f"""
    SELECT st.study_uid, p.patient_id, p.issuer_of_patient_id, st.patient_name,
           st.study_date, st.study_time, st.accession_number, st.study_description,
           (SELECT {group_concat(dialect, "se.modality", distinct=True)} FROM series se
             WHERE se.study_pk = st.pk AND se.modality != '') AS modalities,
           (SELECT count(*) FROM series se WHERE se.study_pk = st.pk) AS series_count,
           ({_OF_STUDY.format("count(*)")}) AS instance_count,
           st.first_received_at, st.last_received_at,
           ({_OF_STUDY.format("sum(i.size)")}) AS size
    FROM studies st JOIN patients p ON st.patient_pk = p.pk {where}
    ORDER BY st.study_date DESC, st.study_time DESC, st.pk DESC
    """


def study_summaries(index: "Index", study_uids: Sequence[str] | None = None
                    ) -> list[StudySummary]:
    """Every stored study, most recent study date first; or those of ``study_uids``, in
    that order (an unknown UID is left out)."""
    params = {f"uid{n}": uid for n, uid in enumerate(study_uids or ())}
    if study_uids is not None and not params:
        return []
    where = f"WHERE st.study_uid IN ({', '.join(':' + name for name in params)})" \
        if params else ""
    found = {row[0]: StudySummary(
        *row[:8], modalities=sorted(row[8].split(",")) if row[8] else [],
        series_count=row[9], instance_count=row[10], first_received_at=row[11],
        last_received_at=row[12], size=int(row[13] or 0))
        for row in index.fetch(_studies_sql(index.dialect, where), params)}
    order = study_uids if study_uids is not None else list(found)
    return [found[uid] for uid in order if uid in found]


def series_summaries(index: "Index", study_uid: str) -> list[SeriesSummary]:
    """The series of a study, by series number (those without one last)."""
    rows = index.fetch("""
        SELECT se.series_uid, se.series_number, se.modality, se.series_description,
               count(i.pk), min(i.received_at), max(i.received_at), sum(i.size)
        FROM series se JOIN studies st ON se.study_pk = st.pk
        JOIN instances i ON i.series_pk = se.pk
        WHERE st.study_uid = :study_uid
        GROUP BY se.pk, se.series_uid, se.series_number, se.modality, se.series_description
        ORDER BY se.series_number IS NULL, se.series_number, se.pk""",  # as on both dialects
        {"study_uid": study_uid})
    return [SeriesSummary(*row[:7], size=int(row[7] or 0)) for row in rows]
