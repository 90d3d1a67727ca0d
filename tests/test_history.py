"""
The database does not only grow: history pruned to what replicas and
event subscribers need (the pruner service), the feed's answer below the
kept horizon, a replica that starts over from a snapshot by itself, and
the SQLite file that stays bounded under a steady stream of overwrites.

The storage contract for the pruning methods themselves is in
L{devpi_twisted.testing.contract} (run on memory, SQLite and PostgreSQL).
"""

import hashlib
import json
import os
import sqlite3
import sys
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devpi_twisted.app import tap
from devpi_twisted.services.auth import replicaUserConfig
from devpi_twisted.services.events import EventDispatcher, PositionFile
from devpi_twisted.storage import BLOB_REF, HistoryPruned
from devpi_twisted.storage.pruner import HistoryPruner
from devpi_twisted.storage.sqlite import SqliteStorage
from devpi_twisted.storage.threads import SynchronousRunner
from devpi_twisted.testing import MemoryStorage

from .helpers import parseServerOptions
from .test_replica import Follower, Primary, settle, storeBlob
from .test_tap import ThreadedMemoryReactor

FILE_KEY = "file/alice/dev/a/a-1.0-py3-none-any.whl"


def _checkpoint(path: FilePath) -> None:
    """Move the WAL into the database file, as a checkpoint does while the server runs."""
    conn = sqlite3.connect(path.path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _services(service: Any) -> list[Any]:
    found = [service]
    for child in getattr(service, "services", []):
        found.extend(_services(child))
    return found


class PrunedFeedTests(SynchronousTestCase):
    """C{GET /+changelog/<serial>-} below the kept history, and C{GET /+snapshot}."""

    def setUp(self) -> None:
        self.primary = Primary(self)
        self.primary.harness.createUser("alice", "alicepw", email="a@example.com")
        self.current = self.primary.storage.currentSerial()
        self.successResultOf(self.primary.storage.pruneHistory(self.current - 1))

    def get(self, path: str, headers: Any = None) -> tuple[Any, bytes]:
        stub, clock = self.primary.treq, self.primary.clock
        response = self.successResultOf(settle(stub, stub.get("http://primary.test" + path, headers=headers),
                                               clock=clock))
        return response, self.successResultOf(settle(stub, response.content(), clock=clock))

    def test_belowHorizonIsGone(self) -> None:
        """Changes no longer kept answer 410 with a JSON message that points at the snapshot."""
        for start in (0, self.current - 1):
            response, body = self.get(f"/+changelog/{start}-", self.primary.credential())
            self.assertEqual(response.code, 410, body)
            message = json.loads(body)["message"]
            self.assertIn(f"oldest kept serial is {self.current - 1}", message)
            self.assertIn("/+snapshot", message)

    def test_fromHorizonOnServed(self) -> None:
        """The changes after the oldest kept serial are served as before."""
        response, body = self.get(f"/+changelog/{self.current}-", self.primary.credential())
        self.assertEqual(response.code, 200)
        self.assertEqual([json.loads(line)["serial"] for line in body.splitlines()], [self.current])

    def test_prunedWhileStreamingIsGone(self) -> None:
        """A prune between the check and the first read still answers 410, never a 500."""
        real = self.primary.storage.oldestKeptSerial
        self.patch(self.primary.storage, "oldestKeptSerial", lambda: succeed(-1))
        response, body = self.get("/+changelog/0-", self.primary.credential())
        self.assertEqual(response.code, 410, body)
        self.assertIn("no longer kept", json.loads(body)["message"])
        self.assertEqual(self.successResultOf(real()), self.current - 1)

    def test_snapshot(self) -> None:
        """The whole state at the current serial, one key a line, password hashes replaced; credential needed."""
        response, body = self.get("/+snapshot")
        self.assertEqual(response.code, 403)
        response, body = self.get("/+snapshot", self.primary.credential())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Serial"), [str(self.current).encode()])
        lines = [json.loads(line) for line in body.splitlines()]
        state = self.successResultOf(self.primary.storage.read(lambda v: dict(v.items(""))))
        self.assertEqual((lines[0]["serial"], lines[0]["keys"]), (self.current, len(state)))
        sent = {line["key"]: line["value"] for line in lines[1:]}
        self.assertEqual(set(sent), set(state))
        self.assertEqual(sent["user/alice"], replicaUserConfig(self.primary.secret, state["user/alice"]))
        self.assertNotIn(b"pwhash", body)


class ResyncTests(SynchronousTestCase):
    """A replica behind the primary's kept history starts over from a snapshot, by itself."""

    def setUp(self) -> None:
        self.primary = Primary(self)
        self.primary.harness.createUser("alice", "alicepw")
        self.first = b"PK\x03\x04 first" * 500
        self.setFile(self.first)

    def setFile(self, content: bytes) -> str:
        digest = storeBlob(self.primary.blobs, content)
        entry = {"filename": "a-1.0-py3-none-any.whl", BLOB_REF: digest, "size": len(content)}
        self.successResultOf(self.primary.storage.write(lambda txn: txn.set(FILE_KEY, entry)))
        return digest

    def assertIdentical(self, follower: Follower) -> None:
        self.assertEqual(follower.storage.currentSerial(), self.primary.storage.currentSerial())
        primaryState = self.successResultOf(self.primary.storage.read(follower.state))
        replicaState = self.successResultOf(follower.storage.read(follower.state))
        expected = {key: replicaUserConfig(self.primary.secret, value) if key.startswith("user/") else value
                    for key, value in primaryState.items()}
        self.assertEqual(replicaState, expected)

    def pruneEverything(self) -> None:
        self.successResultOf(self.primary.storage.pruneHistory(self.primary.storage.currentSerial()))

    def test_behindTheHorizon(self) -> None:
        """
        A replica that was following, then fell behind what the primary
        keeps, copies its state and the new files (verified), ends
        identical at the primary's serial, and follows changes again.
        """
        follower = Follower(self, self.primary)
        follower.poll()
        heard: list[Any] = []
        follower.storage.subscribe(heard.append)
        second = b"PK\x03\x04 second" * 700
        secondDigest = self.setFile(second)  # a volatile overwrite
        self.primary.harness.createUser("bob", "bobpw")
        self.successResultOf(self.primary.storage.write(lambda txn: txn.delete("user/alice")))
        self.pruneEverything()

        self.assertEqual(follower.poll(), 1)
        self.assertIdentical(follower)
        self.assertEqual(follower.service.resyncs, 1)
        self.assertEqual(follower.blobs.blobs[secondDigest], second)
        self.assertEqual(self.successResultOf(follower.storage.oldestKeptSerial()),
                         self.primary.storage.currentSerial())
        # Its caches hear what changed, as for any change.
        self.assertEqual(len(heard), 1)
        self.assertEqual(heard[0].changes["user/alice"], None)
        self.assertEqual(heard[0].changes[FILE_KEY][BLOB_REF], secondDigest)
        self.assertEqual(follower.service.sync.describe()["state"], "following")
        metrics = {name: value for name, _, value in follower.service.statusFields()["metrics"]}
        self.assertEqual(metrics["devpi_replica_resyncs"], 1)

        self.primary.harness.createUser("carol", "carolpw")
        self.assertEqual(follower.poll(), 1)
        self.assertIdentical(follower)
        self.assertEqual(follower.service.resyncs, 1)

    def test_emptyReplica(self) -> None:
        """An empty replica of a pruned primary makes its initial copy from the snapshot."""
        self.pruneEverything()
        follower = Follower(self, self.primary)
        follower.poll()
        self.assertIdentical(follower)
        self.assertEqual(follower.service.resyncs, 1)
        self.assertEqual(follower.blobs.blobs[hashlib.sha256(self.first).hexdigest()], self.first)

    def test_badFileKeepsOldState(self) -> None:
        """A file that cannot be fetched intact stops the copy before anything is replaced."""
        follower = Follower(self, self.primary)
        follower.poll()
        before = self.successResultOf(follower.storage.read(follower.state))
        serial = follower.storage.currentSerial()
        digest = self.setFile(b"PK\x03\x04 corrupt" * 100)
        self.primary.blobs.blobs[digest] = b"something else entirely"
        self.pruneEverything()
        follower.service.fetcher._attempts = 1
        d = Deferred.fromCoroutine(follower.service.pollOnce())
        settle(self.primary.treq, d, clock=self.primary.clock)
        self.failureResultOf(d)
        self.assertEqual(follower.storage.currentSerial(), serial)
        self.assertEqual(self.successResultOf(follower.storage.read(follower.state)), before)
        self.assertEqual(follower.service.resyncs, 0)


class _Hanging:
    """An event subscriber that does not finish its first event until told to."""

    name = "hanging"

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.gate: Deferred[None] = Deferred()

    def deliver(self, event: Any) -> Deferred[None]:
        self.events.append(event)
        return self.gate if len(self.events) == 1 else succeed(None)


class PrunerTests(SynchronousTestCase):
    """The pruning service: the keep window, the readers' positions, its schedule."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.storage = MemoryStorage(clock=self.clock.seconds)

    def writes(self, count: int) -> None:
        for _ in range(count):
            self.successResultOf(self.storage.write(lambda txn: txn.set("hot", (txn.get("hot") or 0) + 1)))

    def oldest(self) -> int:
        return self.successResultOf(self.storage.oldestKeptSerial())

    def test_keepWindow(self) -> None:
        """History of the last C{keep} seconds stays; older goes."""
        self.writes(5)  # serials 0-4 at 1000
        self.clock.advance(500)
        self.writes(5)  # 5-9 at 1500
        pruner = HistoryPruner(self.storage, self.clock, 3600, keep=100)
        self.clock.advance(50)
        self.assertGreater(self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce())), 0)
        self.assertEqual(self.oldest(), 4)
        self.clock.advance(100)
        self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce()))
        self.assertEqual(self.oldest(), 9)
        self.assertEqual(self.successResultOf(self.storage.read(lambda v: v.get("hot"))), 10)

    def test_readersPositionsKept(self) -> None:
        """Nothing a reader still needs is pruned, whatever the window; None needs nothing."""
        self.writes(10)
        self.clock.advance(10000)
        pruner = HistoryPruner(self.storage, self.clock, 3600, keep=0, needed=[lambda: 6, lambda: None])
        pruner.addNeeded(lambda: 3)
        self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce()))
        self.assertEqual(self.oldest(), 3)
        self.assertEqual(self.successResultOf(self.storage.readAsOf(3, lambda v: v.get("hot"))), 4)

    def test_eventDispatcherPositionRespected(self) -> None:
        """
        A subscriber stuck on an event holds the history from its position
        on; once it goes on, pruning follows it, and its events are right.
        """
        positions = PositionFile(FilePath(self.mktemp()), lambda f, *a: maybeDeferred(f, *a))
        subscriber = _Hanging()
        dispatcher = EventDispatcher(self.storage, self.clock, [subscriber], positions)
        pruner = HistoryPruner(self.storage, self.clock, 3600, keep=0, needed=[dispatcher.neededSerial])
        self.writes(3)
        self.assertEqual(dispatcher.neededSerial(), -1)  # not started: it may need all of it
        self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce()))
        self.assertEqual(self.oldest(), -1)
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        position = self.storage.currentSerial()
        for name in ("alice", "bob", "carol"):
            self.successResultOf(self.storage.write(lambda txn, name=name: txn.set(f"user/{name}", {"username": name})))
        self.clock.advance(10000)
        self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce()))
        self.assertEqual(self.oldest(), position)
        subscriber.gate.callback(None)
        self.assertEqual([e.user for e in subscriber.events], ["alice", "bob", "carol"])
        self.assertEqual([e.name for e in subscriber.events], [subscriber.events[0].name] * 3)
        self.successResultOf(Deferred.fromCoroutine(pruner.pruneOnce()))
        self.assertEqual(self.oldest(), self.storage.currentSerial())

    def test_subscriberBehindAnotherNodesPrune(self) -> None:
        """
        A subscriber whose history another node pruned (nodes sharing
        storage) goes on from the oldest kept serial, with a warning,
        instead of failing on it forever.
        """
        positions = PositionFile(FilePath(self.mktemp()), lambda f, *a: maybeDeferred(f, *a))
        subscriber = _Hanging()
        dispatcher = EventDispatcher(self.storage, self.clock, [subscriber], positions)
        dispatcher.batch = 1
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        for name in ("alice", "bob", "carol", "dave"):
            self.successResultOf(self.storage.write(lambda txn, name=name: txn.set(f"user/{name}", {"username": name})))
        self.successResultOf(self.storage.pruneHistory(2))  # another node's pruner
        subscriber.gate.callback(None)
        self.assertEqual([e.user for e in subscriber.events], ["alice", "dave"])
        self.assertEqual(dispatcher.positions(), {"hanging": 3})

    def test_runsByItself(self) -> None:
        """Once ready, a pass every interval; none before; stopping ends them."""
        ready: Deferred[None] = Deferred()
        pruner = HistoryPruner(self.storage, self.clock, 60, keep=0, ready=lambda: ready)
        self.writes(5)
        pruner.startService()
        self.clock.advance(120)
        self.assertEqual(self.oldest(), -1)
        ready.callback(None)
        self.clock.advance(60)
        self.assertEqual(self.oldest(), 4)
        self.assertEqual(pruner.removed, 4)
        self.successResultOf(pruner.stopService() or succeed(None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failedPassLogged(self) -> None:
        """A pass that fails is logged and the next one runs."""
        pruner = HistoryPruner(self.storage, self.clock, 60, keep=0)
        pruner.startService()
        self.addCleanup(pruner.stopService)
        self.storage.unavailable = True
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.storage.unavailable = False
        self.writes(3)
        self.clock.advance(60)
        self.assertEqual(self.oldest(), 2)


class WiringTests(SynchronousTestCase):
    """The options, and the pruner in the server C{makeService} builds."""

    def setUp(self) -> None:
        self.path = FilePath(os.path.abspath(self.mktemp()))
        self.patch(sys, "stderr", open(os.devnull, "w"))
        self.addCleanup(sys.stderr.close)
        self.patch(os, "environ", {})

    def build(self, *extra: str) -> list[Any]:
        options = tap.Options()
        options.parseOptions(["--serverdir", self.path.path, "--root-passwd", "pw", *extra])
        return _services(tap.makeService(options, reactor=ThreadedMemoryReactor()))

    def test_options(self) -> None:
        config = parseServerOptions(self, "--history-keep", "3600", "--history-prune-interval", "60").toConfig()
        self.assertEqual((config.historyKeep, config.historyPruneInterval), (3600.0, 60.0))
        config = parseServerOptions(self).toConfig()
        self.assertEqual((config.historyKeep, config.historyPruneInterval), (7 * 24 * 3600.0, 3600.0))
        from twisted.python.usage import UsageError
        self.assertRaises(UsageError, parseServerOptions, self, "--history-keep", "-1")

    def test_primaryPrunesAfterItsEvents(self) -> None:
        """A primary's main process prunes, keeping what its event dispatcher needs; 0 turns it off."""
        services = self.build("--history-prune-interval", "120", "--history-keep", "10")
        pruners = [s for s in services if isinstance(s, HistoryPruner)]
        dispatchers = [s for s in services if isinstance(s, EventDispatcher)]
        self.assertEqual((len(pruners), len(dispatchers)), (1, 1))
        self.assertEqual((pruners[0]._interval, pruners[0]._keep), (120.0, 10.0))
        self.assertIn(dispatchers[0].neededSerial, pruners[0]._needed)

    def test_off(self) -> None:
        services = self.build("--history-prune-interval", "0")
        self.assertEqual([s for s in services if isinstance(s, HistoryPruner)], [])


class SqliteFileSizeTests(TestCase):
    """
    The SQLite file under a steady stream of overwrites (a volatile
    index's file entry uploaded again and again) and mirror page refreshes.
    """

    timeout = 300
    rounds = 2000

    def stream(self, prune: bool) -> list[int]:
        """The file's size (database and WAL) every 250 rounds."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("db.sqlite")
        storage = SqliteStorage(path, SynchronousRunner())
        self.addCleanup(storage.close)
        page = {"projects": [{"filename": f"pkg-{v}.tar.gz", "url": "https://files.example/" + "x" * 80,
                              "hashes": {"sha256": "0" * 64}} for v in range(20)]}
        sizes = []
        for n in range(self.rounds):
            entry = {"filename": "pkg-1.0.tar.gz", BLOB_REF: hashlib.sha256(b"%d" % n).hexdigest(),
                     "size": 1000 + n, "upload_time": n, "metadata": {"summary": "s" * 300}}
            self.successResultOf(storage.write(lambda txn: [
                txn.set("file/alice/dev/pkg/1.0/pkg-1.0.tar.gz", entry),
                txn.set("mirrorpage/root/pypi/pkg", {**page, "fetched": n}),
            ]))
            if prune and n % 100 == 99:
                # As the pruner with a window of 50 changes would.
                self.successResultOf(storage.pruneHistory(storage.currentSerial() - 50))
            if n % 250 == 249:
                _checkpoint(path)
                sizes.append(os.path.getsize(path.path) + (os.path.getsize(path.path + "-wal")
                                               if os.path.exists(path.path + "-wal") else 0))
        return sizes

    def test_boundedWithPruning(self) -> None:
        """
        With pruning the file stops growing (the second half of the stream
        needs no more room than the first) and stays under 1 MB; without,
        it keeps growing with every overwrite.
        """
        pruned = self.stream(prune=True)
        unpruned = self.stream(prune=False)
        half = len(pruned) // 2
        self.assertLessEqual(max(pruned[half:]), max(pruned[:half]) + 64 * 1024, pruned)
        self.assertLess(max(pruned), 1024 * 1024, pruned)
        self.assertGreater(unpruned[-1], 3 * unpruned[1], unpruned)
        self.assertGreater(unpruned[-1], 5 * max(pruned), (unpruned, pruned))


class SqliteVacuumTests(SynchronousTestCase):
    """A database made before incremental vacuum is converted at its first prune and then shrinks."""

    def test_existingDatabaseConverted(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("db.sqlite")
        old = sqlite3.connect(path.path)
        old.executescript("CREATE TABLE changelog (serial INTEGER PRIMARY KEY, at REAL NOT NULL);")
        old.close()
        storage = SqliteStorage(path, SynchronousRunner())
        self.addCleanup(storage.close)

        def mode() -> int:
            return self.successResultOf(storage.read(lambda v: v._conn.execute("PRAGMA auto_vacuum").fetchone()[0]))

        self.assertEqual(mode(), 0)
        for n in range(300):
            self.successResultOf(storage.write(lambda txn, n=n: txn.set("k", {"n": n, "pad": "p" * 2000})))
        _checkpoint(path)
        before = os.path.getsize(path.path)
        self.assertGreater(self.successResultOf(storage.pruneHistory(storage.currentSerial())), 0)
        _checkpoint(path)
        self.assertEqual(mode(), 2)  # incremental
        self.assertLess(os.path.getsize(path.path), before / 4)
        self.assertEqual(self.successResultOf(storage.read(lambda v: v.get("k")))["n"], 299)
        self.assertRaises(HistoryPruned, lambda: self.failureResultOf(
            storage.readAsOf(0, lambda v: v.get("k"))).raiseException())
