"""
Documentation and tox results: serving a release's docs from its stored zip
(C{/user/index/project/version/+doc/...}, as devpi-web), downloading the zip
(C{+doczip}), and accepting tox results posted to a release file's URL.
"""

import mimetypes
from typing import Any

from twisted.web.iweb import IRequest

from ..auth import Authenticator
from ..errors import BadRequest, NotFound
from ..interfaces import IBlobStore, IReadView, IStorage
from ..model import keys
from ..model.doczip import readDocMember
from ..model.names import isValidProjectName, normalizeProject
from ..releases import Documentation, latestVersion
from ..simple import orderOf
from .context import requesterOf
from .files import FileResponse
from .pages import redirect
from .responses import jsonBody, withLength

MAX_DOC_MEMBER = 256 * 1024 * 1024
DOC_POLICY = b"sandbox allow-scripts allow-popups allow-forms; default-src 'self' 'unsafe-inline' data:"


def _findDoc(view: IReadView, user: str, index: str, project: str, version: str) -> dict[str, Any] | None:
    """The doczip entry of a release, looking through the index's private stages in order."""
    for stage in orderOf(view, user, index):
        if stage.isMirror:
            continue
        wanted = version
        if version in ("latest", "stable"):
            wanted = latestVersion(view, stage.user, stage.index, project)
            if wanted is None:
                continue
        entry = view.get(keys.fileKey(stage.user, stage.index, project, f"{project}-{wanted}.doc.zip"))
        if entry is not None:
            return entry
    return None


class DocViews:
    def __init__(self, storage: IStorage, blobs: IBlobStore, auth: Authenticator, docs: Documentation) -> None:
        self._storage = storage
        self._blobs = blobs
        self._auth = auth
        self._docs = docs

    async def _entry(self, user: str, index: str, name: str, version: str) -> dict[str, Any]:
        if not isValidProjectName(name):
            raise NotFound(f"no project {name!r}")
        project = normalizeProject(name)
        entry = await self._storage.read(lambda view: _findDoc(view, user, index, project, version))
        if entry is None:
            raise NotFound(f"no documentation for {project} {version}")
        return entry

    async def doc(self, request: IRequest, user: str, index: str, name: str, version: str, path: str) -> Any:
        if not path:
            return redirect(request, request.path.decode("latin-1").rstrip("/") + "/index.html")
        entry = await self._entry(user, index, name, version)
        file = await self._blobs.open(entry["sha256"])
        if file is None:
            raise NotFound("documentation content is missing on this server")
        with file:
            member = readDocMember(file, path, MAX_DOC_MEMBER)
        if member is None:
            raise NotFound(f"no {path!r} in the documentation of {entry['project']} {entry['version']}")
        memberName, data = member
        contentType, _ = mimetypes.guess_type(memberName)
        request.setHeader(b"Content-Type", (contentType or "application/octet-stream").encode("ascii"))
        # Docs are uploaded content: keep their scripts away from this origin.
        request.setHeader(b"Content-Security-Policy", DOC_POLICY)
        request.setHeader(b"ETag", b'"' + entry["sha256"].encode("ascii") + b'"')
        return withLength(request, data)

    async def doczip(self, request: IRequest, user: str, index: str, name: str, version: str) -> Any:
        entry = await self._entry(user, index, name, version)
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
        import json

        requester = await requesterOf(request, self._auth)
        release = await self._docs.checkToxresultRights(requester, user, index, relpath)
        request.content.seek(0)
        raw = request.content.read(64 * 1024 * 1024 + 1)
        if len(raw) > 64 * 1024 * 1024:
            raise BadRequest("tox result larger than 64 MiB")
        try:
            json.loads(raw)
        except ValueError:
            raise BadRequest("tox result must be JSON")
        writer = self._blobs.openWriter()
        try:
            await writer.write(raw)
            info = await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        stored = await self._docs.storeToxresult(requester, user, index, release, info)
        return jsonBody(request, result=f"{stored}#sha256={info.sha256}", type="toxresultpath")
