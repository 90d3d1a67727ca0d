"""
In-memory implementations of L{IStorage} and L{IBlobStore}.

They keep the same promises as the embedded backend (one serial per change,
history for reads as of a serial, nothing committed when a transaction
raises) and answer with already-fired Deferreds, so unit tests stay
synchronous.

Both have an C{unavailable} switch: while it is on, every operation fails
with L{StorageUnavailable}, as a database or bucket that cannot be reached
does, and once it is off again they work as before (the real backends
reconnect by themselves).  L{PresigningMemoryBlobStore} also signs URLs
(L{IPresigningBlobStore}), as an S3 bucket does.
"""

import copy
import io
import json
import time
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.interfaces import IBlobReader, IBlobStore, IBlobWriter, IPresigningBlobStore, IReadView, IStorage, IWriteTransaction
from devpi_twisted.storage import BlobInfo, ChangeRecord, CollectResult, HistoryPruned, SerialMismatch, blobRef, newHashes
from devpi_twisted.storage.readers import BytesReader, RunFile

T = TypeVar("T")


def _answerWith(later: RunFile) -> Callable[["Deferred[Any]"], "Deferred[Any]"]:
    """
    How a fake hands over an answer it has at once: as it is, or through
    C{later} (a runner that answers on a later turn, as across a network).
    """
    if later is maybeDeferred:
        return lambda answer: answer

    def deliver(answer: "Deferred[Any]") -> "Deferred[Any]":
        delivered: Deferred[Any] = Deferred()
        answer.addBoth(lambda result: later(lambda: result).chainDeferred(delivered))
        return delivered

    return deliver


def _unreachable(what: str) -> StorageUnavailable:
    return StorageUnavailable(f"the {what} is unreachable just now; try again shortly")


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


@implementer(IReadView)
class _View:
    def __init__(self, state: dict[str, Any], serial: int) -> None:
        self._state = state
        self.serial = serial

    def get(self, key: str) -> Any:
        value = self._state.get(key)
        return None if value is None else copy.deepcopy(value)

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        return sorted((k, copy.deepcopy(v)) for k, v in self._state.items() if k.startswith(prefix))


@implementer(IWriteTransaction)
class _Transaction(_View):
    def __init__(self, state: dict[str, Any], serial: int) -> None:
        super().__init__(state, serial)
        self.changes: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        if key in self.changes:
            return copy.deepcopy(self.changes[key])
        return super().get(key)

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        merged = dict(super().items(prefix))
        merged.update({k: v for k, v in self.changes.items() if k.startswith(prefix)})
        return sorted((k, copy.deepcopy(v)) for k, v in merged.items() if v is not None)

    def set(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("use delete() to remove a key")
        self.changes[key] = _copy(value)

    def delete(self, key: str) -> None:
        self.changes[key] = None


@implementer(IStorage)
class MemoryStorage:
    """
    L{IStorage} in a dict, with its history since the last prune.

    @param later: delivers every answer (at once by default), as
        L{MemoryBlobStore}'s.
    """

    def __init__(self, clock: Callable[[], float] = time.time, later: RunFile = maybeDeferred) -> None:
        self._answer = _answerWith(later)
        self._clock = clock
        self._state: dict[str, Any] = {}
        # The state right after serial _oldest, and every record since.
        self._oldest = -1
        self._base: dict[str, Any] = {}
        self._log: list[ChangeRecord] = []
        self._serial = -1
        self._lastTime: float | None = None
        self._subscribers: list[Callable[[ChangeRecord], None]] = []
        self.closed = False
        self.unavailable = False  # on: every operation fails with StorageUnavailable

    def _down(self) -> "Deferred[Any] | None":
        """The failure every operation answers while the database is unreachable."""
        return self._answer(fail(_unreachable("database"))) if self.unavailable else None

    def currentSerial(self) -> int:
        return self._serial

    def lastCommitTime(self) -> float | None:
        return self._lastTime

    def read(self, function: Callable[[IReadView], T]) -> Deferred[T]:
        if (down := self._down()) is not None:
            return down
        try:
            return self._answer(succeed(function(_View(self._state, self.currentSerial()))))
        except Exception as e:
            return self._answer(fail(e))

    def _stateAsOf(self, serial: int) -> dict[str, Any]:
        if serial < self._oldest:
            raise HistoryPruned(serial, self._oldest)
        state = dict(self._base)
        for record in self._log:
            if record.serial > serial:
                break
            for key, value in record.changes.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
        return state

    def readAsOf(self, serial: int, function: Callable[[IReadView], T]) -> Deferred[T]:
        if (down := self._down()) is not None:
            return down
        try:
            return self._answer(succeed(function(_View(self._stateAsOf(serial), serial))))
        except Exception as e:
            return self._answer(fail(e))

    def write(self, function: Callable[[IWriteTransaction], T]) -> Deferred[tuple[int, T]]:
        if (down := self._down()) is not None:
            return down
        txn = _Transaction(self._state, self.currentSerial())
        try:
            result = function(txn)
        except Exception as e:
            return self._answer(fail(e))
        if not txn.changes:
            return self._answer(succeed((self.currentSerial(), result)))
        record = ChangeRecord(self._serial + 1, self._clock(), copy.deepcopy(txn.changes))
        self._commit(record)
        return self._answer(succeed((record.serial, result)))

    def _commit(self, record: ChangeRecord) -> None:
        self._log.append(record)
        self._serial, self._lastTime = record.serial, record.time
        for key, value in record.changes.items():
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = copy.deepcopy(value)
        for callback in list(self._subscribers):
            callback(record)

    def applyChange(self, record: ChangeRecord) -> Deferred[int]:
        if (down := self._down()) is not None:
            return down
        if record.serial != self.currentSerial() + 1:
            return self._answer(fail(SerialMismatch(f"change {record.serial} cannot follow serial {self.currentSerial()}")))
        changes = {k: None if v is None else _copy(v) for k, v in record.changes.items()}
        self._commit(ChangeRecord(record.serial, record.time, changes))
        return self._answer(succeed(record.serial))

    def changesSince(self, serial: int, limit: int) -> Deferred[list[ChangeRecord]]:
        if (down := self._down()) is not None:
            return down
        if serial < self._oldest:
            return self._answer(fail(HistoryPruned(serial, self._oldest)))
        return self._answer(succeed([copy.deepcopy(r) for r in self._log if r.serial > serial][:limit]))

    def oldestKeptSerial(self) -> Deferred[int]:
        if (down := self._down()) is not None:
            return down
        return self._answer(succeed(self._oldest))

    def pruneHistory(self, keepFrom: int, olderThan: float | None = None) -> Deferred[int]:
        if (down := self._down()) is not None:
            return down
        keepFrom = min(keepFrom, self._serial)
        if olderThan is not None:
            before = [r.serial for r in self._log if r.time <= olderThan]
            keepFrom = min(keepFrom, before[-1] if before else self._oldest)
        if keepFrom <= self._oldest:
            return self._answer(succeed(0))
        base = self._stateAsOf(keepFrom)
        # Counted as the other backends count: of the entries up to keepFrom
        # (one per key alive at the old horizon, one per change since), one
        # per key alive at keepFrom is kept.
        dropped = sum(len(r.changes) for r in self._log if r.serial <= keepFrom)
        removed = len(self._base) + dropped - len(base)
        self._base, self._oldest = base, keepFrom
        self._log = [r for r in self._log if r.serial > keepFrom]
        return self._answer(succeed(removed))

    def applySnapshot(self, serial: int, time: float, state: dict[str, Any]) -> Deferred[int]:
        if (down := self._down()) is not None:
            return down
        if serial <= self._serial:
            return self._answer(fail(SerialMismatch(f"a snapshot at {serial} cannot follow serial {self._serial}")))
        new = {k: _copy(v) for k, v in state.items()}
        changes = {k: v for k, v in new.items() if self._state.get(k) != v}
        changes.update({k: None for k in self._state if k not in new})
        self._state, self._base, self._log = copy.deepcopy(new), new, []
        self._oldest, self._serial, self._lastTime = serial, serial, time
        record = ChangeRecord(serial, time, changes)
        for callback in list(self._subscribers):
            callback(record)
        return self._answer(succeed(serial))

    def subscribe(self, callback: Callable[[ChangeRecord], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def referencedBlobs(self) -> Deferred[set[str]]:
        if (down := self._down()) is not None:
            return down
        return self._answer(succeed({ref for ref in map(blobRef, self._state.values()) if ref}))

    def isBlobReferenced(self, sha256: str) -> Deferred[bool]:
        if (down := self._down()) is not None:
            return down
        return self._answer(succeed(any(blobRef(v) == sha256 for v in self._state.values())))

    def close(self) -> Deferred[None]:
        self.closed = True
        return self._answer(succeed(None))


@implementer(IBlobWriter)
class _MemoryBlobWriter:
    def __init__(self, store: "MemoryBlobStore", extraHashes: tuple[str, ...]) -> None:
        self._store = store
        self._buffer = io.BytesIO()
        self._hashes = newHashes(extraHashes)
        self._info: BlobInfo | None = None

    def write(self, data: bytes) -> Deferred[None]:
        if (down := self._store._down()) is not None:
            return down
        if self._info is not None:
            return self._store._answer(fail(ValueError("write after close")))
        self._buffer.write(data)
        for h in self._hashes.values():
            h.update(data)
        return self._store._answer(succeed(None))

    def _close(self) -> BlobInfo:
        if self._info is None:
            digests = {name: h.hexdigest() for name, h in self._hashes.items()}
            self._info = BlobInfo(digests["sha256"], len(self._buffer.getvalue()), digests)
        return self._info

    def close(self) -> Deferred[BlobInfo]:
        if (down := self._store._down()) is not None:
            return down
        return self._store._answer(succeed(self._close()))

    def read(self, function: Callable[[Any], T]) -> Deferred[T]:
        if (down := self._store._down()) is not None:
            return down
        try:
            return self._store._answer(succeed(function(io.BytesIO(self._buffer.getvalue()))))
        except Exception as e:
            return self._store._answer(fail(e))

    def commit(self) -> Deferred[BlobInfo]:
        if (down := self._store._down()) is not None:
            return down
        info = self._close()
        self._store.stored(info.sha256, self._buffer.getvalue())
        return self._store._answer(succeed(info))

    def abort(self) -> Deferred[None]:
        return self._store._answer(succeed(None))


@implementer(IBlobReader)
class _MemoryBlobReader(BytesReader):
    """
    An open blob of the memory store: not a local file (no C{fileno}), as
    a bucket's object is not, and its reads fail while the store is
    unavailable.
    """

    def __init__(self, store: "MemoryBlobStore", data: bytes) -> None:
        super().__init__(data, store._later)
        self._store = store

    def _startRead(self, size: int, position: int) -> "Deferred[bytes]":
        if self._store.unavailable:
            return self._store._answer(fail(_unreachable("object store")))
        return super()._startRead(size, position)


@implementer(IBlobStore)
class MemoryBlobStore:
    """
    L{IBlobStore} in a dict from sha256 to bytes; C{storedAt} and C{retired}
    play the part of the file store's modification times and trash.

    @param later: delivers every answer, and runs each read of an opened
        blob (at once by default); one that answers later makes the store
        behave as one across the network.
    """

    def __init__(self, later: RunFile = maybeDeferred) -> None:
        self._later = later
        self._answer = _answerWith(later)
        self.blobs: dict[str, bytes] = {}
        self.storedAt: dict[str, float] = {}
        self.retired: dict[str, tuple[bytes, float]] = {}
        self.unavailable = False  # on: every operation fails with StorageUnavailable

    def _down(self) -> "Deferred[Any] | None":
        """The failure every operation answers while the bucket is unreachable."""
        return self._answer(fail(_unreachable("object store"))) if self.unavailable else None

    def stored(self, sha256: str, data: bytes) -> None:
        if sha256 in self.retired:
            data = self.retired.pop(sha256)[0]
        self.blobs.setdefault(sha256, data)
        self.storedAt[sha256] = time.time()

    def _restore(self, sha256: str) -> bool:
        if sha256 not in self.retired:
            return False
        self.blobs[sha256] = self.retired.pop(sha256)[0]
        return True

    def openWriter(self, extraHashes: tuple[str, ...] = ()) -> _MemoryBlobWriter:
        return _MemoryBlobWriter(self, tuple(extraHashes))

    def open(self, sha256: str) -> Deferred[Any]:
        if (down := self._down()) is not None:
            return down
        self._restore(sha256)
        data = self.blobs.get(sha256)
        return self._answer(succeed(None if data is None else _MemoryBlobReader(self, data)))

    def exists(self, sha256: str) -> Deferred[bool]:
        if (down := self._down()) is not None:
            return down
        return self._answer(succeed(sha256 in self.blobs or self._restore(sha256)))

    def delete(self, sha256: str) -> Deferred[None]:
        if (down := self._down()) is not None:
            return down
        self.blobs.pop(sha256, None)
        self.retired.pop(sha256, None)
        return self._answer(succeed(None))

    def deleteUnreferenced(self, referenced: set[str]) -> Deferred[int]:
        if (down := self._down()) is not None:
            return down
        for digest in [d for d in self.retired if d in referenced]:
            self._restore(digest)
        gone = [d for d in self.blobs if d not in referenced]
        for digest in gone:
            del self.blobs[digest]
        removed = len(gone) + len(self.retired)
        self.retired.clear()
        return self._answer(succeed(removed))

    def collect(self, referenced: set[str], now: float, grace: float) -> Deferred[CollectResult]:
        if (down := self._down()) is not None:
            return down
        restored = deleted = retired = 0
        for digest, (_, retiredAt) in list(self.retired.items()):
            if digest in referenced:
                restored += self._restore(digest)
            elif retiredAt <= now - grace:
                del self.retired[digest]
                deleted += 1
        for digest in [d for d in self.blobs if d not in referenced]:
            if self.storedAt.get(digest, 0.0) <= now - grace:
                self.retired[digest] = (self.blobs.pop(digest), now)
                retired += 1
        return self._answer(succeed(CollectResult(retired=retired, restored=restored, deleted=deleted)))


@implementer(IPresigningBlobStore)
class PresigningMemoryBlobStore(MemoryBlobStore):
    """
    A memory blob store that signs URLs, as an S3 bucket does; C{signed}
    records every signing as C{(sha256, filename, contentType, expires)}.
    The URL is a fake: nothing answers it.
    """

    base = "https://bucket.test/blobs/"

    def __init__(self, later: RunFile = maybeDeferred) -> None:
        super().__init__(later)
        self.signed: list[tuple[str, str, str, int]] = []

    def presignedURL(self, sha256: str, filename: str, contentType: str, expires: int) -> str:
        self.signed.append((sha256, filename, contentType, expires))
        return f"{self.base}{sha256}?filename={filename}&expires={expires}&signature=fake"
