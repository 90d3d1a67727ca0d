# -*- test-case-name: tests.test_ops -*-
"""
Stopping in order: listeners, then requests in flight, then the rest.

Twisted's L{MultiService} stops all its children at once; the server needs
an order.  L{SequentialStopService} stops its children one after the other,
last started first, waiting for each: the web part (listening ports, then
L{DrainService} waiting for open requests) before the mirrors, the mirrors
before the storage, the storage before its threads.

L{ExitZeroOnSIGTERM}: after a SIGTERM, twistd re-raises the signal once the
reactor has stopped, so the process dies "killed by SIGTERM" even after a
clean shutdown.  systemd accepts that, but scripts and supervisors read a
non-zero status as a failure, so the server handles SIGTERM itself, the way
the reactor does (log, then stop the reactor from the signal handler via
C{callFromThread}), except that it does not record the signal for
re-raising: a clean shutdown then ends with exit status 0.  SIGINT keeps
Twisted's behaviour.
"""

import signal
from typing import Any, Callable

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()


class SequentialStopService(MultiService):
    """A L{MultiService} that stops its children one by one, in reverse order."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stopAll(list(reversed(list(self)))))

    async def _stopAll(self, services: list[IService]) -> None:
        for service in services:
            if not service.running:
                continue
            try:
                result = service.stopService()
                if isinstance(result, Deferred):
                    await result
            except Exception:
                log.failure("stopping {service} failed", service=service)


class DrainService(Service):
    """
    On stop: the listeners (stopped just before, as siblings started after
    this service) no longer accept; wait until the site's requests in flight
    are answered, for at most C{grace} seconds.
    """

    def __init__(self, site: Any, grace: float) -> None:
        self._site = site
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self._site.drain(self._grace)
        d.addCallback(lambda _: log.info("no requests in flight; stopping"))
        return d


class WebService(SequentialStopService):
    """
    The listeners and the drain: on stop, first every listener closes (at
    once), then the drain waits for the requests in flight (a L{DrainService},
    or a L{MultiService} of it and what stops meanwhile: C{--workers}' children).
    """

    def __init__(self, drain: IService) -> None:
        super().__init__()
        self._listeners = MultiService()
        self._listeners.setName("listeners")
        drain.setServiceParent(self)
        self._listeners.setServiceParent(self)

    def addListener(self, service: IService) -> None:
        service.setServiceParent(self._listeners)


class ExitZeroOnSIGTERM(Service):
    """
    Take over SIGTERM from the reactor once it runs, so that a clean
    shutdown exits 0 (see the module docstring).  Nothing happens unless the
    reactor installed its own SIGTERM handler (it does under twistd and
    twist; not when it runs without signal handlers, as in tests).

    @param reactor: provides C{callWhenRunning}, C{callFromThread}, C{stop}.
    @param installSignal: L{signal.signal}, or a fake in tests.
    @param getSignal: L{signal.getsignal}, or a fake in tests.
    """

    def __init__(self, reactor: Any, installSignal: Callable[..., Any] = signal.signal,
                 getSignal: Callable[[int], Any] = signal.getsignal) -> None:
        self._reactor = reactor
        self._installSignal = installSignal
        self._getSignal = getSignal
        self.installed = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        current = self._getSignal(signal.SIGTERM)
        if getattr(current, "__self__", None) is not self._reactor:
            return
        self._installSignal(signal.SIGTERM, self._onSIGTERM)
        self.installed = True

    def _onSIGTERM(self, number: int, frame: Any) -> None:
        log.info("Received SIGTERM, shutting down.")
        self._reactor.callFromThread(self._stop)

    _stopping = False

    def _stop(self) -> None:
        # A second SIGTERM while the first one's shutdown runs changes
        # nothing: the reactor stays "running" until it is done, and a
        # second stop() would raise ReactorNotRunning.
        if self._stopping or not self._reactor.running:
            return
        self._stopping = True
        self._reactor.stop()

