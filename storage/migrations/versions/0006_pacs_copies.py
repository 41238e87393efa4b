"""Local copies a PACS holds, and rejected instances.

- ``studies.copy_removed_at`` (NULL while the files are here) and ``studies.copy_held_by``
  (the PACS AE title confirmed to hold every instance when the local files were removed):
  the study stays indexed and published, its files are retrieved again on demand.
- ``rejected_instances``: instances an IOCM rejection note (PS3.3 A.35.4, IHE RAD IOCM)
  removed, with the note and its reason code, so that the same instance sent again is not
  shown again.

Revision ID: 0006_pacs_copies
Revises: 0005_study_accesses
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_pacs_copies"
down_revision = "0005_study_accesses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place, as 0004 does: a batch copy of ``studies`` would drop the table the other
    # tables' foreign keys reference.
    op.add_column("studies", sa.Column("copy_removed_at", sa.Double(), nullable=True))
    op.add_column("studies", sa.Column("copy_held_by", sa.Text(), nullable=False,
                                       server_default=""))
    op.create_table(
        "rejected_instances",
        sa.Column("sop_uid", sa.Text(), primary_key=True),
        sa.Column("study_uid", sa.Text(), nullable=False),
        sa.Column("series_uid", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),  # the note's title code value
        sa.Column("note_uid", sa.Text(), nullable=False),
        sa.Column("rejected_at", sa.Double(), nullable=False))
    op.create_index("rejected_instances_study", "rejected_instances", ["study_uid"])


def downgrade() -> None:
    op.drop_index("rejected_instances_study", "rejected_instances")
    op.drop_table("rejected_instances")
    op.drop_column("studies", "copy_held_by")
    op.drop_column("studies", "copy_removed_at")
