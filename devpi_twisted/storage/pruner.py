# -*- test-case-name: tests.test_history -*-
"""
The history pruner: the storage keeps every older value for reads "as of
serial N" and the changelog, which only replicas catching up (the feed),
event subscribers (each derives events from the state just before a
change) and nothing else need.  Without pruning the database only grows,
even when the state does not (a volatile file overwritten, a mirror page
refreshed).

Each pass keeps the history of the last C{keep} seconds, and everything
after the oldest position any event subscriber still has to go through;
the rest is pruned (L{devpi_twisted.interfaces.IStorage.pruneHistory}).
A replica further behind than that starts over from a snapshot.  The
main process runs it (a primary's or a replica's, never a
C{--requests-only} worker), after the startup cleanup.
"""

from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from devpi_twisted.interfaces import IStorage

log = Logger()


class HistoryPruner(Service):
    """
    Runs L{pruneOnce} every C{interval} seconds once C{ready()} has fired.

    @param keep: seconds of history always kept.
    @param needed: functions that each answer the oldest serial their
        reader still needs to read as of (and the changes after), or
        C{None} when it needs none; nothing at or after the smallest is
        pruned.
    """

    def __init__(self, storage: IStorage, clock: IReactorTime, interval: float, keep: float,
                 needed: Iterable[Callable[[], int | None]] = (),
                 ready: Callable[[], "Deferred[Any]"] | None = None) -> None:
        self._storage = storage
        self._clock = clock
        self._interval = interval
        self._keep = keep
        self._needed = list(needed)
        self._ready = ready
        self._loop: LoopingCall | None = None
        self._passes: Deferred[Any] | None = None
        self.lastPass: float | None = None
        self.removed = 0

    def addNeeded(self, needed: Callable[[], int | None]) -> None:
        """One more reader whose position limits pruning."""
        self._needed.append(needed)

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
        # A pass under way finishes its current short transaction; stopping waits for it.
        passes, self._passes = self._passes, None
        return passes

    async def _safePass(self) -> None:
        try:
            await self.pruneOnce()
        except Exception:
            log.failure("history pruner: a pass failed; trying again in {interval} s", interval=self._interval)

    def keepFrom(self) -> int:
        """The oldest serial the readers still need (the current one when none needs older)."""
        serial = self._storage.currentSerial()
        for needed in self._needed:
            position = needed()
            if position is not None:
                serial = min(serial, position)
        return serial

    async def pruneOnce(self) -> int:
        """One pass; the number of history entries removed."""
        keepFrom = self.keepFrom()
        removed: int = await self._storage.pruneHistory(keepFrom, self._clock.seconds() - self._keep)
        self.lastPass = self._clock.seconds()
        self.removed += removed
        if removed:
            log.info("history pruner: {removed} older values removed; history kept from serial {oldest}",
                     removed=removed, oldest=await self._storage.oldestKeptSerial())
        return removed
