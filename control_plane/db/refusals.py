"""Why a control plane refuses to start on a database or a blob store. Kept apart from what raises them, so
that the command line can name them without importing the database layer (a client
command starts in a fraction of the time)."""

from __future__ import annotations


class DatabaseInUse(RuntimeError):
    """Another control plane serves this SQLite file (``sole_server.py``)."""


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer version that this one cannot serve (``schema.py``)."""


class BlobStoreUnusable(RuntimeError):
    """The object store named by ``blob_url`` cannot be reached or has no such bucket."""
