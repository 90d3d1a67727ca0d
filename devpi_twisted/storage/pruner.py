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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.interfaces import IStorage
from devpi_twisted.storage.periodic import PeriodicService

log = Logger()


class HistoryPruner(PeriodicService):
    """
    Runs L{pruneOnce} every C{interval} seconds once C{ready()} has fired.

    @param keep: seconds of history always kept.
    @param needed: functions that each answer the oldest serial their
        reader still needs to read as of (and the changes after), or
        C{None} when it needs none; nothing at or after the smallest is
        pruned.
    """

    what = "history pruner: a pass"

    def __init__(self, storage: IStorage, clock: IReactorTime, interval: float, keep: float,
                 needed: Iterable[Callable[[], int | None]] = (),
                 ready: Callable[[], "Deferred[Any]"] | None = None) -> None:
        super().__init__(clock, interval, ready)
        self._storage = storage
        self._keep = keep
        self._needed = list(needed)
        self.lastPass: float | None = None
        self.removed = 0

    def addNeeded(self, needed: Callable[[], int | None]) -> None:
        """One more reader whose position limits pruning."""
        self._needed.append(needed)

    def onePass(self) -> Any:
        # A pass under way finishes its current short transaction; stopping waits for it.
        return self.pruneOnce()

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
