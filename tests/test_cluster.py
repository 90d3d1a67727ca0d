"""
Several real nodes on one PostgreSQL database and one S3 bucket (issue 13):
what users get through pip, uv and twine on two nodes, and the faults
(a node killed with C{kill -9} under uploads, PostgreSQL and the S3 gateway
stopped under traffic), with nothing acknowledged lost.

Every node is a real C{twistd -n devpi} on 127.0.0.1 (L{tests.cluster});
the engines are real too (L{tests.engines}).
"""

import base64
import hashlib
import json as jsonlib
import os
import signal
import time
from typing import Any
from urllib.parse import urljoin

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from devpi_twisted.services.auth import makeReplicationToken, replicationKey

from .cluster import ClusterCase, Node
from .distbuilder import Dist, buildSdist, buildWheel, uploadBody
from .releaseharness import PIP_ACCEPT
from .serverprocess import ROOT_PASSWORD, FakeUpstream

ALICE = ("alice", "alicepw")


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


class _TwoNodes(ClusterCase):
    """Nodes A (initialises the state) and B (joins it), with alice and alice/dev made through A."""

    def setUp(self) -> Deferred:
        super().setUp()
        return Deferred.fromCoroutine(self._startTwo())

    async def _startTwo(self) -> None:
        self.a = await self.startNode("a")
        # Another --root-passwd on the joining node changes nothing: root is shared.
        self.b = await self.startNode("b", "--root-passwd", "not-the-password")
        await self.mustAPI("PUT", "/alice", {"password": "alicepw"}, auth=None, expect=201, base=self.a.url)
        await self.mustAPI("PUT", "/alice/dev", {}, base=self.a.url)

    async def upload(self, node: Node, dist: Dist, stage: str = "alice/dev") -> tuple[int, bytes, Any]:
        """The legacy upload of C{dist} through C{node}, as twine sends it."""
        body = uploadBody(dist)
        return await self.api("POST", f"/{stage}/", auth=ALICE, headers=body.headers, data=body.body,
                              base=node.url)

    async def mustUpload(self, node: Node, dist: Dist, stage: str = "alice/dev") -> None:
        code, content, _ = await self.upload(node, dist, stage)
        self.assertIn(code, (200, 201), content)

    async def waitForFiles(self, node: Node, stage: str, project: str, expected: dict[str, str],
                           within: float) -> float:
        """Poll C{node}'s JSON simple page until it lists C{expected}; the seconds it took."""
        started = time.monotonic()
        while True:
            files = await self.simpleFiles(stage, project, base=node.url) or {}
            if all(files.get(name) == sha for name, sha in expected.items()):
                return time.monotonic() - started
            if time.monotonic() - started > within:
                self.fail(f"{node.name} did not list {sorted(expected)} within {within}s: {files}")
            await sleep(0.02)

    async def fileLinks(self, node: Node, stage: str, project: str) -> list[tuple[str, str, str]]:
        """C{(filename, absolute URL, sha256)} of every file on C{node}'s JSON simple page."""
        page = f"{node.url}/{stage}/+simple/{project}/"
        response = await self.http.get(page, headers={b"Accept": [PIP_ACCEPT]}, timeout=60)
        content = await response.content()
        self.assertEqual(response.code, 200, content)
        return [(f["filename"], urljoin(page, f["url"]), f["hashes"]["sha256"])
                for f in jsonlib.loads(content)["files"]]

    async def download(self, url: str) -> tuple[int, bytes]:
        response = await self.http.get(url, timeout=60)
        return response.code, await response.content()

    async def serialOf(self, node: Node) -> int:
        response = await self.http.get(node.url + "/+api", timeout=30)
        await response.content()
        return int(response.headers.getRawHeaders(b"X-Devpi-Serial")[0])

    async def sameSerial(self, within: float = 1.0) -> int:
        """Wait until both nodes report the same current serial; that serial."""
        deadline = time.monotonic() + within
        while True:
            serials = [await self.serialOf(self.a), await self.serialOf(self.b)]
            if serials[0] == serials[1]:
                return serials[0]
            if time.monotonic() > deadline:
                self.fail(f"A and B report serials {serials} after {within}s")
            await sleep(0.02)

    def bucketKeys(self) -> list[str]:
        """Every object key in the bucket (blocking)."""
        client = self.s3.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return keys

    def assertUnavailable(self, code: int, content: bytes, response: Any) -> None:
        """A 503 with a JSON message and a C{Retry-After}."""
        self.assertEqual(code, 503, content)
        self.assertIsInstance(jsonlib.loads(content)["message"], str)
        (retryAfter,) = response.headers.getRawHeaders(b"Retry-After")
        self.assertGreater(int(retryAfter), 0)


class TwoNodesTests(_TwoNodes):
    """What users get from two nodes on one database and bucket."""

    async def test_secondNodeJoins(self) -> None:
        """The second node says it joined; root's password is the first node's on both."""
        self.assertIn("joined the existing state", self.b.output())
        self.assertNotIn("joined the existing state", self.a.output())
        for node in (self.a, self.b):
            await self.mustAPI("POST", "/+login", {"user": "root", "password": ROOT_PASSWORD},
                               auth=None, base=node.url)
            code, content, _ = await self.api("POST", "/+login", {"user": "root", "password": "not-the-password"},
                                              auth=None, base=node.url)
            self.assertEqual(code, 401, content)

    async def test_clientsAcrossNodes(self) -> None:
        """twine uploads to A, uv publishes to B; pip installs through B, uv through A."""
        wheel = buildWheel(version="1.0")
        sdist = buildSdist(version="1.0")
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel, base=self.a.url))
        self.assertSucceeded(await self.uvPublish("alice/dev", sdist, base=self.b.url))
        expected = {wheel.filename: wheel.sha256, sdist.filename: sdist.sha256}
        for node in (self.a, self.b):
            self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg", base=node.url), expected)
        result, target = await self.pipInstall("alice/dev", "demo-pkg", base=self.b.url)
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")
        result, target = await self.uvInstall("alice/dev", "demo-pkg", base=self.a.url)
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")

    async def test_changeVisibleWithinOneSecond(self) -> None:
        """
        An upload through A is listed by B within one second, although B had
        the page cached; and the other way round.
        """
        first = buildWheel(version="1.0")
        await self.mustUpload(self.a, first)
        await self.waitForFiles(self.b, "alice/dev", "demo-pkg", {first.filename: first.sha256}, within=1.0)
        for version, writer, reader in (("1.1", self.a, self.b), ("1.2", self.b, self.a), ("1.3", self.a, self.b)):
            # The reader serves the page now, from its cache on the second request.
            for _ in range(2):
                self.assertIsNotNone(await self.simpleFiles("alice/dev", "demo-pkg", base=reader.url))
            wheel = buildWheel(version=version)
            await self.mustUpload(writer, wheel)
            took = await self.waitForFiles(reader, "alice/dev", "demo-pkg", {wheel.filename: wheel.sha256},
                                           within=1.0)
            self.assertLess(took, 1.0)

    async def test_loginTokenWorksOnOtherNode(self) -> None:
        """A login token made on A authenticates alice on B (X-Devpi-Auth, as devpi-client sends it)."""
        login = await self.mustAPI("POST", "/+login", {"user": "alice", "password": "alicepw"},
                                   auth=None, base=self.a.url)
        token = login["result"]["password"]

        def devpiAuth(secret: str) -> dict[bytes, list[bytes]]:
            return {b"X-Devpi-Auth": [base64.b64encode(f"alice:{secret}".encode())]}

        code, content, _ = await self.api("PUT", "/alice/bytoken", {}, auth=None, headers=devpiAuth(token),
                                          base=self.b.url)
        self.assertEqual(code, 200, content)
        code, content, _ = await self.api("PUT", "/alice/forged", {}, auth=None,
                                          headers=devpiAuth(token[:-4] + "AAAA"), base=self.b.url)
        self.assertIn(code, (401, 403), content)
        indexes = await self.mustAPI("GET", "/alice", base=self.a.url)
        self.assertIn("bytoken", indexes["result"]["indexes"])
        self.assertNotIn("forged", indexes["result"]["indexes"])

    async def test_apiTokenRevokedOnEveryNode(self) -> None:
        """
        An API token made through A uploads through B; once deleted through
        A, B refuses it within a second, and so do restricted reads.
        """
        await self.mustAPI("PATCH", "/alice/dev", ["acl_read=alice"], base=self.a.url)
        created = await self.mustAPI("POST", "/alice/+token-create", {"indexes": ["alice/dev"]}, base=self.a.url)
        token = created["result"]["token"]
        bearer = {b"Authorization": [b"Bearer " + token.encode("ascii")]}
        body = uploadBody(buildWheel(version="3.0"))
        code, content, _ = await self.api("POST", "/alice/dev/", auth=("__token__", token), headers=body.headers,
                                          data=body.body, base=self.b.url)
        self.assertIn(code, (200, 201), content)
        code, content, _ = await self.api("GET", "/alice/dev/+simple/demo-pkg/", auth=None, base=self.b.url,
                                          headers={**bearer, b"Accept": [PIP_ACCEPT]})
        self.assertEqual(code, 200, content)
        tokenId = next(iter((await self.mustAPI("GET", "/alice/+tokens", base=self.a.url))["result"]["tokens"]))
        await self.mustAPI("DELETE", f"/alice/+tokens/{tokenId}", base=self.a.url)
        deadline = time.monotonic() + 1.0
        while True:
            code, content, _ = await self.api("GET", "/alice/dev/+simple/demo-pkg/", auth=None, base=self.b.url,
                                              headers={**bearer, b"Accept": [PIP_ACCEPT]})
            if code in (401, 403):
                break
            self.assertLess(time.monotonic(), deadline, f"B still accepts the deleted token: {code}")
            await sleep(0.02)
        code, content, _ = await self.api("POST", "/alice/dev/", auth=("__token__", token),
                                          headers=uploadBody(buildWheel(version="3.1")).headers,
                                          data=uploadBody(buildWheel(version="3.1")).body, base=self.b.url)
        self.assertIn(code, (401, 403), content)

    async def test_serialsGapless(self) -> None:
        """
        Writes through both nodes at once give one gapless changelog, the
        same through either node, and both report its last serial.
        """
        writes = []
        for i in range(12):
            node = (self.a, self.b)[i % 2]
            writes.append(Deferred.fromCoroutine(
                self.mustAPI("PUT", f"/alice/ix{i}", {}, base=node.url)))
            if i % 4 == 3:
                await gatherResults(writes, consumeErrors=True)
                writes = []
        await self.mustUpload(self.b, buildWheel(version="2.0"))
        serial = await self.sameSerial(within=1.0)
        key = replicationKey(self.sharedSecret())
        feeds = []
        for node in (self.a, self.b):
            headers = {b"Authorization": [f"Bearer {makeReplicationToken(key, time.time())}".encode()]}
            response = await self.http.get(f"{node.url}/+changelog/0-?timeout=1", headers=headers, timeout=60)
            content = await response.content()
            self.assertEqual(response.code, 200, content)
            feeds.append([jsonlib.loads(line) for line in content.splitlines() if line.strip()])
        serials = [record["serial"] for record in feeds[0]]
        self.assertEqual(serials, list(range(serials[0], serials[0] + len(serials))))
        self.assertEqual(serials[-1], serial)
        self.assertLessEqual(serials[0], 1)
        self.assertEqual(feeds[0], feeds[1])
        # 1 user + 1 index in setUp, 12 indexes, 1 upload: each a change of its own.
        self.assertGreaterEqual(len(serials), 15)


class MirrorTests(_TwoNodes):
    """A mirror index served by both nodes: files fetched once, stored once."""

    def setUp(self) -> Deferred:
        d = super().setUp()
        return d.addCallback(lambda _: Deferred.fromCoroutine(self._mirror()))

    async def _mirror(self) -> None:
        self.upstream = FakeUpstream(self)
        self.files = {
            "lib": self.upstream.addWheel("mirror-lib", "1.0"),
            "slow": self.upstream.addWheel("mirror-slow", "1.0"),
        }
        await self.upstream.start()
        await self.mustAPI("PUT", "/root/up", {"type": "mirror", "mirror_url": self.upstream.simpleURL},
                           auth=("root", ROOT_PASSWORD), base=self.a.url)

    def upstreamData(self, filename: str) -> bytes:
        return self.upstream.fake._files[filename].content

    async def test_fetchedOnceServedByBoth(self) -> None:
        """pip through A, then through B: upstream is asked for the wheel once."""
        filename = self.files["lib"]
        for node in (self.a, self.b):
            result, target = await self.pipInstall("root/up", "mirror-lib", base=node.url)
            self.assertSucceeded(result)
            self.assertIn("mirror_lib-1.0.dist-info", os.listdir(target))
        self.assertEqual(self.upstream.fileRequests().count(f"/files/{filename}"), 1,
                         self.upstream.fileRequests())

    async def test_sameFileAtOnce(self) -> None:
        """
        The same mirror file through A and B at the same moment: both
        clients get the verified bytes, and the bucket holds one object.
        """
        filename = self.files["slow"]
        data = self.upstreamData(filename)
        sha256 = hashlib.sha256(data).hexdigest()
        urls = []
        for node in (self.a, self.b):
            links = {name: url for name, url, _ in await self.fileLinks(node, "root/up", "mirror-slow")}
            urls.append(links[filename])
        # Slow enough that both fetches overlap.
        self.upstream.fake.clock = reactor
        self.upstream.fake.slowFiles = True
        self.upstream.fake.slowChunkSize = max(1, len(data) // 8)
        self.upstream.fake.slowChunkDelay = 0.1
        results = await gatherResults([Deferred.fromCoroutine(self.download(url)) for url in urls],
                                      consumeErrors=True)
        for code, content in results:
            self.assertEqual(code, 200, content[:300])
            self.assertEqual(hashlib.sha256(content).hexdigest(), sha256)
        self.assertGreaterEqual(self.upstream.fileRequests().count(f"/files/{filename}"), 1)
        keys = await deferToThread(self.bucketKeys)
        self.assertEqual(len([key for key in keys if sha256 in key]), 1, keys)
        # Served again by either node without asking upstream.
        before = len(self.upstream.fileRequests())
        for url in urls:
            code, content = await self.download(url)
            self.assertEqual((code, hashlib.sha256(content).hexdigest()), (200, sha256))
        self.assertEqual(len(self.upstream.fileRequests()), before)


class KillTests(_TwoNodes):
    """A node killed with SIGKILL in the middle of a stream of uploads through both nodes."""

    async def test_killedUnderUploads(self) -> None:
        """
        Every acknowledged upload is listed and downloadable with its
        sha256 afterwards, through B and through A restarted; no listed file
        points at a missing object.
        """
        wheels = [buildWheel(version=f"1.{i}") for i in range(30)]
        acknowledged: dict[str, str] = {}
        killed: list[bool] = []
        gate = DeferredSemaphore(4)

        async def one(i: int) -> None:
            node = (self.a, self.b)[i % 2]
            try:
                code, _, _ = await self.upload(node, wheels[i])
            except Exception:
                return  # the node went away: not acknowledged
            if code in (200, 201):
                acknowledged[wheels[i].filename] = wheels[i].sha256
                if len(acknowledged) >= 10 and not killed:
                    killed.append(True)
                    await deferToThread(self.a.kill, signal.SIGKILL)

        await gatherResults([gate.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(30)],
                            consumeErrors=True)
        self.assertTrue(killed)
        self.assertFalse(self.a.alive())
        self.assertLess(len(acknowledged), 30, "A was killed before the stream ended")
        # Every upload through B after the kill went through.
        for i in range(1, 30, 2):
            self.assertIn(wheels[i].filename, acknowledged, f"upload {i} through B")
        self.a.start()
        await self.waitForNode(self.a)
        for node in (self.b, self.a):
            links = await self.fileLinks(node, "alice/dev", "demo-pkg")
            listed = {name: sha for name, _, sha in links}
            for name, sha in acknowledged.items():
                self.assertEqual(listed.get(name), sha, f"{name} through {node.name}")
            for name, url, sha in links:
                code, content = await self.download(url)
                self.assertEqual(code, 200, f"{name} through {node.name}: {content[:300]!r}")
                self.assertEqual(hashlib.sha256(content).hexdigest(), sha, f"{name} through {node.name}")


class PostgreSQLStoppedTests(_TwoNodes):
    """The test's own PostgreSQL stopped under traffic, and started again."""

    privatePostgreSQL = True

    async def test_stoppedAndBack(self) -> None:
        """
        While PostgreSQL is down: a write or an uncached page is a 503 with
        a JSON message and Retry-After at once, a cached page is served.
        Once it is back the nodes work again without a restart.
        """
        first = buildWheel(version="1.0")
        await self.mustUpload(self.a, first)
        await self.waitForFiles(self.b, "alice/dev", "demo-pkg", {first.filename: first.sha256}, within=1.0)
        # B may read the upload before its notification arrives, which then
        # drops the page B cached: cache it once B has been told.
        await self.sameSerial(within=5.0)
        for _ in range(2):
            cached = await self.simpleFiles("alice/dev", "demo-pkg", base=self.b.url)
        await deferToThread(self.pg.stop)
        for node in (self.a, self.b):
            started = time.monotonic()
            code, content, response = await self.api("PUT", "/alice/whiledown", {}, base=node.url)
            self.assertLess(time.monotonic() - started, 2.0, f"write through {node.name}")
            self.assertUnavailable(code, content, response)
            started = time.monotonic()
            code, content, response = await self.api(
                "GET", "/alice/dev/+simple/not-cached/", auth=None, base=node.url,
                headers={b"Accept": [PIP_ACCEPT]})
            self.assertLess(time.monotonic() - started, 2.0, f"uncached page through {node.name}")
            self.assertUnavailable(code, content, response)
        self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg", base=self.b.url), cached)
        await deferToThread(self.pg.start)
        deadline = time.monotonic() + 30
        while True:
            code, content, _ = await self.api("PUT", "/alice/afterwards", {}, base=self.a.url)
            if code in (200, 201):
                break
            self.assertEqual(code, 503, content)
            if time.monotonic() > deadline:
                self.fail("A did not reconnect to PostgreSQL within 30s:\n" + self.server.output())
            await sleep(0.2)
        second = buildWheel(version="1.1")
        await self.mustUpload(self.a, second)
        await self.waitForFiles(self.b, "alice/dev", "demo-pkg", {second.filename: second.sha256}, within=5.0)
        third = buildWheel(version="1.2")
        await self.mustUpload(self.b, third)
        await self.waitForFiles(self.a, "alice/dev", "demo-pkg", {third.filename: third.sha256}, within=1.0)
        # While B was cut off from notifications the index was created: B knows it now.
        await self.mustAPI("GET", "/alice/afterwards", base=self.b.url)


class S3StoppedTests(_TwoNodes):
    """The test's own S3 gateway stopped under uploads, and started again."""

    privateS3 = True

    async def test_stoppedAndBack(self) -> None:
        """
        Uploads while the gateway is down are 503 (JSON, Retry-After) and
        store nothing; once it is back uploads work and earlier files download.
        """
        first = buildWheel(version="1.0")
        await self.mustUpload(self.a, first)
        await deferToThread(self.s3.stop)
        refused = [buildWheel(version="1.1"), buildWheel(version="1.2")]
        for node, wheel in zip((self.a, self.b), refused):
            started = time.monotonic()
            code, content, response = await self.upload(node, wheel)
            self.assertLess(time.monotonic() - started, 2.0, f"upload through {node.name}")
            self.assertUnavailable(code, content, response)
        for node in (self.a, self.b):
            self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg", base=node.url),
                             {first.filename: first.sha256})
        await deferToThread(self.s3.start)
        keys = "\n".join(await deferToThread(self.bucketKeys))
        for wheel in refused:
            self.assertNotIn(wheel.sha256, keys)
        later = buildWheel(version="1.3")
        deadline = time.monotonic() + 60
        while True:
            code, content, _ = await self.upload(self.b, later)
            if code in (200, 201):
                break
            self.assertEqual(code, 503, content)
            if time.monotonic() > deadline:
                self.fail("uploads did not work again within 60s:\n" + self.server.output())
            await sleep(0.5)
        expected = {first.filename: first.sha256, later.filename: later.sha256}
        for node in (self.a, self.b):
            await self.waitForFiles(node, "alice/dev", "demo-pkg", expected, within=1.0)
            for name, url, sha in await self.fileLinks(node, "alice/dev", "demo-pkg"):
                code, content = await self.download(url)
                self.assertEqual((code, hashlib.sha256(content).hexdigest()), (200, sha), name)


class ReplicaTests(_TwoNodes):
    """A replica (own embedded storage) of node A follows changes made through A and through B."""

    async def test_replicaFollowsBothNodes(self) -> None:
        """Uploads and an index made through A and B reach the replica, files byte for byte."""
        replica = await self.startNode("replica", "--primary-url", self.a.url,
                                       "--secretfile", self.sharedSecretFile(), backend=[])
        viaA = buildWheel(version="1.0")
        viaB = buildWheel(version="1.1")
        await self.mustUpload(self.a, viaA)
        await self.mustUpload(self.b, viaB)
        await self.mustAPI("PUT", "/alice/fromb", {}, base=self.b.url)
        expected = {viaA.filename: viaA.sha256, viaB.filename: viaB.sha256}
        await self.waitForFiles(replica, "alice/dev", "demo-pkg", expected, within=15.0)
        serial = await self.sameSerial()
        deadline = time.monotonic() + 15
        while await self.serialOf(replica) != serial:
            if time.monotonic() > deadline:
                self.fail(f"replica at {await self.serialOf(replica)}, primary at {serial}")
            await sleep(0.1)
        # the index made through B came after the uploads: known once the replica has caught up
        await self.mustAPI("GET", "/alice/fromb", base=replica.url)
        for name, url, sha in await self.fileLinks(replica, "alice/dev", "demo-pkg"):
            code, content = await self.download(url)
            self.assertEqual((code, hashlib.sha256(content).hexdigest()), (200, sha), name)
        result, target = await self.pipInstall("alice/dev", "demo-pkg==1.1", base=replica.url)
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.1")


for _case in (TwoNodesTests, MirrorTests, KillTests, PostgreSQLStoppedTests, S3StoppedTests, ReplicaTests):
    _case.timeout = 180
del _case
