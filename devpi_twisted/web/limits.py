"""
Request body limits, enforced while the body arrives, and where bodies wait.

twisted.web spools every request body before a resource sees it and has no
size limit of its own.  L{LimitedRequest} answers 413 as soon as the declared
C{Content-Length} (or, for chunked bodies, the bytes so far) exceeds the
limit, and closes the connection without reading the rest.  Large bodies
are spooled in C{spoolDirectory} (in the server directory) instead of the
system's temporary directory, which is often a RAM-backed tmpfs: a
multi-gigabyte upload must cost disk, not memory.  An upload's body is not
spooled at all: the site's body gate gives the request a C{bodyReceiver}
(L{devpi_twisted.web.uploadform}), which parses it as it arrives.

L{LimitedRequest.refuse} is the one way a request is answered before its
body is read (413 here, and the channel's 408 for a body that comes too
slowly, 503 for a connection given up for a newer one, 401/403 for an upload
its head already shows to be refused): it writes a complete answer with a
JSON message straight to the transport, since the request never reaches a
resource.
"""

import io
import tempfile
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request

from devpi_twisted.errors import diskFullError
from devpi_twisted.web.responses import rawAnswer
from devpi_twisted.web.uploadform import BodyReceiver

log = Logger()

# twisted.web keeps bodies below this many bytes in memory; larger ones
# (and chunked ones, whose size is unknown) are spooled to disk.
SPOOL_THRESHOLD = 100000
_IN_MEMORY = SPOOL_THRESHOLD


class LimitedRequest(Request):
    """
    A request whose body may not exceed C{maxBodySize} bytes.

    @ivar bodyReceiver: set (by the site's body gate) before the body comes,
        to take the body instead of C{content}, which stays empty.  It is
        discarded when the request is refused, cut off or finished, so what
        the view did not take is dropped.
    """

    maxBodySize: int | None = None
    extraHeaders: list[tuple[bytes, bytes]] = []
    spoolDirectory: str | None = None
    bodyReceiver: BodyReceiver | None = None

    bodyPaused = False
    """The server stopped reading the body (L{pauseBody}): its slowness is not the client's."""

    _refused = False
    _bodyComplete = False
    _refusedCode = 413
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if self.maxBodySize is not None and length is not None and length > self.maxBodySize:
            self._refuse()
            return
        if self.bodyReceiver is not None:
            self.content = io.BytesIO()
            return
        if self.spoolDirectory is not None and (length is None or length >= _IN_MEMORY):
            # Unnamed (or unlinked at once): a crash leaves nothing behind.
            try:
                self.content = tempfile.TemporaryFile(dir=self.spoolDirectory)
            except OSError as e:
                self._spoolFailed(e)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self.maxBodySize is not None and self._received > self.maxBodySize:
            self._refuse()
            return
        if self.bodyReceiver is not None:
            self.bodyReceiver.feed(data)
            return
        try:
            super().handleContentChunk(data)
        except OSError as e:
            self._spoolFailed(e)

    def _spoolFailed(self, error: OSError) -> None:
        """The body cannot be spooled (a full disk, most often): say so, keep nothing."""
        full = diskFullError(error)
        if full is None:
            log.error("cannot spool a request body in {directory}: {error}",
                      directory=self.spoolDirectory, error=str(error))
            self.refuse(500, "the server could not store the request body; nothing was stored")
            return
        log.warn("cannot spool a request body in {directory}: the disk is full", directory=self.spoolDirectory)
        self.refuse(full.status, full.message)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # A refused body can still end (a chunked one does): the 413 is the
        # answer, so the request must not reach the resource as well.
        if self._refused:
            return
        self._bodyComplete = True
        super().requestReceived(command, path, version)

    def pauseBody(self) -> None:
        """Stop reading the body for now (its receiver is behind)."""
        self.bodyPaused = True
        self.channel._networkProducer.pauseProducing()

    def resumeBody(self) -> None:
        """
        Read the body again, unless it is complete or refused: the channel
        then decides when to read (the next request, after this answer).
        """
        self.bodyPaused = False
        if not (self._bodyComplete or self._refused or self.channel._waitingForTransport):
            self.channel._networkProducer.resumeProducing()

    def _dropBody(self) -> None:
        if self.bodyReceiver is not None:
            self.bodyReceiver.discard()

    def finish(self) -> None:
        self._dropBody()
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        self._dropBody()
        super().connectionLost(reason)

    def _refuse(self) -> None:
        self.refuse(413, f"request body larger than the limit of {self.maxBodySize} bytes (--max-upload-size)")

    def refuse(self, status: int, message: str, headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
               reason: bytes | None = None, close: bool = True) -> None:
        """
        Answer C{status} now, before (the rest of) the body, and unless
        C{close} is false close the connection; what the client still sends
        is not read into the body.
        """
        if self._refused:
            return
        self._refused = True
        self._refusedCode = status
        self._dropBody()
        transport: Any = self.channel.transport
        transport.write(rawAnswer(status, message, list(headers) + self.extraHeaders, reason))
        if close:
            self.channel.loseConnection()


def limitedRequestFactory(maxBodySize: int, extraHeaders: list[tuple[bytes, bytes]],
                          base: type[LimitedRequest] = LimitedRequest,
                          spoolDirectory: str | None = None) -> type[LimitedRequest]:
    """A request class (a subclass of C{base}) with the configured limit, for C{Site.requestFactory}."""
    return type("ConfiguredRequest", (base,), {
        "maxBodySize": maxBodySize, "extraHeaders": list(extraHeaders), "spoolDirectory": spoolDirectory,
    })
