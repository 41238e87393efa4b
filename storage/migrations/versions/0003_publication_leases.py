"""Publication leases, for replicas sharing one index: the replica working on a row
(``leased_by``, "" when none) and until when its lease holds (``lease_expires_at``, seconds
since the epoch; 0 when none). storage.outbox claims, renews and releases them.

Revision ID: 0003_publication_leases
Revises: 0001_baseline
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_publication_leases"
down_revision = "0002_qido_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("publications", sa.Column("leased_by", sa.Text(), nullable=False,
                                            server_default=""))
    op.add_column("publications", sa.Column("lease_expires_at", sa.Double(), nullable=False,
                                            server_default="0"))


def downgrade() -> None:
    op.drop_column("publications", "lease_expires_at")
    op.drop_column("publications", "leased_by")
