"""
Read-side views of releases in devpi's JSON shapes (C{projectconfig},
C{versiondata} with C{+links}), over an index's resolution order: the part
of it the requester may read (L{devpi_twisted.model.inheritance.visibleOrder}).
"""

from dataclasses import dataclass, field
from typing import Any

from devpi_twisted.errors import NotFound
from devpi_twisted.interfaces import IReadView, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.acl import isPublic
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.model.inheritance import Stage, contributingStages, isPublicOrder, visibleOrder
from devpi_twisted.model.simplepage import SimpleFile
from devpi_twisted.services.fileentries import coreMetadata, lookupFile, projectEntries
from devpi_twisted.services.simple import Identify, Readable, orderOf, readerFor

_LIST_DEFAULTS = (
    "platform", "classifiers", "supported_platform", "provides", "requires", "obsoletes",
    "project_urls", "provides_dist", "obsoletes_dist", "requires_dist", "requires_external",
    "provides_extras", "dynamic", "license_file",
)


def linkOf(entry: dict[str, Any], baseURL: str) -> dict[str, Any]:
    link = {
        "rel": entry.get("rel", "releasefile"),
        "hash_spec": f"sha256={entry['sha256']}",
        "hashes": {"sha256": entry["sha256"], **entry.get("hashes", {})},
        "href": f"{baseURL}/{entry['relpath']}",
        "log": entry.get("log", []),
    }
    if entry.get("yanked"):
        link["yanked"] = entry["yanked"]
    if entry.get("for_relpath"):
        link["for_href"] = f"{baseURL}/{entry['for_relpath']}"
    return link


def _versionData(metadata: dict[str, Any], links: list[dict[str, Any]]) -> dict[str, Any]:
    data = dict(metadata)
    for key in _LIST_DEFAULTS:
        data.setdefault(key, [])
    data["+links"] = links
    return data


def _stageVersions(view: IReadView, stage: Stage, project: str, baseURL: str) -> dict[str, dict[str, Any]]:
    versions: dict[str, dict[str, Any]] = {}
    links: dict[str, list[dict[str, Any]]] = {}
    for entry in projectEntries(view, stage.user, stage.index, project):
        links.setdefault(entry["version"], []).append(linkOf(entry, baseURL))
    for _, metadata in view.items(keys.versionsPrefix(stage.user, stage.index, project)):
        version = metadata["version"]
        versions[version] = _versionData(metadata, links.get(version, []))
    return versions


@dataclass
class ProjectVersions:
    """
    A project's C{projectconfig} while it is put together: the versions of
    the private stages (read in one storage view), and the mirror stages
    that still have to be asked (upstream, possibly over the network).
    """

    project: str
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    found: bool = False
    mirrors: list[Stage] = field(default_factory=list)
    # read without a requester, the order had a restricted index: nothing collected
    restricted: bool = False

    def add(self, versions: dict[str, dict[str, Any]]) -> None:
        """Merge one stage's versions; a version seen earlier shadows the later one."""
        self.found = True
        for version, data in versions.items():
            if version in self.versions:
                self.versions[version].setdefault("+shadowing", []).append(data)
            else:
                self.versions[version] = data

    def result(self) -> dict[str, dict[str, Any]]:
        if not self.found:
            raise NotFound(f"no project {self.project!r}")
        return self.versions


def collectProject(view: IReadView, user: str, index: str, project: str, baseURL: str,
                   ignoreBases: bool, readable: Readable | None = None) -> ProjectVersions:
    """
    C{GET /user/index/project}: every version the private stages of the
    index serve, with links, and the mirrors that may add theirs.

    @param readable: whether the requester may read a stage; without it
        only a public order is read (else the answer is C{restricted}).
    """
    order = orderOf(view, user, index)
    if readable is not None:
        order = visibleOrder(order, readable)
        if not order:
            raise NotFound(f"The stage {user}/{index} could not be found.")
    if ignoreBases:
        order = order[:1]
    if readable is None and not isPublicOrder(order):
        return ProjectVersions(project, restricted=True)

    def holds(stage: Stage) -> bool:
        return view.get(keys.projectKey(stage.user, stage.index, project)) is not None

    contributing, _ = contributingStages(order, project, holds)
    collected = ProjectVersions(project)
    for stage in contributing:
        if stage.isMirror:
            collected.mirrors.append(stage)
        elif holds(stage):
            collected.add(_stageVersions(view, stage, project, baseURL))
    return collected


def mirrorVersions(project: str, files: list[SimpleFile]) -> dict[str, dict[str, Any]]:
    """
    A mirror's versions as devpi synthesizes them from the simple links:
    C{name}, C{version}, C{requires_python} and C{yanked} of the first file
    of each version, and every file in C{+links}.

    @param files: the mirror's files, their C{url}s absolute.
    """
    versions: dict[str, dict[str, Any]] = {}
    for f in files:
        if not f.version:
            continue
        data = versions.get(f.version)
        if data is None:
            data = versions[f.version] = {"name": project, "version": f.version}
            if f.requiresPython is not None:
                data["requires_python"] = f.requiresPython
            if f.yanked is not False:
                data["yanked"] = f.yanked
            data["+links"] = []
        data["+links"].append({
            "rel": "releasefile",
            "hash_spec": f"sha256={f.sha256}" if f.sha256 else "",
            "hashes": {"sha256": f.sha256} if f.sha256 else {},
            "href": f.url,
        })
    return versions


def fileMeta(entry: dict[str, Any]) -> dict[str, Any]:
    """C{releasefilemeta}: the entry as devpi shows it for a JSON file request."""
    return {
        "last_modified": entry.get("last_modified"),
        "hash_spec": f"sha256={entry['sha256']}",
        "hashes": {"sha256": entry["sha256"], **entry.get("hashes", {})},
        "project": entry["project"],
        "version": entry["version"],
        "size": entry["size"],
    }


class Queries:
    """What the read views ask of stored releases, each answer read in one storage view."""

    def __init__(self, storage: IStorage) -> None:
        self._storage = storage

    async def projectVersions(self, user: str, index: str, project: str, baseURL: str,
                              ignoreBases: bool, identify: Identify | None = None) -> ProjectVersions:
        """
        See L{collectProject}; the mirrors it names are still to be asked.

        @param identify: who asks, called only when the order has a
            restricted index; without it the requester is anonymous.
        """
        collected = await self._storage.read(
            lambda view: collectProject(view, user, index, project, baseURL, ignoreBases))
        if collected.restricted:
            readable = await readerFor(identify)
            collected = await self._storage.read(
                lambda view: collectProject(view, user, index, project, baseURL, ignoreBases, readable))
        return collected

    async def file(self, user: str, index: str, relpath: str) -> dict[str, Any]:
        """The entry a C{+f/...} path names.  @raise Gone: deleted.  @raise NotFound: never here."""
        return await self._storage.read(lambda view: lookupFile(view, user, index, relpath))

    async def fileOrMirror(self, user: str, index: str, relpath: str) -> tuple[dict[str, Any] | None, Stage | None]:
        """
        The stored file entry (C{None} when a mirror has yet to fetch it),
        and the index as a stage when it is a mirror.
        """
        entry, stage, _ = await self.servedFile(user, index, relpath)
        return entry, stage

    async def servedFile(self, user: str, index: str, relpath: str
                         ) -> tuple[dict[str, Any] | None, Stage | None, bool]:
        """
        As L{fileOrMirror}, and whether the index is public (only a public
        index's files may be answered before routing).
        """
        return await self._storage.read(lambda view: _fileOrMirror(view, user, index, relpath))

    async def coreMetadata(self, user: str, index: str, entry: dict[str, Any]) -> bytes | None:
        """The stored METADATA of a wheel's entry, if any."""
        return await self._storage.read(
            lambda view: coreMetadata(view, user, index, entry["project"], entry["filename"]))


def _fileOrMirror(view: IReadView, user: str, index: str, relpath: str
                  ) -> tuple[dict[str, Any] | None, Stage | None, bool]:
    config = view.get(keys.indexKey(user, index))
    if config is None:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    stage = Stage(user, index, config) if config.get("type") == MIRROR else None
    public = isPublic(config)
    try:
        return lookupFile(view, user, index, relpath), stage, public
    except NotFound:
        if stage is None:
            raise
        return None, stage, public
