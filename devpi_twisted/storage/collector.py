# -*- test-case-name: tests.test_collector -*-
"""
The blob collector: while the server runs, file contents that nothing refers
to any more (deleted releases, overwritten volatile uploads, removed indexes)
are retired and, one interval later, removed, so the disk is given back
without a restart.

Each pass reads the digests that current values refer to, then lets the blob
store retire what is unreferenced and untouched for a whole interval and
remove what has been retired for one (L{IBlobStore.collect} says why content
stored again meanwhile is never lost).  Only the main process runs it, never
a C{--requests-only} worker, and only after the startup cleanup.
"""

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.storage import CollectResult

log = Logger()


class BlobCollector(Service):
    """Runs L{collectOnce} every C{interval} seconds once C{ready()} has fired."""

    def __init__(self, storage: IStorage, blobs: IBlobStore, clock: IReactorTime, interval: float,
                 ready: Callable[[], "Deferred[None]"] | None = None) -> None:
        self._storage = storage
        self._blobs = blobs
        self._clock = clock
        self._interval = interval
        self._ready = ready
        self._loop: LoopingCall | None = None
        self._passes: Deferred[Any] | None = None
        self.lastPass: float | None = None
        self.totals = CollectResult()

    def startService(self) -> None:
        super().startService()
        waiting = self._ready() if self._ready is not None else succeed(None)
        waiting.addCallback(lambda _: self._start())

    def _start(self) -> None:
        if not self.running:
            return
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self._safePass()))
        self._loop.clock = self._clock
        self._passes = self._loop.start(self._interval, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # A pass under way finishes (its file operations are short and each
        # leaves the store consistent); stopping waits for it.
        passes, self._passes = self._passes, None
        return passes

    async def _safePass(self) -> None:
        try:
            await self.collectOnce()
        except Exception:
            log.failure("blob collector: a pass failed; trying again in {interval} s", interval=self._interval)

    async def collectOnce(self) -> CollectResult:
        """One pass; what it did."""
        referenced = await self._storage.referencedBlobs()
        result: CollectResult = await self._blobs.collect(referenced, self._clock.seconds(), self._interval)
        self.lastPass = self._clock.seconds()
        self.totals = CollectResult(
            retired=self.totals.retired + result.retired,
            restored=self.totals.restored + result.restored,
            deleted=self.totals.deleted + result.deleted,
        )
        if result.retired or result.restored or result.deleted:
            log.info(
                "blob collector: {retired} unreferenced files retired, {deleted} removed, {restored} brought back",
                retired=result.retired, deleted=result.deleted, restored=result.restored,
            )
        return result
