"""
The storage as a service of the process: cleaned up after an interrupted run
when the server starts, closed (and the server directory unlocked) when it
stops, and shared with C{--requests-only} workers.
"""

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from devpi_twisted.app.serverdir import ServerDir


class StorageService(Service):
    """
    Cleans up after an interrupted run on start; closes the store on stop.

    With a C{clock}, it also shares the directory with C{--requests-only}
    workers: the cleanup runs only while no worker does (and keeps them
    from starting meanwhile), and once workers are seen the storage follows
    their commits.  A worker (C{requestsOnly}) runs no cleanup and follows
    the other processes' commits from the start, as does every process on a
    storage other nodes share (C{storage.sharedByNodes}).
    """

    log = Logger()

    def __init__(self, serverdir: ServerDir, storage: Any, blobs: Any, clock: Any = None,
                 requestsOnly: bool = False) -> None:
        self._serverdir = serverdir
        self._storage = storage
        self._blobs = blobs
        self._clock = clock
        self._requestsOnly = requestsOnly
        self._workersCheck: Any = None
        self._ready = False
        self._readyWaiters: list[Deferred[None]] = []

    def whenReady(self) -> "Deferred[None]":
        """Fires once the startup cleanup is over (at once without one): storage may be written."""
        waiter: Deferred[None] = Deferred()
        if self._ready:
            waiter.callback(None)
        else:
            self._readyWaiters.append(waiter)
        return waiter

    def _setReady(self) -> None:
        self._ready = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _recover(self) -> None:
        referenced = await self._storage.referencedBlobs()
        removed = await self._blobs.deleteUnreferenced(referenced)
        if removed:
            self.log.warn(
                "startup cleanup removed {removed} unfinished or unreferenced files from {path}",
                removed=removed, path=self._serverdir.path.path,
            )
        self.log.info(
            "storage ready at serial {serial} in {path}",
            serial=self._storage.currentSerial(), path=self._serverdir.path.path,
        )

    def startService(self) -> None:
        super().startService()
        if self._clock is not None and getattr(self._storage, "sharedByNodes", False):
            # Other nodes write to this storage whether or not workers run here.
            self._followOthers()
        if self._requestsOnly:
            self._setReady()
            self._followOthers()
            self.log.info("requests-only worker on {path} at serial {serial}: serving requests, no background jobs",
                          path=self._serverdir.path.path, serial=self._storage.currentSerial())
            return
        if self._clock is not None and not self._serverdir.holdOutWorkers():
            self.log.info("requests-only workers are running on {path}: no startup cleanup this time",
                          path=self._serverdir.path.path)
            self._setReady()
            self._followOthers()
            return
        d = Deferred.fromCoroutine(self._recover())
        d.addErrback(lambda f: self.log.failure("startup cleanup failed", failure=f))
        d.addCallback(lambda _: self._setReady())
        if self._clock is not None:
            d.addCallback(lambda _: self._watchForWorkers())

    def _watchForWorkers(self) -> None:
        from twisted.internet.task import LoopingCall

        self._serverdir.releaseWorkers()
        if not self.running:
            return
        self._workersCheck = LoopingCall(self._checkWorkers)
        self._workersCheck.clock = self._clock
        self._workersCheck.start(0.2, now=True)  # one flock(2) call: cheap

    def _checkWorkers(self) -> None:
        if self._serverdir.workersRunning():
            self.log.info("requests-only workers joined: following their commits")
            self._stopWorkersCheck()
            self._followOthers()

    def _stopWorkersCheck(self) -> None:
        check, self._workersCheck = self._workersCheck, None
        if check is not None and check.running:
            check.stop()

    def _followOthers(self) -> None:
        startWatching = getattr(self._storage, "startWatching", None)
        if startWatching is None:
            self.log.warn("this storage backend cannot follow other processes' commits; caches may be stale")
        else:
            startWatching(self._clock)

    def stopService(self) -> Any:
        super().stopService()
        self._stopWorkersCheck()
        d = self._storage.close()
        d.addBoth(lambda result: self._serverdir.unlock() or result)
        return d
