"""
Retention policies against a real server (C{twistd -n devpi}): set with
devpi-client, previewed and applied over HTTP, the removed version answering
410 and skipped by pip, and the scheduled run of C{--retention-interval}.
"""

import hashlib
import json as jsonlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from . import test_clients, test_devpi_client
from .distbuilder import buildSdist, buildWheel, uploadBody


class RetentionClientTests(test_clients._ClientCase):
    """demo-pkg 1.0, 1.1 and 2.0 in alice/dev (alice/staging inherits it), removed by a keep-latest policy."""

    # devpi-client as its own tests run it
    devpiEnvironment = test_devpi_client.DevpiClientTests.devpiEnvironment
    devpi = test_devpi_client.DevpiClientTests.devpi

    async def uploadVersions(self) -> dict[str, Any]:
        wheels = {}
        for version in ("1.0", "1.1", "2.0"):
            wheel = buildWheel(version=version)
            self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
            wheels[version] = wheel
        return wheels

    def fileURL(self, wheel: Any) -> str:
        return f"{self.server.url}/alice/dev/+f/{wheel.sha256[:3]}/{wheel.sha256[3:16]}/{wheel.filename}"

    async def test_policyDryRunRunAndPip(self) -> None:
        wheels = await self.uploadVersions()
        await self.devpi("use", self.server.url)
        await self.devpi("login", "alice", "--password", "alicepw")
        await self.devpi("index", "alice/dev", "retention_keep_latest=1")
        config = await self.mustAPI("GET", "/alice/dev")
        self.assertEqual(config["result"]["retention_keep_latest"], 1)

        dry = (await self.mustAPI("POST", "/alice/dev/+retention", {"dry_run": True}))["result"]
        self.assertEqual([v["version"] for v in dry["versions"]], ["1.1", "1.0"])
        self.assertEqual(set(await self.simpleFiles("alice/dev", "demo-pkg") or {}),
                         {w.filename for w in wheels.values()})
        real = (await self.mustAPI("POST", "/alice/dev/+retention"))["result"]
        self.assertEqual(real["versions"], dry["versions"])
        self.assertEqual(real["totals"]["bytes"], wheels["1.0"].size + wheels["1.1"].size)

        code, body, _ = await self.api("GET", self.fileURL(wheels["1.0"])[len(self.server.url):], auth=None)
        self.assertEqual(code, 410, body)
        self.assertRegex(jsonlib.loads(body)["message"],
                         r"^removed by retention policy of alice/dev on \d{4}-\d\d-\d\d$")
        code, body, _ = await self.api("GET", self.fileURL(wheels["2.0"])[len(self.server.url):], auth=None,
                                       headers={b"Accept": [b"*/*"]})
        self.assertEqual((code, hashlib.sha256(body).hexdigest()), (200, wheels["2.0"].sha256))

        result, target = await self.pipInstall("alice/staging", "demo-pkg<2")
        self.assertNotEqual(result.returncode, 0, result.output)  # nothing below 2 is left
        result, target = await self.pipInstall("alice/staging", "demo-pkg==1.1")
        self.assertNotEqual(result.returncode, 0, result.output)
        result, target = await self.pipInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "2.0")

        code, body, _ = await self.api("GET", "/+metrics", auth=None, headers={b"Accept": [b"text/plain"]})
        self.assertIn(b"devpi_retention_removed_versions_total 2.0", body)


class ScheduledRetentionClientTests(test_clients._ClientCase):
    """A server started with --retention-interval 1 applies the policy by itself."""

    serverOptions = ("--retention-interval", "1")

    async def test_scheduledRun(self) -> None:
        kept = buildWheel(version="2.0")
        for wheel in (buildWheel(version="1.0"), buildWheel(version="1.5a1"), kept):
            self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        await self.mustAPI("PATCH", "/alice/dev", ["retention_keep_latest=2"])
        for _ in range(60):
            files = await self.simpleFiles("alice/dev", "demo-pkg")
            if files is not None and len(files) == 2:
                break
            await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(sorted(files or {}), ["demo_pkg-1.5a1-py3-none-any.whl", kept.filename])
        self.assertIn("retention: removed 1 versions", self.server.output())


class InterruptedRetentionTests(test_clients._ClientCase):
    """A server killed (SIGKILL) while a retention run removes versions in batches."""

    async def test_killedInTheMiddle(self) -> None:
        """
        After a restart every version is whole or wholly gone, every remaining
        file downloads with its sha256, and the next run finishes the work.
        """
        dists = {}
        for n in range(60):
            for dist in (buildWheel(version=f"1.{n}"), buildSdist(version=f"1.{n}")):
                body = uploadBody(dist)
                code, content, _ = await self.api("POST", "/alice/dev/", headers=body.headers, data=body.body)
                self.assertEqual(code, 200, content)
                dists[dist.filename] = dist
        await self.mustAPI("PATCH", "/alice/dev", ["retention_keep_latest=1"])
        running = Deferred.fromCoroutine(self.api("POST", "/alice/dev/+retention"))
        running.addErrback(lambda _: None)  # the connection dies with the server
        # The kill usually lands after the first of three batches (of 20
        # versions); what is checked below must hold wherever it lands.
        await deferLater(reactor, 0.05, lambda: None)
        self.server.process.kill()
        self.server.process.wait(timeout=30)
        await running
        self.server.cleanup()
        self.server = test_clients.ServerProcess(self, self.workdir)
        await self.waitForServer()

        files = await self.simpleFiles("alice/dev", "demo-pkg") or {}
        versions: dict[str, int] = {}
        for filename in files:
            versions[dists[filename].version] = versions.get(dists[filename].version, 0) + 1
        self.assertEqual(set(versions.values()), {2}, versions)  # no version lost one file of two
        self.assertIn("1.59", versions)
        for filename in files:
            code, body, _ = await self.api("GET", self.fileURL(dists[filename]), auth=None,
                                           headers={b"Accept": [b"*/*"]})
            self.assertEqual((code, hashlib.sha256(body).hexdigest()), (200, dists[filename].sha256), filename)
        await self.mustAPI("POST", "/alice/dev/+retention")
        self.assertEqual(len(await self.simpleFiles("alice/dev", "demo-pkg") or {}), 2)

    def fileURL(self, dist: Any) -> str:
        return f"/alice/dev/+f/{dist.sha256[:3]}/{dist.sha256[3:16]}/{dist.filename}"
