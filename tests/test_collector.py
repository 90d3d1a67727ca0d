"""
The blob collector: unit tests on a clock with the memory fakes, and the real
server giving back the disk space of deleted files while it runs, without
ever losing content that is still referred to.
"""

import json
import os
import time
from typing import Any
from urllib.parse import urljoin

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.storage import BLOB_REF
from devpi_twisted.storage.collector import BlobCollector
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage

from .distbuilder import buildWheel, uploadBody
from .helpers import basicAuth
from .serverprocess import ROOT_PASSWORD, RealServerCase

INTERVAL = 600.0


class BlobCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # the memory store dates blobs with the wall clock
        self.storage = MemoryStorage()
        self.blobs = MemoryBlobStore()
        self.ready: Deferred[None] = Deferred()
        self.collector = BlobCollector(self.storage, self.blobs, self.clock, INTERVAL, ready=lambda: self.ready)

    def store(self, data: bytes) -> str:
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(data))
        return self.successResultOf(writer.commit()).sha256

    def refer(self, key: str, digest: str) -> None:
        self.successResultOf(self.storage.write(lambda txn: txn.set(key, {BLOB_REF: digest})))

    def start(self) -> None:
        self.collector.startService()
        self.addCleanup(lambda: self.collector.running and self.collector.stopService())

    def test_waitsForTheStartupCleanup(self) -> None:
        """No pass before storage is ready (the startup cleanup must not meet a pass)."""
        orphan = self.store(b"orphan")
        self.start()
        self.clock.advance(INTERVAL * 3)
        self.assertIn(orphan, self.blobs.blobs)
        self.assertIsNone(self.collector.lastPass)
        self.ready.callback(None)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.collector.lastPass, self.clock.seconds())

    def test_unreferencedGoesAfterTwoIntervals(self) -> None:
        kept, orphan = self.store(b"kept"), self.store(b"orphan")
        self.refer("file/kept", kept)
        self.ready.callback(None)
        self.start()
        self.clock.advance(INTERVAL)  # stored less than an interval before this pass
        self.assertIn(orphan, self.blobs.blobs)
        self.clock.advance(INTERVAL)
        self.assertIn(orphan, self.blobs.retired)
        self.clock.advance(INTERVAL)
        self.assertNotIn(orphan, self.blobs.retired)
        self.assertNotIn(orphan, self.blobs.blobs)
        self.assertIn(kept, self.blobs.blobs)
        self.assertEqual((self.collector.totals.retired, self.collector.totals.deleted), (1, 1))

    def test_referencedAgainComesBack(self) -> None:
        """Content retired and then referred to again (pushed, uploaded again) is restored, not deleted."""
        digest = self.store(b"wanted again")
        self.ready.callback(None)
        self.start()
        self.clock.advance(INTERVAL * 2)
        self.assertIn(digest, self.blobs.retired)
        self.refer("file/again", digest)
        self.clock.advance(INTERVAL)
        self.assertIn(digest, self.blobs.blobs)
        self.assertEqual(self.collector.totals.restored, 1)

    def test_failedPassIsLoggedAndRetried(self) -> None:
        orphan = self.store(b"orphan")
        calls: list[int] = []
        real = self.storage.referencedBlobs

        def flaky() -> Deferred[set[str]]:
            calls.append(1)
            if len(calls) == 1:
                raise OSError("database is locked")
            return real()

        self.storage.referencedBlobs = flaky  # type: ignore[method-assign]
        self.ready.callback(None)
        self.start()
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(calls), 2)
        self.assertIn(orphan, self.blobs.retired)

    def test_stopEndsThePasses(self) -> None:
        self.ready.callback(None)
        self.start()
        self.clock.advance(INTERVAL)
        self.successResultOf(self.collector.stopService() or succeed(None))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CollectorServerTests(RealServerCase):
    """The real server with a one-second interval: deleted files leave the disk, shared content stays."""

    timeout = 120

    def setUp(self) -> Deferred:
        return self.startForeground("--blob-collect-interval", "1")

    async def api(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        headers = {**basicAuth("root", ROOT_PASSWORD), b"Content-Type": [b"application/json"]}
        data = json.dumps(body).encode() if body is not None else None
        response = await self.http.request(method, self.url + path, data=data, headers=headers)
        content = await response.content()
        self.assertEqual(response.code, expect, content)
        return json.loads(content) if content else None

    async def upload(self, index: str, wheel: Any) -> None:
        upload = uploadBody(wheel)
        response = await self.http.post(self.url + f"/root/{index}/", data=upload.body,
                                        headers={**upload.headers, **basicAuth("root", ROOT_PASSWORD)})
        self.assertEqual(response.code, 200, await response.content())

    def blobPaths(self, digest: str) -> list[str]:
        files = os.path.join(self.workdir, "server", "+files")
        return [p for p in (os.path.join(files, digest[:2], digest), os.path.join(files, "trash", digest))
                if os.path.exists(p)]

    async def sleep(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    async def test_deletedFileLeavesTheDiskSharedContentStays(self) -> None:
        for index in ("a", "b"):
            await self.api("PUT", f"/root/{index}", {"volatile": True, "bases": []})
        wheel = buildWheel("shared-pkg", "1.0")
        await self.upload("a", wheel)
        await self.upload("b", wheel)  # the same bytes: one blob, two references
        self.assertEqual(len(self.blobPaths(wheel.sha256)), 1)

        await self.api("DELETE", "/root/a/shared-pkg/1.0")
        await self.sleep(4.5)  # past the two to three intervals an unreferenced blob would take
        self.assertEqual(len(self.blobPaths(wheel.sha256)), 1)
        response = await self.http.get(self.url + "/root/b/+simple/shared-pkg/",
                                       headers={b"Accept": [b"application/vnd.pypi.simple.v1+json"]})
        link = json.loads(await response.content())["files"][0]["url"]
        response = await self.http.get(urljoin(self.url + "/root/b/+simple/shared-pkg/", link))
        self.assertEqual(await response.content(), wheel.data)

        await self.api("DELETE", "/root/b/shared-pkg/1.0")
        deadline = time.monotonic() + 30
        while self.blobPaths(wheel.sha256) and time.monotonic() < deadline:
            await self.sleep(0.5)
        self.assertEqual(self.blobPaths(wheel.sha256), [])
        self.assertIn("blob collector", self.server.log())
        response = await self.http.get(self.url + "/+metrics")
        metrics = (await response.content()).decode()
        for name in ("devpi_blobs_retired_total", "devpi_blobs_deleted_total"):
            value = next(line.split()[1] for line in metrics.splitlines() if line.startswith(name + " "))
            self.assertGreaterEqual(float(value), 1.0, name)
        self.assertIn("devpi_blob_collector_last_pass_timestamp_seconds", metrics)

        # The same content uploaded once more is stored anew and served.
        await self.upload("a", wheel)
        await self.sleep(3.5)
        response = await self.http.get(self.url + "/root/a/+simple/shared-pkg/",
                                       headers={b"Accept": [b"application/vnd.pypi.simple.v1+json"]})
        link = json.loads(await response.content())["files"][0]["url"]
        response = await self.http.get(urljoin(self.url + "/root/a/+simple/shared-pkg/", link))
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), wheel.data)
