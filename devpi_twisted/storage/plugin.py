"""
Storage backends as Twisted plugins.

A dropin in C{twisted/plugins/} declares a L{StorageBackendPlugin} (the
metadata, C{--storage}) or a L{BlobBackendPlugin} (file contents,
C{--blobs}) with a name and the dotted path of an C{open} function; the
module behind it is imported only when that backend is chosen, so the
drivers of PostgreSQL and S3 are needed only by those who use them.
"""

from importlib import import_module
from typing import Any

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from devpi_twisted.config import BackendSettings
from devpi_twisted.errors import StorageError
from devpi_twisted.interfaces import IBlobBackend, IBlobStore, IStorage, IStorageBackend


class _LazyBackend:
    def __init__(self, name: str, description: str, opener: str) -> None:
        self.name = name
        self.description = description
        self._opener = opener

    def open(self, serverdir: Any, runner: Any, settings: BackendSettings) -> Any:
        module, _, attr = self._opener.partition(":")
        try:
            opener = getattr(import_module(module), attr)
        except ImportError as e:
            raise StorageError(
                f"the {self.name!r} backend needs {e.name!r}, which is not installed; "
                f"install devpi-twisted[{self.name}]"
            ) from e
        return opener(serverdir, runner, settings)


@implementer(IPlugin, IStorageBackend)
class StorageBackendPlugin(_LazyBackend):
    """A lazily imported metadata backend (C{--storage NAME})."""


@implementer(IPlugin, IBlobBackend)
class BlobBackendPlugin(_LazyBackend):
    """A lazily imported file-contents backend (C{--blobs NAME})."""


def _find(interface: Any, name: str, option: str) -> Any:
    backends = {b.name: b for b in getPlugins(interface)}
    if name not in backends:
        raise StorageError(
            f"unknown {option} backend {name!r}; installed: {', '.join(sorted(backends)) or 'none'}"
        )
    return backends[name]


def findBackend(name: str) -> IStorageBackend:
    """The installed metadata backend called C{name}, or L{StorageError} listing those there are."""
    return _find(IStorageBackend, name, "storage")


def findBlobBackend(name: str) -> IBlobBackend:
    """The installed blob backend called C{name}, or L{StorageError} listing those there are."""
    return _find(IBlobBackend, name, "blobs")


def backendNames(interface: Any) -> list[str]:
    """The names of the installed backends of one kind, for C{--help}."""
    return sorted(b.name for b in getPlugins(interface))


def openBackends(settings: BackendSettings, serverdir: Any, runner: Any) -> tuple[IStorage, IBlobStore]:
    """
    Open the metadata store and the blob store C{settings} choose.  When
    the blob store cannot be opened, the metadata store is closed again.
    """
    storageBackend = findBackend(settings.storage)
    blobBackend = findBlobBackend(settings.blobs)
    storage = storageBackend.open(serverdir, runner, settings)
    try:
        blobs = blobBackend.open(serverdir, runner, settings)
    except BaseException:
        storage.close()
        raise
    return storage, blobs
