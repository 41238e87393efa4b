"""An index as an earlier version of Passerelle left it, to test the upgrades from it."""

import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config

import storage.migrations
from storage.database import Database, sqlite_url
from storage.schema import MIGRATIONS, request_items_text
from storage.search import fold_name


def index_at_version(path: Path, version: int) -> sqlite3.Connection:
    """A new SQLite index at ``path`` with the schema of ``version`` (its first ``version``
    migrations, user_version left at 0 as those versions' code then sets it: the caller
    inserts its rows and sets ``PRAGMA user_version``)."""
    db = sqlite3.connect(path)
    db.create_function("fold_name", 1, fold_name)
    db.create_function("request_items_text", 1, request_items_text)
    for script in MIGRATIONS[:version]:
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
    return db


def downgrade_to_baseline(path: Path) -> None:
    """Undo the Alembic revisions after the baseline (v11) of the SQLite index at ``path``,
    so that dropping its alembic_version leaves the index a version before Alembic left."""
    database = Database(sqlite_url(path))
    try:
        with database.transaction() as connection:
            config = Config()
            config.set_main_option("script_location",
                                   str(Path(storage.migrations.__file__).parent))
            config.attributes["connection"] = connection
            command.downgrade(config, storage.migrations.BASELINE)
    finally:
        database.close()
