"""What QIDO-RS needs of each dialect (storage.search): on PostgreSQL, the values it compares
by range (dates and times) or matches by a wildcard prefix through an index (Patient ID,
Accession Number) in the "C" collation, code point by code point as on SQLite, whatever the
database's collation (a time bound "1015" extended by U+FFFF, and LIKE 'prefix%' served by
the btree index, need it); on both, the studies by date and time, the order of a study
search, so a page of the most recent is read from the index instead of sorting them all.

Revision ID: 0002_qido_indexes
Revises: 0001_baseline
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_qido_indexes"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

# Table -> its columns compared code point by code point (storage.tables.Exact).
_EXACT = {"patients": ("patient_id",),
          "studies": ("study_date", "study_time", "accession_number", "patient_birth_date"),
          "series": ("series_date", "series_time")}


def _collate(collation: str | None) -> None:
    for table, columns in _EXACT.items():
        for column in columns:
            op.alter_column(table, column, type_=sa.Text(collation=collation),
                            existing_type=sa.Text(), existing_nullable=False)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _collate("C")
    # IF (NOT) EXISTS: an SQLite index of this schema stamped at the baseline again (as
    # tests/test_storage.py makes one of "v9") is brought here as it is.
    op.drop_index("studies_date", "studies", if_exists=True)
    op.create_index("studies_date_time", "studies", ["study_date", "study_time"],
                    if_not_exists=True)


def downgrade() -> None:
    op.drop_index("studies_date_time", "studies")
    op.create_index("studies_date", "studies", ["study_date"])
    if op.get_bind().dialect.name == "postgresql":
        _collate(None)
