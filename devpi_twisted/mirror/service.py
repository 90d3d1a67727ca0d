"""
The mirror coordinator: what simple pages and file requests need of mirror
indexes.  It holds the per-mirror status machines (through L{MirrorPages}),
shares file transfers between requests, and records verified files in
storage so later requests are served from disk like private files.
"""

import base64
import hashlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from devpi_twisted.model.coalesce import Coalescer
from devpi_twisted.errors import NotFound, StorageUnavailable, UpstreamError
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.model.names import normalizeProject
from devpi_twisted.model.simplepage import SimpleFile
from devpi_twisted.model.upstream.common import UpstreamLink
from devpi_twisted.model.upstream.project import toSimpleFile
from devpi_twisted.services.fileentries import httpDate, logEntry, writeFileEntry
from devpi_twisted.storage.threads import Runner
from devpi_twisted.storage import BLOB_REF, BlobInfo
from devpi_twisted.mirror.files import (
    CoreMetadata, Elsewhere, FetchedFile, FileAnswer, FileFetch, LinkOnly, LiveFile, StoredFile, startFetch,
)
from devpi_twisted.mirror.names import MirrorNames
from devpi_twisted.mirror.pages import MirrorPages, _discardBody, linkRelpath
from devpi_twisted.mirror.upstream import UpstreamClient, UpstreamFailure, UpstreamMissing, _Collector

log = Logger()


def candidateProjects(filename: str) -> list[str]:
    """Which projects a distribution file name may belong to, most likely first."""
    names: list[str] = []
    try:
        if filename.endswith(".whl"):
            names.append(str(parse_wheel_filename(filename)[0]))
        else:
            names.append(str(parse_sdist_filename(filename)[0]))
    except (InvalidWheelFilename, InvalidSdistFilename):
        pass
    stem = filename.split(".tar.")[0].rsplit(".", 1)[0] if ".tar." in filename else filename.rsplit(".", 1)[0]
    parts = stem.split("-")
    for end in range(len(parts) - 1, 0, -1):
        name = normalizeProject("-".join(parts[:end]))
        if name and name not in names:
            names.append(name)
    return names


class Mirrors(MultiService):
    """Mirror indexes for the simple pages and the file routes."""

    def __init__(self, storage: IStorage, blobs: IBlobStore, upstream: UpstreamClient, clock: IReactorTime,
                 offlineMode: bool = False, filesElsewhere: Callable[[], bool] | None = None,
                 parseRunner: Runner | None = None) -> None:
        """
        @param parseRunner: where upstream pages and project lists are
            parsed (off the reactor thread); inline when not given.
        @param filesElsewhere: in offline mode, whether files that are not
            stored here can still be had (a replica's primary answers for
            them while it is reachable); pages then list every cached link,
            not only the stored files.
        """
        super().__init__()
        self._filesElsewhere = filesElsewhere
        self._storage = storage
        self._blobs = blobs
        self._upstream = upstream
        self._clock = clock
        self.pages = MirrorPages(storage, upstream, clock, offlineMode, parseRunner=parseRunner)
        self.names = MirrorNames(storage, blobs, upstream, clock, self.pages)
        self._starting: Coalescer[FileFetch] = Coalescer()
        self._running: dict[tuple[str, str], FileFetch] = {}

    @property
    def offlineMode(self) -> bool:
        return self.pages.offlineMode

    def stopService(self) -> Any:
        self.pages.stop()
        return super().stopService()

    def statuses(self) -> dict[str, dict[str, Any]]:
        return self.pages.statuses()

    # what simple pages need (devpi_twisted.services.simple.MirrorSource)

    def isFresh(self, stage: Stage, project: str) -> bool:
        return self.pages.isFresh(stage, project)

    async def projectFiles(self, stage: Stage, project: str, rootPrefix: str) -> list[SimpleFile] | None:
        cached = await self.pages.project(stage, project)
        if cached is None:
            return None
        if cached.status == "quarantined":
            return []
        links = cached.links
        if self.offlineMode and not (self._filesElsewhere is not None and self._filesElsewhere()):
            prefix = keys.filesPrefix(stage.user, stage.index, project)
            stored = await self._storage.read(lambda view: {e["filename"] for _, e in view.items(prefix)})
            links = [link for link in links if link.filename in stored]
        return [toSimpleFile(link, rootPrefix + linkRelpath(stage, link)) for link in links]

    async def projectNames(self, stage: Stage) -> list[str]:
        return await self.pages.knownNames(stage)

    async def projectNameList(self, stage: Stage) -> Any:
        return await self.names.openCurrent(stage)

    def projectNamesFresh(self, stage: Stage) -> bool:
        return self.names.isFresh(stage)

    async def projectStatus(self, stage: Stage, project: str) -> dict[str, Any] | None:
        cached = await self.pages.cached(stage, project)
        if cached is None or not cached.status:
            return None
        return {"status": cached.status, **({"reason": cached.statusReason} if cached.statusReason else {})}

    async def refresh(self, stage: Stage, project: str) -> None:
        """Forget the cached links, so the next request asks upstream."""
        await self.pages.forget(stage, project)

    # files

    async def _findLink(self, stage: Stage, relpath: str) -> tuple[str, UpstreamLink]:
        filename = unquote(relpath.rsplit("/", 1)[-1])
        candidates = candidateProjects(filename)
        for project in candidates:
            cached = await self.pages.cached(stage, project)
            link = cached.find(filename) if cached else None
            if link is not None and linkRelpath(stage, link).endswith("/+f/" + relpath):
                return project, link
        # Not seen yet (uv lock files name file URLs directly): ask upstream.
        if candidates:
            cached = await self.pages.project(stage, candidates[0])
            link = cached.find(filename) if cached else None
            if link is not None and linkRelpath(stage, link).endswith("/+f/" + relpath):
                return candidates[0], link
        raise NotFound("no such file")

    async def fileAnswer(self, stage: Stage, relpath: str, wantBody: bool = True) -> FileAnswer:
        """
        What a request for a file of a mirror that does not have it stored
        yet gets.  Without C{wantBody} (a HEAD) nothing is fetched for a
        distribution: upstream's page tells enough.
        """
        metadata = relpath.endswith(".metadata")
        project, link = await self._findLink(stage, relpath[: -len(".metadata")] if metadata else relpath)
        if metadata:
            return await self._coreMetadata(stage, project, link)
        if not wantBody:
            return LinkOnly(link.filename, link.size)
        if stage.config.get("mirror_use_external_urls"):
            return Elsewhere(link.url)
        key = (stage.name, link.filename)
        running = self._running.get(key)
        if running is None:
            # A transfer may have finished and been recorded while this
            # request looked the link up: then the file is on disk already.
            fileKey = keys.fileKey(stage.user, stage.index, project, link.filename)
            stored = await self._storage.read(lambda view: view.get(fileKey))
            if stored is not None:
                return await self._serveStored(
                    FetchedFile(BlobInfo(stored["sha256"], stored["size"]), stored.get("last_modified")), link,
                    project)
            running = self._running.get(key)
        if running is None:
            if self.offlineMode or not self.pages.state(stage).status.mayAskUpstream():
                raise UpstreamError(f"{link.filename} is not cached and the upstream of {stage.name} is unavailable")
            running = await self._start(stage, project, link)
        if not running.started and not running.result.called:
            length = running.contentLength if running.contentLength is not None else link.size
            return LiveFile(link.filename, length, link.sha256 or None, running, project)
        fetched = await running.waitForResult()
        return await self._serveStored(fetched, link, project)

    async def _start(self, stage: Stage, project: str, link: UpstreamLink) -> FileFetch:
        key = (stage.name, link.filename)
        return await self._starting.run(key, lambda: self._startFetch(stage, project, link))

    async def _startFetch(self, stage: Stage, project: str, link: UpstreamLink) -> FileFetch:
        key = (stage.name, link.filename)
        status = self.pages.state(stage).status
        try:
            fetch = await startFetch(self._upstream, self._blobs, self._clock, link, stage.config.get("mirror_url"))
        except UpstreamMissing as e:
            # Upstream answered: it is up, it just no longer has the file.
            status.succeeded()
            raise NotFound(f"{link.filename} is not available upstream: {e}")
        except UpstreamFailure as e:
            status.failed(str(e))
            raise UpstreamError(f"cannot fetch {link.filename}: {e}")
        status.succeeded()
        self._clock.callLater(0, fetch.begin)
        self._running[key] = fetch
        fetch.result.addCallback(self._record, stage, project, link)
        fetch.result.addErrback(self._failed, stage, link)
        fetch.result.addBoth(lambda _: self._running.pop(key, None) and None)
        return fetch

    def _failed(self, failure: Failure, stage: Stage, link: UpstreamLink) -> None:
        if not failure.check(StorageUnavailable):
            # Our own storage failing says nothing about upstream.
            self.pages.state(stage).status.failed(failure.getErrorMessage())
        log.warn("mirror file {filename} was not stored: {error}", filename=link.filename,
                 error=failure.getErrorMessage())

    def mirrorEntry(self, fetched: FetchedFile, stage: Stage, project: str, link: UpstreamLink) -> dict[str, Any]:
        """The file entry of a verified upstream file, as stored for later requests."""
        sha = fetched.blob.sha256
        now = self._clock.seconds()
        return {
            "rel": "releasefile",
            "filename": link.filename,
            "project": project,
            "version": link.version or "",
            "sha256": sha,
            "hashes": {"sha256": sha},
            "size": fetched.blob.size,
            BLOB_REF: sha,
            "relpath": linkRelpath(stage, link),
            "upload_time": link.uploadTime,
            "last_modified": fetched.lastModified or httpDate(now),
            "requires_python": link.requiresPython,
            "yanked": link.yanked,
            "url": link.url,
            "log": [logEntry("mirror", None, now, dst=stage.name)],
        }

    def _record(self, fetched: FetchedFile, stage: Stage, project: str, link: UpstreamLink) -> Deferred[Any]:
        entry = self.mirrorEntry(fetched, stage, project, link)
        d = self._storage.write(lambda txn: writeFileEntry(txn, stage.user, stage.index, entry))
        d.addErrback(self._recordFailed, link)
        return d

    def _recordFailed(self, failure: Failure, link: UpstreamLink) -> None:
        """The file was served and verified, but not recorded: the next request fetches it again."""
        if failure.check(StorageUnavailable):
            log.warn("mirror file {filename} was served but not recorded: {error}",
                     filename=link.filename, error=failure.getErrorMessage())
        else:
            log.failure("recording mirror file {filename}", failure=failure, filename=link.filename)

    async def _serveStored(self, fetched: FetchedFile, link: UpstreamLink, project: str) -> StoredFile:
        file = await self._blobs.open(fetched.blob.sha256)
        if file is None:
            raise NotFound(f"{link.filename} is missing on this server")
        return StoredFile(link.filename, fetched.blob.sha256, fetched.blob.size, fetched.lastModified, file, project)

    async def _coreMetadata(self, stage: Stage, project: str, link: UpstreamLink) -> CoreMetadata:
        if not link.coreMetadata:
            raise NotFound(f"no metadata found in {link.filename}")
        key = keys.coreMetadataKey(stage.user, stage.index, project, link.filename)
        stored = await self._storage.read(lambda view: view.get(key))
        if stored is not None:
            data = base64.b64decode(stored["data"])
        else:
            if self.offlineMode or not self.pages.state(stage).status.mayAskUpstream():
                raise UpstreamError(f"metadata of {link.filename} is not cached and upstream is unavailable")
            data = await self._fetchMetadata(stage, link)
            encoded = base64.b64encode(data).decode("ascii")
            await self._storage.write(lambda txn: txn.set(key, {"data": encoded}))
        return CoreMetadata(link.filename, data)

    async def _fetchMetadata(self, stage: Stage, link: UpstreamLink) -> bytes:
        status = self.pages.state(stage).status
        try:
            response = await self._upstream.openFile(link.url + ".metadata", stage.config.get("mirror_url"))
            if response.code != 200:
                _discardBody(response)
                error = UpstreamMissing if response.code in (404, 410) else UpstreamFailure
                raise error(f"metadata of {link.filename}: upstream answered {response.code}")
            collector = _Collector(self._clock, self._upstream.idleTimeout, 16 * 1024 * 1024)
            response.deliverBody(collector)
            data = await collector.done
        except UpstreamMissing as e:
            status.succeeded()
            raise UpstreamError(str(e))
        except UpstreamFailure as e:
            status.failed(str(e))
            raise UpstreamError(str(e))
        status.succeeded()
        if isinstance(link.coreMetadata, str) and hashlib.sha256(data).hexdigest() != link.coreMetadata.lower():
            raise UpstreamError(f"metadata of {link.filename} from upstream does not match its advertised hash")
        return data

    async def releaseEntries(self, stage: Stage, project: str, version: str) -> list[dict[str, Any]]:
        """
        The file entries of one release of an upstream project, fetching and
        storing files that are not cached yet (C{devpi push} from a mirror).
        """
        cached = await self.pages.project(stage, project)
        links = [link for link in (cached.links if cached else []) if link.version == version]
        entries = []
        for link in links:
            key = keys.fileKey(stage.user, stage.index, project, link.filename)
            entry = await self._storage.read(lambda view, key=key: view.get(key))
            if entry is None:
                running = self._running.get((stage.name, link.filename))
                if running is None:
                    if self.offlineMode or not self.pages.state(stage).status.mayAskUpstream():
                        raise UpstreamError(f"{link.filename} is not cached and upstream is unavailable")
                    running = await self._start(stage, project, link)
                fetched = await running.waitForResult()
                entry = self.mirrorEntry(fetched, stage, project, link)
            entries.append(entry)
        return entries
