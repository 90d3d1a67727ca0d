"""
The embedded default backend: SQLite metadata and files under C{+files/}.
"""

from typing import Any

from twisted.python.filepath import FilePath

from devpi_twisted.storage.blobs import FileBlobStore
from devpi_twisted.storage.sqlite import SqliteStorage


def openEmbedded(serverdir: FilePath, runner: Any, log: Any) -> tuple[SqliteStorage, FileBlobStore]:
    """Open the database and blob store kept in C{serverdir}."""
    storage = SqliteStorage(serverdir.child("db.sqlite"), runner)
    blobs = FileBlobStore(serverdir.child("+files"), runner)
    return storage, blobs
