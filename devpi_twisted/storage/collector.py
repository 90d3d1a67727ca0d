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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.storage import CollectResult
from devpi_twisted.storage.periodic import PeriodicService

log = Logger()


class BlobCollector(PeriodicService):
    """Runs L{collectOnce} every C{interval} seconds once C{ready()} has fired."""

    what = "blob collector: a pass"

    def __init__(self, storage: IStorage, blobs: IBlobStore, clock: IReactorTime, interval: float,
                 ready: Callable[[], "Deferred[None]"] | None = None) -> None:
        super().__init__(clock, interval, ready)
        self._storage = storage
        self._blobs = blobs
        self.lastPass: float | None = None
        self.totals = CollectResult()

    def onePass(self) -> Any:
        # A pass under way finishes (its file operations are short and each
        # leaves the store consistent); stopping waits for it.
        return self.collectOnce()

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
