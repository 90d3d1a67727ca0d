"""
A mirror's project list, without holding upstream's whole list in memory.

Upstream's root page (hundreds of thousands of names for PyPI) is scanned as
it arrives and written to the blob store as one name per line; the list page
is rendered from that file, once per file (L{devpi_twisted.services.simple}).  It is refreshed after the index's
C{mirror_cache_expiry}; when upstream fails the last list is used, and
without any the locally cached project names stand in.
"""

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from devpi_twisted.model.coalesce import Coalescer
from devpi_twisted.interfaces import IBlobStore, IBlobWriter, IStorage, IWriteTransaction
from devpi_twisted.model.indexconfig import mirrorBaseURL
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.model.upstream.projectlist import ProjectListScanner
from devpi_twisted.storage import BLOB_REF
from devpi_twisted.mirror.pages import MirrorPages
from devpi_twisted.mirror.upstream import UpstreamClient, UpstreamFailure, redacted
from devpi_twisted.storage.threads import Runner

log = Logger()


def namesKey(stage: Stage) -> str:
    return f"mirrornames/{stage.user}/{stage.index}"


class _NamesReceiver(Protocol):
    """
    Scans the list as it arrives and writes the names.

    The scanning runs in C{runner} (a 64 KiB piece takes milliseconds), one
    piece at a time since the scanner has state; what arrives meanwhile is
    joined into the next piece.  Upstream is paused while a scan or a write
    is in flight, so neither the disk nor the scanner falls behind by more
    than what the connection had already read.
    """

    def __init__(self, scanner: ProjectListScanner, writer: IBlobWriter, clock: IReactorTime,
                 idleTimeout: float, runner: Runner) -> None:
        self._scanner = scanner
        self._writer = writer
        self._runner = runner
        self.done: Deferred[int] = Deferred()
        self.count = 0
        self._incoming: list[bytes] = []
        self._busy = False
        self._paused = False
        self._ended = False
        self._closed = False
        self._idleTimeout = idleTimeout
        self._timer: IDelayedCall | None = clock.callLater(idleTimeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self._stop()
        self._finish(Failure(UpstreamFailure(f"no data from upstream for {self._idleTimeout} seconds")))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._timer is not None:
            self._timer.reset(self._idleTimeout)
        self._incoming.append(data)
        if not self._busy:
            self._next()
        elif not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancelTimer()
        if self.done.called:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._finish(Failure(UpstreamFailure(f"project list broke off: {reason.getErrorMessage()}")))
            return
        self._ended = True
        if not self._busy:
            self._next()

    def _next(self) -> None:
        """Start the next scan, or let upstream go on, or finish."""
        if self.done.called:
            return
        if self._incoming:
            piece = b"".join(self._incoming)
            self._incoming = []
            scanned = self._runner.runFile(self._scanner.feed, piece)
        elif self._ended and not self._closed:
            self._closed = True
            scanned = self._runner.runFile(self._scanner.close)
        elif self._ended:
            self._busy = False
            self._finish(self.count)
            return
        else:
            self._busy = False
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resumeProducing()
            return
        self._busy = True
        scanned.addCallbacks(self._write, self._unreadable)

    def _write(self, names: list[str]) -> None:
        if self.done.called:
            return
        if not names:
            self._next()
            return
        self.count += len(names)
        written = self._writer.write("".join(name + "\n" for name in names).encode("utf-8"))
        written.addCallbacks(lambda _: self._next(), self._finish)

    def _unreadable(self, failure: Failure) -> None:
        if self.done.called:
            return
        self._stop()
        self._finish(Failure(UpstreamFailure(f"cannot read upstream's project list: {failure.getErrorMessage()}")))

    def _stop(self) -> None:
        if not self._ended and self.transport is not None:
            self.transport.stopProducing()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, result: Any) -> None:
        self._cancelTimer()
        if not self.done.called:
            self.done.callback(result) if not isinstance(result, Failure) else self.done.errback(result)


class MirrorNames:
    """Upstream project lists kept as files of names."""

    def __init__(self, storage: IStorage, blobs: IBlobStore, upstream: UpstreamClient, clock: IReactorTime,
                 pages: MirrorPages) -> None:
        self._storage = storage
        self._blobs = blobs
        self._upstream = upstream
        self._clock = clock
        self._pages = pages
        self._fetchedAt: dict[str, float] = {}
        self._refreshes: Coalescer[dict[str, Any] | None] = Coalescer()

    def _listed(self, stage: Stage) -> bool:
        # Only the names with cached pages are listed (by the caller) otherwise.
        return not (stage.config.get("mirror_no_project_list") or self._pages.offlineMode)

    def isFresh(self, stage: Stage) -> bool:
        """Whether the stored list may be used without asking upstream; no I/O."""
        fetchedAt = self._fetchedAt.get(stage.name)
        expiry = float(stage.config.get("mirror_cache_expiry", 1800))
        return self._listed(stage) and fetchedAt is not None and self._clock.seconds() - fetchedAt < expiry

    async def current(self, stage: Stage) -> dict[str, Any] | None:
        """The stored record of the mirror's list, fetched anew first when due, or C{None}."""
        if not self._listed(stage):
            return None
        key = namesKey(stage)
        stored = await self._storage.read(lambda view: view.get(key))
        fresh = stored is not None and self.isFresh(stage)
        status = self._pages.state(stage).status
        if not fresh and status.mayAskUpstream():
            current = stored
            stored = await self._refreshes.run(stage.name, lambda: self._refresh(stage, current))
        return stored

    async def openCurrent(self, stage: Stage) -> tuple[str, Any] | None:
        """The current list's content hash and an open L{IBlobReader} of its names, one per line; or C{None}."""
        stored = await self.current(stage)
        if stored is None:
            return None
        return stored[BLOB_REF], await self._blobs.open(stored[BLOB_REF])

    async def _refresh(self, stage: Stage, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        status = self._pages.state(stage).status
        url = mirrorBaseURL(stage.config)
        writer = self._blobs.openWriter()
        try:
            response = await self._upstream.openPage(url, stored.get("etag") if stored else None)
            if response.code == 304 and stored is not None:
                from devpi_twisted.mirror.pages import _discardBody

                _discardBody(response)
                status.succeeded()
                self._fetchedAt[stage.name] = self._clock.seconds()
                await writer.abort()
                return stored
            if response.code != 200:
                from devpi_twisted.mirror.pages import _discardBody

                _discardBody(response)
                raise UpstreamFailure(f"{redacted(url)} answered {response.code}")
            contentType = response.headers.getRawHeaders(b"content-type", [b""])[-1].decode("latin-1")
            receiver = _NamesReceiver(ProjectListScanner(contentType or None), writer, self._clock,
                                      self._upstream.idleTimeout, self._pages.parseRunner)
            response.deliverBody(receiver)
            count = await receiver.done
        except UpstreamFailure as e:
            await writer.abort()
            status.failed(str(e))
            log.warn("fetching the project list of {mirror} failed: {error}", mirror=stage.name, error=str(e))
            return stored
        status.succeeded()
        info = await writer.commit()
        etags = response.headers.getRawHeaders(b"etag")
        value = {BLOB_REF: info.sha256, "count": count, "etag": etags[-1].decode("latin-1") if etags else None}
        key = namesKey(stage)

        def _store(txn: IWriteTransaction) -> None:
            txn.set(key, value)

        await self._storage.write(_store)
        self._fetchedAt[stage.name] = self._clock.seconds()
        old = stored.get(BLOB_REF) if stored else None
        if old and old != info.sha256 and not await self._storage.isBlobReferenced(old):
            await self._blobs.delete(old)
        log.info("project list of {mirror}: {count} names", mirror=stage.name, count=count)
        return value
