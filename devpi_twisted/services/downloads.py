# -*- test-case-name: tests.test_downloads -*-
"""
Download records: when each file (private or mirrored) was last downloaded
and how often, for the retention rules and the mirror cache's eviction.

A download costs a dictionary update here, never a storage read or write:
what was counted is written in one transaction every L{FLUSH_SECONDS} at
most (and at stop), so a crash loses a few seconds of counts, no more.  The
records are keys of their own (L{devpi_twisted.model.keys.downloadKey}), so
a flush changes no file entry, simple page or ETag.

This also knows which blobs are being sent right now (L{transferring}), so
the mirror cache never evicts a file in the middle of its transfer.

On a replica (C{persist=False}) nothing is written: its storage belongs to
the follower, and a replica forwards nothing of this to its primary.  Its
downloads reach the listeners (nothing uses them there) and are dropped.
"""

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.errors import DevpiError
from devpi_twisted.interfaces import IStorage, IWriteTransaction
from devpi_twisted.model import keys

FLUSH_SECONDS = 5.0
"""The longest counted downloads wait before they are written."""

Listener = Callable[[str, str, str, str, float], None]
"""Told C{(user, index, project, filename, when)} of every download as it is counted."""


class DownloadCounter(Service):
    """Counts downloads in memory and writes them in batches."""

    log = Logger()

    def __init__(self, storage: IStorage, clock: IReactorTime, flushSeconds: float = FLUSH_SECONDS,
                 persist: bool = True) -> None:
        self._storage = storage
        self._clock = clock
        self._flushSeconds = flushSeconds
        self._persist = persist
        self._pending: dict[str, tuple[float, int]] = {}
        self._flushCall: Any = None
        self._active: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self.counted = 0  # downloads counted since start
        self.flushes = 0  # transactions written

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def count(self, user: str, index: str, project: str, filename: str) -> None:
        """One download of a file (a GET of its body, whole or a range)."""
        now = self._clock.seconds()
        self.counted += 1
        for listener in self._listeners:
            listener(user, index, project, filename, now)
        if not self._persist:
            return
        key = keys.downloadKey(user, index, project, filename)
        _, count = self._pending.get(key, (now, 0))
        self._pending[key] = (now, count + 1)
        if self._flushCall is None:
            self._flushCall = self._clock.callLater(self._flushSeconds, self._flush)

    # blobs being sent

    def transferring(self, sha256: str, done: "Deferred[Any]") -> None:
        """The blob C{sha256} is being sent until C{done} fires (either way)."""
        self._active[sha256] = self._active.get(sha256, 0) + 1

        def finished(result: Any) -> None:
            left = self._active.get(sha256, 1) - 1
            if left > 0:
                self._active[sha256] = left
            else:
                self._active.pop(sha256, None)

        done.addBoth(finished)

    def isTransferring(self, sha256: str) -> bool:
        return sha256 in self._active

    # writing

    def _flush(self) -> "Deferred[None]":
        """Write every pending record in one transaction, adding to what is stored."""
        self._flushCall = None
        pending, self._pending = self._pending, {}
        if not pending:
            return succeed(None)

        def write(txn: IWriteTransaction) -> None:
            for key, (last, count) in pending.items():
                stored = txn.get(key) or {}
                txn.set(key, {"last": max(last, stored.get("last", 0)), "count": stored.get("count", 0) + count})

        def written(_: Any) -> None:
            self.flushes += 1

        def failed(failure: Any) -> None:
            # Kept for the next flush: storage trouble loses no counts.
            for key, (last, count) in pending.items():
                newer, more = self._pending.get(key, (last, 0))
                self._pending[key] = (max(last, newer), count + more)
            if self._pending and self._flushCall is None and self.running:
                self._flushCall = self._clock.callLater(self._flushSeconds, self._flush)
            if failure.check(DevpiError):
                self.log.warn("download counts not written, kept for the next try: {error}", error=failure.value)
            else:
                self.log.failure("writing download counts", failure)

        return self._storage.write(write).addCallbacks(written, failed)

    def flushNow(self) -> "Deferred[None]":
        """Write pending records at once (stop, tests)."""
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        return self._flush()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.flushNow()
