"""Which version of a study was queued for publication, by a count rather than a time.

``studies.changes`` counts the instances written into a study; ``queued_changes`` is that
count when the study was last queued. The time of the last instance (``last_received_at``)
only says whether the study is quiet: written by each replica's transaction, a late commit
or another clock could leave it earlier than the time already queued, and the study would
never be queued again. A study whose queued time was its last (queued and unchanged since)
starts up to date; any other is queued once quiet, as before.

Revision ID: 0004_study_changes
Revises: 0003_publication_leases
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_study_changes"
down_revision = "0003_publication_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("changes", sa.BigInteger(), nullable=False,
                                       server_default="0"))
    op.add_column("studies", sa.Column("queued_changes", sa.BigInteger()))
    op.execute("UPDATE studies SET queued_changes = 0 "
               "WHERE queued_through IS NOT NULL AND queued_through >= last_received_at")
    op.drop_column("studies", "queued_through")


def downgrade() -> None:
    op.add_column("studies", sa.Column("queued_through", sa.Double()))
    op.execute("UPDATE studies SET queued_through = last_received_at "
               "WHERE queued_changes = changes")
    op.drop_column("studies", "queued_changes")
    op.drop_column("studies", "changes")
