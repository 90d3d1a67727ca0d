"""
Retention policies of private indexes: the pure selection, the index
settings, C{POST /USER/INDEX/+retention}, the 410 of removed files, the
scheduled run, a run stopped in the middle, exports and metrics.
"""

import hashlib
from dataclasses import replace
from typing import Any

from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.admin.exporter import EXTRA, planExport
from devpi_twisted.app.compose import runsRetention
from devpi_twisted.model import keys
from devpi_twisted.model.retention import (
    DAY, KEEP_LATEST, MAX_AGE, NOT_DOWNLOADED, PRERELEASE_MAX_AGE, Policy, VersionFacts, parseUploadTime,
    policyOf, select,
)
from devpi_twisted.errors import Gone
from devpi_twisted.services import retention as retentionModule
from devpi_twisted.services.fileentries import lookupFile, removalReason, removeFileEntry
from devpi_twisted.services.retention import RetentionSchedule

from .distbuilder import buildSdist, buildWheel
from . import test_export
from .helpers import parseServerOptions
from .releaseharness import ServerHarness, combine
from .test_tokens import bearer

JSON = {b"Accept": [b"application/json"]}
NOW = 1_800_000_000.0


def facts(version: str, ageDays: float | None = 0, yanked: bool = False,
          unusedDays: tuple[float, ...] | None = None) -> VersionFacts:
    uploaded = None if ageDays is None else NOW - ageDays * DAY
    lastUse = tuple(NOW - d * DAY for d in unusedDays) if unusedDays is not None else (
        () if uploaded is None else (uploaded,))
    return VersionFacts(version, uploaded, lastUse, yanked)


def chosen(policy: Policy, versions: list[VersionFacts]) -> list[str]:
    return [v.version for v, _ in select(policy, versions, NOW)]


class SelectionTests(SynchronousTestCase):
    """Which versions a policy selects, rule by rule (L{devpi_twisted.model.retention.select})."""

    def test_unsetPolicySelectsNothing(self) -> None:
        self.assertEqual(chosen(Policy(), [facts("1.0", 1000), facts("2.0")]), [])

    def test_keepLatest(self) -> None:
        """keep_latest 2 keeps the two newest by PEP 440 order, not upload order."""
        versions = [facts("1.10"), facts("1.9"), facts("1.2"), facts("2.0rc1")]
        self.assertEqual(chosen(Policy(keepLatest=2), versions), ["1.9", "1.2"])

    def test_keepLatestZeroStillKeepsNewest(self) -> None:
        """The newest version is never selected, even by keep_latest 0."""
        self.assertEqual(chosen(Policy(keepLatest=0), [facts("1.0"), facts("2.0")]), ["1.0"])

    def test_yankedCountLast(self) -> None:
        """Yanked versions rank after every other: they go first, and a yanked newest is not protected."""
        versions = [facts("1.0"), facts("2.0"), facts("3.0", yanked=True)]
        self.assertEqual(chosen(Policy(keepLatest=2), versions), ["3.0"])
        self.assertEqual(chosen(Policy(keepLatest=1), versions), ["1.0", "3.0"])

    def test_maxAge(self) -> None:
        versions = [facts("1.0", 100), facts("2.0", 40), facts("3.0", 100)]
        self.assertEqual(chosen(Policy(maxAgeDays=50), versions), ["1.0"])  # 3.0 is the newest

    def test_versionWithoutFilesHasNoAge(self) -> None:
        self.assertEqual(chosen(Policy(maxAgeDays=1), [facts("1.0", None), facts("2.0")]), [])

    def test_prereleaseMaxAge(self) -> None:
        """Only pre- and dev releases older than the limit; finals and young prereleases stay."""
        versions = [facts("1.0", 100), facts("1.1a1", 100), facts("1.1.dev3", 100), facts("1.1rc1", 5),
                    facts("1.1", 0)]
        self.assertEqual(chosen(Policy(prereleaseMaxAgeDays=30), versions), ["1.1a1", "1.1.dev3"])

    def test_notDownloaded(self) -> None:
        """Every file unused for the limit; one recent download keeps the version."""
        versions = [facts("1.0", 100, unusedDays=(90, 80)), facts("1.1", 100, unusedDays=(90, 3)),
                    facts("2.0", 100, unusedDays=(90,))]
        self.assertEqual(chosen(Policy(notDownloadedDays=30), versions), ["1.0"])

    def test_everySetRuleMustAllow(self) -> None:
        """keep_latest and max_age together: old and beyond the N newest."""
        versions = [facts("1.0", 100), facts("1.1", 10), facts("1.2", 100), facts("1.3", 100), facts("2.0", 0)]
        policy = Policy(keepLatest=2, maxAgeDays=30)
        self.assertEqual(chosen(policy, versions), ["1.2", "1.0"])
        self.assertEqual([rules for _, rules in select(policy, versions, NOW)][0], [KEEP_LATEST, MAX_AGE])

    def test_prereleaseAndKeepLatest(self) -> None:
        versions = [facts("1.0", 100), facts("2.0a1", 100), facts("2.0a2", 100), facts("2.0a3", 1)]
        self.assertEqual(chosen(Policy(keepLatest=2, prereleaseMaxAgeDays=30), versions), ["2.0a1"])

    def test_invalidVersionsRankLowest(self) -> None:
        self.assertEqual(chosen(Policy(keepLatest=1), [facts("weird"), facts("0.1")]), ["weird"])

    @given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5), st.booleans(), st.integers(0, 400)),
                    min_size=1, max_size=12, unique_by=lambda t: (t[0], t[1])),
           st.one_of(st.none(), st.integers(0, 6)), st.one_of(st.none(), st.integers(0, 400)))
    def test_properties(self, specs: list[tuple[int, int, bool, int]], keep: int | None, age: int | None) -> None:
        """The newest stays, keep_latest keeps its N, and every selected version is old enough."""
        versions = [facts(f"{a}.{b}", days, yanked) for a, b, yanked, days in specs]
        picked = chosen(Policy(keepLatest=keep, maxAgeDays=age), versions)
        ranked = sorted(versions, key=lambda v: (not v.yanked, tuple(int(p) for p in v.version.split("."))),
                        reverse=True)
        self.assertNotIn(ranked[0].version, picked)
        if keep is not None:
            self.assertFalse(set(picked) & {v.version for v in ranked[:keep]})
        if age is not None:
            for v in versions:
                if v.version in picked:
                    self.assertGreater(NOW - v.uploaded, age * DAY)
        if keep is None and age is None:
            self.assertEqual(picked, [])

    def test_parseUploadTime(self) -> None:
        self.assertEqual(parseUploadTime("2023-11-14T22:13:20.250000Z"), 1700000000.25)
        self.assertEqual(parseUploadTime("2023-11-14T22:13:20Z"), 1700000000.0)
        self.assertIsNone(parseUploadTime("yesterday"))
        self.assertIsNone(parseUploadTime(None))

    def test_mirrorHasNoPolicy(self) -> None:
        self.assertFalse(policyOf({"type": "mirror", KEEP_LATEST: 1}).isSet)
        self.assertEqual(policyOf({"type": "stage", KEEP_LATEST: 1}), Policy(keepLatest=1))


class RetentionCase(SynchronousTestCase):
    """alice/dev with demo-pkg 1.0, 1.1, 2.0 (wheel and sdist each), uploaded a day apart."""

    versions = ("1.0", "1.1", "2.0")

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "dev")
        self.dists: dict[str, Any] = {}
        for version in self.versions:
            for dist in (buildWheel(version=version), buildSdist(version=version)):
                self.h.mustUpload("alice/dev", dist)
                self.dists[dist.filename] = dist
            self.h.clock.advance(DAY)

    def configure(self, **settings: Any) -> Any:
        edits = [f"{k}={v}" for k, v in settings.items()]
        return self.h.request("PATCH", "/alice/dev", combine(self.h.alice, JSON), json=edits)

    def runPolicy(self, dryRun: bool | None = None, auth: Any = None, stage: str = "alice/dev") -> Any:
        body = None if dryRun is None else {"dry_run": dryRun}
        return self.h.request("POST", f"/{stage}/+retention", combine(auth or self.h.alice, JSON), json=body)

    def fileURL(self, filename: str) -> str:
        dist = self.dists[filename]
        return f"/alice/dev/+f/{dist.sha256[:3]}/{dist.sha256[3:16]}/{filename}"

    def pageFiles(self) -> list[str]:
        return sorted(f["filename"] for f in self.h.simpleJSON("alice/dev", "demo-pkg")["files"])


class SettingsTests(RetentionCase):
    """The retention_* settings through the index JSON API and devpi-client's key=value edits."""

    def test_setAndShown(self) -> None:
        answer = self.configure(retention_keep_latest="3", retention_prerelease_max_age_days="30")
        self.assertEqual(answer.code, 200, answer.body)
        config = self.h.request("GET", "/alice/dev", JSON).json["result"]
        self.assertEqual((config[KEEP_LATEST], config[PRERELEASE_MAX_AGE]), (3, 30))
        self.assertNotIn(MAX_AGE, config)

    def test_offByDefault(self) -> None:
        config = self.h.request("GET", "/alice/dev", JSON).json["result"]
        self.assertFalse(set(config) & {KEEP_LATEST, MAX_AGE, PRERELEASE_MAX_AGE, NOT_DOWNLOADED})

    def test_removeSetting(self) -> None:
        self.configure(retention_max_age_days=10)
        answer = self.h.request("PATCH", "/alice/dev", combine(self.h.alice, JSON), json=["retention_max_age_days-="])
        self.assertEqual(answer.code, 200, answer.body)
        self.assertNotIn(MAX_AGE, answer.json["result"])

    def test_invalid(self) -> None:
        """Negative, fractional, boolean or non-numeric values are a 400 naming the setting."""
        for value in ("-1", "abc", "1.5", ""):
            answer = self.configure(retention_keep_latest=value)
            self.assertEqual(answer.code, 400, value)
            self.assertIn("retention_keep_latest", answer.json["message"])
        for value in (-1, 1.5, True, [1]):
            answer = self.h.request("PUT", "/alice/other", combine(self.h.alice, JSON),
                                    json={"retention_max_age_days": value})
            self.assertEqual(answer.code, 400, value)
            self.assertIn("non-negative integer", answer.json["message"])

    def test_notOnMirrors(self) -> None:
        answer = self.h.request("PUT", "/root/mirror", combine(self.h.root, JSON),
                                json={"type": "mirror", "mirror_url": "https://example.invalid/simple/",
                                      "retention_keep_latest": 1})
        self.assertEqual(answer.code, 200, answer.body)  # stage keys are dropped on mirrors, as devpi does
        self.assertNotIn(KEEP_LATEST, answer.json["result"])


class RunTests(RetentionCase):
    """POST /USER/INDEX/+retention."""

    def test_dryRunThenRealRunAgree(self) -> None:
        """The dry run lists what the real run removes, with files, bytes and rules, and changes nothing."""
        self.configure(retention_keep_latest=1)
        serial = self.h.storage.currentSerial()
        dry = self.runPolicy(dryRun=True)
        self.assertEqual(dry.code, 200, dry.body)
        self.assertEqual(self.h.storage.currentSerial(), serial)
        result = dry.json["result"]
        self.assertTrue(result["dry_run"])
        self.assertEqual(result["serial"], serial)
        self.assertEqual([(v["project"], v["version"]) for v in result["versions"]],
                         [("demo-pkg", "1.1"), ("demo-pkg", "1.0")])
        first = result["versions"][1]
        self.assertEqual(first["files"], ["demo_pkg-1.0-py3-none-any.whl", "demo_pkg-1.0.tar.gz"])
        self.assertEqual(first["bytes"], sum(self.dists[f].size for f in first["files"]))
        self.assertEqual(first["rules"], [KEEP_LATEST])
        self.assertEqual(len(self.pageFiles()), 6)
        real = self.runPolicy()
        self.assertEqual(real.code, 200, real.body)
        self.assertFalse(real.json["result"]["dry_run"])
        self.assertEqual(real.json["result"]["versions"], result["versions"])
        self.assertEqual(real.json["result"]["totals"], {"versions": 2, "files": 4, "bytes": result["totals"]["bytes"]})
        self.assertEqual(self.pageFiles(), ["demo_pkg-2.0-py3-none-any.whl", "demo_pkg-2.0.tar.gz"])
        self.assertEqual(self.runPolicy(dryRun=True).json["result"]["versions"], [])

    def test_realRunReevaluates(self) -> None:
        """State changed after the dry run: the real run removes what the policy selects now."""
        self.configure(retention_keep_latest=1)
        self.assertEqual(len(self.runPolicy(dryRun=True).json["result"]["versions"]), 2)
        self.h.mustUpload("alice/dev", buildWheel(version="3.0"))
        removed = self.runPolicy().json["result"]["versions"]
        self.assertEqual([v["version"] for v in removed], ["2.0", "1.1", "1.0"])

    def test_noPolicyRemovesNothing(self) -> None:
        answer = self.runPolicy()
        self.assertEqual((answer.code, answer.json["result"]["versions"]), (200, []))
        self.assertEqual(len(self.pageFiles()), 6)

    def test_nonVolatileIndex(self) -> None:
        """The owner's policy applies to a non-volatile index too (setting it is the consent)."""
        self.configure(volatile="False", retention_keep_latest=2)
        self.assertEqual([v["version"] for v in self.runPolicy().json["result"]["versions"]], ["1.0"])

    def test_permissions(self) -> None:
        """Anonymous 401, another user 403, root may; nothing changes when refused."""
        self.configure(retention_keep_latest=1)
        anonymous = self.h.request("POST", "/alice/dev/+retention", JSON, json={"dry_run": True})
        self.assertEqual(anonymous.code, 401, anonymous.body)
        bob = self.runPolicy(dryRun=False, auth=self.h.bob)
        self.assertEqual(bob.code, 403, bob.body)
        self.assertEqual(len(self.pageFiles()), 6)
        root = self.runPolicy(auth=self.h.root)
        self.assertEqual((root.code, len(root.json["result"]["versions"])), (200, 2))

    def test_tokenNeedsDelVerdata(self) -> None:
        """An API token needs del_verdata on that index."""
        self.configure(retention_keep_latest=1)

        def token(**restrictions: Any) -> str:
            answer = self.h.request("POST", "/alice/+token-create", combine(self.h.alice, JSON), json=restrictions)
            self.assertEqual(answer.code, 200, answer.body)
            return answer.json["result"]["token"]

        refused = self.runPolicy(auth=bearer(token(allowed=["upload"])))
        self.assertEqual(refused.code, 403, refused.body)
        self.assertIn("del_verdata", refused.json["message"])
        elsewhere = self.runPolicy(auth=bearer(token(allowed=["del_verdata"], indexes=["alice/prod"])))
        self.assertEqual(elsewhere.code, 403, elsewhere.body)
        self.assertEqual(len(self.pageFiles()), 6)
        allowed = self.runPolicy(auth=bearer(token(allowed=["del_verdata"], indexes=["alice/dev"])))
        self.assertEqual((allowed.code, len(allowed.json["result"]["versions"])), (200, 2), allowed.body)

    def test_badRequests(self) -> None:
        for body in ([True], {"dry_run": "yes"}, {"dryrun": True}):
            answer = self.h.request("POST", "/alice/dev/+retention", combine(self.h.alice, JSON), json=body)
            self.assertEqual(answer.code, 400, body)
        garbage = self.h.request("POST", "/alice/dev/+retention", combine(self.h.alice, JSON), body=b"{nope")
        self.assertEqual(garbage.code, 400, garbage.body)
        missing = self.runPolicy(stage="alice/nothere", auth=self.h.alice)
        self.assertEqual(missing.code, 404, missing.body)
        wrongMethod = self.h.request("GET", "/alice/dev/+retention", combine(self.h.alice, JSON))
        self.assertEqual(wrongMethod.code, 405, wrongMethod.body)

    def test_mirrorRefused(self) -> None:
        self.h.request("PUT", "/root/mirror", combine(self.h.root, JSON),
                       json={"type": "mirror", "mirror_url": "https://example.invalid/simple/"})
        answer = self.runPolicy(stage="root/mirror", auth=self.h.root)
        self.assertEqual(answer.code, 400, answer.body)
        self.assertIn("private", answer.json["message"])


class RemovedFileTests(RetentionCase):
    """What a removed version answers, and where the removal shows."""

    def setUp(self) -> None:
        super().setUp()
        self.configure(retention_keep_latest=2)
        self.runAt = self.h.clock.seconds()
        self.assertEqual([v["version"] for v in self.runPolicy().json["result"]["versions"]], ["1.0"])

    def test_gone(self) -> None:
        """A removed file answers 410 saying which policy removed it and when; the others are served."""
        answer = self.h.get(self.fileURL("demo_pkg-1.0.tar.gz"), JSON)
        self.assertEqual(answer.code, 410, answer.body)
        day = "2023-11-17"  # START_TIME plus three days
        self.assertEqual(answer.json["message"], f"removed by retention policy of alice/dev on {day}")
        kept = self.h.get(self.fileURL("demo_pkg-1.1.tar.gz"))
        self.assertEqual(kept.code, 200)
        self.assertEqual(hashlib.sha256(kept.body).hexdigest(), self.dists["demo_pkg-1.1.tar.gz"].sha256)

    def test_plainDeletionMessageUnchanged(self) -> None:
        """A file deleted by hand keeps devpi's message."""
        answer = self.h.request("DELETE", "/alice/dev/demo-pkg/1.1", combine(self.h.alice, JSON))
        self.assertEqual(answer.code, 200, answer.body)
        gone = self.h.get(self.fileURL("demo_pkg-1.1.tar.gz"), JSON)
        self.assertEqual((gone.code, gone.json["message"]), (410, "file existed, deleted in later serial"))

    def test_versionGone(self) -> None:
        """The version and its files are off the version API and the simple page."""
        self.assertEqual(self.h.get("/alice/dev/demo-pkg/1.0", JSON).code, 404)
        self.assertEqual(self.pageFiles(), sorted(f for f in self.dists if "-1.0" not in f))

    def test_blobsUnreferenced(self) -> None:
        """Nothing refers to the removed contents any more, so the blob collector frees them."""
        referenced = self.successResultOf(self.h.storage.referencedBlobs())
        for filename, dist in self.dists.items():
            self.assertEqual(dist.sha256 in referenced, "-1.0" not in filename, filename)

    def test_changelog(self) -> None:
        """The removal is one change in the changelog, which replicas apply."""
        serial = self.h.storage.currentSerial()
        [record] = self.successResultOf(self.h.storage.changesSince(serial - 1, 10))
        changed = set(record.changes) if isinstance(record.changes, dict) else {k for k, _ in record.changes}
        self.assertIn(keys.versionKey("alice", "dev", "demo-pkg", "1.0"), changed)

    def test_exportCarriesTheRemoval(self) -> None:
        """The export lists the removed paths with why they went."""
        plan, _ = self.successResultOf(self.h.storage.read(lambda view: planExport(view)))
        deleted = plan["indexes"]["alice/dev"][EXTRA]["deleted"]
        self.assertEqual(len(deleted), 2)
        self.assertEqual({(d["removed_by"], d["policy"], d["when"]) for d in deleted},
                         {("retention", "alice/dev", self.runAt)})

    def test_metrics(self) -> None:
        """/+metrics counts removed versions, files and bytes."""
        text = self.h.get("/+metrics").body.decode("utf-8")
        size = sum(d.size for f, d in self.dists.items() if "-1.0" in f)
        self.assertIn("devpi_retention_removed_versions_total 1.0", text)
        self.assertIn("devpi_retention_removed_files_total 2.0", text)
        self.assertIn(f"devpi_retention_removed_bytes_total {float(size)}", text)


class DownloadRuleTests(RetentionCase):
    """retention_not_downloaded_days reads the download records (written here directly)."""

    def setDownload(self, filename: str, when: float) -> None:
        key = keys.downloadKey("alice", "dev", "demo-pkg", filename)
        self.successResultOf(self.h.storage.write(lambda txn: txn.set(key, {"last": when, "count": 1})))

    def test_notDownloaded(self) -> None:
        """A version with one file downloaded recently stays; a never-downloaded one counts from upload."""
        self.h.clock.advance(40 * DAY)
        self.configure(retention_not_downloaded_days=30)
        self.setDownload("demo_pkg-1.1.tar.gz", self.h.clock.seconds() - DAY)
        self.setDownload("demo_pkg-1.0.tar.gz", self.h.clock.seconds() - 35 * DAY)
        removed = self.runPolicy(dryRun=True).json["result"]["versions"]
        self.assertEqual([(v["version"], v["rules"]) for v in removed], [("1.0", [NOT_DOWNLOADED])])

    def test_neverDownloadedCountsFromUpload(self) -> None:
        self.configure(retention_not_downloaded_days=30)
        self.assertEqual(self.runPolicy(dryRun=True).json["result"]["versions"], [])
        self.h.clock.advance(31 * DAY)
        self.assertEqual([v["version"] for v in self.runPolicy(dryRun=True).json["result"]["versions"]], ["1.1", "1.0"])


class FailingWrites:
    """The storage, whose writes fail after C{allowed} of them: a crash in the middle of a run."""

    def __init__(self, storage: Any, allowed: int) -> None:
        self._storage = storage
        self.allowed = allowed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def write(self, function: Any) -> Any:
        if self.allowed <= 0:
            raise RuntimeError("the process died here")
        self.allowed -= 1
        return self._storage.write(function)


class ChangesFirst:
    """The storage, where C{change} is written just before the first write: a race with a run."""

    def __init__(self, storage: Any, change: Any) -> None:
        self._storage = storage
        self._change = change

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def write(self, function: Any) -> Any:
        change, self._change = self._change, None
        if change is not None:
            self._storage.write(change)
        return self._storage.write(function)


class RaceTests(RetentionCase):
    """Each batch evaluates the policy again on what its transaction sees."""

    def retention(self, change: Any) -> Any:
        return retentionModule.Retention(ChangesFirst(self.h.storage, change), self.h.clock.seconds)

    def test_policyUnsetMeanwhile(self) -> None:
        self.configure(retention_keep_latest=1)
        key = keys.indexKey("alice", "dev")

        def unset(txn: Any) -> None:
            config = txn.get(key)
            del config[KEEP_LATEST]
            txn.set(key, config)

        result = self.successResultOf(Deferred.fromCoroutine(self.retention(unset).apply("alice", "dev")))
        self.assertEqual(result.removals, [])
        self.assertEqual(len(self.pageFiles()), 6)

    def test_versionDownloadedMeanwhile(self) -> None:
        """A version downloaded after the plan was made is kept; the others go."""
        self.h.clock.advance(40 * DAY)
        self.configure(retention_not_downloaded_days=30)
        key = keys.downloadKey("alice", "dev", "demo-pkg", "demo_pkg-1.1.tar.gz")
        now = self.h.clock.seconds()
        result = self.successResultOf(Deferred.fromCoroutine(self.retention(
            lambda txn: txn.set(key, {"last": now, "count": 1})).apply("alice", "dev")))
        self.assertEqual([r.version for r in result.removals], ["1.0"])
        self.assertIn("demo_pkg-1.1.tar.gz", self.pageFiles())


class ScheduleTests(RetentionCase):
    """The scheduled run (--retention-interval) on a Clock."""

    versions = ("1.0", "1.1", "1.2", "1.3", "2.0")

    def setUp(self) -> None:
        super().setUp()
        self.configure(retention_keep_latest=1)
        self.h.createIndex("bob", "dev", auth=self.h.bob)
        self.h.mustUpload("bob/dev", buildWheel(version="1.0"), self.h.bob)
        self.h.mustUpload("bob/dev", buildWheel(version="2.0"), self.h.bob)
        self.events: list[dict[str, Any]] = []
        self.patch(retentionModule, "log", Logger(observer=self.events.append))

    def test_runsEachInterval(self) -> None:
        """Nothing before the interval; then every index's policy applies, logged with structured fields."""
        schedule = RetentionSchedule(self.h.server.retention, self.h.clock, 3600)
        schedule.startService()
        self.addCleanup(schedule.stopService)
        self.h.clock.advance(3599)
        self.assertEqual(len(self.pageFiles()), 10)
        self.h.clock.advance(1)
        self.assertEqual(self.pageFiles(), ["demo_pkg-2.0-py3-none-any.whl", "demo_pkg-2.0.tar.gz"])
        [event] = [e for e in self.events if e.get("index") == "alice/dev"]
        self.assertEqual((event["versions"], event["files"], event["trigger"]), (4, 8, "schedule"))
        self.assertEqual(event["removed"], ["demo-pkg==1.3", "demo-pkg==1.2", "demo-pkg==1.1", "demo-pkg==1.0"])
        # bob/dev has no policy: untouched
        self.assertEqual(len(self.h.simpleJSON("bob/dev", "demo-pkg")["files"]), 2)
        self.h.mustUpload("alice/dev", buildWheel(version="3.0"))
        self.h.clock.advance(3600)
        self.assertEqual(self.pageFiles(), ["demo_pkg-3.0-py3-none-any.whl"])

    def test_stoppedBeforeTheFirstRun(self) -> None:
        schedule = RetentionSchedule(self.h.server.retention, self.h.clock, 3600)
        schedule.startService()
        self.successResultOf(schedule.stopService())
        self.h.clock.advance(7200)
        self.assertEqual(len(self.pageFiles()), 10)

    def test_restartInTheMiddle(self) -> None:
        """
        The process dies after the first batch: every remaining file is whole
        and downloads with its sha256 after a restart, and the next run
        finishes the work.
        """
        retention = retentionModule.Retention(FailingWrites(self.h.storage, 1), self.h.clock.seconds, batch=1)
        schedule = RetentionSchedule(retention, self.h.clock, 3600)
        schedule.startService()
        self.h.clock.advance(3600)
        self.successResultOf(schedule.stopService())
        # the run on alice/dev failed after its first batch, and said so
        [failure] = [e for e in self.events if e.get("log_failure") is not None]
        self.assertEqual(failure["index"], "alice/dev")
        self.h.build()  # restart over the same storage
        files = self.pageFiles()
        self.assertEqual(len(files), 8)  # 1.3 went, 1.0-1.2 and 2.0 are whole
        for filename in files:
            answer = self.h.get(self.fileURL(filename))
            self.assertEqual(answer.code, 200, filename)
            self.assertEqual(hashlib.sha256(answer.body).hexdigest(), self.dists[filename].sha256)
        self.assertEqual(retention.totals.versions, 1)
        self.successResultOf(Deferred.fromCoroutine(self.h.server.retention.applyAll()))
        self.assertEqual(self.pageFiles(), ["demo_pkg-2.0-py3-none-any.whl", "demo_pkg-2.0.tar.gz"])

    def test_stopBetweenBatches(self) -> None:
        """A stop during a run waits for the batch under way and starts no other."""
        held: list[Any] = []

        class HeldWrites:
            def __init__(self, storage: Any) -> None:
                self._storage = storage

            def __getattr__(self, name: str) -> Any:
                return getattr(self._storage, name)

            def write(self, function: Any) -> Any:
                d: Deferred[Any] = Deferred()
                held.append(lambda: self._storage.write(function).chainDeferred(d))
                return d

        retention = retentionModule.Retention(HeldWrites(self.h.storage), self.h.clock.seconds, batch=1)
        schedule = RetentionSchedule(retention, self.h.clock, 3600)
        schedule.startService()
        self.h.clock.advance(3600)
        self.assertEqual(len(held), 1)
        stopped = schedule.stopService()
        self.assertNoResult(stopped)
        held.pop()()
        self.successResultOf(stopped)
        self.assertEqual(held, [])
        self.assertEqual(len(self.pageFiles()), 8)  # one version of four went

    def test_runLimit(self) -> None:
        """A run removes at most its limit of versions; the next run goes on."""
        retention = self.h.server.retention
        [first] = self.successResultOf(Deferred.fromCoroutine(retention.applyAll(limit=3)))
        self.assertEqual([r.version for r in first.removals], ["1.3", "1.2", "1.1"])
        self.assertEqual(len(self.pageFiles()), 4)
        self.successResultOf(Deferred.fromCoroutine(retention.applyAll(limit=3)))
        self.assertEqual(len(self.pageFiles()), 2)


class OptionTests(SynchronousTestCase):
    """--retention-interval, and which process runs the schedule."""

    def test_default(self) -> None:
        config = parseServerOptions(self, "--serverdir", "/tmp/x").toConfig()
        self.assertEqual(config.retentionInterval, 86400.0)
        self.assertTrue(runsRetention(config))

    def test_setAndOff(self) -> None:
        self.assertEqual(parseServerOptions(self, "--retention-interval", "60").toConfig().retentionInterval, 60)
        environ = {"DEVPI_TWISTED_RETENTION_INTERVAL": "0"}
        self.assertFalse(runsRetention(parseServerOptions(self, environ=environ).toConfig()))

    def test_negativeRefused(self) -> None:
        self.assertRaises(UsageError, parseServerOptions, self, "--retention-interval", "-1")

    def test_onlyThePrimarysMainProcess(self) -> None:
        config = parseServerOptions(self).toConfig()
        self.assertFalse(runsRetention(replace(config, requestsOnly=True)))
        self.assertFalse(runsRetention(replace(config, primaryURL="http://primary.test")))


class ExportImportTests(test_export._Dirs, SynchronousTestCase):
    """Why a file went (a retention policy) survives export and import: the 410 says it after."""

    def test_reasonSurvives(self) -> None:
        self.importInto("server1")
        storage, _ = test_export.openStorage(self.workdir.child("server1"))
        wheelKey = keys.fileKey("alice", "dev", "hello-devpi", "hello_devpi-1.1-py3-none-any.whl")
        when = 1_700_000_000.0
        try:
            entry = test_export.fired(storage.read(lambda view: view.get(wheelKey)))
            test_export.fired(storage.write(lambda txn: removeFileEntry(
                txn, "alice", "dev", entry, removalReason("retention", "alice/dev", when))))
        finally:
            test_export.fired(storage.close())
        relpath = entry["relpath"].split("/+f/", 1)[1]
        self.importInto("server2", self.exportTo("server1", "export1"))
        storage, _ = test_export.openStorage(self.workdir.child("server2"))
        try:
            with self.assertRaises(Gone) as caught:
                test_export.fired(storage.read(lambda view: lookupFile(view, "alice", "dev", relpath)))
        finally:
            test_export.fired(storage.close())
        self.assertEqual(caught.exception.message, "removed by retention policy of alice/dev on 2023-11-14")
