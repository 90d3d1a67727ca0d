"""
Project, version and file views: devpi's JSON read views, stored files and
their C{.metadata}, deletions, and yanking and project status (which devpi
does not have).
"""

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from devpi_twisted.services.auth import Authenticator
from devpi_twisted.config import ServerConfig
from devpi_twisted.errors import BadRequest, Gone, NotFound, UnsupportedMediaType, UpstreamError
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.model.attestations import provenanceObject
from devpi_twisted.model.names import isValidProjectName, normalizeProject
from devpi_twisted.model.negotiation import wantsJSONAPI
from devpi_twisted.services.queries import Queries, fileMeta, mirrorVersions
from devpi_twisted.services.releases import Releases
from devpi_twisted.model.identity import DEL_ENTRY, DEL_PROJECT, DEL_VERDATA, UPLOAD
from devpi_twisted.web.context import hasQueryFlag, identityOf, outsideURL, requesterFor
from devpi_twisted.web.files import FileRedirects, FileResponse, countDownload, metadataResponse
from devpi_twisted.web.storedfiles import KnownFiles
from devpi_twisted.web.headers import setSerial
from devpi_twisted.web.pages import redirect
from devpi_twisted.web.responses import jsonBody, readJSON, withLength


def _project(name: str) -> str:
    if not isValidProjectName(name):
        raise NotFound(f"no project {name!r}")
    return normalizeProject(name)


class ProjectViews:
    """Views below C{/user/index/}."""

    log = Logger()

    def __init__(self, config: ServerConfig, storage: IStorage, blobs: IBlobStore,
                 auth: Authenticator, releases: Releases, queries: Queries, mirrors: Any = None,
                 knownFiles: KnownFiles | None = None, mirrorFiles: Any = None,
                 runFile: Callable[..., Any] = maybeDeferred, redirects: FileRedirects | None = None,
                 downloads: Any = None) -> None:
        self._downloads = downloads  # counts what getFile sends
        self._runFile = runFile  # large JSON bodies are decoded off the reactor
        self._redirects = redirects
        self._queries = queries
        self._mirrors = mirrors
        self._mirrorFiles = mirrorFiles
        self._knownFiles = knownFiles
        self._config = config
        self._storage = storage
        self._blobs = blobs
        self._auth = auth
        self._releases = releases

    def _written(self, request: IRequest) -> None:
        setSerial(request, self._storage.currentSerial())

    async def getProject(self, request: IRequest, user: str, index: str, name: str) -> bytes:
        if not wantsJSONAPI(request.getHeader(b"accept")):
            raise UnsupportedMediaType(
                f"unsupported media type {request.getHeader(b'accept')!r}; "
                f"use Accept: application/json, or /{user}/{index}/+simple/{name}/"
            )
        project = _project(name)
        if project != name:
            return redirect(request, request.path.decode("latin-1").replace(name, project, 1))
        base = outsideURL(request, self._config.outsideURL)
        ignoreBases = hasQueryFlag(request, b"ignore_bases")
        result = await self._projectConfig(request, user, index, project, base, ignoreBases)
        return jsonBody(request, result=result, type="projectconfig")

    async def getVersion(self, request: IRequest, user: str, index: str, name: str, version: str) -> bytes:
        project = _project(name)
        base = outsideURL(request, self._config.outsideURL)
        versions = await self._projectConfig(request, user, index, project, base, ignoreBases=False)
        if version not in versions:
            raise NotFound(f"The version {version} of project {project} does not exist.")
        return jsonBody(request, result=versions[version], type="versiondata")

    async def _projectConfig(self, request: IRequest, user: str, index: str, project: str, base: str,
                             ignoreBases: bool) -> dict[str, Any]:
        """
        devpi's C{projectconfig}: the private stages' versions, then each
        mirror's, asked as the simple pages ask it (so C{mirror_cache_expiry}
        decides when upstream is asked again, and a project that appeared
        upstream since the last look is found).  Of the bases only those
        the requester may read count (who they are is found only when one
        is restricted).
        """
        collected = await self._queries.projectVersions(
            user, index, project, base, ignoreBases, lambda: identityOf(request, self._auth))
        for stage in collected.mirrors:
            if self._mirrors is None:
                continue
            try:
                files = await self._mirrors.projectFiles(stage, project, base + "/")
            except UpstreamError as e:
                if not collected.found:
                    raise
                # The private releases are there; answer with them alone.
                self.log.warn("leaving {mirror} out of {project}: {error}",
                              mirror=stage.name, project=project, error=e.message)
                continue
            if files is not None:
                collected.add(mirrorVersions(project, files))
        return collected.result()

    async def deleteProject(self, request: IRequest, user: str, index: str, name: str) -> bytes:
        project = _project(name)
        requester = await requesterFor(request, self._auth, DEL_PROJECT, f"{user}/{index}", project)
        await self._releases.deleteProject(requester, user, index, project, hasQueryFlag(request, b"force"))
        self._written(request)
        return jsonBody(request, message=f"project {project} deleted from stage {user}/{index}")

    async def deleteVersion(self, request: IRequest, user: str, index: str, name: str, version: str) -> bytes:
        project = _project(name)
        requester = await requesterFor(request, self._auth, DEL_VERDATA, f"{user}/{index}", project)
        await self._releases.deleteVersion(requester, user, index, project, version, hasQueryFlag(request, b"force"))
        self._written(request)
        return jsonBody(request, message=f"project {project} version {version!r} deleted")

    async def patchProject(self, request: IRequest, user: str, index: str, name: str) -> bytes:
        """C{{"status": "archived", "reason": "..."}}: the PEP 792 project status."""
        project = _project(name)
        body = await readJSON(request, self._runFile)
        if not isinstance(body, dict) or "status" not in body:
            raise BadRequest("expected a JSON object with 'status' (and optionally 'reason')")
        requester = await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}", project)
        await self._releases.setStatus(requester, user, index, project, body["status"], body.get("reason"))
        self._written(request)
        return jsonBody(request, message=f"status of {project} set to {body['status']}")

    async def patchVersion(self, request: IRequest, user: str, index: str, name: str, version: str) -> bytes:
        """C{{"yanked": true | "reason" | false}} for every file of a version (PEP 592)."""
        project = _project(name)
        yanked = await self._yankedValue(request)
        requester = await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}", project)
        changed = await self._releases.setYanked(requester, user, index, project, version, None, yanked)
        self._written(request)
        return jsonBody(request, message=f"{changed} files of {project} {version} changed")

    async def _yankedValue(self, request: IRequest) -> Any:
        body = await readJSON(request, self._runFile)
        if not isinstance(body, dict) or "yanked" not in body:
            raise BadRequest("expected a JSON object with 'yanked': true, a reason, or false")
        return body["yanked"]

    # files

    async def _entry(self, user: str, index: str, relpath: str) -> dict[str, Any]:
        return await self._queries.file(user, index, relpath)

    async def getFile(self, request: IRequest, user: str, index: str, relpath: str) -> Any:
        metadata = relpath.endswith(".metadata")
        target = relpath[: -len(".metadata")] if metadata else relpath
        serial = self._storage.currentSerial()
        entry, mirror, public = await self._queries.servedFile(user, index, target)
        if entry is None:
            if self._mirrorFiles is None:
                raise NotFound("no such file")
            return await self._mirrorFiles.answer(request, mirror, relpath)
        if metadata:
            return await self._coreMetadata(request, user, index, entry, mirror)
        if wantsJSONAPI(request.getHeader(b"accept")):
            return jsonBody(request, result=fileMeta(entry), type="releasefilemeta")
        # Only a public index's files are answered before routing (no read check there).
        known = self._knownFiles if public else None
        if self._redirects is not None:
            countDownload(self._downloads, request, user, index, entry["project"], entry["filename"])
            if known is not None:
                known.remember(request.path, entry, serial)
            return self._redirects.answer(request, entry["sha256"], entry["filename"])
        file = await self._blobs.open(entry["sha256"])
        if file is None:
            raise NotFound(f"content of {entry['filename']} is missing on this server")
        if known is not None:
            known.remember(request.path, entry, serial)
        countDownload(self._downloads, request, user, index, entry["project"], entry["filename"], entry["sha256"])
        return FileResponse(
            file=file, size=entry["size"], filename=entry["filename"],
            etag=b'"' + entry["sha256"].encode("ascii") + b'"',
            lastModified=entry.get("last_modified"),
        )

    async def getProvenance(self, request: IRequest, user: str, index: str, relpath: str) -> bytes:
        """The PEP 740 provenance object of a file uploaded with attestations."""
        entry = await self._entry(user, index, relpath)
        if not entry.get("attestations"):
            raise NotFound(f"no provenance for {entry['filename']}")
        uploader = next((log.get("who") for log in entry.get("log", []) if log.get("what") == "upload"), None)
        body = json.dumps(provenanceObject(entry["attestations"], uploader)).encode("utf-8")
        request.setHeader(b"Content-Type", b"application/vnd.pypi.integrity.v1+json")
        return withLength(request, body)

    async def _coreMetadata(self, request: IRequest, user: str, index: str, entry: dict[str, Any],
                            mirror: Stage | None) -> Any:
        data = await self._queries.coreMetadata(user, index, entry)
        if data is None:
            if mirror is not None and self._mirrorFiles is not None:
                return await self._mirrorFiles.answer(request, mirror, entry["relpath"].split("/+f/", 1)[1] + ".metadata")
            raise NotFound(f"no metadata found in {entry['filename']}")
        return metadataResponse(entry["filename"], data, entry.get("last_modified"))

    async def deleteFile(self, request: IRequest, user: str, index: str, relpath: str) -> bytes:
        entry = None
        try:
            entry = await self._entry(user, index, relpath)
        except (NotFound, Gone):
            pass  # the service gives the answer for a missing file
        requester = await requesterFor(request, self._auth, DEL_ENTRY, f"{user}/{index}",
                                       entry.get("project") if entry else None)
        deleted = await self._releases.deleteFile(requester, user, index, relpath, hasQueryFlag(request, b"force"))
        self._written(request)
        return jsonBody(request, message=f"package {deleted!r} deleted")

    async def patchFile(self, request: IRequest, user: str, index: str, relpath: str) -> bytes:
        """C{{"yanked": ...}} for one file."""
        yanked = await self._yankedValue(request)
        entry = await self._entry(user, index, relpath)
        requester = await requesterFor(request, self._auth, UPLOAD, f"{user}/{index}", entry["project"])
        await self._releases.setYanked(
            requester, user, index, entry["project"], None, entry["filename"], yanked
        )
        self._written(request)
        return jsonBody(request, message=f"{entry['filename']} yanked" if yanked else f"{entry['filename']} unyanked")
