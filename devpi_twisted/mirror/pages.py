"""
Mirror project pages: fetched from upstream, kept in storage, served stale
when upstream fails.

Freshness is kept in memory (a restart revalidates with the stored ETag,
which costs upstream a 304).  Upstream errors never become a cached "no such
project"; an upstream 404 is remembered only briefly.  Concurrent requests
for one project share one upstream fetch.

Pages are parsed in the storage service's file threads, never on the
reactor: a page of a few hundred files takes milliseconds (about 40 us a KiB
of JSON and 130 us a KiB of HTML, measured), and one may be up to
L{devpi_twisted.model.upstream.project.MAX_PAGE_SIZE}.  Even the smallest pages go there: below about 1 KiB,
where parsing inline would cost the reactor less than the hop to a thread
(about 50 us of reactor time), the saving is a tenth of a millisecond next
to an upstream round trip, not worth a second code path.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.model.coalesce import Coalescer
from devpi_twisted.errors import UpstreamError
from devpi_twisted.interfaces import IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.indexconfig import mirrorBaseURL
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.model.upstream.common import UpstreamLink, UpstreamPageError
from devpi_twisted.model.upstream.project import parseProjectPage
from devpi_twisted.mirror.status import MirrorStatus, StatusCore, makeMirrorStatus
from devpi_twisted.mirror.upstream import UpstreamClient, UpstreamFailure, redacted
from devpi_twisted.storage.threads import Runner, SynchronousRunner

NOT_FOUND_SECONDS = 60.0


def simpleKey(stage: Stage, project: str) -> str:
    return f"simple/{stage.user}/{stage.index}/{project}"


def linkRelpath(stage: Stage, link: UpstreamLink) -> str:
    """Our stable path for an upstream file: by its advertised sha256, as devpi does."""
    if link.sha256:
        return keys.fileRelpath(stage.user, stage.index, link.sha256, link.filename)
    import hashlib

    urlHash = hashlib.sha256(link.url.encode("utf-8")).hexdigest()
    return f"{stage.user}/{stage.index}/+f/nohash/{urlHash[:16]}/{quote(link.filename)}"


@dataclass
class CachedProject:
    """What we know of one upstream project."""

    links: list[UpstreamLink]
    etag: str | None
    serial: int | None
    status: str | None = None
    statusReason: str | None = None
    fetchedAt: float | None = None  # None: loaded from storage, not yet revalidated

    def toStored(self) -> dict[str, Any]:
        return {
            "links": [asdict(link) for link in self.links],
            "etag": self.etag,
            "serial": self.serial,
            "status": self.status,
            "statusReason": self.statusReason,
        }

    @classmethod
    def fromStored(cls, value: dict[str, Any]) -> "CachedProject":
        return cls(
            links=[UpstreamLink(**link) for link in value.get("links", [])],
            etag=value.get("etag"),
            serial=value.get("serial"),
            status=value.get("status"),
            statusReason=value.get("statusReason"),
        )

    def find(self, filename: str) -> UpstreamLink | None:
        for link in self.links:
            if link.filename == filename:
                return link
        return None


@dataclass
class _MirrorState:
    status: MirrorStatus
    projects: dict[str, CachedProject] = field(default_factory=dict)
    notFoundUntil: dict[str, float] = field(default_factory=dict)
    refreshes: Coalescer[CachedProject | None] = field(default_factory=Coalescer)


class MirrorPages:
    """
    Upstream project pages of every mirror index.

    @ivar parseRunner: runs the parsing of upstream pages and project lists
        off the reactor (its C{runFile}); the composition root gives it the
        storage service's L{ThreadRunner<devpi_twisted.storage.threads.ThreadRunner>}.
    """

    log = Logger()

    def __init__(self, storage: IStorage, upstream: UpstreamClient, clock: IReactorTime,
                 offlineMode: bool = False, onChange: Callable[[str], None] | None = None,
                 parseRunner: Runner | None = None) -> None:
        self.parseRunner: Runner = parseRunner if parseRunner is not None else SynchronousRunner()
        self._storage = storage
        self._upstream = upstream
        self._clock = clock
        self.offlineMode = offlineMode
        self._onChange = onChange
        self._mirrors: dict[str, _MirrorState] = {}

    def state(self, stage: Stage) -> _MirrorState:
        state = self._mirrors.get(stage.name)
        if state is None:
            state = self._mirrors[stage.name] = _MirrorState(makeMirrorStatus(StatusCore(stage.name, self._clock)))
        return state

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {name: state.status.describe() for name, state in sorted(self._mirrors.items())}

    def stop(self) -> None:
        for state in self._mirrors.values():
            state.status.stop()

    def _expiry(self, stage: Stage) -> float:
        return float(stage.config.get("mirror_cache_expiry", 1800))

    def isFresh(self, stage: Stage, project: str) -> bool:
        """Whether a page built from the cached links may be served without asking upstream."""
        if self.offlineMode:
            return True
        state = self.state(stage)
        cached = state.projects.get(project)
        if cached is None:
            return False
        if not state.status.mayAskUpstream():
            return True
        return cached.fetchedAt is not None and self._clock.seconds() - cached.fetchedAt < self._expiry(stage)

    async def _stored(self, stage: Stage, project: str) -> CachedProject | None:
        value = await self._storage.read(lambda view: view.get(simpleKey(stage, project)))
        return None if value is None else CachedProject.fromStored(value)

    async def cached(self, stage: Stage, project: str) -> CachedProject | None:
        """What is cached, without asking upstream."""
        state = self.state(stage)
        cached = state.projects.get(project)
        if cached is None:
            cached = await self._stored(stage, project)
            if cached is not None:
                state.projects.setdefault(project, cached)
        return cached

    async def project(self, stage: Stage, project: str) -> CachedProject | None:
        """
        The project's links, fresh when upstream can be asked, else stale.

        @return: C{None} when upstream does not have the project.
        @raise UpstreamError: upstream failed and nothing is cached.
        """
        state = self.state(stage)
        cached = await self.cached(stage, project)
        if self.isFresh(stage, project):
            return cached
        if self.offlineMode or not state.status.mayAskUpstream():
            if cached is not None:
                return cached
            raise UpstreamError(
                f"upstream of {stage.name} is unavailable ({'offline mode' if self.offlineMode else 'offline'})"
                f" and {project!r} is not cached"
            )
        until = state.notFoundUntil.get(project)
        if until is not None and until > self._clock.seconds():
            return None
        return await state.refreshes.run(project, lambda: self._refresh(stage, project, cached))

    async def _refresh(self, stage: Stage, project: str, cached: CachedProject | None) -> CachedProject | None:
        state = self.state(stage)
        url = mirrorBaseURL(stage.config) + quote(project) + "/"
        try:
            response = await self._upstream.fetchPage(url, cached.etag if cached else None)
            if response.status == 304 and cached is not None:
                state.status.succeeded()
                cached.fetchedAt = self._clock.seconds()
                return cached
            if response.status == 404:
                state.status.succeeded()
                state.notFoundUntil[project] = self._clock.seconds() + min(NOT_FOUND_SECONDS, self._expiry(stage))
                return None
            if response.status != 200:
                raise UpstreamFailure(f"{redacted(url)} answered {response.status}")
            page = await self.parseRunner.runFile(
                parseProjectPage, response.body, response.contentType, response.url, project)
        except (UpstreamFailure, UpstreamPageError) as e:
            state.status.failed(str(e))
            self.log.warn("fetching {url} failed: {error}", url=redacted(url), error=str(e))
            if cached is not None:
                return cached
            raise UpstreamError(f"upstream error for {project!r} on {stage.name}: {e}")
        state.status.succeeded()
        state.notFoundUntil.pop(project, None)
        if (cached is not None and cached.serial is not None and response.serial is not None
                and response.serial < cached.serial
                and not stage.config.get("mirror_ignore_serial_header")):
            # An older replica of upstream answered: keep the newer page we have.
            self.log.info("ignoring {url}: serial {new} is older than the cached {old}",
                          url=redacted(url), new=response.serial, old=cached.serial)
            cached.fetchedAt = self._clock.seconds()
            return cached
        fresh = CachedProject(
            links=list(page.links), etag=response.etag, serial=response.serial,
            status=page.status, statusReason=page.statusReason, fetchedAt=self._clock.seconds(),
        )
        state.projects[project] = fresh
        if cached is None or cached.toStored() != fresh.toStored():
            key = simpleKey(stage, project)

            def _store(txn: IWriteTransaction) -> None:
                txn.set(key, fresh.toStored())

            await self._storage.write(_store)
            if self._onChange is not None:
                self._onChange(project)
        return fresh

    async def forget(self, stage: Stage, project: str) -> None:
        """Drop the cached links of a project (C{+simple/<p>/refresh})."""
        state = self.state(stage)
        state.projects.pop(project, None)
        state.notFoundUntil.pop(project, None)
        key = simpleKey(stage, project)
        await self._storage.write(lambda txn: txn.delete(key))

    async def knownNames(self, stage: Stage) -> list[str]:
        """The projects this mirror has cached links for."""
        prefix = f"simple/{stage.user}/{stage.index}/"
        return await self._storage.read(lambda view: [k[len(prefix):] for k, _ in view.items(prefix)])


def _discardBody(response: Any) -> None:
    from devpi_twisted.mirror.upstream import _Discard

    response.deliverBody(_Discard())
