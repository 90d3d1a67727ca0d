"""
Serving stored files: stable URLs, strong ETags, immutable caching, HEAD and
single byte ranges, and never a C{Content-Encoding} (a C{.tar.gz} is the file
itself; a client that decompressed it would fail its hash check).
"""

import errno
import hashlib
import mimetypes
import os
import re
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.storage.readers import BytesReader
from devpi_twisted.interfaces import ILocalBlobReader, IPresigningBlobStore

CHUNK = 256 * 1024
# The most one connection sends with sendfile before the others get a turn
# (nginx's sendfile_max_chunk serves the same end).
SENDFILE_SLICE = 4 * 1024 * 1024
IMMUTABLE = b"max-age=365000000, immutable, public"
_RANGE = re.compile(rb"^bytes=(\d*)-(\d*)$")
# os.sendfile's shape: (socket fd, file fd, offset, count) -> bytes sent.
Sendfile = Callable[[int, int, int, int], int]
# sendfile(2) refusing the file (some FUSE and network file systems), not the socket.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
SYSTEM_SENDFILE: Sendfile | None = getattr(os, "sendfile", None)

log = Logger()


def contentTypeFor(filename: str) -> bytes:
    if filename.endswith(".whl"):
        return b"application/zip"
    if filename.endswith((".tar.gz", ".tgz")):
        return b"application/gzip"
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return (guessed or "application/octet-stream").encode("ascii")


def directSocket(transport: object) -> socket.socket | None:
    """
    The connection's own socket when bytes may be written to it directly:
    plain TCP (or a Unix socket), not TLS, whose handle is a TLS connection
    object, and not an HTTP/2 stream, which has no handle.
    """
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None or ISSLTransport.providedBy(transport):
        return None
    try:
        handle = getHandle()
    except (AttributeError, NotImplementedError):
        return None
    return handle if isinstance(handle, socket.socket) else None


def _closeReader(reader: Any) -> None:
    reader.close().addErrback(lambda f: log.failure("closing a stored file", f))


@implementer(IPushProducer)
class _FileProducer:
    """
    Sends C{length} bytes of an open blob (an L{IBlobReader}) from
    C{offset}, paced by the transport.

    On a plain socket a local blob (L{ILocalBlobReader}) goes mostly with
    C{sendfile(2)}: the kernel copies it from the page cache, and Python
    never holds it.  That is only safe while the transport's own buffer is
    empty, so the bytes stay in order; the transport tells us exactly that
    when it resumes us after it paused us (it resumes a paused producer
    only once everything it held is written).  So every stretch of
    C{sendfile} begins after such a resume, and when the socket is full the
    next piece goes through the transport, large enough to make it pause
    us again.  Elsewhere (TLS, a blob that is not a local file, a file
    system without C{sendfile}) the blob is read with the reader's
    asynchronous reads, the next piece read while the last one is written.
    """

    def __init__(self, request: IRequest, reader: Any, offset: int, length: int,
                 sendfile: Sendfile | None) -> None:
        self._request = request
        self._reader: Any = reader
        self._offset = offset
        self._remaining = length
        self._paused = False
        self._looping = False
        self._reading = False
        self._ready: bytes | None = None
        transport = request.channel.transport
        self._socket = directSocket(transport) if sendfile is not None else None
        local = self._socket is not None and ILocalBlobReader.providedBy(reader)
        self._fileno = reader.fileno() if local else None
        self._sendfile = sendfile if self._fileno is not None else None
        # A piece written through the transport must exceed its buffer, or
        # it would not pause us, and we would never learn when it is empty.
        self._handoffSize = getattr(transport, "bufferSize", 65536) + 1

    def start(self) -> None:
        self._request.registerProducer(self, True)
        # The channel pauses a producer registered while its transport is
        # full; the transport's resume then starts us.
        if not self._paused:
            self._produce(transportEmpty=False)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        transportEmpty = self._paused
        self._paused = False
        self._produce(transportEmpty)

    def stopProducing(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            _closeReader(reader)

    def _produce(self, transportEmpty: bool) -> None:
        # A loop, not recursion: a reader that answers at once would
        # otherwise recurse once per piece.
        if self._looping:
            return
        self._looping = True
        try:
            while not self._paused and self._reader is not None:
                if self._ready is not None:
                    data, self._ready = self._ready, None
                    self._readAhead()
                    self._request.write(data)
                elif self._remaining <= 0:
                    if not self._reading:
                        self._finish()
                    return
                elif self._sendfile is not None:
                    if transportEmpty:
                        if not self._sendDirect():
                            return
                        transportEmpty = False
                    elif not self._writePiece():
                        return
                else:
                    self._readAhead()
                    if self._ready is None:
                        return  # the piece arrives later
        finally:
            self._looping = False

    def _readAhead(self) -> None:
        """Ask the reader for the next piece, unless one is on its way or waiting."""
        if self._reading or self._ready is not None or self._remaining <= 0 or self._reader is None:
            return
        self._reading = True
        self._reader.seek(self._offset)
        self._reader.read(min(CHUNK, self._remaining)).addCallbacks(self._gotPiece, self._readFailed)

    def _gotPiece(self, data: bytes) -> None:
        self._reading = False
        if self._reader is None:
            return
        if not data:
            log.error("stored file shorter than its recorded size; connection aborted")
            self._abort()
            return
        self._offset += len(data)
        self._remaining -= len(data)
        self._ready = data
        self._produce(transportEmpty=False)

    def _readFailed(self, failure: Any) -> None:
        self._reading = False
        if self._reader is None:
            return
        if failure.check(StorageUnavailable):
            log.warn("reading a stored file failed ({error}); connection aborted", error=failure.getErrorMessage())
        else:
            log.failure("reading a stored file; connection aborted", failure)
        self._abort()

    def _sendDirect(self) -> bool:
        """
        C{sendfile} until the socket is full, C{SENDFILE_SLICE} bytes are
        sent, or the file is; C{False} if the connection is gone.  The slice
        keeps one fast client from holding the reactor for a whole file:
        the piece handed to the transport after it waits for the next turn.
        """
        assert self._socket is not None and self._fileno is not None and self._sendfile is not None
        budget = SENDFILE_SLICE
        while self._remaining > 0 and budget > 0:
            try:
                sent = self._sendfile(self._socket.fileno(), self._fileno, self._offset,
                                      min(self._remaining, budget))
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError as error:
                if error.errno in _NO_SENDFILE:
                    log.info("sendfile unavailable for this file ({error}); writing through the transport",
                             error=error)
                    self._sendfile = None
                    return True
                self._abort()
                return False
            if sent == 0:
                # The file ended early: the client must not take a short
                # body for the whole file.
                log.error("stored file shorter than its recorded size; connection aborted")
                self._abort()
                return False
            self._offset += sent
            self._remaining -= sent
            budget -= sent
            self._request.sentLength += sent
        return True

    def _writePiece(self) -> bool:
        """
        The piece that fills the transport between two stretches of
        C{sendfile}: read from the page cache as C{sendfile} reads it, with
        no thread hop per piece.
        """
        assert self._fileno is not None
        data = os.pread(self._fileno, min(self._handoffSize, self._remaining), self._offset)
        if not data:
            log.error("stored file shorter than its recorded size; connection aborted")
            self._abort()
            return False
        self._offset += len(data)
        self._remaining -= len(data)
        self._request.write(data)
        return True

    def _abort(self) -> None:
        """Cut the connection: the client must see a failed transfer, never a short body."""
        self.stopProducing()
        channel = self._request.channel
        if channel is not None:
            self._request.unregisterProducer()
            channel.transport.abortConnection()

    def _finish(self) -> None:
        self.stopProducing()
        self._request.unregisterProducer()
        self._request.finish()


def _parseRange(header: bytes, size: int) -> tuple[int, int] | None | bool:
    """C{(start, end)} inclusive; C{None} to ignore; C{False} if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if match is None or size == 0 and match.group(1):
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            return False
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return False
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def etagMatches(request: IRequest, etag: bytes) -> bool:
    """Whether the request's If-None-Match names C{etag} (or C{*})."""
    header = request.getHeader(b"if-none-match")
    if not header:
        return False
    tags = [t.strip() for t in header.split(b",")]
    return etag in tags or b"*" in tags


def serveBytesOrFile(request: IRequest, *, file: Any, size: int, filename: str, etag: bytes,
                     lastModified: str | None, contentType: bytes | None = None,
                     sendfile: Sendfile | None = SYSTEM_SENDFILE) -> Any:
    """
    Answer a GET or HEAD for an immutable stored file, honouring
    If-None-Match, Range and If-Range.  C{file} is an open
    L{IBlobReader}, closed when done.
    C{sendfile} (C{None} to never use it) sends the body on plain sockets.
    """
    request.setHeader(b"Content-Type", contentType or contentTypeFor(filename))
    request.setHeader(b"ETag", etag)
    request.setHeader(b"Cache-Control", IMMUTABLE)
    request.setHeader(b"Accept-Ranges", b"bytes")
    if lastModified:
        request.setHeader(b"Last-Modified", lastModified.encode("ascii"))
    if etagMatches(request, etag):
        _closeReader(file)
        request.setResponseCode(304)
        request.responseHeaders.removeHeader(b"Content-Type")
        return b""
    start, length = 0, size
    rangeHeader = request.getHeader(b"range")
    ifRange = request.getHeader(b"if-range")
    if rangeHeader and (not ifRange or ifRange == etag or ifRange == (lastModified or "").encode("ascii")):
        parsed = _parseRange(rangeHeader, size)
        if parsed is False:
            _closeReader(file)
            request.setResponseCode(416)
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            request.setHeader(b"Content-Length", b"0")
            return b""
        if parsed:
            start, end = parsed
            length = end - start + 1
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (start, end, size))
    request.setHeader(b"Content-Length", str(length).encode("ascii"))
    if request.method == b"HEAD" or length == 0:
        _closeReader(file)
        return b""
    if request.channel is None:
        # The client went away while the file was looked up.
        _closeReader(file)
        return NOT_DONE_YET
    _FileProducer(request, file, start, length, sendfile).start()
    return NOT_DONE_YET


class FileResponse(Resource):
    """
    A one-off resource that streams a file; Klein renders a returned resource,
    which lets the answer stay open while the producer runs.
    """

    isLeaf = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._kwargs = kwargs

    def render(self, request: IRequest) -> Any:
        return serveBytesOrFile(request, **self._kwargs)


PRESIGNED_EXPIRES = 300
"""Seconds a presigned URL of C{--s3-redirect} stays valid."""


class FileRedirects:
    """
    C{--s3-redirect}: a stored file is answered with a redirect to a
    short-lived presigned URL of the blob store, which then serves the
    bytes (and ranges) itself.  The redirect must not outlive the URL, so
    it is never cached.
    """

    def __init__(self, blobs: Any, expires: int = PRESIGNED_EXPIRES) -> None:
        self._blobs = blobs
        self._expires = expires

    def answer(self, request: IRequest, sha256: str, filename: str) -> bytes:
        url = self._blobs.presignedURL(sha256, filename, contentTypeFor(filename).decode("ascii"), self._expires)
        request.setResponseCode(302)
        request.setHeader(b"Location", url.encode("utf-8"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"0")
        return b""


def fileRedirects(redirect: bool, blobs: Any) -> FileRedirects | None:
    """The redirects to presigned URLs, if asked for and the blob store can sign them."""
    if redirect and IPresigningBlobStore.providedBy(blobs):
        return FileRedirects(blobs)
    return None


def countDownload(downloads: Any, request: IRequest, user: str, index: str, project: str, filename: str,
                  sha256: str | None = None) -> None:
    """
    A GET of a file's body (whole or a range; a HEAD is not one) counts as a
    download (L{devpi_twisted.services.downloads}); its blob C{sha256}, when
    given, is in use until the answer is done, so the mirror cache leaves it.
    """
    if downloads is None or request.method == b"HEAD":
        return
    downloads.count(user, index, project, filename)
    if sha256:
        downloads.transferring(sha256, request.notifyFinish())


def metadataResponse(distFilename: str, data: bytes, lastModified: str | None = None) -> "FileResponse":
    """A wheel's core metadata (PEP 658) as the file C{NAME.whl.metadata}."""
    return FileResponse(
        file=BytesReader(data), size=len(data), filename=distFilename + ".metadata",
        etag=b'"' + hashlib.sha256(data).hexdigest().encode("ascii") + b'"',
        lastModified=lastModified, contentType=b"text/plain; charset=utf-8",
    )
