"""The local registry's SQLite store: DocumentReferences, SubmissionSets and Binaries, with
the search keys ITI-67 needs (patient identifier, masterIdentifier, referenceIdList, events).
"""

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from gateway.registry.validate import patient_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS binaries (
    id INTEGER PRIMARY KEY,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    resource_id INTEGER PRIMARY KEY REFERENCES resources(id),
    master_identifier TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS search_keys (
    resource_id INTEGER NOT NULL REFERENCES resources(id),
    name TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS search_keys_value ON search_keys(name, value);
"""


class DuplicateDocumentError(Exception):
    """A DocumentReference with this masterIdentifier is already registered."""


def now() -> str:
    """The current instant as a FHIR instant."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _keys(document: dict) -> list[tuple[str, str, str]]:
    """(search parameter, system, value) of a DocumentReference."""
    keys = []
    system, value = patient_key(document.get("subject")) or ("", "")
    keys.append(("patient.identifier", system, value))
    master = document.get("masterIdentifier") or {}
    keys.append(("identifier", master.get("system", ""), master.get("value", "")))
    context = document.get("context") or {}
    for related in context.get("related", []):
        identifier = related.get("identifier") or {}
        keys.append(("related", identifier.get("system", ""), identifier.get("value", "")))
    for event in context.get("event", []):
        keys += [("event", c.get("system", ""), c.get("code", "")) for c in event.get("coding", [])]
    return keys


class DocumentStore:
    """Resources of the local registry in one SQLite file; writes are serialised."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator["DocumentStore"]:
        """All writes inside happen or none do (ITI-65 is all-or-nothing)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def reserve(self, resource_type: str) -> int:
        """A new id for a resource written later in the same transaction."""
        return self._db.execute(
            "INSERT INTO resources (type, version, json) VALUES (?, 0, '{}') RETURNING id",
            (resource_type,)).fetchone()[0]

    def add_binary(self, content_type: str, data: bytes) -> int:
        """Store document bytes; their id."""
        return self._db.execute(
            "INSERT INTO binaries (content_type, data) VALUES (?, ?) RETURNING id",
            (content_type, data)).fetchone()[0]

    def write(self, resource_id: int, resource: dict) -> dict:
        """Store a new version of a reserved or existing resource (meta set here)."""
        version = self._db.execute("SELECT version FROM resources WHERE id = ?",
                                   (resource_id,)).fetchone()[0] + 1
        resource = {**resource, "id": str(resource_id),
                    "meta": {**resource.get("meta", {}), "versionId": str(version),
                             "lastUpdated": now()}}
        self._db.execute("UPDATE resources SET version = ?, json = ? WHERE id = ?",
                         (version, json.dumps(resource, ensure_ascii=False), resource_id))
        if resource["resourceType"] == "DocumentReference":
            master = resource["masterIdentifier"]["value"]
            try:
                self._db.execute(
                    """INSERT INTO documents (resource_id, master_identifier, status)
                       VALUES (?, ?, ?) ON CONFLICT (resource_id) DO UPDATE SET
                       status = excluded.status""", (resource_id, master, resource["status"]))
            except sqlite3.IntegrityError as exc:
                raise DuplicateDocumentError(master) from exc
            self._db.execute("DELETE FROM search_keys WHERE resource_id = ?", (resource_id,))
            self._db.executemany(
                "INSERT INTO search_keys (resource_id, name, system, value) VALUES (?, ?, ?, ?)",
                [(resource_id, *key) for key in _keys(resource)])
        return resource

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        """The current version of a resource."""
        row = self._db.execute("SELECT json FROM resources WHERE type = ? AND id = ? AND "
                               "version > 0", (resource_type, resource_id)).fetchone()
        return json.loads(row[0]) if row else None

    def binary(self, binary_id: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of a stored document."""
        row = self._db.execute("SELECT content_type, data FROM binaries WHERE id = ?",
                               (binary_id,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def search(self, tokens: list[tuple[str, str | None, str]], statuses: list[str]) -> list[dict]:
        """DocumentReferences matching every (parameter, system or None = any, value) token and
        one of ``statuses`` (none = any), oldest first."""
        sql = ["SELECT r.json FROM resources r JOIN documents d ON d.resource_id = r.id"
               " WHERE 1 = 1"]
        params: list[str] = []
        for name, system, value in tokens:
            sql.append("AND EXISTS (SELECT 1 FROM search_keys k WHERE k.resource_id = r.id"
                       " AND k.name = ? AND k.value = ?"
                       + (" AND k.system = ?)" if system is not None else ")"))
            params += [name, value, *([system] if system is not None else [])]
        if statuses:
            sql.append(f"AND d.status IN ({','.join('?' * len(statuses))})")
            params += statuses
        sql.append("ORDER BY r.id")
        return [json.loads(row[0]) for row in self._db.execute(" ".join(sql), params)]

    def document_id(self, master_identifier: str) -> int | None:
        """Id of the DocumentReference with this masterIdentifier value."""
        row = self._db.execute("SELECT resource_id FROM documents WHERE master_identifier = ?",
                               (master_identifier,)).fetchone()
        return row[0] if row else None
