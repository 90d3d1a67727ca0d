"""
Storage backends as Twisted plugins.

A dropin in C{twisted/plugins/} declares a L{StorageBackendPlugin} with a name
and the dotted path of an C{open} function; the module behind it is imported
only when that backend is chosen with C{--storage NAME}.
"""

from importlib import import_module
from typing import Any

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from devpi_twisted.errors import StorageError
from devpi_twisted.interfaces import IStorageBackend


@implementer(IPlugin, IStorageBackend)
class StorageBackendPlugin:
    """A lazily imported storage backend."""

    def __init__(self, name: str, description: str, opener: str) -> None:
        self.name = name
        self.description = description
        self._opener = opener

    def open(self, serverdir: Any, runner: Any, log: Any) -> Any:
        module, _, attr = self._opener.partition(":")
        return getattr(import_module(module), attr)(serverdir, runner, log)


def findBackend(name: str) -> IStorageBackend:
    """The installed backend called C{name}, or L{StorageError} listing those there are."""
    backends = {b.name: b for b in getPlugins(IStorageBackend)}
    if name not in backends:
        raise StorageError(
            f"unknown storage backend {name!r}; installed: {', '.join(sorted(backends)) or 'none'}"
        )
    return backends[name]
