"""
What the web interface's pages show (L{devpi_twisted.web.ui}), read from
storage in one view each, over the part of
an index's resolution order the requester may read (as the JSON views do:
L{devpi_twisted.services.queries.collectProject}), with what the JSON
shapes leave out (file sizes, uploaders, which index a file comes from,
tox results).  L{Browse} is the service the views ask; the C{collect}
functions are pure, over an L{IReadView}.
"""

from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import NotFound
from devpi_twisted.interfaces import IReadView, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.inheritance import Stage, contributingStages, isPublicOrder, visibleOrder
from devpi_twisted.services.fileentries import projectEntries
from devpi_twisted.services.releases import latestVersion
from devpi_twisted.services.simple import Readable, Restricted, orderOf


def versionKey(version: str) -> tuple[int, Any]:
    """Sorts versions as PEP 440 does; what does not parse sorts first, by text."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)


@dataclass
class FileInfo:
    """A release file (or one a mirror lists) as a page shows it."""

    filename: str
    url: str  # a path on this server, or the mirror's URL
    stage: str  # "user/index" it comes from
    sha256: str = ""
    size: int | None = None
    uploaded: str | None = None
    uploader: str | None = None
    yanked: bool | str = False
    relpath: str | None = None
    toxresults: list[dict[str, Any]] = field(default_factory=list)  # their entries


@dataclass
class VersionInfo:
    version: str
    stage: str  # the index whose metadata is shown
    metadata: dict[str, Any]
    files: list[FileInfo] = field(default_factory=list)
    hasDocs: bool = False


@dataclass
class ProjectInfo:
    """A project across the readable stages of an index."""

    project: str  # normalised
    name: str  # as uploaded
    chain: list[str]
    versions: dict[str, VersionInfo] = field(default_factory=dict)
    status: dict[str, Any] | None = None  # PEP 792 (archived, quarantined, deprecated)
    mirrors: list[Stage] = field(default_factory=list)
    found: bool = False

    def ordered(self) -> list[VersionInfo]:
        """Newest first."""
        return sorted(self.versions.values(), key=lambda v: versionKey(v.version), reverse=True)


def _fileInfo(entry: dict[str, Any], stage: Stage) -> FileInfo:
    upload = next((log for log in entry.get("log", []) if log.get("what") == "upload"), {})
    return FileInfo(
        filename=entry["filename"], url="/" + entry["relpath"], stage=stage.name, sha256=entry.get("sha256", ""),
        size=entry.get("size"), uploaded=entry.get("upload_time") or entry.get("last_modified"),
        uploader=upload.get("who"), yanked=entry.get("yanked") or False, relpath=entry["relpath"],
    )


def readableOrder(view: IReadView, user: str, index: str, readable: Readable | None) -> list[Stage] | Restricted:
    """
    The order of C{user/index} the requester sees; without C{readable} a
    L{Restricted} when the order is not all public (ask who they are).
    """
    order = orderOf(view, user, index)
    if readable is None:
        return order if isPublicOrder(order) else Restricted(order)
    order = visibleOrder(order, readable)
    if not order:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    return order


def collectProjectInfo(view: IReadView, user: str, index: str, project: str,
                       readable: Readable | None = None) -> ProjectInfo | Restricted:
    """Every version of C{project} the readable private stages hold; the mirrors still to ask."""
    order = readableOrder(view, user, index, readable)
    if isinstance(order, Restricted):
        return order

    def holds(stage: Stage) -> bool:
        return view.get(keys.projectKey(stage.user, stage.index, project)) is not None

    contributing, _ = contributingStages(order, project, holds)
    info = ProjectInfo(project, project, [stage.name for stage in order])
    for stage in contributing:
        if stage.isMirror:
            info.mirrors.append(stage)
            continue
        projectConfig = view.get(keys.projectKey(stage.user, stage.index, project))
        if projectConfig is None:
            continue
        if not info.found:
            info.found = True
            info.name = projectConfig.get("name") or project
            info.status = projectConfig.get("status")
        entries = projectEntries(view, stage.user, stage.index, project)
        files: dict[str, list[FileInfo]] = {}
        docs: set[str] = set()
        for entry in entries:
            rel = entry.get("rel", "releasefile")
            if rel == "releasefile":
                files.setdefault(entry["version"], []).append(_fileInfo(entry, stage))
            elif rel == "doczip":
                docs.add(entry["version"])
        byFile = {f.relpath: f for fs in files.values() for f in fs}
        for entry in entries:
            if entry.get("rel") == "toxresult" and entry.get("for_relpath") in byFile:
                byFile[entry["for_relpath"]].toxresults.append(entry)
        for _, metadata in view.items(keys.versionsPrefix(stage.user, stage.index, project)):
            version = metadata["version"]
            if version in info.versions:
                continue  # shadowed by an earlier stage
            info.versions[version] = VersionInfo(
                version, stage.name, metadata, sorted(files.get(version, []), key=lambda f: f.filename),
                version in docs)
    return info


@dataclass
class IndexPage:
    config: dict[str, Any]
    projects: list[tuple[str, str | None]]  # (name, latest version) of this page
    total: int
    page: int
    pageSize: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.pageSize))


def collectIndexPage(view: IReadView, user: str, index: str, page: int, pageSize: int) -> IndexPage:
    """
    One page of an index's own projects: a private index's registered ones,
    a mirror's cached ones only (never upstream's whole list).
    """
    config = view.get(keys.indexKey(user, index))
    if config is None:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    isMirror = config.get("type") == "mirror"
    prefix = f"simple/{user}/{index}/" if isMirror else keys.projectsPrefix(user, index)
    names = sorted(key[len(prefix):] for key, _ in view.items(prefix))
    start = (page - 1) * pageSize
    shown: list[tuple[str, str | None]] = []
    for name in names[start:start + pageSize]:
        if isMirror:
            shown.append((name, None))
        else:
            projectConfig = view.get(keys.projectKey(user, index, name)) or {}
            shown.append((projectConfig.get("name") or name, latestVersion(view, user, index, name)))
    return IndexPage(config, shown, len(names), page, pageSize)


class Browse:
    """The reads behind the web interface's index and project pages."""

    def __init__(self, storage: IStorage) -> None:
        self._storage = storage

    def indexPage(self, user: str, index: str, page: int, pageSize: int) -> Any:
        """@return: a Deferred with an L{IndexPage}."""
        return self._storage.read(lambda view: collectIndexPage(view, user, index, page, pageSize))

    def projectInfo(self, user: str, index: str, project: str, readable: Readable | None = None) -> Any:
        """
        @return: a Deferred with a L{ProjectInfo}, or L{Restricted} when the
            index's chain holds a restricted index and C{readable} is not given.
        """
        return self._storage.read(lambda view: collectProjectInfo(view, user, index, project, readable))
