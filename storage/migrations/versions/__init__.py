"""The revisions of the index schema, one module each (Alembic)."""
