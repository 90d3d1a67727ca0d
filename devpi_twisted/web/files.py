"""
Serving stored files: stable URLs, strong ETags, immutable caching, HEAD and
single byte ranges, and never a C{Content-Encoding} (a C{.tar.gz} is the file
itself; a client that decompressed it would fail its hash check).
"""

import mimetypes
import re
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPullProducer
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

CHUNK = 256 * 1024
IMMUTABLE = b"max-age=365000000, immutable, public"
_RANGE = re.compile(rb"^bytes=(\d*)-(\d*)$")


def contentTypeFor(filename: str) -> bytes:
    if filename.endswith(".whl"):
        return b"application/zip"
    if filename.endswith((".tar.gz", ".tgz")):
        return b"application/gzip"
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return (guessed or "application/octet-stream").encode("ascii")


@implementer(IPullProducer)
class _FileProducer:
    """Sends C{length} bytes of an open file when the transport asks."""

    def __init__(self, request: IRequest, file: BinaryIO, length: int) -> None:
        self._request = request
        self._file = file
        self._remaining = length

    def start(self) -> None:
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._file is None:
            return
        data = self._file.read(min(CHUNK, self._remaining))
        if data:
            self._remaining -= len(data)
            self._request.write(data)
        if not data or self._remaining <= 0:
            self._finish()

    def stopProducing(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None  # type: ignore[assignment]

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


def serveBytesOrFile(request: IRequest, *, file: BinaryIO, size: int, filename: str, etag: bytes,
                     lastModified: str | None, contentType: bytes | None = None) -> Any:
    """
    Answer a GET or HEAD for an immutable stored file, honouring
    If-None-Match, Range and If-Range.  Closes C{file} when done.
    """
    request.setHeader(b"Content-Type", contentType or contentTypeFor(filename))
    request.setHeader(b"ETag", etag)
    request.setHeader(b"Cache-Control", IMMUTABLE)
    request.setHeader(b"Accept-Ranges", b"bytes")
    if lastModified:
        request.setHeader(b"Last-Modified", lastModified.encode("ascii"))
    if etagMatches(request, etag):
        file.close()
        request.setResponseCode(304)
        request.responseHeaders.removeHeader(b"Content-Type")
        return b""
    start, length = 0, size
    rangeHeader = request.getHeader(b"range")
    ifRange = request.getHeader(b"if-range")
    if rangeHeader and (not ifRange or ifRange == etag or ifRange == (lastModified or "").encode("ascii")):
        parsed = _parseRange(rangeHeader, size)
        if parsed is False:
            file.close()
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
        file.close()
        return b""
    if start:
        file.seek(start)
    _FileProducer(request, file, length).start()
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
