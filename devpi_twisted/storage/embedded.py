"""
The embedded default backends: SQLite metadata (C{db.sqlite}) and files
under C{+files/}, both in the server directory.
"""

from typing import Any

from twisted.python.filepath import FilePath

from devpi_twisted.storage.blobs import FileBlobStore
from devpi_twisted.storage.sqlite import SqliteStorage


def openSqlite(serverdir: FilePath, runner: Any, settings: Any) -> SqliteStorage:
    """Open the database kept in C{serverdir}."""
    return SqliteStorage(serverdir.child("db.sqlite"), runner)


def openFiles(serverdir: FilePath, runner: Any, settings: Any) -> FileBlobStore:
    """Open the blob store kept in C{serverdir}."""
    return FileBlobStore(serverdir.child("+files"), runner)
