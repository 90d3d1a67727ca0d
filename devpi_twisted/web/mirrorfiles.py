# -*- test-case-name: tests.test_mirror -*-
"""
Mirror files as HTTP: turns what the mirror answers for a file it does not
have stored yet (L{devpi_twisted.mirror.files.FileAnswer}) into responses:
a stored file with its ETag, Range and HEAD handling; a live transfer
streamed to the request, cut off if it fails verification; a redirect to
upstream; or the headers alone for a HEAD.
"""

from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from devpi_twisted.mirror.files import (
    CoreMetadata, Elsewhere, FileAnswer, ILiveSink, LinkOnly, LiveFile, StoredFile,
)
from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.web.errors import renderDevpiError
from devpi_twisted.web.files import (
    IMMUTABLE, FileRedirects, FileResponse, contentTypeFor, countDownload, metadataResponse,
)


class MirrorFileSource(Protocol):
    """What the file routes need of the mirror coordinator."""

    async def fileAnswer(self, stage: Stage, relpath: str, wantBody: bool = True) -> FileAnswer:
        """See L{devpi_twisted.mirror.service.Mirrors.fileAnswer}."""


class MirrorFileAnswers:
    """Answers file requests of mirror indexes for files not stored here yet."""

    def __init__(self, mirrors: MirrorFileSource, redirects: FileRedirects | None = None,
                 downloads: Any = None) -> None:
        self._mirrors = mirrors
        self._redirects = redirects
        self._downloads = downloads

    async def answer(self, request: IRequest, stage: Stage, relpath: str) -> Any:
        answer = await self._mirrors.fileAnswer(stage, relpath, request.method != b"HEAD")
        if isinstance(answer, (StoredFile, LiveFile)) and answer.project is not None:
            countDownload(self._downloads, request, stage.user, stage.index, answer.project, answer.filename,
                          answer.sha256 if isinstance(answer, StoredFile) else None)
        return respond(request, answer, self._redirects)


def respond(request: IRequest, answer: FileAnswer, redirects: FileRedirects | None = None) -> Any:
    """
    The response (bytes or a resource for Klein to render) for a mirror's
    answer; a stored file goes by C{redirects} (C{--s3-redirect}) if given.
    """
    if isinstance(answer, StoredFile) and redirects is not None:
        answer.file.close().addErrback(lambda f: None)  # nothing was read; nothing to lose
        return redirects.answer(request, answer.sha256, answer.filename)
    if isinstance(answer, StoredFile):
        return FileResponse(file=answer.file, size=answer.size, filename=answer.filename,
                            etag=b'"' + answer.sha256.encode("ascii") + b'"', lastModified=answer.lastModified)
    if isinstance(answer, LiveFile):
        return _LiveResponse(answer)
    if isinstance(answer, CoreMetadata):
        return metadataResponse(answer.filename, answer.data)
    if isinstance(answer, LinkOnly):
        request.setHeader(b"Content-Type", contentTypeFor(answer.filename))
        if answer.size is not None:
            request.setHeader(b"Content-Length", str(answer.size).encode("ascii"))
        return b""
    if isinstance(answer, Elsewhere):
        request.setResponseCode(302)
        request.setHeader(b"Location", answer.url.encode("utf-8"))
        return b""
    raise TypeError(f"not a mirror file answer: {answer!r}")


class _LiveResponse(Resource):
    """Starts streaming a running transfer to the request when rendered."""

    isLeaf = True

    def __init__(self, live: LiveFile) -> None:
        super().__init__()
        self._live = live

    def render(self, request: IRequest) -> Any:
        live = self._live
        request.setHeader(b"Content-Type", contentTypeFor(live.filename))
        if live.length is not None:
            request.setHeader(b"Content-Length", str(live.length).encode("ascii"))
        if live.sha256:
            request.setHeader(b"ETag", b'"' + live.sha256.encode("ascii") + b'"')
            request.setHeader(b"Cache-Control", IMMUTABLE)
        request.setHeader(b"X-Accel-Buffering", b"no")
        if request.channel is not None:  # else the client left while the transfer started
            live.attach(RequestSink(request))
        return NOT_DONE_YET


@implementer(ILiveSink)
class RequestSink:
    """
    A request as the sink of a live transfer.  Bytes go straight to
    C{request.write} (no layer of ours per chunk); the transfer's producer
    is stopped when the client goes away.
    """

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self.write = request.write
        self.unregisterProducer = request.unregisterProducer
        self.finish = request.finish

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)
        self._request.notifyFinish().addErrback(lambda _: producer.stopProducing())

    def unavailable(self, error: StorageUnavailable) -> None:
        """
        Our storage failed while storing the file: a 503 with C{Retry-After}
        while nothing was sent yet, else a broken connection.
        """
        request = self._request
        if request.startedWriting or request.finished or request.channel is None:
            self.abort()
            return
        for name in (b"Content-Length", b"ETag", b"Cache-Control", b"X-Accel-Buffering"):
            request.responseHeaders.removeHeader(name)
        body = renderDevpiError(request, Failure(error))
        request.write(body)
        request.finish()

    def abort(self) -> None:
        """Break the connection: the client must not take the body as complete."""
        transport = getattr(self._request.channel, "transport", None)
        if transport is not None:
            if hasattr(transport, "abortConnection"):
                transport.abortConnection()
            else:
                transport.loseConnection()
