"""
Mirror files: fetched on first request, streamed to the client while they
are written to the blob store, verified, and kept only when they match.

One upstream transfer per file however many clients ask at once: clients
that arrive before the first byte get the bytes live; later ones wait for the
stored copy.  The last chunk is held back until the hash is checked, so a
client never receives a complete body that failed verification (the
connection is aborted instead).  A client that goes away does not stop the
transfer for the others or for the cache.  Upstream is paused while the disk
or a live client is behind, so memory stays flat for any file size.

What a file request gets is one of the answers below (L{StoredFile},
L{LiveFile}, L{CoreMetadata}, L{LinkOnly}, L{Elsewhere}); a live client is
an L{ILiveSink}.  The web layer turns them into HTTP, so nothing here
knows of requests.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from devpi_twisted.errors import StorageUnavailable, UpstreamError
from devpi_twisted.interfaces import IBlobReader, IBlobStore, IBlobWriter
from devpi_twisted.model.upstream.common import UpstreamLink
from devpi_twisted.storage import BlobInfo
from devpi_twisted.mirror.upstream import UpstreamClient, UpstreamFailure, UpstreamMissing, redacted

log = Logger()

PENDING_LIMIT = 4 * 1024 * 1024
"""Bytes received but not yet written before upstream is paused."""


class VerificationFailed(UpstreamError):
    """Upstream's bytes do not match what its page advertised."""


@dataclass(frozen=True)
class FetchedFile:
    """A verified file, committed to the blob store."""

    blob: BlobInfo
    lastModified: str | None


@dataclass(frozen=True)
class StoredFile:
    """A file this server has, opened for reading (whoever sends it closes C{file})."""

    filename: str
    sha256: str
    size: int
    lastModified: str | None
    file: IBlobReader
    project: str | None = None  # for the download records


@dataclass(frozen=True)
class CoreMetadata:
    """The core metadata (PEP 658) of the distribution C{filename}."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class LinkOnly:
    """What upstream's page tells of a file not fetched (the asker wants no body)."""

    filename: str
    size: int | None


@dataclass(frozen=True)
class Elsewhere:
    """The file is to be had from upstream directly (C{mirror_use_external_urls})."""

    url: str


class ILiveSink(IConsumer):
    """
    Where a live transfer's bytes go.  The transfer registers itself as a
    streaming producer; the sink calls its C{stopProducing} when the reader
    goes away.
    """

    def finish() -> None:
        """Every byte was written and the file verified: the body is complete."""

    def abort() -> None:
        """The transfer failed: the reader must not take what it got as complete."""


@implementer(IPushProducer)
class _LiveClient:
    """A sink that receives the bytes as they arrive."""

    def __init__(self, fetch: "FileFetch", sink: ILiveSink) -> None:
        self.fetch = fetch
        self.sink = sink
        self.gone = False
        self.done: Deferred[None] = Deferred()
        sink.registerProducer(self, True)

    def _lost(self, reason: Failure) -> None:
        if not self.gone:
            self.gone = True
            self.fetch._resumeFor(self)
            if not self.done.called:
                self.done.callback(None)

    def pauseProducing(self) -> None:
        self.fetch._pauseFor(self)

    def resumeProducing(self) -> None:
        self.fetch._resumeFor(self)

    def stopProducing(self) -> None:
        self._lost(Failure(Exception("stopped")))

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.sink.write(data)

    def finish(self) -> None:
        if not self.gone:
            self.gone = True
            self.sink.unregisterProducer()
            self.sink.finish()
            self.done.callback(None)

    def abort(self, reason: Failure | None = None) -> None:
        """
        The reader must not take the body as complete.  A sink that can
        still answer otherwise (nothing sent yet) is told when our own
        storage is the reason (C{unavailable}), so its client hears so.
        """
        if not self.gone:
            self.gone = True
            self.sink.unregisterProducer()
            unavailable = getattr(self.sink, "unavailable", None)
            if reason is not None and reason.check(StorageUnavailable) and unavailable is not None:
                unavailable(reason.value)
            else:
                self.sink.abort()
            self.done.callback(None)


class FileFetch(Protocol):
    """One upstream transfer into the blob store, fanned out to live clients."""

    def __init__(self, link: UpstreamLink, writer: IBlobWriter, clock: IReactorTime, idleTimeout: float) -> None:
        self.link = link
        self._writer = writer
        self._clock = clock
        self._idleTimeout = idleTimeout
        self.result: Deferred[FetchedFile] = Deferred()
        self._waiters: list[Deferred[FetchedFile]] = []
        self.live: list[_LiveClient] = []
        self.started = False  # bytes have been sent to live clients
        self._held: bytes | None = None
        self._pausedBy: set[object] = set()
        self._writing: Deferred[None] | None = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._ended: Failure | None = None
        self._size = 0
        # The blob writer computes the sha256 off the reactor thread; other
        # advertised hashes (rare) are computed here as the bytes pass.
        self._checkSha256 = "sha256" in link.hashes
        self._verify = {name: hashlib.new(name) for name in link.hashes if name in ("md5", "sha384", "sha512")}
        self._timer: Any = None
        self._outcome: Any = None  # a FetchedFile or a Failure, once settled
        self.lastModified: str | None = None
        self.contentLength: int | None = None

    response: Any = None

    def begin(self) -> None:
        """
        Start receiving the body.  Called a reactor turn after the request
        that started the transfer attached itself, so it gets every byte.
        """
        if self.response is not None:
            response, self.response = self.response, None
            response.deliverBody(self)

    # waiting for the result without taking part in the stream

    def waitForResult(self) -> Deferred[FetchedFile]:
        """
        A Deferred of its own for the outcome; also when the transfer has
        already ended (a request may find it finished but not yet recorded).
        """
        waiter: Deferred[FetchedFile] = Deferred()
        if self._outcome is None:
            self._waiters.append(waiter)
        elif isinstance(self._outcome, Failure):
            waiter.errback(self._outcome)
        else:
            waiter.callback(self._outcome)
        return waiter

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        for waiter in self._waiters:
            if not waiter.called:
                waiter.errback(outcome) if isinstance(outcome, Failure) else waiter.callback(outcome)
        self._waiters = []
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    # flow control: upstream pauses while the disk or any live client is behind

    def _pauseFor(self, reason: object) -> None:
        if not self._pausedBy and self.transport is not None:
            self.transport.pauseProducing()
        self._pausedBy.add(reason)

    def _resumeFor(self, reason: object) -> None:
        self._pausedBy.discard(reason)
        if not self._pausedBy and self.transport is not None and self._ended is None:
            self.transport.resumeProducing()

    # the upstream body

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idleTimeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        stalled = [client for client in self.live if client in self._pausedBy and not client.gone]
        if stalled:
            # Upstream is quiet because live clients paused it: they are the
            # ones that stalled.  Drop them and carry on for the others and
            # for the cache.
            for client in stalled:
                log.warn("dropping a client that took no data of {filename} for {seconds} seconds",
                         filename=self.link.filename, seconds=self._idleTimeout)
                client.abort()
                self._resumeFor(client)
            self._timer = self._clock.callLater(self._idleTimeout, self._idle)
            return
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._ended is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idleTimeout)
        self._size += len(data)
        for h in self._verify.values():
            h.update(data)
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._writing is None:
            self._writeNext()
        elif self._pendingSize >= PENDING_LIMIT:
            # Upstream waits only when the disk is a few MiB behind, so
            # chunks are written in large batches rather than in lock-step.
            self._pauseFor("disk")
        # Live clients get everything but the newest chunk, held back until
        # the transfer is verified.
        if self._held is not None:
            for client in self.live:
                client.write(self._held)
        self._held = data
        self.started = True

    def _writeNext(self) -> None:
        if not self._pending:
            self._writing = None
            self._resumeFor("disk")
            if self._ended is not None:
                self._complete()
            return
        data = b"".join(self._pending)
        self._pending = []
        self._pendingSize = 0
        self._resumeFor("disk")
        self._writing = self._writer.write(data)
        self._writing.addCallbacks(lambda _: self._writeNext(), self._writeFailed)

    def _writeFailed(self, failure: Failure) -> None:
        self._writing = None
        if failure.check(StorageUnavailable):
            # The object store is down, not upstream: kept as it is (the
            # mirror logs it in one line, without a traceback).
            self._ended = failure
        else:
            log.failure("writing a mirror file failed", failure=failure)
            self._ended = Failure(UpstreamError(f"cannot store {self.link.filename}: {failure.getErrorMessage()}"))
        if self.transport is not None:
            self.transport.stopProducing()
        self._fail(self._ended)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.result.called or self._ended is not None:
            return
        if reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self._verifiable()):
            # PotentialDataLoss: upstream gave no length and closed the
            # connection; fine when the size or a hash can tell.
            self._ended = reason
            if self._writing is None:
                self._complete()
        else:
            self._ended = reason
            self._fail(Failure(UpstreamFailure(
                f"transfer of {self.link.filename} from {redacted(self.link.url)} broke off after "
                f"{self._size} bytes: {reason.getErrorMessage()}"
            )))

    def _verifiable(self) -> bool:
        return (self._checkSha256 or bool(self._verify) or self.contentLength is not None
                or self.link.size is not None)

    def _complete(self) -> None:
        Deferred.fromCoroutine(self._verifyAndCommit()).addErrback(self._fail)

    async def _verifyAndCommit(self) -> None:
        expected = self.contentLength if self.contentLength is not None else self.link.size
        if expected is not None and expected != self._size:
            raise UpstreamFailure(
                f"{self.link.filename}: upstream sent {self._size} bytes, expected {expected}"
            )
        closed = await self._writer.close()
        actual = {name: h.hexdigest() for name, h in self._verify.items()}
        if self._checkSha256:
            actual["sha256"] = closed.sha256
        for name, digest in sorted(actual.items()):
            if digest != self.link.hashes[name].lower():
                log.error(
                    "hash mismatch for {filename} from {url}: {algorithm} {actual}, advertised {expected}",
                    filename=self.link.filename, url=redacted(self.link.url), algorithm=name,
                    actual=digest, expected=self.link.hashes[name],
                )
                raise VerificationFailed(
                    f"{self.link.filename} from upstream does not match its advertised {name}; not stored"
                )
        info = await self._writer.commit()
        if self._held is not None:
            for client in self.live:
                client.write(self._held)
        for client in self.live:
            client.finish()
        self._settle(FetchedFile(info, self.lastModified))

    def _fail(self, failure: Failure) -> None:
        if self.result.called:
            return
        for client in self.live:
            client.abort(failure)
        self._writer.abort().addErrback(lambda f: log.failure("dropping a failed download", failure=f))
        self._settle(failure)


async def startFetch(upstream: UpstreamClient, blobs: IBlobStore, clock: IReactorTime,
                     link: UpstreamLink, mirrorURL: str | None = None) -> FileFetch:
    """
    Ask upstream for C{link}; the body flows once L{FileFetch.begin} is called.

    @param mirrorURL: the mirror's URL, for its credentials (same origin only).
    @raise UpstreamMissing: upstream does not have the file.
    @raise UpstreamFailure: upstream could not be reached or refused.
    """
    response = await upstream.openFile(link.url, mirrorURL)
    if response.code != 200:
        from devpi_twisted.mirror.pages import _discardBody

        _discardBody(response)
        error = UpstreamMissing if response.code in (404, 410) else UpstreamFailure
        raise error(f"{redacted(link.url)} answered {response.code}")
    fetch = FileFetch(link, blobs.openWriter(), clock, upstream.idleTimeout)
    lengths = response.headers.getRawHeaders(b"content-length")
    if lengths and lengths[-1].isdigit():
        fetch.contentLength = int(lengths[-1])
    modified = response.headers.getRawHeaders(b"last-modified")
    fetch.lastModified = modified[-1].decode("latin-1") if modified else None
    fetch.response = response
    return fetch


@dataclass(frozen=True)
class LiveFile:
    """
    A mirror file being fetched, whose bytes can still be followed from the
    first: C{attach} a sink, which gets them as they arrive and then
    C{finish} (verified) or C{abort}.
    """

    filename: str
    length: int | None
    sha256: str | None
    fetch: FileFetch
    project: str | None = None  # for the download records

    def attach(self, sink: ILiveSink) -> Deferred[None]:
        """Stream the transfer to C{sink}; fires when the sink is done with it."""
        client = _LiveClient(self.fetch, sink)
        self.fetch.live.append(client)
        return client.done


FileAnswer = StoredFile | LiveFile | CoreMetadata | LinkOnly | Elsewhere
"""What L{devpi_twisted.mirror.service.Mirrors.fileAnswer} gives."""
