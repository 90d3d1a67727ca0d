"""
Threads owned by the storage service.

Blocking database and file work never runs on the reactor thread.  The
L{ThreadRunner} owns four pools: a single writer (so writes are serialised
without locks), parallel readers, file I/O, and network blob I/O (an object
store's requests wait on the network, so they get threads of their own and
never hold up local file work).  L{SynchronousRunner} runs
everything inline, for unit tests.
"""

from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Runner(Protocol):
    """Runs blocking callables and answers with Deferreds."""

    def runWrite(self, f: Callable[..., T], *args: Any) -> "Deferred[T]": ...

    def runRead(self, f: Callable[..., T], *args: Any) -> "Deferred[T]": ...

    def runFile(self, f: Callable[..., T], *args: Any) -> "Deferred[T]": ...

    def runBlob(self, f: Callable[..., T], *args: Any) -> "Deferred[T]": ...


class SynchronousRunner:
    """Runs each callable at once on the calling thread."""

    def runWrite(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return maybeDeferred(f, *args)

    runRead = runWrite
    runFile = runWrite
    runBlob = runWrite


class ThreadRunner(Service):
    """
    Owns the storage thread pools; started and stopped as a service.

    @param reactor: provides C{callFromThread}, to hand results back.
    """

    def __init__(self, reactor: Any, readers: int = 4, files: int = 4, blobs: int = 16) -> None:
        self._reactor = reactor
        self._writer = ThreadPool(1, 1, name="devpi-storage-writer")
        self._readers = ThreadPool(1, readers, name="devpi-storage-reader")
        self._files = ThreadPool(1, files, name="devpi-storage-files")
        self._blobs = ThreadPool(1, blobs, name="devpi-storage-blobs")
        self._pools = (self._writer, self._readers, self._files, self._blobs)
        self._started = False

    def start(self) -> None:
        """Start the pools; safe to call more than once."""
        if not self._started:
            self._started = True
            for pool in self._pools:
                pool.start()

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> None:
        super().stopService()
        if self._started:
            self._started = False
            for pool in self._pools:
                pool.stop()

    def runWrite(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._writer, f, *args)

    def runRead(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._readers, f, *args)

    def runFile(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._files, f, *args)

    def runBlob(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._blobs, f, *args)
