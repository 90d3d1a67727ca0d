# -*- test-case-name: tests.test_retention -*-
"""
Retention runs: the versions an index's policy selects
(L{devpi_twisted.model.retention}), previewed or removed.

A removal goes through the version-deletion path
(L{devpi_twisted.services.releases.removeVersion}), so it is in the
changelog (replicas and exports follow), its files answer 410 saying the
policy removed them, and the blob collector frees their space.  Versions are
removed in batches, each batch one transaction of whole versions that
evaluates the policy again on what it sees: a stop or crash between batches
leaves every remaining version whole, and a run that raced with other
changes removes only what the policy still selects.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.errors import BadRequest, Forbidden, NotFound, Unauthorized
from devpi_twisted.interfaces import IReadView, IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.indexconfig import STAGE
from devpi_twisted.model.retention import Policy, VersionFacts, parseUploadTime, policyOf, select
from devpi_twisted.services.fileentries import projectEntries, removalReason
from devpi_twisted.services.releases import removeVersion
from devpi_twisted.storage.periodic import PeriodicService

log = Logger()

#: Versions removed per transaction: each is short, and the work between two stops is bounded.
BATCH = 20
#: Versions a scheduled run removes at most; the rest waits for the next run.
RUN_LIMIT = 5000


@dataclass(frozen=True)
class Removal:
    """One version a run removes (or would), and why."""

    project: str
    version: str
    files: tuple[str, ...]
    bytes: int
    rules: tuple[str, ...]

    def asJSON(self) -> dict[str, Any]:
        return {"project": self.project, "version": self.version, "files": list(self.files),
                "bytes": self.bytes, "rules": list(self.rules)}


@dataclass(frozen=True)
class RunResult:
    """What a run on one index removed (or, dry, would remove), evaluated at C{serial}."""

    index: str
    dryRun: bool
    serial: int | None
    removals: list[Removal]

    def asJSON(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "dry_run": self.dryRun,
            "serial": self.serial,
            "versions": [r.asJSON() for r in self.removals],
            "totals": {"versions": len(self.removals), "files": sum(len(r.files) for r in self.removals),
                       "bytes": sum(r.bytes for r in self.removals)},
        }


@dataclass
class RetentionTotals:
    """What retention removed since the process started, for C{/+metrics}."""

    versions: int = 0
    files: int = 0
    bytes: int = 0


def versionFacts(view: IReadView, user: str, index: str, project: str
                 ) -> tuple[list[VersionFacts], dict[str, list[dict[str, Any]]]]:
    """The facts the rules look at for each version of a project, and each version's file entries."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in projectEntries(view, user, index, project):
        entries.setdefault(entry["version"], []).append(entry)
    facts = []
    for _, metadata in view.items(keys.versionsPrefix(user, index, project)):
        version = metadata["version"]
        files = entries.get(version, [])
        releaseFiles = [e for e in files if e.get("rel", "releasefile") == "releasefile"]
        times = [t for t in (parseUploadTime(e.get("upload_time")) for e in releaseFiles) if t is not None]
        lastUse = []
        for entry in releaseFiles:
            uploaded = parseUploadTime(entry.get("upload_time"))
            record = view.get(keys.downloadKey(user, index, project, entry["filename"]))
            last = record.get("last") if isinstance(record, dict) else None
            used = max([t for t in (uploaded, last) if isinstance(t, (int, float))], default=None)
            if used is not None:
                lastUse.append(float(used))
        facts.append(VersionFacts(
            version=version,
            uploaded=max(times) if times else None,
            lastUse=tuple(lastUse) if len(lastUse) == len(releaseFiles) else (),
            yanked=bool(releaseFiles) and all(e.get("yanked") for e in releaseFiles),
        ))
    return facts, entries


def planProject(view: IReadView, user: str, index: str, project: str, policy: Policy, now: float) -> list[Removal]:
    """The versions of one project the policy removes at C{now}."""
    facts, entries = versionFacts(view, user, index, project)
    removals = []
    for chosen, rules in select(policy, facts, now):
        files = entries.get(chosen.version, [])
        removals.append(Removal(project, chosen.version, tuple(sorted(e["filename"] for e in files)),
                                sum(int(e.get("size") or 0) for e in files), tuple(rules)))
    return removals


def planIndex(view: IReadView, user: str, index: str, now: float) -> list[Removal]:
    """Every version the index's policy removes at C{now}, by project."""
    config = view.get(keys.indexKey(user, index)) or {}
    policy = policyOf(config)
    if not policy.isSet:
        return []
    prefix = keys.projectsPrefix(user, index)
    removals = []
    for key, _ in view.items(prefix):
        removals.extend(planProject(view, user, index, key[len(prefix):], policy, now))
    return removals


def indexesWithPolicies(view: IReadView) -> list[tuple[str, str]]:
    """C{(user, index)} of every stage index whose policy sets a rule."""
    found = []
    for key, config in view.items(keys.INDEX):
        if config.get("type") == STAGE and policyOf(config).isSet:
            user, _, index = key[len(keys.INDEX):].partition("/")
            found.append((user, index))
    return found


class Retention:
    """Previews and applies the retention policies of private indexes."""

    def __init__(self, storage: IStorage, clock: Callable[[], float], batch: int = BATCH) -> None:
        self._storage = storage
        self._clock = clock
        self._batch = batch
        self.totals = RetentionTotals()

    async def checkRights(self, requester: str | None, user: str, index: str) -> None:
        """@raise Unauthorized, Forbidden, NotFound, BadRequest: only the owner or root runs a policy."""
        if requester is None:
            raise Unauthorized("retention runs need the index owner or root to log in")
        if requester not in (user, "root"):
            raise Forbidden(f"only {user} or root may run the retention policy of {user}/{index}")
        config = await self._storage.read(lambda view: view.get(keys.indexKey(user, index)))
        if config is None:
            raise NotFound(f"The stage {user}/{index} could not be found.")
        if config.get("type") != STAGE:
            raise BadRequest(f"{user}/{index} is a mirror: retention policies apply to private indexes")

    async def preview(self, user: str, index: str) -> RunResult:
        """What a run would remove now; changes nothing."""
        now = self._clock()

        def _plan(view: IReadView) -> tuple[int | None, list[Removal]]:
            return getattr(view, "serial", None), planIndex(view, user, index, now)

        serial, removals = await self._storage.read(_plan)
        return RunResult(f"{user}/{index}", True, serial, removals)

    async def apply(self, user: str, index: str, trigger: str = "api", limit: int | None = None,
                    proceed: Callable[[], bool] = lambda: True) -> RunResult:
        """
        Remove what the policy selects, C{limit} versions at most, in
        batches; C{proceed()} is asked before each batch (a stopping
        service says no).  @return: what was removed.
        """
        now = self._clock()
        planned = await self._storage.read(lambda view: planIndex(view, user, index, now))
        if limit is not None:
            planned = planned[:limit]
        removed: list[Removal] = []
        serial = None
        for start in range(0, len(planned), self._batch):
            if not proceed():
                break
            batch = planned[start:start + self._batch]
            serial, done = await self._storage.write(lambda txn: self._removeBatch(txn, user, index, batch, now))
            removed.extend(done)
            self._count(done)
        result = RunResult(f"{user}/{index}", False, serial, removed)
        if removed:
            log.info(
                "retention: removed {versions} versions ({files} files, {bytes} bytes) from {index} ({trigger})",
                index=result.index, trigger=trigger, versions=len(removed), files=sum(len(r.files) for r in removed),
                bytes=sum(r.bytes for r in removed), removed=[f"{r.project}=={r.version}" for r in removed],
                serial=serial,
            )
        return result

    def _removeBatch(self, txn: IWriteTransaction, user: str, index: str, batch: list[Removal],
                     now: float) -> list[Removal]:
        """One transaction: the batch's versions the policy still selects, removed whole."""
        policy = policyOf(txn.get(keys.indexKey(user, index)) or {})
        if not policy.isSet:
            return []
        reason = removalReason("retention", f"{user}/{index}", now)
        done = []
        fresh: dict[str, dict[str, Removal]] = {}
        for wanted in batch:
            if wanted.project not in fresh:
                fresh[wanted.project] = {r.version: r for r in planProject(txn, user, index, wanted.project,
                                                                            policy, now)}
            still = fresh[wanted.project].get(wanted.version)
            if still is not None:
                removeVersion(txn, user, index, still.project, still.version, reason)
                done.append(still)
        return done

    def _count(self, removed: list[Removal]) -> None:
        self.totals.versions += len(removed)
        self.totals.files += sum(len(r.files) for r in removed)
        self.totals.bytes += sum(r.bytes for r in removed)

    async def applyAll(self, limit: int = RUN_LIMIT, proceed: Callable[[], bool] = lambda: True) -> list[RunResult]:
        """A scheduled run: every index's policy, C{limit} versions at most in all."""
        indexes = await self._storage.read(indexesWithPolicies)
        results = []
        for user, index in indexes:
            if limit <= 0 or not proceed():
                break
            try:
                result = await self.apply(user, index, "schedule", limit, proceed)
            except Exception:
                log.failure("retention: the run on {index} failed", index=f"{user}/{index}")
                continue
            limit -= len(result.removals)
            results.append(result)
        return results


class RetentionSchedule(PeriodicService):
    """
    Applies every index's policy each C{interval} seconds, once C{ready()}
    has fired; run only by a primary's main process (never a replica or a
    C{--requests-only} worker).
    """

    def __init__(self, retention: Retention, clock: IReactorTime, interval: float,
                 ready: Callable[[], "Deferred[None]"] | None = None) -> None:
        super().__init__(clock, interval, ready)
        self._retention = retention
        self.lastRun: float | None = None

    what = "retention: a scheduled run"

    def onePass(self) -> Any:
        # A run under way stops after its current batch (each a whole transaction).
        return self.runOnce()

    async def runOnce(self) -> list[RunResult]:
        results = await self._retention.applyAll(proceed=lambda: self.running)
        self.lastRun = self._clock.seconds()
        return results
