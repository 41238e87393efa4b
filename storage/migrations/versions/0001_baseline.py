"""The schema of v11, the last version migrated by PRAGMA user_version (storage.schema):
patients, studies, series, instances, their cached DICOM JSON, the publication outbox. On
PostgreSQL also the SQL function name_group, SQLite's being storage.search.name_group.

Revision ID: 0001_baseline
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the rowid
_TABLES = ("instance_metadata", "instances", "series", "patient_modules_to_read", "studies",
           "patients", "publications")

# Component group ``g`` (0 alphabetic, 1 ideographic, 2 phonetic) of a PN value without its
# padding nor trailing empty components, "" when absent: storage.search.name_group.
_NAME_GROUP = """
CREATE FUNCTION name_group(name text, g integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT rtrim(btrim(split_part(name, '=', g + 1), ' '), '^ ') $$
"""


def _pk() -> sa.Column:
    return sa.Column("pk", _KEY, sa.Identity(always=False), primary_key=True)


def _ref(name: str, target: str, **options: object) -> sa.Column:
    return sa.Column(name, _KEY, sa.ForeignKey(target, **options), nullable=False)


def _text(*names: str, default: bool = False) -> list[sa.Column]:
    return [sa.Column(name, sa.Text(), nullable=False, server_default="" if default else None)
            for name in names]


def _time(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Double(), nullable=False) for name in names]


def upgrade() -> None:
    op.create_table("patients", _pk(), *_text("patient_id", "issuer_of_patient_id"),
                    sa.UniqueConstraint("patient_id", "issuer_of_patient_id"))
    op.create_index("patients_id", "patients", ["patient_id"])
    op.create_table(
        "studies", _pk(), sa.Column("study_uid", sa.Text(), nullable=False, unique=True),
        _ref("patient_pk", "patients.pk"),
        *_text("study_date", "study_time", "accession_number", "accession_issuer", "study_id",
               "study_description", "referring_physician", "requested_procedure_ids",
               "placer_order_numbers"),
        *_time("first_received_at", "last_received_at"),
        *_text("referring_physician_folded", default=True),
        sa.Column("queued_through", sa.Double()),
        *_text("character_set", "other_patient_ids", "patient_name", "patient_name_folded",
               "patient_birth_date", "patient_sex", "patient_id_qualifiers", default=True))
    op.create_index("studies_patient", "studies", ["patient_pk"])
    op.create_index("studies_date", "studies", ["study_date"])
    op.create_index("studies_accession", "studies", ["accession_number"])
    op.create_table(
        "series", _pk(), sa.Column("series_uid", sa.Text(), nullable=False, unique=True),
        _ref("study_pk", "studies.pk"), *_text("modality"),
        sa.Column("series_number", sa.Integer()),
        *_text("series_description", "body_part", "series_date", "series_time"),
        *_text("requests", default=True))
    op.create_index("series_study", "series", ["study_pk"])
    op.create_table(
        "instances", _pk(), sa.Column("sop_uid", sa.Text(), nullable=False, unique=True),
        _ref("series_pk", "series.pk"), *_text("sop_class_uid"),
        sa.Column("instance_number", sa.Integer()), *_text("transfer_syntax"),
        sa.Column("rows", sa.Integer()), sa.Column("columns", sa.Integer()),
        sa.Column("frames", sa.Integer()), *_text("path"),
        sa.Column("size", sa.BigInteger(), nullable=False), *_text("source"),
        *_time("received_at"), *_text("timezone_offset", default=True),
        sa.Column("bits_allocated", sa.Integer()),
        *_text("pps_start_date", "pps_start_time", "request_attributes", default=True))
    op.create_index("instances_series", "instances", ["series_pk"])
    op.create_index("instances_path", "instances", ["path"])
    op.create_table(
        "instance_metadata",
        sa.Column("instance_pk", _KEY, sa.ForeignKey("instances.pk", ondelete="CASCADE"),
                  primary_key=True, autoincrement=False),
        *_text("json"))
    op.create_table(
        "publications", _pk(), *_text("study_uid", "action", "kos_uid"),
        *_text("replaces_kos_uid", default=True), *_text("state"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        *_time("next_attempt_at"),
        *_text("last_error", "response", "document_id", default=True),
        *_time("created_at", "updated_at"), *_text("payload", default=True))
    op.create_index("publications_state", "publications", ["state", "next_attempt_at"])
    op.create_index("publications_study", "publications", ["study_uid"])
    op.create_index("publications_kos", "publications", ["kos_uid"])
    op.create_table(
        "patient_modules_to_read",
        sa.Column("study_pk", _KEY, sa.ForeignKey("studies.pk"), primary_key=True,
                  autoincrement=False))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NAME_GROUP)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION name_group(text, integer)")
    for table in _TABLES:
        op.drop_table(table)
