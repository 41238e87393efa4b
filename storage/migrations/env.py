"""Alembic's entry point: runs the migrations of versions/ on the connection (already in its
transaction) that ``storage.migrations.upgrade`` passes in the config's attributes."""

from alembic import context

from storage.tables import metadata

context.configure(connection=context.config.attributes["connection"],
                  target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
