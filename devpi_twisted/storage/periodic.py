"""
A background job that runs one pass every so often: the blob collector, the
history pruner and the retention schedule are each one.
"""

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class PeriodicService(Service):
    """
    Runs L{onePass} every C{interval} seconds (the first one an interval
    after start) once C{ready()} has fired - storage may not be written
    before the startup cleanup is over.  A failed pass is logged and the
    next one comes on schedule; stopping waits for a pass under way, which
    must be made of short steps that each leave the state consistent.
    """

    what = "a pass"  # for the log: "blob collector: a pass"

    def __init__(self, clock: IReactorTime, interval: float,
                 ready: Callable[[], "Deferred[Any]"] | None = None) -> None:
        self._clock = clock
        self._interval = interval
        self._ready = ready
        self._loop: LoopingCall | None = None
        self._passes: Deferred[Any] | None = None

    async def onePass(self) -> Any:
        raise NotImplementedError

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
        passes, self._passes = self._passes, None
        return passes

    async def _safePass(self) -> None:
        try:
            await self.onePass()
        except Exception:
            log.failure("{what} failed; trying again in {interval} s", what=self.what, interval=self._interval)
