"""
What a replica must ask its primary about a read, decided from what it has
replicated: the web layer's forwarding (L{devpi_twisted.web.replicaproxy})
asks this, and never reads storage keys itself.
"""

from dataclasses import dataclass

from devpi_twisted.errors import Gone, NotFound
from devpi_twisted.interfaces import IReadView, IStorage
from devpi_twisted.mirror.pages import simpleKey
from devpi_twisted.model import keys
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.model.inheritance import contributingStages, resolutionOrder
from devpi_twisted.model.names import normalizeProject
from devpi_twisted.services.fileentries import lookupFile


async def planRead(storage: IStorage, kind: str, user: str, index: str, rest: list[str]) -> "ReadPlan":
    """
    How a read of C{/user/index/kind/rest...} that may need upstream is
    answered (C{kind} is C{+simple} or C{+f}).
    """
    return await storage.read(lambda view: _plan(view, kind, user, index, rest))


@dataclass
class ReadPlan:
    """
    How a read that may need upstream is answered.

    @ivar forward: ask the primary.
    @ivar digest: a stored file whose content must be here to answer locally.
    @ivar page: C{(user, index, project)} of a simple project page that a
        mirror contributes to, with C{expiry} the shortest
        C{mirror_cache_expiry} of those mirrors and C{linksHere} whether all
        their cached links have replicated.
    """

    forward: bool
    digest: str | None = None
    page: tuple[str, str, str] | None = None
    expiry: float = 0.0
    linksHere: bool = False


def _plan(view: IReadView, kind: str, user: str, index: str, rest: list[str]) -> ReadPlan:
    config = view.get(keys.indexKey(user, index))
    if config is None:
        return ReadPlan(False)
    if kind == "+simple":
        order = resolutionOrder(user, index, lambda u, i: view.get(keys.indexKey(u, i)))
        if not any(stage.isMirror for stage in order):
            return ReadPlan(False)
        if not rest or not rest[0] or (len(rest) > 1 and rest[1]):
            return ReadPlan(True)  # the project list, or refresh and other sub-paths
        project = normalizeProject(rest[0])
        contributing, _ = contributingStages(
            order, project, lambda stage: view.get(keys.projectKey(stage.user, stage.index, project)) is not None)
        mirrors = [stage for stage in contributing if stage.isMirror]
        if not mirrors:
            return ReadPlan(False)  # a private project: upstream is never asked about it
        return ReadPlan(
            True, page=(user, index, project),
            expiry=min(float(stage.config.get("mirror_cache_expiry", 1800)) for stage in mirrors),
            linksHere=all(view.get(simpleKey(stage, project)) is not None for stage in mirrors),
        )
    if config.get("type") != MIRROR:
        return ReadPlan(False)
    relpath = "/".join(rest)
    metadata = relpath.endswith(".metadata")
    try:
        entry = lookupFile(view, user, index, relpath[: -len(".metadata")] if metadata else relpath)
    except Gone:
        return ReadPlan(False)
    except NotFound:
        return ReadPlan(True)
    if metadata:
        stored = view.get(keys.coreMetadataKey(user, index, entry["project"], entry["filename"]))
        return ReadPlan(stored is None)
    return ReadPlan(False, digest=entry.get("sha256"))
