"""
Documentation and tox results: serving a release's docs from its stored zip
(C{/user/index/project/version/+doc/...}, as devpi-web), downloading the zip
(C{+doczip}), and accepting tox results posted to a release file's URL.

A page is streamed out of the zip (L{devpi_twisted.storage.doczip} reads it
in the file threads) no faster than the client takes it: a small zip may
hold a page of hundreds of megabytes.
"""

import json
import mimetypes
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from devpi_twisted.services.auth import Authenticator
from devpi_twisted.errors import BadRequest, NotFound
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model.names import isValidProjectName, normalizeProject
from devpi_twisted.services.releases import Documentation
from devpi_twisted.storage.doczip import DocMember, DocZipReader, RunFile
from devpi_twisted.storage.readers import PiecePump
from devpi_twisted.model.identity import TOXRESULT_UPLOAD
from devpi_twisted.web.context import identityOf, requesterFor
from devpi_twisted.web.files import FileResponse
from devpi_twisted.web.pages import redirect
from devpi_twisted.web.responses import jsonBody
from devpi_twisted.web.server import DOC_CSP

MAX_TOXRESULT = 64 * 1024 * 1024

log = Logger()


def _readToxresult(content: BinaryIO) -> bytes:
    """A posted tox result's bytes, checked to be JSON (run off the reactor: it may be large)."""
    content.seek(0)
    raw = content.read(MAX_TOXRESULT + 1)
    if len(raw) > MAX_TOXRESULT:
        raise BadRequest("tox result larger than 64 MiB")
    try:
        json.loads(raw)
    except ValueError:
        raise BadRequest("tox result must be JSON")
    return raw


@implementer(IPushProducer)
class _MemberProducer:
    """
    Sends a documentation member as the transport asks for it: one chunk
    is read (in a file thread) at a time, and none while the transport is
    paused, so a client that does not read holds a few chunks, not the
    member.
    """

    def __init__(self, request: IRequest, member: DocMember) -> None:
        self._request = request
        self._member = member
        self._closed = False
        self._pump = PiecePump(member.read, request.write, self._ended, self._failed)

    def start(self) -> None:
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        self._pump.pump()

    def pauseProducing(self) -> None:
        self._pump.pause()

    def resumeProducing(self) -> None:
        self._pump.resume()

    def stopProducing(self) -> None:
        """The client went away: stop reading and close the zip."""
        self._pump.stop()
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._member.close()

    def _ended(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _failed(self, failure: Failure) -> None:
        log.failure("serving documentation member {name}", failure, name=self._member.name)
        self._close()
        # Headers promised the whole member: a cut connection, never a short body.
        channel = self._request.channel
        if channel is not None:
            self._request.unregisterProducer()
            channel.transport.abortConnection()


class _MemberResponse(Resource):
    """A one-off resource that streams an open member (see L{FileResponse})."""

    isLeaf = True

    def __init__(self, member: DocMember, etag: bytes) -> None:
        super().__init__()
        self._member = member
        self._etag = etag

    def render(self, request: IRequest) -> Any:
        member = self._member
        contentType, _ = mimetypes.guess_type(member.name)
        request.setHeader(b"Content-Type", (contentType or "application/octet-stream").encode("ascii"))
        # Docs are uploaded content: keep their scripts away from this origin.
        request.setHeader(b"Content-Security-Policy", DOC_CSP)
        request.setHeader(b"ETag", self._etag)
        # DocMember delivers exactly its declared size or fails (and the
        # connection is cut), so the declared size is a true length.
        request.setHeader(b"Content-Length", str(member.size).encode("ascii"))
        if request.method == b"HEAD" or member.size == 0 or request.channel is None:
            member.close()
            return b"" if request.channel is not None else NOT_DONE_YET
        _MemberProducer(request, member).start()
        return NOT_DONE_YET


class DocViews:
    """
    @param runFile: runs blocking file work (reading documentation zips and
        tox results) off the reactor: the storage runner's C{runFile}.
    """

    def __init__(self, storage: IStorage, blobs: IBlobStore, auth: Authenticator, docs: Documentation,
                 runFile: RunFile) -> None:
        self._runFile = runFile
        self._reader = DocZipReader(runFile)
        self._storage = storage
        self._blobs = blobs
        self._auth = auth
        self._docs = docs

    async def _entry(self, request: IRequest, user: str, index: str, name: str, version: str) -> dict[str, Any]:
        if not isValidProjectName(name):
            raise NotFound(f"no project {name!r}")
        project = normalizeProject(name)
        # Of the bases, only those the requester may read are looked through.
        entry = await self._docs.findDoc(user, index, project, version, lambda: identityOf(request, self._auth))
        if entry is None:
            raise NotFound(f"no documentation for {project} {version}")
        return entry

    async def doc(self, request: IRequest, user: str, index: str, name: str, version: str, path: str) -> Any:
        if not path:
            return redirect(request, request.path.decode("latin-1").rstrip("/") + "/index.html")
        entry = await self._entry(request, user, index, name, version)
        reader = await self._blobs.open(entry["sha256"])
        if reader is None:
            raise NotFound("documentation content is missing on this server")
        member = await self._reader.openMember(reader, path)
        if member is None:
            raise NotFound(f"no {path!r} in the documentation of {entry['project']} {entry['version']}")
        return _MemberResponse(member, b'"' + entry["sha256"].encode("ascii") + b'"')

    async def doczip(self, request: IRequest, user: str, index: str, name: str, version: str) -> Any:
        entry = await self._entry(request, user, index, name, version)
        file = await self._blobs.open(entry["sha256"])
        if file is None:
            raise NotFound("documentation content is missing on this server")
        return FileResponse(
            file=file, size=entry["size"], filename=entry["filename"],
            etag=b'"' + entry["sha256"].encode("ascii") + b'"', lastModified=entry.get("last_modified"),
            contentType=b"application/zip",
        )

    async def postToxresult(self, request: IRequest, user: str, index: str, relpath: str) -> bytes:
        """devpi-client's C{test}: attach a tox result (any JSON, stored verbatim) to a release file."""
        requester = await requesterFor(request, self._auth, TOXRESULT_UPLOAD, f"{user}/{index}")
        release = await self._docs.checkToxresultRights(requester, user, index, relpath)
        await requesterFor(request, self._auth, TOXRESULT_UPLOAD, f"{user}/{index}", release.get("project"))
        raw = await self._runFile(_readToxresult, request.content)
        writer = self._blobs.openWriter()
        try:
            await writer.write(raw)
            info = await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        stored = await self._docs.storeToxresult(requester, user, index, release, info)
        return jsonBody(request, result=f"{stored}#sha256={info.sha256}", type="toxresultpath")
