"""The metadata schema, its version, and the migrations between versions.

Every object is keyed by namespace. Labels are stored as JSON objects; timestamps as
integer nanoseconds since the epoch (UTC). ``PRAGMA user_version`` holds the schema
version; ``migrate`` applies each missing step in one transaction.

Version 1::

    namespaces(name PK, labels JSON, created_at, updated_at)
    leases(namespace, id, labels JSON, created_at)          PK(namespace, id)
    lease_resources(namespace, lease, type, id)             PK(namespace, lease, type, id)

Later versions (added by the image, container and runtime work) extend this list.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]


def _script(conn: sqlite3.Connection, sql: str) -> None:
    # executescript() would COMMIT the migration's transaction; run statement by statement.
    for stmt in sql.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _v1(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE namespaces (
            name TEXT PRIMARY KEY,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE TABLE leases (
            namespace TEXT NOT NULL,
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE lease_resources (
            namespace TEXT NOT NULL,
            lease TEXT NOT NULL,
            type TEXT NOT NULL,
            id TEXT NOT NULL,
            PRIMARY KEY (namespace, lease, type, id),
            FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
        );
        """
    )


# Append new steps; never edit a released one.
MIGRATIONS: list[Migration] = [_v1]
VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to ``VERSION``; returns the version it started at."""
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current > VERSION:
        raise RuntimeError(
            f"metadata schema version {current} is newer than this daemon's ({VERSION})"
        )
    for step in range(current, VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return int(current)
