"""
Index inheritance: which indexes a request sees, and which of them may
contribute releases of a project.

The resolution order is devpi's: the index itself, then a breadth-first walk
over C{bases} in which mirror indexes are moved to the end; each index once,
missing ones skipped.  A project that the index or any non-mirror base holds
hides the mirrors' releases of it, unless C{mirror_whitelist} names it (or
C{*}): a private C{acme 1.0} always beats an upstream C{acme 99.0}.

Under read ACLs (C{acl_read}) a requester sees the order without the bases
they may not read, and without the bases reached only through those
(L{visibleOrder}): as if the restricted base were not among the C{bases}.
So a restricted base's private project does not hide a mirror's releases of
it from a requester who may not read that base (its existence must not show),
and its C{mirror_whitelist} does not count for them either.
"""

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from devpi_twisted.model.acl import isPublic, mayRead
from devpi_twisted.model.identity import PKG_READ, Identity
from devpi_twisted.model.indexconfig import MIRROR


@dataclass(frozen=True)
class Stage:
    """One index in a resolution order."""

    user: str
    index: str
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.user}/{self.index}"

    @property
    def isMirror(self) -> bool:
        return self.config.get("type") == MIRROR


def resolutionOrder(user: str, index: str, configOf: Callable[[str, str], dict[str, Any] | None]) -> list[Stage]:
    """
    The stages an index serves from, in devpi's order.

    @param configOf: the config of C{(user, index)}, or C{None} when missing.
    """
    first = configOf(user, index)
    if first is None:
        return []
    order: list[Stage] = []
    mirrors: list[Stage] = []
    seen = {f"{user}/{index}"}
    pending = deque([Stage(user, index, first)])
    while pending:
        stage = pending.popleft()
        (mirrors if stage.isMirror else order).append(stage)
        for base in stage.config.get("bases", ()):
            if base in seen:
                continue
            seen.add(base)
            baseUser, _, baseIndex = base.partition("/")
            config = configOf(baseUser, baseIndex)
            if config is not None:
                pending.append(Stage(baseUser, baseIndex, config))
    return order + mirrors


def isPublicOrder(order: list[Stage]) -> bool:
    """Whether everyone may read every index of C{order}: then every requester sees all of it."""
    return all(isPublic(stage.config) for stage in order)


def stageReader(identity: Identity | None) -> Callable[[Stage], bool]:
    """
    Whether C{identity} (C{None}: anonymous) may read a stage: a public
    index anyone may (a token's scope does not narrow what anonymous may
    read); a restricted one if C{acl_read} lets the user in and the API
    token that authenticated them, if any, allows C{pkg_read} on it.
    """

    def readable(stage: Stage) -> bool:
        if isPublic(stage.config):
            return True
        if identity is None or not mayRead(identity.user, stage.user, stage.config):
            return False
        return identity.permits(PKG_READ, stage.name)

    return readable


def visibleOrder(order: list[Stage], readable: Callable[[Stage], bool]) -> list[Stage]:
    """
    The part of C{order} (a whole resolution order) a requester sees: the
    walk done again with the stages they may not read taken as missing, so
    a base reached only through one of them is left out too.  Empty when
    they may not read the index itself.
    """
    if not order:
        return []
    configs = {stage.name: stage for stage in order}

    def configOf(user: str, index: str) -> dict[str, Any] | None:
        stage = configs.get(f"{user}/{index}")
        return stage.config if stage is not None and readable(stage) else None

    return resolutionOrder(order[0].user, order[0].index, configOf)


def chainOf(order: list[Stage]) -> tuple[str, ...]:
    """The names of a (visible) order: what a page built over it depends on, besides the data."""
    return tuple(stage.name for stage in order)


def contributingStages(
    order: list[Stage], project: str, holds: Callable[[Stage], bool]
) -> tuple[list[Stage], list[Stage]]:
    """
    Which stages may contribute releases of C{project} (normalised).

    @param holds: whether a non-mirror stage has the project.
    @return: C{(contributing, hiddenMirrors)}: the stages to merge in order,
        and the mirrors left out because a private stage holds the project.
    """
    if not order:
        return [], []
    inheritance = order[0].config.get("mirror_whitelist_inheritance", "union")
    whitelist: set[str] | None = None
    whitelisted = False
    privateHit = False
    contributing: list[Stage] = []
    hidden: list[Stage] = []
    for stage in order:
        if stage.isMirror:
            if privateHit and not whitelisted:
                hidden.append(stage)
            else:
                contributing.append(stage)
            continue
        names = set(stage.config.get("mirror_whitelist", ()))
        if whitelist is None:
            whitelist = names
        elif inheritance == "intersection":
            whitelist &= names
        else:
            whitelist |= names
        if "*" in whitelist or project in whitelist:
            whitelisted = True
        elif holds(stage):
            privateHit = True
        contributing.append(stage)
    return contributing, hidden
