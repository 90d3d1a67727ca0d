"""
The simple API pages of every index, rendered once per change.

A page depends on the index's resolution order and on what its stages hold
of one project.  Rendered bodies are kept with their ETag until a change to
that project (in any index) or to any index configuration arrives from the
storage changelog; a page request is then a dictionary lookup.

Project lists are rendered whole, in a thread (a list with PyPI's names is
tens of megabytes), with a gzip copy, once per change of the names: a
private project added or removed, or a mirror's list of names fetched anew.

Under read ACLs a page shows only what the requester may read of the
index's bases (L{devpi_twisted.model.inheritance.visibleOrder}).  A page of
a public chain (every index in the order public, the common case) is the
same for everyone and kept under the keys below, which the answer before
routing looks up without authenticating.  A page of a chain with a
restricted index is kept under keys that also name the visible chain (the
indexes it was built over), never the user, so it only ever answers a
requester who sees that same chain; finding that chain costs a storage read
and the authentication.  An index change (C{acl_read} is one) drops all.

What is kept is bounded by bytes, least recently used first out, so requests
that make many variants of a page (another Host, another installer) cannot
grow the memory or push out everyone's pages at once.
"""

import gzip
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Iterable, Iterator, Protocol

from packaging.utils import canonicalize_name

from twisted.logger import Logger

from devpi_twisted.model.coalesce import Coalescer
from devpi_twisted.errors import NotFound, StorageUnavailable, UpstreamError
from devpi_twisted.interfaces import IReadView, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.identity import Identity
from devpi_twisted.model.inheritance import (
    Stage,
    chainOf,
    contributingStages,
    isPublicOrder,
    resolutionOrder,
    stageReader,
    visibleOrder,
)
from devpi_twisted.model.negotiation import JSON
from devpi_twisted.model.simplepage import (
    ProjectPage,
    SimpleFile,
    renderIndexHTML,
    renderIndexJSON,
    renderProjectHTML,
    renderProjectJSON,
)
from devpi_twisted.storage import ChangeRecord
from devpi_twisted.storage.threads import Runner, SynchronousRunner
from devpi_twisted.storage.readers import blockingFile

_PROJECT_KINDS = {"project", "version", "file", "simple"}
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# What a cached page costs besides its bodies (key, entry, objects).
_ENTRY_OVERHEAD = 512
_NAMES_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RenderedPage:
    """
    A page ready to send.

    @ivar gzipped: the body gzip-compressed, for clients that accept it
        (project lists only), or C{None}.
    """

    body: bytes
    etag: bytes
    contentType: bytes
    lastSerial: int
    gzipped: bytes | None = None

    @property
    def gzipETag(self) -> bytes:
        """The strong ETag of the compressed body (another representation, so another tag)."""
        return self.etag[:-1] + b'-gzip"'

    @property
    def size(self) -> int:
        return len(self.body) + len(self.gzipped or b"") + _ENTRY_OVERHEAD


class PageCache:
    """
    Cached pages under hashable keys, at most C{maxBytes} of them in all;
    the least recently used leave first.  Entries are grouped, so all pages
    of one project (or all project lists) can be dropped at once.
    """

    def __init__(self, maxBytes: int) -> None:
        self.maxBytes = maxBytes
        self.size = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int, Hashable]] = OrderedDict()
        self._groups: dict[Hashable, set[Hashable]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, group: Hashable, value: Any, size: int) -> None:
        """Keep C{value}; one larger than the whole cache is not kept."""
        self.remove(key)
        if size > self.maxBytes:
            return
        self._entries[key] = (value, size, group)
        self._groups.setdefault(group, set()).add(key)
        self.size += size
        while self.size > self.maxBytes:
            self.remove(next(iter(self._entries)))

    def remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        _, size, group = entry
        self.size -= size
        members = self._groups.get(group)
        if members is not None:
            members.discard(key)
            if not members:
                del self._groups[group]

    def dropGroup(self, group: Hashable) -> None:
        for key in list(self._groups.get(group, ())):
            self.remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self._groups.clear()
        self.size = 0


class MirrorSource(Protocol):
    """What the pages need of mirror indexes (supplied by the mirror code)."""

    async def projectFiles(self, stage: Stage, project: str, rootPrefix: str) -> list[SimpleFile] | None:
        """The files upstream lists for C{project}, or C{None} when it has none."""

    async def projectNames(self, stage: Stage) -> list[str]:
        """The names the mirror can list without fetching upstream's whole list."""

    async def projectNameList(self, stage: Stage) -> tuple[str, Any] | None:
        """
        The identity (content hash) of upstream's list of names, fetched
        anew when due, with an open file of it (one name a line); or C{None}.
        """

    def projectNamesFresh(self, stage: Stage) -> bool:
        """Whether the last list of names may be used without asking upstream (no I/O)."""

    async def refresh(self, stage: Stage, project: str) -> None:
        """Forget the cached links of C{project}."""

    def isFresh(self, stage: Stage, project: str) -> bool:
        """Whether what the mirror has of C{project} may be served without asking upstream."""

    async def projectStatus(self, stage: Stage, project: str) -> dict[str, Any] | None:
        """Upstream's PEP 792 status of C{project}: C{{"status", "reason"?}} or C{None}."""


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'


def _listedNames(privateNames: list[str], sources: list[Any]) -> Iterator[str]:
    """
    The private names, then each mirror's names that are not private: from
    a list, or from an open file of names (one a line), which is closed.
    """
    seen = {canonicalize_name(n) for n in privateNames}
    yield from privateNames
    for source in sources:
        if isinstance(source, list):
            batch = [n for n in source if canonicalize_name(n) not in seen]
            seen.update(canonicalize_name(n) for n in batch)
            yield from batch
            continue
        # Upstream's list has no duplicates, so its names are not remembered.
        rest = b""
        while True:
            data = source.read(_NAMES_CHUNK)
            if not data:
                break
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                name = line.decode("utf-8", "replace")
                if name and canonicalize_name(name) not in seen:
                    yield name
        if rest:
            name = rest.decode("utf-8", "replace")
            if canonicalize_name(name) not in seen:
                yield name


def _closeSources(sources: Iterable[Any]) -> None:
    for source in sources:
        if not isinstance(source, list):
            source.close()


# About 2.5 microseconds a file: pages up to this many files take under half
# a millisecond and are rendered inline; larger ones (a mirrored project
# with thousands of files) in the runner's threads, off the reactor.
INLINE_RENDER_FILES = 200


def renderProjectPage(page: ProjectPage, mediaType: str, title: str) -> bytes:
    """A project's simple page in C{mediaType}: PEP 691 JSON, or HTML."""
    if mediaType == JSON:
        return renderProjectJSON(page)
    return renderProjectHTML(page, title)


def renderProjectList(privateNames: list[str], sources: list[Any], mediaType: str, title: str,
                      serial: int) -> RenderedPage:
    """
    The whole project list with its ETag and gzip copy; blocking (reads the
    mirrors' name files, and compresses), so it runs in a thread.
    """
    try:
        names = _listedNames(privateNames, sources)
        if mediaType == JSON:
            body = renderIndexJSON(names, serial)
        else:
            body = renderIndexHTML(names, title)
    finally:
        _closeSources(sources)
    return RenderedPage(body, _etag(body), mediaType.encode("ascii"), serial,
                        gzip.compress(body, compresslevel=6, mtime=0))


@dataclass(frozen=True)
class _CachedList:
    """A rendered project list and the versions of the mirrors' names it shows."""

    page: RenderedPage
    mirrors: tuple[Stage, ...]
    # per mirror: ("file", hash of the names file) or ("known", names)
    sources: tuple[tuple[Any, ...], ...] = field(default=())


# Who a request acts as, found only when a page needs it (authenticating costs
# a storage read): C{None} is anonymous.
Identify = Callable[[], Awaitable[Identity | None]]
# Whether the requester may read a stage.
Readable = Callable[[Stage], bool]


def orderOf(view: IReadView, user: str, index: str, readable: Readable | None = None) -> list[Stage]:
    """
    The resolution order of C{user/index}; with C{readable}, the part of it
    the requester sees (L{visibleOrder}).
    """
    order = resolutionOrder(user, index, lambda u, i: view.get(keys.indexKey(u, i)))
    if readable is not None:
        order = visibleOrder(order, readable)
    if not order:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    return order


@dataclass(frozen=True)
class Restricted:
    """
    What a read returns instead of a page's data when the order has a
    restricted index and the requester is not known yet: the whole order,
    from which their visible chain is found once they are.
    """

    order: list[Stage]


async def readerFor(identify: Identify | None) -> Readable:
    """Whether the requester (anonymous without C{identify}) may read a stage."""
    return stageReader(None if identify is None else await identify())


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
    # the visible chain when the order has a restricted index, else None
    chain: tuple[str, ...] | None = None


class SimplePages:
    """Builds, caches and invalidates simple pages."""

    log = Logger()

    def __init__(self, storage: IStorage, mirrors: MirrorSource | None = None, runner: Runner | None = None,
                 cacheBytes: int = DEFAULT_CACHE_BYTES) -> None:
        """
        @param runner: runs the rendering of project lists off the reactor.
        @param cacheBytes: most bytes of rendered pages kept.
        """
        self._storage = storage
        self._mirrors = mirrors
        self._runner: Runner = runner if runner is not None else SynchronousRunner()
        self.cache = PageCache(cacheBytes)
        # Raised by every change that may change a project list: a list
        # rendered meanwhile is sent but not kept.
        self._listGeneration = 0
        self._listBuilds: Coalescer[RenderedPage | Restricted] = Coalescer()
        storage.subscribe(self._changed)

    def _changed(self, record: ChangeRecord) -> None:
        for key in record.changes:
            kind, _, _, project = keys.parseKey(key)
            if kind in ("index", "user"):
                self.invalidateAll()
                return
            if kind in _PROJECT_KINDS:
                if kind == "project":
                    self._invalidateLists()
                if project is not None:
                    self.invalidateProject(project)

    def _invalidateLists(self) -> None:
        self._listGeneration += 1
        self.cache.dropGroup(_LISTS)

    def invalidateAll(self) -> None:
        self._listGeneration += 1
        self.cache.clear()

    def invalidateProject(self, project: str) -> None:
        """Forget pages of one project (mirror code calls this after a refresh)."""
        self.cache.dropGroup(("project", project))

    def cachedProjectPage(self, cacheKey: tuple[Any, ...], project: str,
                          chain: tuple[str, ...] | None = None) -> RenderedPage | None:
        """
        The rendered page if it is cached and still valid, without any I/O.

        @param cacheKey: C{(user, index, mediaType, rootPrefix, installer, baseURL)}.
            Most pages do not depend on the base URL (their links are
            relative): those are kept once for every base URL.
        @param chain: the visible chain of an order with a restricted index;
            C{None} finds only pages of public chains.
        """
        hit = self.cache.get(_pageKey(project, cacheKey, chain, None))
        if hit is None:
            hit = self.cache.get(_pageKey(project, cacheKey, chain, cacheKey[-1]))
            if hit is None:
                return None
        if self._mirrors is not None and not all(self._mirrors.isFresh(stage, project) for stage in hit[1]):
            return None
        return hit[0]

    async def projectPage(self, user: str, index: str, project: str, mediaType: str,
                          rootPrefix: str, installer: bool, baseURL: str,
                          identify: Identify | None = None) -> RenderedPage:
        """
        @param rootPrefix: leads from the page's URL back to the server root.
        @param baseURL: the server's outside URL, for the links PEP 740 wants
            absolute (provenance).
        @param identify: who asks, called only when the index's order has a
            restricted index; without it the requester is anonymous.
        """
        cacheKey = (user, index, mediaType, rootPrefix, installer, baseURL)
        cached = self.cachedProjectPage(cacheKey, project)
        if cached is not None:
            return cached
        try:
            return await self._buildProjectPage(cacheKey, project, identify)
        except StorageUnavailable as e:
            # A page that no change has dropped, only the mirrors' freshness
            # has expired, is still the best answer while storage is down.
            stale = self._keptProjectPage(cacheKey, project)
            if stale is None:
                raise
            self.log.warn("storage unavailable ({error}): serving the kept page of {project} on {user}/{index}",
                          error=e.message, project=project, user=user, index=index)
            return stale

    def _keptProjectPage(self, cacheKey: tuple[Any, ...], project: str) -> RenderedPage | None:
        """
        The cached page of a public chain whatever the mirrors' freshness
        (changes drop pages, not expiry).
        """
        hit = (self.cache.get(_pageKey(project, cacheKey, None, None))
               or self.cache.get(_pageKey(project, cacheKey, None, cacheKey[-1])))
        return None if hit is None else hit[0]

    async def _buildProjectPage(self, cacheKey: tuple[Any, ...], project: str,
                                identify: Identify | None) -> RenderedPage:
        user, index, mediaType, rootPrefix, installer, baseURL = cacheKey
        serialBefore = self._storage.currentSerial()
        found: _Collected | Restricted = await self._storage.read(
            lambda view: self._collect(view, user, index, project, rootPrefix, baseURL, None))
        if isinstance(found, Restricted):
            readable = await readerFor(identify)
            cached = self.cachedProjectPage(cacheKey, project, chainOf(visibleOrder(found.order, readable)))
            if cached is not None:
                return cached
            serialBefore = self._storage.currentSerial()
            found = await self._storage.read(
                lambda view: self._collect(view, user, index, project, rootPrefix, baseURL, readable))
        assert isinstance(found, _Collected)
        collected = found
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
        title = f"{user}/{index}: links for {project}"
        if len(files) <= INLINE_RENDER_FILES:
            body = renderProjectPage(page, mediaType, title)
        else:
            body = await self._runner.runFile(renderProjectPage, page, mediaType, title)
        rendered = RenderedPage(body, _etag(body), mediaType.encode("ascii"), collected.serial)
        # Keep it only if nothing changed while it was built; a page with
        # mirror content is used while the mirrors' data stays fresh.
        if self._storage.currentSerial() == serialBefore:
            # Only absolute links (provenance) tie a page to the base URL.
            usesBase = any(f.provenanceURL is not None and f.provenanceURL.startswith(baseURL) for f in files)
            key = _pageKey(project, cacheKey, collected.chain, baseURL if usesBase else None)
            self.cache.put(key, ("project", project), (rendered, collected.mirrors), rendered.size)
        return rendered

    def _collect(self, view: IReadView, user: str, index: str, project: str, rootPrefix: str,
                 baseURL: str, readable: Readable | None) -> "_Collected | Restricted":
        """
        What the private stages the requester sees hold of C{project}.
        Without C{readable} only a public order is read; one with a
        restricted index answers L{Restricted}.
        """
        order = orderOf(view, user, index)
        chain = None
        if readable is None:
            if not isPublicOrder(order):
                return Restricted(order)
        else:
            order = visibleOrder(order, readable)
            if not order:
                raise NotFound(f"The stage {user}/{index} could not be found.")
            chain = chainOf(order)

        def holds(stage: Stage) -> bool:
            return view.get(keys.projectKey(stage.user, stage.index, project)) is not None

        contributing, hidden = contributingStages(order, project, holds)
        collected = _Collected(False, [], set(), None, [], hidden, view.serial, chain)
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

    async def indexPage(self, user: str, index: str, mediaType: str,
                        identify: Identify | None = None) -> RenderedPage:
        """
        The project list: the cached rendering while the names are the same,
        else rendered anew in a thread (concurrent requests share one).

        @param identify: who asks, called only when the index's order has a
            restricted index; without it the requester is anonymous.
        """
        key = (_LISTS, user, index, mediaType)
        cached = self.cache.get(key)
        if cached is not None and self._listFresh(cached):
            return cached.page
        generation = self._listGeneration
        try:
            built = await self._listBuilds.run((key, generation), lambda: self._buildList(key, generation, None))
            if isinstance(built, Restricted):
                # Shared only by requesters who see the same chain.
                readable = await readerFor(identify)
                chainKey = (*key, chainOf(visibleOrder(built.order, readable)))
                cached = self.cache.get(chainKey)
                if cached is not None and self._listFresh(cached):
                    return cached.page
                generation = self._listGeneration
                built = await self._listBuilds.run(
                    (chainKey, generation), lambda: self._buildList(chainKey, generation, readable))
            assert isinstance(built, RenderedPage)
            return built
        except StorageUnavailable as e:
            # Kept until a change drops it: its mirrors' names merely expired.
            cached = self.cache.get(key)
            if cached is None:
                raise
            self.log.warn("storage unavailable ({error}): serving the kept project list of {user}/{index}",
                          error=e.message, user=user, index=index)
            return cached.page

    def _listFresh(self, cached: _CachedList) -> bool:
        """Whether every mirror's names in C{cached} are still current, without any I/O."""
        if not cached.mirrors:
            return True
        if self._mirrors is None:
            return False
        return all(source[0] == "file" and self._mirrors.projectNamesFresh(stage)
                   for stage, source in zip(cached.mirrors, cached.sources))

    async def _buildList(self, key: tuple[Any, ...], generation: int,
                         readable: Readable | None) -> "RenderedPage | Restricted":
        """
        The project list of C{key}: C{(_LISTS, user, index, mediaType)} for
        a public order (an order with a restricted index answers
        L{Restricted}), with the visible chain added for one seen through
        C{readable}.
        """
        user, index, mediaType = key[1:4]

        def _names(view: IReadView) -> Any:
            names: dict[str, str] = {}
            mirrors = []
            order = orderOf(view, user, index)
            if readable is None and not isPublicOrder(order):
                return Restricted(order)
            if readable is not None:
                order = visibleOrder(order, readable)
                if not order:
                    raise NotFound(f"The stage {user}/{index} could not be found.")
            for stage in order:
                if stage.isMirror:
                    mirrors.append(stage)
                    continue
                prefix = keys.projectsPrefix(stage.user, stage.index)
                for k, config in view.items(prefix):
                    names.setdefault(k[len(prefix):], config.get("name") or k[len(prefix):])
            return sorted(names.values(), key=str.lower), mirrors, view.serial, chainOf(order)

        read = await self._storage.read(_names)
        if isinstance(read, Restricted):
            return read
        names, mirrors, serial, chain = read
        # A chain that changed since the requester's was found is not kept
        # under a key that names another.
        keep = readable is None or (*key[:4], chain) == key
        sources: list[Any] = []
        versions: list[tuple[Any, ...]] = []
        stages: list[Stage] = []
        try:
            if self._mirrors is not None:
                for stage in mirrors:
                    opened = await self._mirrors.projectNameList(stage)
                    if opened is not None:
                        ref, nameReader = opened
                        sources.append(await blockingFile(nameReader, self._runner.runFile))
                        versions.append(("file", ref))
                    else:
                        known = await self._mirrors.projectNames(stage)
                        sources.append(known)
                        versions.append(("known", tuple(known)))
                    stages.append(stage)
        except BaseException:
            _closeSources(sources)
            raise
        cached = self.cache.get(key)
        if cached is not None and cached.sources == tuple(versions) and cached.mirrors == tuple(stages):
            # The same names: revalidated, not rendered again.
            _closeSources(sources)
            return cached.page
        title = f"{user}/{index}: simple list (including inherited indices)"
        rendered = await self._runner.runFile(renderProjectList, names, sources, mediaType, title, serial)
        if keep and self._listGeneration == generation:
            self.cache.put(key, _LISTS, _CachedList(rendered, tuple(stages), tuple(versions)), rendered.size)
        self.log.info("rendered the project list of {user}/{index} ({mediaType}): {size} bytes",
                      user=user, index=index, mediaType=mediaType, size=len(rendered.body))
        return rendered


_LISTS = "lists"


def _pageKey(project: str, cacheKey: tuple[Any, ...], chain: tuple[str, ...] | None, base: str | None) -> tuple[Any, ...]:
    """
    Where a project page is kept: a public chain's page under today's key
    (which the answer before routing builds), a restricted chain's with
    its visible chain too (a key of another length, so never confused).
    """
    if chain is None:
        return ("project", project, *cacheKey[:-1], base)
    return ("project", project, *cacheKey[:-1], chain, base)
