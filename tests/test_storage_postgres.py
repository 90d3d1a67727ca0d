"""
The PostgreSQL metadata backend against a real PostgreSQL (tests/engines.py):
the storage contract, two nodes on one database, the shared secret, and
the server stopped and started under it.
"""

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from devpi_twisted.config import BackendSettings
from devpi_twisted.errors import BadRequest, StorageError, StorageUnavailable
from devpi_twisted.interfaces import ISharedSecret
from devpi_twisted.storage.plugin import findBackend
from devpi_twisted.storage.postgres import openPostgres
from devpi_twisted.storage.threads import SynchronousRunner, ThreadRunner
from devpi_twisted.testing.contract import StorageContract
from tests.engines import PostgreSQLServer, sharedPostgreSQL


def _threads(case: TestCase) -> ThreadRunner:
    runner = ThreadRunner(reactor)
    runner.start()
    case.addCleanup(runner.stopService)
    return runner


def _open(case: TestCase, dsn: str, runner: Any) -> Any:
    from devpi_twisted.storage.postgres import PostgresStorage

    storage = PostgresStorage(dsn, runner)
    case.addCleanup(storage.close)
    return storage


async def _until(condition: Any, timeout: float, step: float = 0.02) -> float:
    """Wait (on the reactor) until C{condition()} holds; the seconds it took, or fail."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await deferLater(reactor, step, lambda: None)
    return time.monotonic() - start


class PostgresStorageContractTests(StorageContract, TestCase):
    """The storage contract on PostgreSQL, on real storage threads as the server runs it."""

    def makeStorage(self) -> Any:
        return _open(self, sharedPostgreSQL().newDatabase(), _threads(self))

    async def test_survivesReopen(self) -> None:
        """Committed changes, serial and history are there for a storage opened afterwards."""
        await self.storage.write(lambda txn: txn.set("a", {"v": 1}))
        await self.storage.write(lambda txn: txn.set("a", {"v": 2}))
        reopened = _open(self, self.storage._dsn, _threads(self))
        self.assertEqual((reopened.currentSerial(), reopened.lastCommitTime()),
                         (1, self.storage.lastCommitTime()))
        self.assertEqual(await reopened.read(lambda v: v.get("a")), {"v": 2})
        self.assertEqual(await reopened.readAsOf(0, lambda v: v.get("a")), {"v": 1})

    async def test_keysInCodePointOrder(self) -> None:
        """Prefix ranges and order are by code point whatever the database's locale, as in SQLite."""
        keys = ["a/B", "a/a", "a/\u00e9", "a/_", "a0", "a/Z"]
        await self.storage.write(lambda txn: [txn.set(k, 1) for k in keys])
        self.assertEqual([k for k, _ in await self.storage.read(lambda v: v.items("a/"))],
                         sorted(k for k in keys if k.startswith("a/")))


class SynchronousPostgresStorageContractTests(StorageContract, TestCase):
    """The same, inline (as the admin commands run it)."""

    def makeStorage(self) -> Any:
        return _open(self, sharedPostgreSQL().newDatabase(), SynchronousRunner())


class TwoNodesTests(TestCase):
    """Two storages on one database, as two nodes run."""

    def setUp(self) -> None:
        dsn = sharedPostgreSQL().newDatabase()
        self.one = _open(self, dsn, _threads(self))
        self.two = _open(self, dsn, _threads(self))

    async def test_concurrentWritesGapless(self) -> None:
        """Writes from both nodes at once: every serial once, none lost, no lost update."""

        def increment(txn: Any) -> None:
            txn.set("counter", (txn.get("counter") or 0) + 1)

        results = await gatherResults([node.write(increment) for _ in range(15) for node in (self.one, self.two)])
        self.assertEqual(sorted(serial for serial, _ in results), list(range(30)))
        self.assertEqual(await self.two.read(lambda v: (v.get("counter"), v.serial)), (30, 29))
        records = await self.one.changesSince(-1, 100)
        self.assertEqual([r.serial for r in records], list(range(30)))
        self.assertEqual([r.changes["counter"] for r in records], list(range(1, 31)))

    async def test_followsTheOtherNode(self) -> None:
        """A write through one node reaches the other's subscribers within a second, in order, once."""
        heard: list[Any] = []
        self.two.subscribe(heard.append)
        self.two.startWatching(reactor)
        self.assertTrue(self.two.isWatching())
        await deferLater(reactor, 0.3, lambda: None)  # the listener is connected
        start = time.monotonic()
        await self.one.write(lambda txn: txn.set("a", 1))
        await _until(lambda: len(heard) == 1, 1.0)
        self.assertLess(time.monotonic() - start, 1.0)
        for i in range(5):
            await self.one.write(lambda txn, i=i: txn.set(f"k{i}", i))
        await self.two.write(lambda txn: txn.set("own", 1))
        await _until(lambda: len(heard) == 7, 1.0)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([r.serial for r in heard], list(range(7)))
        self.assertEqual(heard[0].changes, {"a": 1})
        self.assertEqual(heard[6].changes, {"own": 1})
        self.assertEqual(self.two.currentSerial(), 6)
        self.assertEqual(await self.two.readAsOf(0, lambda v: v.items("")), [("a", 1)])
        self.assertEqual(len(await self.two.changesSince(-1, 100)), 7)
        listener = self.two.stopWatching()
        self.assertFalse(self.two.isWatching())
        listener.join(1.0)
        self.assertFalse(listener.is_alive())

    async def test_bothWritingWhileFollowing(self) -> None:
        """Both nodes writing at once, both following: each hears every change once, in serial order."""
        heard: dict[str, list[int]] = {"one": [], "two": []}
        for name, node in (("one", self.one), ("two", self.two)):
            node.subscribe(lambda r, name=name: heard[name].append(r.serial))
            node.startWatching(reactor)
        await deferLater(reactor, 0.3, lambda: None)
        await gatherResults([node.write(lambda txn, i=i: txn.set(f"k{i}", i))
                             for i in range(10) for node in (self.one, self.two)])
        await _until(lambda: len(heard["one"]) >= 20 and len(heard["two"]) >= 20, 2.0)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(heard, {"one": list(range(20)), "two": list(range(20))})
        self.assertEqual((self.one.currentSerial(), self.two.currentSerial()), (19, 19))

    async def test_storageServiceFollowsAtOnce(self) -> None:
        """The storage service follows the other nodes from its start on a shared storage, and stops promptly."""
        from devpi_twisted.app.serverdir import ServerDir
        from devpi_twisted.app.storageservice import StorageService
        from devpi_twisted.testing import MemoryBlobStore

        path = FilePath(self.mktemp())
        path.makedirs()
        service = StorageService(ServerDir(path), self.two, MemoryBlobStore(), reactor)
        service.startService()
        self.assertTrue(self.two.isWatching())
        heard: list[Any] = []
        self.two.subscribe(heard.append)
        await service.whenReady()
        await deferLater(reactor, 0.3, lambda: None)
        await self.one.write(lambda txn: txn.set("a", 1))
        await _until(lambda: len(heard) == 1, 1.0)
        start = time.monotonic()
        await service.stopService()
        self.assertLess(time.monotonic() - start, 1.5)
        self.assertFalse(self.two.isWatching())

    def test_sharedSecret(self) -> None:
        """The first node's candidate becomes the secret; the second gets the same one, not its own."""
        self.assertTrue(ISharedSecret.providedBy(self.one))
        first = self.one.sharedSecret(b"first-secret\x00\xff")
        self.assertEqual(first, b"first-secret\x00\xff")
        self.assertEqual(self.two.sharedSecret(b"second-secret"), first)
        self.assertEqual(self.one.currentSerial(), -1)  # not a change: not in the changelog or exports

    def test_sharedUUID(self) -> None:
        """Nodes share the first node's uuid, so replicas and clients see one server."""
        self.assertEqual(self.one.sharedUUID("a" * 32), "a" * 32)
        self.assertEqual(self.two.sharedUUID("b" * 32), "a" * 32)
        self.assertEqual(self.two.sharedSecret(b"s"), b"s")  # a value of its own
        self.assertEqual(self.one.currentSerial(), -1)


class OpenTests(TestCase):
    def test_nodesOpeningAtOnce(self) -> None:
        """Several nodes creating the schema at the same moment all open it."""
        import threading

        from devpi_twisted.storage.postgres import PostgresStorage

        dsn = sharedPostgreSQL().newDatabase()
        opened: list[Any] = []
        errors: list[BaseException] = []

        def openOne() -> None:
            try:
                opened.append(PostgresStorage(dsn, SynchronousRunner()))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=openOne) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for storage in opened:
            self.addCleanup(storage.close)
        self.assertEqual((len(opened), errors), (4, []))


class FaultTests(TestCase):
    """A private PostgreSQL stopped and started under the storage."""

    def setUp(self) -> None:
        self.server = PostgreSQLServer().start()
        self.addCleanup(self.server.destroy)
        self.runner = _threads(self)
        self.dsn = self.server.newDatabase()

    async def _eventually(self, make: Any, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await make()
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.2, lambda: None)

    async def test_unreachableFailsFastThenRecovers(self) -> None:
        """Stopped: reads and writes fail at once with StorageUnavailable, commit nothing; started: they work."""
        storage = _open(self, self.dsn, self.runner)
        await storage.write(lambda txn: txn.set("a", 1))
        self.server.stop()
        for _ in range(3):
            for attempt in (lambda: storage.read(lambda v: v.get("a")),
                            lambda: storage.write(lambda txn: txn.set("lost", 1)),
                            lambda: storage.changesSince(-1, 10)):
                start = time.monotonic()
                failure = await self.assertFailure(attempt(), StorageUnavailable)
                self.assertLess(time.monotonic() - start, 1.5)
                self.assertEqual(failure.status, 503)
        self.server.start()
        self.assertEqual(await self._eventually(lambda: storage.read(lambda v: v.get("a"))), 1)
        serial, _ = await self._eventually(lambda: storage.write(lambda txn: txn.set("b", 2)))
        self.assertEqual(serial, 1)  # the failed writes used no serial
        self.assertEqual(await storage.read(lambda v: v.items("")), [("a", 1), ("b", 2)])

    async def test_listenerCatchesUpAfterOutage(self) -> None:
        """The listener reconnects after a restart and tells what another node committed meanwhile."""
        one = _open(self, self.dsn, self.runner)
        two = _open(self, self.dsn, _threads(self))
        heard: list[Any] = []
        two.subscribe(heard.append)
        two.startWatching(reactor)
        await deferLater(reactor, 0.3, lambda: None)
        await one.write(lambda txn: txn.set("before", 1))
        await _until(lambda: len(heard) == 1, 1.0)
        self.server.stop()
        self.server.start()
        # Committed while two's listener is reconnecting (its notification is lost to it).
        await self._eventually(lambda: one.write(lambda txn: txn.set("meanwhile", 1)))
        await _until(lambda: len(heard) == 2, 10.0)
        self.assertEqual([(r.serial, r.changes) for r in heard], [(0, {"before": 1}), (1, {"meanwhile": 1})])
        self.assertEqual(two.currentSerial(), 1)

    def test_openUnreachable(self) -> None:
        """Opening against a stopped server fails at once with a one-line StorageUnavailable."""
        from devpi_twisted.storage.postgres import PostgresStorage

        self.server.stop()
        start = time.monotonic()
        error = self.assertRaises(StorageUnavailable, PostgresStorage, self.dsn, SynchronousRunner())
        self.assertLess(time.monotonic() - start, 1.5)
        self.assertIn(f"127.0.0.1:{self.server.port}", str(error))
        self.assertNotIn("\n", str(error))


class PluginTests(TestCase):
    def test_openThroughPlugin(self) -> None:
        """The 'postgresql' plugin opens the storage from the settings' DSN."""
        settings = BackendSettings(storage="postgresql", pgDSN=sharedPostgreSQL().newDatabase())
        storage = findBackend("postgresql").open(FilePath(self.mktemp()), SynchronousRunner(), settings)
        self.addCleanup(storage.close)
        self.assertTrue(storage.sharedByNodes)
        self.assertEqual(self.successResultOf(storage.write(lambda txn: txn.set("a", [1]))), (0, None))
        self.assertEqual(self.successResultOf(storage.read(lambda v: v.get("a"))), [1])

    def test_needsDSN(self) -> None:
        """Without a DSN the plugin says what is missing."""
        error = self.assertRaises(StorageError, findBackend("postgresql").open, FilePath(self.mktemp()),
                                  SynchronousRunner(), BackendSettings(storage="postgresql"))
        self.assertIn("--pg-dsn", str(error))


class NulKeyTests(TestCase):
    """PostgreSQL text cannot hold NUL: such keys (names from URLs) are absent, and refused as names."""

    async def test_nulKeys(self) -> None:
        storage = openPostgres(FilePath(self.mktemp()), SynchronousRunner(),
                               BackendSettings(storage="postgresql", pgDSN=sharedPostgreSQL().newDatabase()))
        self.addCleanup(storage.close)
        await storage.write(lambda txn: txn.set("users/alice", {"a": "x\x00y"}))
        self.assertIsNone(await storage.read(lambda view: view.get("users/ali\x00ce")))
        self.assertEqual(await storage.read(lambda view: view.items("users/\x00")), [])
        self.assertIsNone(await storage.readAsOf(0, lambda view: view.get("users/\x00")))
        self.assertEqual(await storage.read(lambda view: view.get("users/alice")), {"a": "x\x00y"})
        with self.assertRaises(BadRequest):
            await storage.write(lambda txn: txn.set("users/b\x00b", {}))
        self.assertEqual(storage.currentSerial(), 0)
