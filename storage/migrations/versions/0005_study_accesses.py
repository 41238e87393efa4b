"""Who saw each study: per stored study, user (as the audit trail names them) and client
address, the number of accesses, how many of them were refused or failed, the first and
last time, and the kind of the last one (storage.study_accesses, written by the audit
trail's writer). Its rows go with their study (ON DELETE CASCADE).

Revision ID: 0005_study_accesses
Revises: 0004_study_changes
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_study_accesses"
down_revision = "0004_study_changes"
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "study_accesses",
        sa.Column("study_pk", _KEY, sa.ForeignKey("studies.pk", ondelete="CASCADE"),
                  primary_key=True, autoincrement=False),
        sa.Column("user_id", sa.Text(), primary_key=True),
        sa.Column("address", sa.Text(), primary_key=True),
        sa.Column("accesses", sa.BigInteger(), nullable=False),
        sa.Column("refused", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.Double(), nullable=False),
        sa.Column("last_at", sa.Double(), nullable=False),
        sa.Column("last_kind", sa.Text(), nullable=False))


def downgrade() -> None:
    op.drop_table("study_accesses")
