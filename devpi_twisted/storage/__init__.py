"""
The storage service: metadata with a serial and changelog, and a blob store.
"""

from dataclasses import dataclass, field
import json
from typing import Any, Callable

from zope.interface import implementer

from devpi_twisted.interfaces import IWriteTransaction


@dataclass(frozen=True)
class ChangeRecord:
    """One committed change: what each key became (C{None}: deleted)."""

    serial: int
    time: float
    changes: dict[str, Any] = field(default_factory=dict)


class SerialMismatch(Exception):
    """A change record is not the next one for the store it is applied to."""


class HistoryPruned(Exception):
    """
    A read as of a serial, or the changes after one, asked for history the
    store no longer keeps (L{devpi_twisted.interfaces.IStorage.pruneHistory});
    C{oldest} is the oldest serial it still answers for.
    """

    def __init__(self, serial: int, oldest: int) -> None:
        super().__init__(f"the history before serial {oldest} is pruned (asked for serial {serial})")
        self.serial = serial
        self.oldest = oldest


@dataclass(frozen=True)
class BlobInfo:
    """A written blob: its content address, size and any extra digests."""

    sha256: str
    size: int
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectResult:
    """What one pass of the blob collector did (L{IBlobStore.collect})."""

    retired: int = 0
    restored: int = 0
    deleted: int = 0


def newHashes(extraHashes: tuple[str, ...]) -> dict[str, Any]:
    """Hash objects for sha256 plus the extra names (md5, blake2b_256)."""
    import hashlib

    makers = {
        "sha256": hashlib.sha256,
        "md5": lambda: hashlib.md5(usedforsecurity=False),
        "blake2b_256": lambda: hashlib.blake2b(digest_size=32),
    }
    names = ("sha256", *[n for n in extraHashes if n != "sha256"])
    return {name: makers[name]() for name in names}


BLOB_REF = "+blob"
"""A value that is a dict with this key refers to the blob of that sha256."""


def blobRef(value: Any) -> str | None:
    """The sha256 a stored value refers to, if any."""
    if isinstance(value, dict):
        ref = value.get(BLOB_REF)
        if isinstance(ref, str):
            return ref
    return None


def prefixUpperBound(prefix: str) -> str:
    """The smallest string greater than every string starting with C{prefix}."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


def canonicalJSON(value: Any) -> str:
    """The stored text of a value: compact, keys sorted (so equal values store alike)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@implementer(IWriteTransaction)
class OverlayTransaction:
    """
    The write transaction of a backend whose current view reads committed
    values: its own changes laid over that view (reads see them), kept in
    C{changes} (C{None}: deleted) for the backend to store on commit.

    @param checkKey: refuses a key the backend cannot store (raises).
    """

    def __init__(self, view: Any, serial: int, checkKey: Callable[[str], None] | None = None) -> None:
        self._view = view
        self._checkKey = checkKey
        self.serial = serial
        self.changes: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        if key in self.changes:
            return self.changes[key]
        return self._view.get(key)

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        merged = dict(self._view.items(prefix))
        for key, value in self.changes.items():
            if key.startswith(prefix):
                merged[key] = value
        return sorted((k, v) for k, v in merged.items() if v is not None)

    def set(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("use delete() to remove a key")
        if self._checkKey is not None:
            self._checkKey(key)
        # A round trip through JSON keeps later reads in this transaction
        # identical to what a fresh read will return.
        self.changes[key] = json.loads(canonicalJSON(value))

    def delete(self, key: str) -> None:
        self.changes[key] = None


class ChangeTeller:
    """
    Tells subscribers of each committed change once, whoever committed it:
    this process, or another one on the same storage (which a backend
    notices by polling or notification, possibly out of serial order).
    Keeps the last serial and commit time a backend answers with.

    @ivar told: every serial up to this one has been told.
    @ivar ahead: serials told beyond C{told} (commits that overtook others).
    """

    def __init__(self, serial: int, lastTime: float | None) -> None:
        self.serial = serial
        self.lastTime = lastTime
        self.told = serial
        self.ahead: set[int] = set()
        self._subscribers: list[Callable[[ChangeRecord], None]] = []

    def subscribe(self, callback: Callable[[ChangeRecord], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def tell(self, record: ChangeRecord) -> None:
        if record.serial <= self.told or record.serial in self.ahead:
            return
        if record.serial >= self.serial:
            self.serial, self.lastTime = record.serial, record.time
        if record.serial == self.told + 1:
            self.told = record.serial
            while self.told + 1 in self.ahead:
                self.told += 1
                self.ahead.discard(self.told)
        else:
            self.ahead.add(record.serial)
            if len(self.ahead) > 100000:  # nobody is filling the gaps
                self.told = max(self.ahead)
                self.ahead.clear()
        for callback in list(self._subscribers):
            callback(record)

    def skipTo(self, serial: int) -> None:
        """Take every change up to C{serial} as told (a snapshot replaced them; history pruned them)."""
        self.told = max(self.told, serial)
        self.ahead = {s for s in self.ahead if s > serial}
