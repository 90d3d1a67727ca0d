"""
A replica's storage as the rest of the server sees it: readable, never
written.  Only the follower applies changes (the primary's); a local write
would give this replica a serial the primary never made, so any attempt
fails loudly instead (requests that write are forwarded before they get
here, and mirrors run offline).
"""

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from devpi_twisted.errors import DevpiError
from devpi_twisted.interfaces import IStorage


class ReplicaReadOnly(DevpiError):
    """A change was attempted on a replica instead of its primary."""

    status = 503


@implementer(IStorage)
class ReadOnlyStorage:
    """Everything of the wrapped L{IStorage} but L{write} and L{applyChange}."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def currentSerial(self) -> int:
        return self._storage.currentSerial()

    def lastCommitTime(self) -> float | None:
        return self._storage.lastCommitTime()

    def read(self, function: Callable[[Any], Any]) -> Deferred[Any]:
        return self._storage.read(function)

    def readAsOf(self, serial: int, function: Callable[[Any], Any]) -> Deferred[Any]:
        return self._storage.readAsOf(serial, function)

    def changesSince(self, serial: int, limit: int) -> Deferred[Any]:
        return self._storage.changesSince(serial, limit)

    def oldestKeptSerial(self) -> Deferred[int]:
        return self._storage.oldestKeptSerial()

    def pruneHistory(self, keepFrom: int, olderThan: float | None = None) -> Deferred[int]:
        return self._storage.pruneHistory(keepFrom, olderThan)

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return self._storage.subscribe(callback)

    def referencedBlobs(self) -> Deferred[set[str]]:
        return self._storage.referencedBlobs()

    def isBlobReferenced(self, sha256: str) -> Deferred[bool]:
        return self._storage.isBlobReferenced(sha256)

    def close(self) -> Deferred[None]:
        return self._storage.close()

    def write(self, function: Callable[[Any], Any]) -> Deferred[Any]:
        return fail(ReplicaReadOnly("this server is a replica: changes are made on its primary"))

    def applyChange(self, record: Any) -> Deferred[int]:
        return fail(ReplicaReadOnly("only the replica's follower applies changes"))

    def applySnapshot(self, serial: int, time: float, state: Any) -> Deferred[int]:
        return fail(ReplicaReadOnly("only the replica's follower applies snapshots"))
