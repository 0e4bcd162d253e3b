"""The metadata schema, its version, and the migrations between versions.

Every object is keyed by namespace. Labels are stored as JSON objects; timestamps as
integer nanoseconds since the epoch (UTC). ``PRAGMA user_version`` holds the schema
version; ``migrate`` applies each missing step in one transaction.

Version 1::

    namespaces(name PK, labels JSON, created_at, updated_at)
    leases(namespace, id, labels JSON, created_at)                   PK(namespace, id)
    lease_resources(namespace, lease, type, id)                      PK(namespace, lease, type, id)
        type is "content", "ingests" or "snapshots/<snapshotter>"
    content(namespace, digest, size, labels JSON, created_at, updated_at)   PK(namespace, digest)
    ingests(namespace, ref, expected, expires_at, created_at)        PK(namespace, ref)
        the backend ingest of a namespaced ref is keyed "<namespace>/<ref>"
    images(namespace, name, media_type, digest, size, annotations JSON, labels JSON,
           created_at, updated_at)                                   PK(namespace, name)
    snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels JSON,
              created_at, updated_at)                                PK(namespace, snapshotter, key)
        parent is the namespaced key of the parent; backend_key names it in the snapshotter
    containers(namespace, id, labels JSON, image, runtime_name, runtime_options BLOB,
               spec BLOB, snapshotter, snapshot_key, extensions BLOB, sandbox,
               created_at, updated_at)                               PK(namespace, id)
        runtime_options, spec and extensions hold serialized google.protobuf.Any values

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
        CREATE TABLE content (
            namespace TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, digest)
        );
        CREATE INDEX content_by_digest ON content(digest);
        CREATE TABLE ingests (
            namespace TEXT NOT NULL,
            ref TEXT NOT NULL,
            expected TEXT NOT NULL DEFAULT '',
            expires_at INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, ref)
        );
        CREATE TABLE images (
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            media_type TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            annotations TEXT NOT NULL DEFAULT '{}',
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, name)
        );
        CREATE TABLE snapshots (
            namespace TEXT NOT NULL,
            snapshotter TEXT NOT NULL,
            key TEXT NOT NULL,
            backend_key TEXT NOT NULL,
            parent TEXT NOT NULL DEFAULT '',
            kind INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, snapshotter, key)
        );
        CREATE INDEX snapshots_by_parent ON snapshots(namespace, snapshotter, parent);
        CREATE TABLE containers (
            namespace TEXT NOT NULL,
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            image TEXT NOT NULL DEFAULT '',
            runtime_name TEXT NOT NULL,
            runtime_options BLOB,
            spec BLOB,
            snapshotter TEXT NOT NULL DEFAULT '',
            snapshot_key TEXT NOT NULL DEFAULT '',
            extensions BLOB,
            sandbox TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        """,
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
