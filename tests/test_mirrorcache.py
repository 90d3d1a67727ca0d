"""
Mirror caches with a size limit: C{mirror_cache_max_size} set through the
index API, the bytes per mirror kept as files are stored and removed, the
least recently downloaded files evicted (never one being sent), evicted
files still listed and fetched again from upstream, and the figures in
C{/+metrics}.  L{RealServerTests}: the real server, a fake upstream on
loopback and pip.
"""

import hashlib
import io
import json
import os
import random
import sys
import time
import zipfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devpi_twisted.model import keys
from devpi_twisted.services.mirrorcache import AGAIN, INTERVAL, MirrorCache, _readFigures

from .mirrorharness import MirrorHarness, sha256
from .releaseharness import basic, combine
from .serverprocess import FakeUpstream
from .test_clients import BIN, ClientRunning, ServerProcess
from .test_ops import parseMetrics

SIZE = 1000
LIMIT = 3000
JSON = {b"Accept": [b"application/json"]}


def content(n: int) -> bytes:
    return bytes([n]) * SIZE


class _CacheCase(SynchronousTestCase):
    """root/pypi mirrors C{big} 1.0 to 5.0, an sdist of SIZE bytes each."""

    limit: int | None = LIMIT

    def setUp(self) -> None:
        self.h = MirrorHarness(self)
        for n in range(1, 6):
            self.h.fake.addFile("big", self.name(n), content(n))
        if self.limit is not None:
            self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": self.limit}, auth=self.h.root)
        self.cache = self.h.server.mirrorCache
        self.urls = {n: self.h.mirrorFileURL("big", self.name(n)) for n in range(1, 6)}

    @staticmethod
    def name(n: int) -> str:
        return f"big-{n}.0.tar.gz"

    def download(self, n: int) -> None:
        self.h.clock.advance(10)  # each download at its own time
        answer = self.h.get(self.urls[n])
        self.assertEqual((answer.code, answer.body), (200, content(n)))

    def cached(self) -> list[int]:
        """Which files root/pypi has stored."""
        return [n for n in range(1, 6) if self.h.storedEntry("big", self.name(n)) is not None]

    def figures(self) -> Any:
        return self.cache.mirrors["root/pypi"]

    def fetches(self, n: int) -> int:
        return self.h.fileRequests().count(f"/files/{self.name(n)}")


class EvictionTests(_CacheCase):
    def test_leastRecentlyDownloadedGoes(self) -> None:
        """Over the limit, the file downloaded longest ago is evicted: not the oldest stored."""
        for n in (1, 2, 3):
            self.download(n)
        self.download(1)
        self.assertEqual((self.figures().bytes, self.cached()), (3 * SIZE, [1, 2, 3]))
        self.download(4)
        self.assertEqual(self.cached(), [1, 3, 4])
        self.assertEqual((self.figures().bytes, len(self.figures().files), self.figures().evictions),
                         (3 * SIZE, 3, 1))

    def test_fiveFilesUnderTheLimitAllServed(self) -> None:
        """Five files through a three-file cache: under the limit, each still listed and served (again)."""
        for n in range(1, 6):
            self.download(n)
        self.assertLessEqual(self.figures().bytes, LIMIT)
        self.assertEqual(self.cached(), [3, 4, 5])
        self.assertEqual(sorted(self.h.mirrorFiles("big")), [self.name(n) for n in range(1, 6)])
        for n in range(1, 6):
            self.download(n)
            self.assertLessEqual(self.figures().bytes, LIMIT)
        # 1 and 2 came from upstream again; 3 was evicted by then, 4 and 5 too
        self.assertEqual([self.fetches(n) for n in range(1, 6)], [2, 2, 2, 2, 2])
        self.assertEqual(self.figures().evictions, 7)
        # an evicted entry leaves no tombstone: its URL is not 410
        self.assertEqual(self.h.storage._state.get(keys.tombstonePrefix("root", "pypi")), None)

    def test_refetchVerified(self) -> None:
        """A file fetched again after eviction is checked against the hash the page advertised."""
        for n in (1, 2, 3, 4):
            self.download(n)
        self.assertNotIn(1, self.cached())
        self.h.fake.addFile("big", self.name(1), b"x" * SIZE)  # other bytes upstream, page not refreshed
        answer = self.h.begin("GET", self.urls[1])
        for _ in range(50):
            self.h.pump()
        self.assertIsNone(self.h.storedEntry("big", self.name(1)))
        if answer.called:
            result: list[Any] = []
            answer.addBoth(result.append)
            self.assertNotEqual(getattr(result[0], "body", None), b"x" * SIZE)
        self.flushLoggedErrors()

    def test_fileBeingSentStays(self) -> None:
        """A file whose bytes are being sent is not evicted, even when the limit asks for every file."""
        for n in (1, 2, 3):
            self.download(n)
        gate: Deferred[None] = Deferred()
        realOpen = self.h.blobs.open

        def slowOpen(digest: str) -> Any:
            def slowReads(reader: Any) -> Any:
                read = reader.read
                reader.read = lambda size: gate.addCallback(lambda _: read(size))
                return reader
            return realOpen(digest).addCallback(slowReads)

        self.patch(self.h.blobs, "open", slowOpen)
        self.h.clock.advance(10)
        first = self.h.begin("GET", self.urls[1])  # stored: answered from its blob, which waits
        self.assertTrue(self.h.server.downloads.isTransferring(sha256(content(1))))
        self.patch(self.h.blobs, "open", realOpen)
        # a limit that only an empty cache meets: all goes but the file being sent
        self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": SIZE // 2}, auth=self.h.root)
        self.h.pump()
        self.assertEqual(self.cached(), [1])
        gate.callback(None)
        self.assertEqual(self.h.settle(first).body, content(1))
        self.assertFalse(self.h.server.downloads.isTransferring(sha256(content(1))))

    def test_limitLowered(self) -> None:
        """Lowering the limit evicts at once; the figures then match a full read of storage."""
        self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": 10 * SIZE}, auth=self.h.root)
        for n in range(1, 6):
            self.download(n)
        self.assertEqual(self.cached(), [1, 2, 3, 4, 5])
        self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": 2 * SIZE}, auth=self.h.root)
        self.h.pump()
        self.assertEqual(self.cached(), [4, 5])
        _, scanned = self.successResultOf(self.h.storage.read(_readFigures))
        self.assertEqual((scanned["root/pypi"].bytes, sorted(scanned["root/pypi"].files)),
                         (self.figures().bytes, sorted(self.figures().files)))

    def test_boundedPasses(self) -> None:
        """A pass evicts at most its batch; the next follows AGAIN seconds later."""
        self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": 10 * SIZE}, auth=self.h.root)
        for n in range(1, 6):
            self.download(n)
        self.cache._batch = 1
        self.h.modifyIndex("root", "pypi", {"mirror_cache_max_size": SIZE}, auth=self.h.root)
        self.h.clock.advance(0)
        self.assertEqual(self.cached(), [2, 3, 4, 5])
        self.h.clock.advance(AGAIN)
        self.assertEqual(self.cached(), [3, 4, 5])
        for _ in range(3):
            self.h.clock.advance(AGAIN)
        self.assertEqual(self.cached(), [5])
        self.assertEqual(self.figures().evictions, 4)

    def test_periodicPass(self) -> None:
        """A file that was being sent when the pass ran is evicted by a later pass."""
        for n in (1, 2, 3):
            self.download(n)
        done: Deferred[None] = Deferred()
        self.h.server.downloads.transferring(sha256(content(1)), done)
        self.download(4)
        self.assertEqual(self.cached(), [1, 3, 4])
        self.figures().files[("big", self.name(1))].last = 0
        self.figures().limit = SIZE  # over the limit with no new file stored
        self.h.clock.advance(INTERVAL)
        self.assertEqual(self.cached(), [1])  # the others went, as 1 was being sent
        done.callback(None)
        self.figures().limit = SIZE // 2
        self.assertEqual(self.cached(), [1])
        self.h.clock.advance(INTERVAL)
        self.assertEqual(self.cached(), [])

    def test_metrics(self) -> None:
        for n in range(1, 6):
            self.download(n)
        values = parseMetrics(self.h.get("/+metrics").body.decode())
        self.assertEqual(values['devpi_mirror_cache_bytes{mirror="root/pypi"}'], 3 * SIZE)
        self.assertEqual(values['devpi_mirror_cache_files{mirror="root/pypi"}'], 3)
        self.assertEqual(values['devpi_mirror_cache_max_bytes{mirror="root/pypi"}'], LIMIT)
        self.assertEqual(values['devpi_mirror_cache_evictions_total{mirror="root/pypi"}'], 2)

    def test_notEvictingProcess(self) -> None:
        """A replica or a --requests-only worker keeps the figures but evicts nothing."""
        watcher = MirrorCache(self.h.storage, self.h.clock, self.h.server.downloads, evict=False)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.cache._evict = False
        for n in range(1, 6):
            self.download(n)
        self.h.clock.advance(INTERVAL)
        self.assertEqual(self.cached(), [1, 2, 3, 4, 5])
        self.assertEqual(watcher.mirrors["root/pypi"].bytes, 5 * SIZE)


class NoLimitTests(_CacheCase):
    limit = None

    def test_unlimited(self) -> None:
        """Without mirror_cache_max_size (as before) nothing is evicted; the figures are kept."""
        for n in range(1, 6):
            self.download(n)
        self.h.clock.advance(INTERVAL)
        self.assertEqual(self.cached(), [1, 2, 3, 4, 5])
        self.assertEqual((self.figures().bytes, self.figures().limit, self.figures().evictions), (5 * SIZE, None, 0))

    def test_figuresReadAtStart(self) -> None:
        """A restarted server reads the figures once, with the last downloads recorded."""
        for n in range(1, 4):
            self.download(n)
        self.download(1)
        self.h.restart()
        figures = self.h.server.mirrorCache.mirrors["root/pypi"]
        self.assertEqual((figures.bytes, len(figures.files)), (3 * SIZE, 3))
        lasts = {filename: cached.last for (_, filename), cached in figures.files.items()}
        self.assertGreater(lasts[self.name(1)], lasts[self.name(3)])


class SettingTests(SynchronousTestCase):
    """mirror_cache_max_size through the index API, as JSON and as devpi-client's key=value."""

    def setUp(self) -> None:
        self.h = MirrorHarness(self)

    def patch_(self, edits: Any, index: str = "root/pypi") -> Any:
        return self.h.request("PATCH", f"/{index}", combine(self.h.root, JSON), json=edits)

    def config(self) -> Any:
        return self.h.get("/root/pypi", JSON).json["result"]

    def test_values(self) -> None:
        self.assertEqual(self.patch_(["mirror_cache_max_size=3000000"]).code, 200)
        self.assertEqual(self.config()["mirror_cache_max_size"], 3000000)
        self.assertEqual(self.patch_({"mirror_cache_max_size": 5}).code, 200)
        self.assertEqual(self.config()["mirror_cache_max_size"], 5)
        self.assertEqual(self.patch_(["mirror_cache_max_size="]).code, 200)
        self.assertNotIn("mirror_cache_max_size", self.config())
        self.assertIsNone(self.h.server.mirrorCache.mirrors["root/pypi"].limit)

    def test_refused(self) -> None:
        for value in ("lots", "-1", "0", True, [1]):
            answer = self.patch_({"mirror_cache_max_size": value})
            self.assertEqual(answer.code, 400, value)
            self.assertIn("mirror_cache_max_size", json.loads(answer.body)["message"])
        # a stage index has no such setting (dropped, as devpi drops foreign keys)
        self.h.createIndex("root", "dev", auth=self.h.root)
        self.patch_({"mirror_cache_max_size": 1000}, "root/dev")
        self.assertNotIn("mirror_cache_max_size", self.h.get("/root/dev", JSON).json["result"])


def bigWheel(name: str, payloadSize: int) -> tuple[str, bytes]:
    """
    An installable wheel of C{name} 1.0 (module C{VERSION}) that carries
    C{payloadSize} incompressible bytes, stored, so the wheel is that large.
    """
    distribution = name.replace("-", "_")
    distInfo = f"{distribution}-1.0.dist-info"
    files = [
        (f"{distribution}/__init__.py", b'VERSION = "1.0"\n'),
        (f"{distribution}/payload.bin", random.Random(name).randbytes(payloadSize)),
        (f"{distInfo}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n".encode()),
        (f"{distInfo}/WHEEL", b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"),
    ]

    def recordHash(data: bytes) -> str:
        import base64

        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},{recordHash(data)},{len(data)}\n" for path, data in files) + f"{distInfo}/RECORD,,\n"
    files.append((f"{distInfo}/RECORD", record.encode()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for path, data in files:
            archive.writestr(zipfile.ZipInfo(path, date_time=(2025, 1, 1, 0, 0, 0)), data)
    return f"{distribution}-1.0-py3-none-any.whl", out.getvalue()


class RealServerTests(ClientRunning, TestCase):
    """
    The issue's case: C{twistd devpi} mirroring a fake upstream with a 3 MiB
    limit, five wheels of 1 MB installed with pip, twice.
    """

    timeout = 600
    LIMIT = 3 * 1024 * 1024
    NAMES = [f"evict-pkg-{n}" for n in range(5)]

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.prepareClients()
        self.upstream = FakeUpstream(self)
        self.wheels = {}
        for name in self.NAMES:
            filename, data = bigWheel(name, 1_000_000)
            self.upstream.fake.addFile(name, filename, data)
            self.wheels[name] = filename
        await self.upstream.start()
        self.server = ServerProcess(self, self.workdir, "--request-timeout", "5", "--blob-collect-interval", "1",
                                    rootPypi=True)
        await self.waitForServer()
        await self.root("PATCH", "/root/pypi", {"mirror_url": self.upstream.simpleURL,
                                                "mirror_cache_max_size": self.LIMIT})

    async def root(self, method: str, path: str, body: Any = None) -> Any:
        headers = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"],
                   **basic("root", "secret")}
        data = None if body is None else json.dumps(body).encode()
        response = await self.http.request(method, self.server.url + path, headers=headers, data=data, timeout=60)
        content = await response.content()
        self.assertEqual(response.code, 200, content)
        return json.loads(content)

    async def metrics(self) -> dict[str, float]:
        response = await self.http.get(self.server.url + "/+metrics", timeout=60)
        return parseMetrics((await response.content()).decode())

    async def pipInstall(self, target: str) -> None:
        pip = os.path.join(BIN, "pip")
        command = [pip] if os.path.isfile(pip) else [sys.executable, "-m", "pip"]
        result = await self.runClient(*command, "install", "--index-url", f"{self.server.url}/root/pypi/+simple/",
                                      "--no-cache-dir", "--target", os.path.join(self.workdir, target), *self.NAMES)
        self.assertSucceeded(result)
        for name in self.NAMES:
            module = os.path.join(self.workdir, target, name.replace("-", "_"))
            with open(os.path.join(module, "payload.bin"), "rb") as f:
                self.assertEqual(len(f.read()), 1_000_000)

    async def underTheLimit(self) -> dict[str, float]:
        """The figures once eviction has caught up (it runs right after each file is stored)."""
        deadline = time.monotonic() + 30
        while True:
            values = await self.metrics()
            if values['devpi_mirror_cache_bytes{mirror="root/pypi"}'] <= self.LIMIT or time.monotonic() > deadline:
                return values
            await deferLater(reactor, 0.2, lambda: None)

    def blobBytes(self) -> int:
        total = 0
        for directory, _, names in os.walk(os.path.join(self.server.serverdir, "+files")):
            total += sum(os.path.getsize(os.path.join(directory, name)) for name in names)
        return total

    async def test_fiveFilesThroughThreeMegabytes(self) -> None:
        await self.pipInstall("first")
        values = await self.underTheLimit()
        self.assertLessEqual(values['devpi_mirror_cache_bytes{mirror="root/pypi"}'], self.LIMIT)
        self.assertEqual(values['devpi_mirror_cache_files{mirror="root/pypi"}'], 3)
        self.assertEqual(values['devpi_mirror_cache_evictions_total{mirror="root/pypi"}'], 2)
        self.assertEqual(len(self.upstream.fileRequests()), 5)
        # every file installs again: the evicted ones come from upstream again, verified
        await self.pipInstall("second")
        values = await self.underTheLimit()
        self.assertLessEqual(values['devpi_mirror_cache_bytes{mirror="root/pypi"}'], self.LIMIT)
        self.assertGreater(len(self.upstream.fileRequests()), 5)
        # and the blob collector gives the disk back
        deadline = time.monotonic() + 30
        while self.blobBytes() > self.LIMIT + 512 * 1024 and time.monotonic() < deadline:
            await deferLater(reactor, 0.5, lambda: None)
        self.assertLessEqual(self.blobBytes(), self.LIMIT + 512 * 1024)
