"""
The legacy upload API (twine, uv publish, poetry, pdm, devpi-client):
C{POST /user/index/} with C{:action=file_upload}.

The body was parsed while it arrived (L{devpi_twisted.web.uploadform}),
its file part written once, into a blob writer; the view checks and
completes the upload.  Every check runs before the blob is committed; a
refused upload stores nothing.  Errors carry their message in the reason
phrase too, because twine shows only that.

L{UploadGate} runs earlier, when the head of an upload has arrived: it gives
the request the receiver that parses its body, and for a large body checks
the credentials and the index's upload permission from the headers, so an
upload that would be refused is answered 401/403 before its body is read,
and no anonymous client can fill the disk.
"""

import json
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, ensureDeferred
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from devpi_twisted.services.auth import Authenticator
from devpi_twisted.errors import BadRequest, DevpiError, Unauthorized
from devpi_twisted.interfaces import IBlobStore
from devpi_twisted.model import distfile
from devpi_twisted.model.archive import checkConsistency, inspectArchive
from devpi_twisted.model.attestations import checkAttestations
from devpi_twisted.model.doczip import DocLimits, checkDocZip
from devpi_twisted.model.names import isValidProjectName
from devpi_twisted.model.names import checkVersion, normalizeProject
from devpi_twisted.services.releases import Documentation, Releases, UploadedFile
from devpi_twisted.storage import newHashes
from devpi_twisted.model.identity import UPLOAD
from devpi_twisted.web.context import hasCredentials, requesterFor
from devpi_twisted.web.headers import contentTypeOf
from devpi_twisted.web.limits import SPOOL_THRESHOLD, LimitedRequest
from devpi_twisted.web.responses import withLength
from devpi_twisted.web.uploadform import (
    DIGEST_FIELDS, FORM_TYPES, MultipartReceiver, UploadForm, UrlencodedReceiver, formReceiver,
)

READ_SIZE = 1024 * 1024


def _hashFile(file: Any, names: list[str]) -> dict[str, str]:
    """Digests the client sent after the file part, computed from the stored bytes."""
    hashers = {name: h for name, h in newHashes(tuple(names)).items() if name in names}
    while chunk := file.read(READ_SIZE):
        for h in hashers.values():
            h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


class UploadGate:
    """
    The site's body gate for uploads, C{POST /user/index/} with a form
    body: gives the request a receiver that parses the body as it arrives,
    and decides from the head whether a body of at least C{minSize} bytes
    (or chunked) may come in.  The requester found here is kept
    on the request (L{requesterOf}), so the view does not check the password
    again; the view still checks the permission, which may change meanwhile.

    @param urlMap: the routes' map, to find the index route as the routes do.
    """

    def __init__(self, auth: Authenticator, releases: Releases, blobs: IBlobStore, urlMap: Map,
                 endpoint: str = "index", minSize: int = SPOOL_THRESHOLD) -> None:
        self._auth = auth
        self._releases = releases
        self._blobs = blobs
        self._adapter = urlMap.bind("localhost", "/")
        self._endpoint = endpoint
        self._minSize = minSize

    def __call__(self, request: IRequest, length: int | None) -> "Deferred[None] | None":
        if request.method != b"POST" or contentTypeOf(request.getHeader(b"content-type")) not in FORM_TYPES:
            return None
        try:
            endpoint, values = self._adapter.match(
                unquote((request.path or b"").decode("utf-8", "replace")), method="POST")
        except HTTPException:
            return None
        if endpoint != self._endpoint or any(str(v).startswith("+") for v in values.values()):
            return None
        if isinstance(request, LimitedRequest):
            request.bodyReceiver = formReceiver(self._blobs, request.getHeader(b"content-type"),
                                                pause=request.pauseBody, resume=request.resumeBody)
        if length is not None and length < self._minSize:
            return None
        return ensureDeferred(self._check(request, values["user"], values["index"]))

    async def _check(self, request: IRequest, user: str, index: str) -> None:
        # the project is in the body: an API token's projects are checked by the view
        requester = await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}")
        await self._releases.checkCanUpload(requester, user, index)


class UploadViews:
    """Accepts uploads into private indexes."""

    log = Logger()

    def __init__(self, auth: Authenticator, releases: Releases, blobs: IBlobStore,
                 docs: Documentation | None = None, docLimits: DocLimits = DocLimits()) -> None:
        self._auth = auth
        self._releases = releases
        self._blobs = blobs
        self._docs = docs
        self._docLimits = docLimits

    async def submit(self, request: IRequest, user: str, index: str) -> bytes:
        try:
            return await self._submit(request, user, index)
        except DevpiError as error:
            error.reasonPhrase = True  # type: ignore[attr-defined]
            raise

    async def _submit(self, request: IRequest, user: str, index: str) -> bytes:
        requester = await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}")
        try:
            config = await self._releases.checkCanUpload(requester, user, index)
        except Unauthorized as error:
            if requester is None and hasCredentials(request):
                error.message = "the user name or password is wrong (or the login token expired)"
            raise
        form = await self._readForm(request)
        try:
            name = form.first("name")
            if name and isValidProjectName(name):
                # what an API token's projects allow is known only now
                await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}", normalizeProject(name))
            action = form.first(":action")
            if action == "file_upload":
                await self._fileUpload(request, requester, user, index, config, form)
            elif action == "submit":
                await self._register(requester, user, index, form)
            elif action == "doc_upload":
                await self._docUpload(requester, user, index, form)
            elif action:
                raise BadRequest(f"action {action!r} not supported")
            else:
                raise BadRequest("the form has no ':action' field")
        finally:
            if form.writer is not None:
                await form.writer.abort()
        request.setResponseCode(200)
        return withLength(request, b"")

    async def _readForm(self, request: IRequest) -> UploadForm:
        """
        The form the body carried.  Through the site it was parsed while it
        arrived (L{UploadGate}); a request that came another way (an
        in-memory test request) has its body in C{content}, fed at once.
        """
        receiver = getattr(request, "bodyReceiver", None)
        if not isinstance(receiver, (MultipartReceiver, UrlencodedReceiver)):
            receiver = formReceiver(self._blobs, request.getHeader(b"content-type"))
            request.content.seek(0)
            receiver.feed(request.content.read())
        return await receiver.finish()

    async def _register(self, requester: str | None, user: str, index: str, form: UploadForm) -> None:
        metadata = distfile.parseUploadMetadata(form.fields)
        name = str(metadata["name"])
        await self._releases.register(
            requester, user, index, normalizeProject(name), name, str(metadata["version"]), metadata
        )

    async def _fileUpload(self, request: IRequest, requester: str | None, user: str, index: str,
                          config: dict[str, Any], form: UploadForm) -> None:
        if form.writer is None or not form.filename:
            raise BadRequest("content file field not found")
        metadata = distfile.parseUploadMetadata(form.fields)
        name, version = str(metadata["name"]), str(metadata["version"])
        filename = form.filename
        distfile.checkFilename(filename, name, version)
        if config.get("pypi_strict"):
            distfile.checkStrict(filename, name, version)
        info = await form.writer.close()
        digests = {field: form.first(field) for field in DIGEST_FIELDS}
        hashes = dict(info.hashes)
        late = [name for field, name in DIGEST_FIELDS.items() if digests[field] and name not in hashes]
        if late:
            hashes.update(await form.writer.read(lambda f: _hashFile(f, late)))
        distfile.checkDigests(digests, hashes)
        archive = await form.writer.read(lambda f: inspectArchive(filename, f))
        checkConsistency(filename, name, version, archive)
        attestations = self._attestations(form)
        if attestations is not None:
            checkAttestations(attestations, filename, info.sha256)
        present = frozenset(distfile.presentMetadataKeys(form.fields))
        metadata.pop("protocol_version", None)
        project = normalizeProject(name)
        await self._releases.checkNoConflict(user, index, project, filename, info.sha256)
        await form.writer.commit()
        form.writer = None
        stored = await self._releases.storeFile(requester, user, index, UploadedFile(
            filename=filename,
            project=project,
            displayName=archive.name or name,
            version=version,
            metadata=metadata,
            presentKeys=present,
            blob=info,
            coreMetadata=archive.metadataBytes if filename.endswith(".whl") else None,
            attestations=attestations,
        ))
        self.log.info(
            "{what} {filename} ({size} bytes, sha256 {sha256}) to {index} by {who}",
            what="stored" if stored else "identical re-upload of",
            filename=filename, size=info.size, sha256=info.sha256,
            index=f"{user}/{index}", who=requester,
        )

    async def _docUpload(self, requester: str | None, user: str, index: str, form: UploadForm) -> None:
        """A documentation zip for a release (devpi-client's C{upload --with-docs})."""
        if self._docs is None:
            raise BadRequest("documentation uploads are not enabled")
        if form.writer is None:
            raise BadRequest("content file field not found")
        name = form.first("name")
        if not name or not isValidProjectName(name):
            raise BadRequest("doc_upload needs a valid 'name'")
        project = normalizeProject(name)
        given = form.first("version") or None
        if given is not None:
            checkVersion(given)
        version = await self._docs.docVersion(user, index, project, given)
        info = await form.writer.close()
        files = await form.writer.read(lambda f: checkDocZip(f, self._docLimits))
        await self._docs.checkNoConflict(user, index, project, version, info.sha256)
        await form.writer.commit()
        form.writer = None
        stored = await self._docs.storeDoc(requester, user, index, project, name, version, info)
        self.log.info(
            "{what} documentation of {project} {version} ({files} files) to {index} by {who}",
            what="stored" if stored else "identical re-upload of", project=project, version=version,
            files=files, index=f"{user}/{index}", who=requester,
        )

    @staticmethod
    def _attestations(form: UploadForm) -> list[Any] | None:
        raw = form.first("attestations")
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            raise BadRequest("'attestations' is not valid JSON")
        if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
            raise BadRequest("'attestations' must be a JSON array of attestation objects")
        return value
