"""
File contents for a replica: every blob a change refers to is fetched from
the primary (C{GET /+blob/<sha256>}) and verified by its hash before the
change is applied, so a replica never has metadata pointing at a file it
lacks.

A transfer that does not hash to the digest it was asked for is dropped and
fetched again (with a growing delay); a primary that answers 404 no longer
has the blob (a later change removed it and the primary collected it), so
the change is applied without it and a later change will drop the entry.
Bodies are written to the blob store as they arrive; the primary's
connection is paused while the disk is behind, so memory stays flat.
"""

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from devpi_twisted.interfaces import IBlobStore, IBlobWriter
from devpi_twisted.replica.client import PrimaryClient, ReplicationError

log = Logger()

_HIGH_WATER = 1024 * 1024


class HashMismatch(ReplicationError):
    """The bytes received do not hash to the digest asked for."""


class _BlobReceiver(Protocol):
    """Writes a body to a blob writer, one write at a time, pausing the sender when behind."""

    def __init__(self, writer: IBlobWriter, clock: IReactorTime, idleTimeout: float) -> None:
        self._writer = writer
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._writing = False
        self._paused = False
        self._ended: Failure | None = None
        self._error: BaseException | None = None
        self._timer: Any = None
        self.done: Deferred[None] = Deferred(lambda d: self._fail(CancelledError("stopped")))

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idleTimeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self._fail(TimeoutError(f"no data from the primary for {self._idleTimeout} seconds"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idleTimeout)
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize > _HIGH_WATER and not self._paused:
            self._paused = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.transport.pauseProducing()
        self._pump()

    def _pump(self) -> None:
        if self._writing:
            return
        if self._error is not None and self._ended is not None:
            self._finish()
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending, self._pendingSize = [], 0
            if self._paused and self._ended is None:
                self._paused = False
                self._timer = self._clock.callLater(self._idleTimeout, self._idle)
                self.transport.resumeProducing()
            self._writing = True
            self._writer.write(data).addCallbacks(self._wrote, self._writeFailed)
        elif self._ended is not None:
            self._finish()

    def _wrote(self, _: Any) -> None:
        self._writing = False
        self._pump()

    def _writeFailed(self, failure: Failure) -> None:
        self._writing = False
        self._pending = []
        self._fail(failure.value)
        self._pump()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._ended = reason
        self._pump()

    def _finish(self) -> None:
        if self.done.called:
            return
        assert self._ended is not None
        if self._error is not None:
            self.done.errback(Failure(self._error))
        elif self._ended.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(self._ended)


class BlobFetcher:
    """
    Makes sure the blob store holds a blob the primary has.

    @param attempts: transfers of one blob before giving up (the change is
        then retried with the follower's back-off).
    @param retryDelay: seconds before the second attempt, doubling after.
    """

    def __init__(self, client: PrimaryClient, blobs: IBlobStore, clock: IReactorTime,
                 attempts: int = 3, retryDelay: float = 1.0) -> None:
        self._client = client
        self._blobs = blobs
        self._clock = clock
        self._attempts = attempts
        self._retryDelay = retryDelay
        self.fetched = 0
        self.missing = 0

    async def ensure(self, sha256: str) -> bool:
        """
        Fetch the blob unless it is stored already.

        @return: whether the blob is stored now (C{False}: the primary no
            longer has it).
        @raise ReplicationError: it could not be fetched intact.
        """
        if await self._blobs.exists(sha256):
            return True
        delay = self._retryDelay
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._fetch(sha256)
            except HashMismatch as e:
                log.warn("replica: {error} (attempt {attempt} of {attempts})",
                         error=str(e), attempt=attempt, attempts=self._attempts)
                if attempt == self._attempts:
                    raise
            await deferLater(self._clock, delay, lambda: None)
            delay *= 2
        raise AssertionError("unreachable")

    async def _fetch(self, sha256: str) -> bool:
        response = await self._client.get(f"/+blob/{sha256}")
        if response.code == 404:
            self._discard(response)
            self.missing += 1
            log.info("replica: the primary no longer has blob {sha256}; a later change drops its entry",
                     sha256=sha256)
            return False
        if response.code != 200:
            raise ReplicationError(await self._client.errorMessage(response))
        writer = self._blobs.openWriter()
        try:
            receiver = _BlobReceiver(writer, self._clock, self._client.idleTimeout)
            response.deliverBody(receiver)
            await receiver.done
            info = await writer.close()
            if info.sha256 != sha256:
                raise HashMismatch(f"blob {sha256} from the primary hashed to {info.sha256} ({info.size} bytes)")
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        self.fetched += 1
        return True

    @staticmethod
    def _discard(response: Any) -> None:
        response.deliverBody(_Discard())


class _Discard(Protocol):
    """Reads a body and forgets it."""

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        pass
