"""The index's schema migrations (Alembic; the revisions are in versions/), applied when an
Index opens, in one transaction. On PostgreSQL under an advisory lock: replicas starting
together on an empty database migrate it once, the others wait and find it at head. An
SQLite index of a version before Alembic (PRAGMA user_version 1 to 11) is brought to v11 by
the legacy migrations of storage.schema and stamped with the baseline."""

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from storage.database import Database
from storage.schema import NewerSchemaError, migrate_legacy

log = logging.getLogger(__name__)
# Alembic's INFO lines (context, each revision run) would reach the stderr of every command
# that opens a new index; the upgrade from an existing schema is logged here, once.
logging.getLogger("alembic").setLevel(logging.WARNING)

BASELINE = "0001_baseline"  # the schema of storage.schema.LEGACY_VERSION
_LOCK_KEY = 0x7061_7373_6572  # pg_advisory_xact_lock key of the migrations ("passer")


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(Path(__file__).parent))


def head() -> str:
    """The revision the migrations end at."""
    return _scripts().get_current_head() or ""


def current_revision(connection: Connection) -> str:
    """The revision the database is at ("" before any migration)."""
    return MigrationContext.configure(connection).get_current_revision() or ""


def upgrade(database: Database) -> None:
    """Bring the schema of ``database`` to head."""
    with database.transaction() as connection:
        if database.dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        config = _config(connection)
        if database.dialect == "sqlite" and not inspect(connection).has_table("alembic_version"):
            legacy = connection.exec_driver_sql("PRAGMA user_version").scalar_one()
            if legacy:
                migrate_legacy(connection.connection.driver_connection, legacy)
                command.stamp(config, BASELINE)
                log.info("index schema: v%d, of a version before Alembic, migrated to %s",
                         legacy, BASELINE)
        current = current_revision(connection)
        if current and current not in {script.revision for script in _scripts().walk_revisions()}:
            raise NewerSchemaError(f"index schema revision {current} is newer than this"
                                   " program (left by a later version)")
        if current != head():
            if current:
                log.info("index schema: migrating from %s to %s", current, head())
            command.upgrade(config, "head")
