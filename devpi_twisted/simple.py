"""
The simple API pages of every index, rendered once per change.

A page depends on the index's resolution order and on what its stages hold
of one project.  Rendered bodies are kept with their ETag until a change to
that project (in any index) or to any index configuration arrives from the
storage changelog; a page request is then a dictionary lookup.
"""

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from .errors import NotFound, UpstreamError
from .interfaces import IReadView, IStorage
from .model import keys
from .model.inheritance import Stage, contributingStages, resolutionOrder
from .model.negotiation import JSON
from .model.simplepage import (
    ProjectPage,
    SimpleFile,
    renderIndexHTML,
    renderIndexJSON,
    renderProjectHTML,
    renderProjectJSON,
)
from .storage import ChangeRecord

_PROJECT_KINDS = {"project", "version", "file", "simple"}
_MAX_CACHED = 20000


@dataclass(frozen=True)
class RenderedPage:
    """A page ready to send."""

    body: bytes
    etag: bytes
    contentType: bytes
    lastSerial: int


class MirrorSource(Protocol):
    """What the pages need of mirror indexes (supplied by the mirror code)."""

    async def projectFiles(self, stage: Stage, project: str, rootPrefix: str) -> list[SimpleFile] | None:
        """The files upstream lists for C{project}, or C{None} when it has none."""

    async def projectNames(self, stage: Stage) -> list[str]:
        """The names the mirror can list without fetching upstream's whole list."""

    async def refresh(self, stage: Stage, project: str) -> None:
        """Forget the cached links of C{project}."""

    async def projectNameFile(self, stage: Stage) -> Any:
        """An open file of upstream's project names, one per line, or C{None}."""

    def isFresh(self, stage: Stage, project: str) -> bool:
        """Whether what the mirror has of C{project} may be served without asking upstream."""

    async def projectStatus(self, stage: Stage, project: str) -> dict[str, Any] | None:
        """Upstream's PEP 792 status of C{project}: C{{"status", "reason"?}} or C{None}."""


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'


def orderOf(view: IReadView, user: str, index: str) -> list[Stage]:
    order = resolutionOrder(user, index, lambda u, i: view.get(keys.indexKey(u, i)))
    if not order:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    return order


def provenancePath(relpath: str) -> str:
    """Where the provenance of the file at C{relpath} is served."""
    return relpath.replace("/+f/", "/+provenance/", 1)


def simpleFileOf(entry: dict[str, Any], rootPrefix: str, baseURL: str) -> SimpleFile:
    return SimpleFile(
        filename=entry["filename"],
        url=rootPrefix + entry["relpath"],
        sha256=entry["sha256"],
        size=entry["size"],
        uploadTime=entry.get("upload_time"),
        requiresPython=entry.get("requires_python"),
        yanked=entry.get("yanked", False),
        coreMetadataSha256=entry.get("core_metadata_sha256"),
        provenanceURL=f"{baseURL}/{provenancePath(entry['relpath'])}" if entry.get("attestations") else None,
        version=entry.get("version"),
    )


@dataclass
class _Collected:
    found: bool
    files: list[SimpleFile]
    versions: set[str]
    status: dict[str, Any] | None
    mirrors: list[Stage]
    hidden: list[Stage]
    serial: int


class SimplePages:
    """Builds, caches and invalidates simple pages."""

    log = Logger()

    def __init__(self, storage: IStorage, mirrors: MirrorSource | None = None) -> None:
        self._storage = storage
        self._mirrors = mirrors
        self._projectPages: dict[str, dict[tuple[Any, ...], tuple[RenderedPage, list[Stage]]]] = {}
        self._indexPages: dict[tuple[Any, ...], RenderedPage] = {}
        self._cachedCount = 0
        storage.subscribe(self._changed)

    def _changed(self, record: ChangeRecord) -> None:
        for key in record.changes:
            kind, _, _, project = keys.parseKey(key)
            if kind in ("index", "user"):
                self.invalidateAll()
                return
            if kind in _PROJECT_KINDS:
                if kind == "project":
                    self._indexPages.clear()
                if project is not None:
                    dropped = self._projectPages.pop(project, None)
                    if dropped:
                        self._cachedCount -= len(dropped)

    def invalidateAll(self) -> None:
        self._projectPages.clear()
        self._indexPages.clear()
        self._cachedCount = 0

    def invalidateProject(self, project: str) -> None:
        """Forget pages of one project (mirror code calls this after a refresh)."""
        dropped = self._projectPages.pop(project, None)
        if dropped:
            self._cachedCount -= len(dropped)

    def cachedProjectPage(self, cacheKey: tuple[Any, ...], project: str) -> RenderedPage | None:
        """
        The rendered page if it is cached and still valid, without any I/O.

        @param cacheKey: C{(user, index, mediaType, rootPrefix, installer, baseURL)}.
        """
        pages = self._projectPages.get(project)
        if pages is None:
            return None
        hit = pages.get(cacheKey)
        if hit is None:
            return None
        if self._mirrors is not None and not all(self._mirrors.isFresh(stage, project) for stage in hit[1]):
            return None
        return hit[0]

    async def projectPage(self, user: str, index: str, project: str, mediaType: str,
                          rootPrefix: str, installer: bool, baseURL: str) -> RenderedPage:
        """
        @param rootPrefix: leads from the page's URL back to the server root.
        @param baseURL: the server's outside URL, for the links PEP 740 wants
            absolute (provenance).
        """
        cacheKey = (user, index, mediaType, rootPrefix, installer, baseURL)
        cached = self.cachedProjectPage(cacheKey, project)
        if cached is not None:
            return cached
        serialBefore = self._storage.currentSerial()
        collected = await self._storage.read(lambda view: self._collect(view, user, index, project, rootPrefix, baseURL))
        files = list(collected.files)
        versions = set(collected.versions)
        found = collected.found
        seen = {f.filename for f in files}
        for stage in collected.mirrors:
            if self._mirrors is None:
                continue
            try:
                mirrored = await self._mirrors.projectFiles(stage, project, rootPrefix)
            except UpstreamError as e:
                if not found:
                    raise
                # Private releases are there; serve them without the mirror's.
                self.log.warn("leaving {mirror} out of {project}: {error}",
                              mirror=stage.name, project=project, error=e.message)
                continue
            if mirrored is None:
                continue
            found = True
            if collected.status is None:
                upstreamStatus = await self._mirrors.projectStatus(stage, project)
                if upstreamStatus is not None and upstreamStatus.get("status"):
                    collected.status = upstreamStatus
            for f in mirrored:
                if f.filename not in seen:
                    seen.add(f.filename)
                    files.append(f)
                    if f.version:
                        versions.add(f.version)
        if not found:
            raise NotFound(f"The project {project} does not exist.")
        status = collected.status or {}
        if status.get("status") == "quarantined":
            files = []
        notices = ()
        if collected.hidden and not installer:
            names = ", ".join(s.name for s in collected.hidden)
            notices = (
                f"Because this project isn't in the mirror_whitelist, no releases from {names} are included.",
            )
        page = ProjectPage(
            name=project,
            files=tuple(files),
            versions=tuple(versions),
            status=status.get("status"),
            statusReason=status.get("reason"),
            lastSerial=collected.serial,
            notices=notices,
        )
        if mediaType == JSON:
            body = renderProjectJSON(page)
        else:
            body = renderProjectHTML(page, f"{user}/{index}: links for {project}")
        rendered = RenderedPage(body, _etag(body), mediaType.encode("ascii"), collected.serial)
        # Keep it only if nothing changed while it was built; a page with
        # mirror content is used while the mirrors' data stays fresh.
        if self._storage.currentSerial() == serialBefore:
            if self._cachedCount >= _MAX_CACHED:
                self.invalidateAll()
            self._projectPages.setdefault(project, {})[cacheKey] = (rendered, collected.mirrors)
            self._cachedCount += 1
        return rendered

    def _collect(self, view: IReadView, user: str, index: str, project: str, rootPrefix: str,
                 baseURL: str) -> _Collected:
        order = orderOf(view, user, index)

        def holds(stage: Stage) -> bool:
            return view.get(keys.projectKey(stage.user, stage.index, project)) is not None

        contributing, hidden = contributingStages(order, project, holds)
        collected = _Collected(False, [], set(), None, [], hidden, view.serial)
        seen: set[str] = set()
        for stage in contributing:
            if stage.isMirror:
                collected.mirrors.append(stage)
                continue
            projectConfig = view.get(keys.projectKey(stage.user, stage.index, project))
            if projectConfig is None:
                continue
            collected.found = True
            if collected.status is None and projectConfig.get("status"):
                collected.status = projectConfig["status"]
            for _, entry in view.items(keys.filesPrefix(stage.user, stage.index, project)):
                if entry.get("rel", "releasefile") != "releasefile" or entry["filename"] in seen:
                    continue
                seen.add(entry["filename"])
                collected.files.append(simpleFileOf(entry, rootPrefix, baseURL))
            for _, metadata in view.items(keys.versionsPrefix(stage.user, stage.index, project)):
                collected.versions.add(metadata["version"])
        return collected

    async def refreshMirrors(self, user: str, index: str, project: str) -> None:
        """Make every mirror in the index's resolution order ask upstream again for C{project}."""
        order = await self._storage.read(lambda view: orderOf(view, user, index))
        if self._mirrors is not None:
            for stage in order:
                if stage.isMirror:
                    await self._mirrors.refresh(stage, project)
        self.invalidateProject(project)

    async def indexPage(self, user: str, index: str, mediaType: str) -> "RenderedPage | IndexListing":
        """
        The project list: rendered and cached when only private indexes
        contribute; an L{IndexListing} to stream when mirrors do.
        """
        cacheKey = (user, index, mediaType)
        page = self._indexPages.get(cacheKey)
        if page is not None:
            return page
        serialBefore = self._storage.currentSerial()

        def _names(view: IReadView) -> tuple[list[str], list[Stage], int]:
            names: dict[str, str] = {}
            mirrors = []
            for stage in orderOf(view, user, index):
                if stage.isMirror:
                    mirrors.append(stage)
                    continue
                prefix = keys.projectsPrefix(stage.user, stage.index)
                for key, config in view.items(prefix):
                    names.setdefault(key[len(prefix):], config.get("name") or key[len(prefix):])
            return sorted(names.values(), key=str.lower), mirrors, view.serial

        names, mirrors, serial = await self._storage.read(_names)
        if mirrors and self._mirrors is not None:
            sources: list[Any] = []
            for stage in mirrors:
                nameFile = await self._mirrors.projectNameFile(stage)
                sources.append(nameFile if nameFile is not None else await self._mirrors.projectNames(stage))
            return IndexListing(names, sources, serial)
        if mediaType == JSON:
            body = renderIndexJSON(names, serial)
        else:
            body = renderIndexHTML(names, f"{user}/{index}: simple list (including inherited indices)")
        rendered = RenderedPage(body, _etag(body), mediaType.encode("ascii"), serial)
        if self._storage.currentSerial() == serialBefore:
            self._indexPages[cacheKey] = rendered
        return rendered


@dataclass(frozen=True)
class IndexListing:
    """
    A project list with mirror names to stream: the private names, then for
    each mirror either an open file of names (one per line) or a list.
    """

    privateNames: list[str]
    mirrorSources: list[Any]
    lastSerial: int
