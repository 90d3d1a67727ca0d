"""
Index inheritance: which indexes a request sees, and which of them may
contribute releases of a project.

The resolution order is devpi's: the index itself, then a breadth-first walk
over C{bases} in which mirror indexes are moved to the end; each index once,
missing ones skipped.  A project that the index or any non-mirror base holds
hides the mirrors' releases of it, unless C{mirror_whitelist} names it (or
C{*}): a private C{acme 1.0} always beats an upstream C{acme 99.0}.
"""

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

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
