"""The index's schema at the head of its migrations (storage/migrations), as SQLAlchemy Core
tables: patients, studies, series, instances, their cached DICOM JSON, the publication
outbox, who saw each study, and rejected instances. Any schema change is a migration and a
change here (tests/test_migrations.py checks they agree, on SQLite and PostgreSQL)."""

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

# PostgreSQL's own names for constraints, on both dialects: a migration can name what it alters.
NAMING = {"pk": "%(table_name)s_pkey", "uq": "%(table_name)s_%(column_0_N_name)s_key",
          "fk": "%(table_name)s_%(column_0_N_name)s_fkey"}
metadata = MetaData(naming_convention=NAMING)

# BIGINT on PostgreSQL; on SQLite INTEGER PRIMARY KEY, the rowid (BIGINT would not be).
Key = BigInteger().with_variant(Integer(), "sqlite")


def _pk() -> Column:
    return Column("pk", Key, Identity(), primary_key=True)


# Compared code point by code point on PostgreSQL too, as on SQLite, whatever the database's
# collation: the values QIDO matches by range (dates, times) or by a wildcard prefix through an
# index (Patient ID, Accession Number; LIKE 'prefix%' uses a btree only in "C").
Exact = Text().with_variant(Text(collation="C"), "postgresql")


def _text(name: str, default: bool = False, exact: bool = False) -> Column:
    """A NOT NULL text column; ``default``: '' when not given (the columns added to a table
    after its creation got that default); ``exact``: of type Exact."""
    return Column(name, Exact if exact else Text, nullable=False,
                  server_default="" if default else None)


patients = Table(
    "patients", metadata, _pk(),
    _text("patient_id", exact=True), _text("issuer_of_patient_id"),
    UniqueConstraint("patient_id", "issuer_of_patient_id"),
    Index("patients_id", "patient_id"),
)

studies = Table(
    "studies", metadata, _pk(),
    Column("study_uid", Text, nullable=False, unique=True),
    Column("patient_pk", Key, ForeignKey("patients.pk"), nullable=False),
    _text("study_date", exact=True), _text("study_time", exact=True),
    _text("accession_number", exact=True),
    _text("accession_issuer"), _text("study_id"), _text("study_description"),
    _text("referring_physician"), _text("requested_procedure_ids"),
    _text("placer_order_numbers"),
    Column("first_received_at", Double, nullable=False),  # seconds since the epoch
    Column("last_received_at", Double, nullable=False),
    _text("referring_physician_folded", default=True),
    # Instances written into the study, and that count when it was last queued for
    # publication (storage.outbox; migration 0004 says why a count, not a time).
    Column("changes", BigInteger, nullable=False, server_default="0"),
    Column("queued_changes", BigInteger),
    _text("character_set", default=True),
    _text("other_patient_ids", default=True), _text("patient_name", default=True),
    _text("patient_name_folded", default=True),
    _text("patient_birth_date", default=True, exact=True),
    _text("patient_sex", default=True), _text("patient_id_qualifiers", default=True),
    # When the local files were removed, a PACS (copy_held_by) holding every instance
    # (gateway.retention); NULL while they are here.
    Column("copy_removed_at", Double), _text("copy_held_by", default=True),
    Index("studies_patient", "patient_pk"),
    Index("studies_date_time", "study_date", "study_time"),  # the order of a study search
    Index("studies_accession", "accession_number"),
)

series = Table(
    "series", metadata, _pk(),
    Column("series_uid", Text, nullable=False, unique=True),
    Column("study_pk", Key, ForeignKey("studies.pk"), nullable=False),
    _text("modality"), Column("series_number", Integer), _text("series_description"),
    _text("body_part"), _text("series_date", exact=True), _text("series_time", exact=True),
    _text("requests", default=True),
    Index("series_study", "study_pk"),
)

instances = Table(
    "instances", metadata, _pk(),
    Column("sop_uid", Text, nullable=False, unique=True),
    Column("series_pk", Key, ForeignKey("series.pk"), nullable=False),
    _text("sop_class_uid"), Column("instance_number", Integer), _text("transfer_syntax"),
    Column("rows", Integer), Column("columns", Integer), Column("frames", Integer),
    _text("path"), Column("size", BigInteger, nullable=False), _text("source"),
    Column("received_at", Double, nullable=False),
    _text("timezone_offset", default=True), Column("bits_allocated", Integer),
    _text("pps_start_date", default=True), _text("pps_start_time", default=True),
    _text("request_attributes", default=True),
    Index("instances_series", "series_pk"),
    Index("instances_path", "path"),
)

instance_metadata = Table(
    "instance_metadata", metadata,
    Column("instance_pk", Key, ForeignKey("instances.pk", ondelete="CASCADE"),
           primary_key=True, autoincrement=False),
    _text("json"),
)

publications = Table(
    "publications", metadata, _pk(),
    _text("study_uid"), _text("action"), _text("kos_uid"),
    _text("replaces_kos_uid", default=True), _text("state"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False),
    _text("last_error", default=True), _text("response", default=True),
    _text("document_id", default=True),
    Column("created_at", Double, nullable=False), Column("updated_at", Double, nullable=False),
    _text("payload", default=True),
    # The replica working on the row ("" for none) and until when (0 for none): outbox.claim.
    _text("leased_by", default=True),
    Column("lease_expires_at", Double, nullable=False, server_default="0"),
    Index("publications_state", "state", "next_attempt_at"),
    Index("publications_study", "study_uid"),
    Index("publications_kos", "kos_uid"),
)

# The studies indexed before v8 whose patient module Store reads again from their files.
patient_modules_to_read = Table(
    "patient_modules_to_read", metadata,
    Column("study_pk", Key, ForeignKey("studies.pk"), primary_key=True, autoincrement=False),
)

# Who saw each stored study (storage.study_accesses): one row per study, user and client
# address, whatever the number of accesses (a flood bumps its counters, adds no row).
study_accesses = Table(
    "study_accesses", metadata,
    Column("study_pk", Key, ForeignKey("studies.pk", ondelete="CASCADE"), primary_key=True,
           autoincrement=False),
    Column("user_id", Text, primary_key=True), Column("address", Text, primary_key=True),
    Column("accesses", BigInteger, nullable=False),
    Column("refused", BigInteger, nullable=False),  # of those: refused or failed
    Column("first_at", Double, nullable=False), Column("last_at", Double, nullable=False),
    _text("last_kind"),
)

# Instances an IOCM rejection note removed (PS3.3 A.35.4 title codes 113001, 113037, 113038,
# 113039): the same instance sent again is not shown again. Each note has a row of its own
# (note_uid = sop_uid): stored, never published (storage.rejections).
rejected_instances = Table(
    "rejected_instances", metadata,
    Column("sop_uid", Text, primary_key=True), _text("study_uid"), _text("series_uid"),
    _text("reason"), _text("note_uid"), Column("rejected_at", Double, nullable=False),
    Index("rejected_instances_study", "study_uid"),
)
