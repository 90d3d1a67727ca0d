"""
The storage contract, run against the in-memory fake and the embedded
SQLite + files backend, plus what only the embedded backend promises.
"""

import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from devpi_twisted.storage.blobs import FileBlobStore
from devpi_twisted.storage.sqlite import SqliteStorage
from devpi_twisted.storage.threads import SynchronousRunner, ThreadRunner
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage
from devpi_twisted.testing.contract import AnswersLater, BlobStoreContract, StorageContract


class MemoryStorageTests(StorageContract, TestCase):
    """The memory fake, answering on a later turn of the reactor as a storage across the network would."""

    def makeStorage(self) -> Any:
        self.later = AnswersLater(reactor)
        return MemoryStorage(later=self.later)

    async def test_answersLater(self) -> None:
        """The contract runs through answers that have not fired when they are returned."""
        answer = self.storage.write(lambda txn: txn.set("a", 1))
        self.assertNoResult(answer)
        await answer
        self.assertGreater(self.later.calls, 0)


class SqliteStorageTests(StorageContract, TestCase):
    def makeStorage(self) -> Any:
        self.path = FilePath(self.mktemp())
        self.path.makedirs()
        return SqliteStorage(self.path.child("db.sqlite"), SynchronousRunner())

    def test_survivesReopen(self) -> None:
        """Committed changes, serial and history are there after reopening."""
        self.successResultOf(self.storage.write(lambda txn: txn.set("a", {"v": 1})))
        self.successResultOf(self.storage.write(lambda txn: txn.set("a", {"v": 2})))
        self.successResultOf(self.storage.close())
        reopened = SqliteStorage(self.path.child("db.sqlite"), SynchronousRunner())
        self.assertEqual(reopened.currentSerial(), 1)
        self.assertEqual(self.successResultOf(reopened.read(lambda v: v.get("a"))), {"v": 2})
        self.assertEqual(self.successResultOf(reopened.readAsOf(0, lambda v: v.get("a"))), {"v": 1})

    def test_walMode(self) -> None:
        """The database runs in WAL mode, so readers do not block the writer."""
        mode = self.successResultOf(self.storage.read(
            lambda v: v._conn.execute("PRAGMA journal_mode").fetchone()[0]))
        self.assertEqual(mode, "wal")


class _AnswersLater:
    """For a blob store whose answers come later (threads, a network): the contract's awaits are real."""

    async def test_answersLater(self) -> None:
        """Opening and reading answer later, not at once."""
        info = await self.store(b"later")
        opening = self.blobs.open(info.sha256)
        self.assertNoResult(opening)
        reader = await opening
        reading = reader.read(100)
        self.assertNoResult(reading)
        self.assertEqual(await reading, b"later")
        await reader.close()


class MemoryBlobStoreTests(_AnswersLater, BlobStoreContract, TestCase):
    """The memory fake, answering (and reading) on a later turn of the reactor, as a blob store across the network."""

    def makeBlobStore(self) -> Any:
        return MemoryBlobStore(later=AnswersLater(reactor))


class ThreadedFileBlobStoreTests(_AnswersLater, BlobStoreContract, TestCase):
    """The file blob store on a real thread pool, as the server runs it."""

    def makeBlobStore(self) -> Any:
        self.runner = ThreadRunner(reactor)
        self.runner.start()
        self.addCleanup(self.runner.stopService)
        return FileBlobStore(FilePath(self.mktemp()), self.runner)


class FileBlobStoreTests(BlobStoreContract, TestCase):
    def makeBlobStore(self) -> Any:
        self.root = FilePath(self.mktemp())
        return FileBlobStore(self.root, SynchronousRunner())

    async def test_layout(self) -> None:
        """Blobs live at +files/<first two hex digits>/<sha256>; no temporaries remain."""
        info = await self.store(b"data")
        self.assertTrue(self.root.child(info.sha256[:2]).child(info.sha256).isfile())
        self.assertEqual(self.root.child("tmp").listdir(), [])

    async def test_storingAgainMakesAnOldBlobFresh(self) -> None:
        """
        The collector goes by a blob's modification time: content stored
        again (a second upload of the same bytes, whose metadata is about to
        point at it) is not retired however old its file is.
        """
        info = await self.store(b"old but wanted")
        path = self.root.child(info.sha256[:2]).child(info.sha256).path
        longAgo = time.time() - 86400
        os.utime(path, (longAgo, longAgo))
        await self.store(b"old but wanted")
        self.assertEqual(self.successResultOf(self.blobs.collect(set(), time.time(), 3600)).retired, 0)
        os.utime(path, (longAgo, longAgo))
        self.assertEqual(self.successResultOf(self.blobs.collect(set(), time.time(), 3600)).retired, 1)
        self.assertTrue(self.root.child("trash").child(info.sha256).isfile())

    def test_collectorLeavesTemporariesAndStrangersAlone(self) -> None:
        """An upload being written (under tmp/) and files that are not blobs are never the collector's."""
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(b"in flight"))
        self.root.child("ab").makedirs()
        self.root.child("ab").child("README").setContent(b"not a blob")
        self.successResultOf(self.blobs.collect(set(), time.time() + 86400, 60))
        self.assertEqual(len(self.root.child("tmp").listdir()), 1)
        self.assertTrue(self.root.child("ab").child("README").exists())
        self.assertEqual(self.successResultOf(writer.commit()).size, len(b"in flight"))

    def test_unfinishedTemporariesRemoved(self) -> None:
        """A temporary left by an interrupted write is removed by garbage collection."""
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(b"half"))
        self.assertEqual(len(self.root.child("tmp").listdir()), 1)
        writer._file.close()
        self.successResultOf(self.blobs.deleteUnreferenced(set()))
        self.assertEqual(self.root.child("tmp").listdir(), [])

    def test_rejectsNonDigest(self) -> None:
        """Only sha256 hex digests name blobs, so no path can escape the store."""
        self.assertRaises(ValueError, self.blobs.pathFor, "../../etc/passwd")


class ThreadedSqliteStorageTests(StorageContract, TestCase):
    """The storage contract on the embedded backend on a real thread pool, as the server runs it."""

    def makeStorage(self) -> Any:
        self.runner = ThreadRunner(reactor)
        self.runner.start()
        self.addCleanup(self.runner.stopService)
        path = FilePath(self.mktemp())
        path.makedirs()
        storage = SqliteStorage(path.child("db.sqlite"), self.runner)
        self.addCleanup(storage.close)
        return storage


class ThreadedStorageTests(TestCase):
    """The embedded backend on real threads, as the server runs it."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.runner = ThreadRunner(reactor)
        self.runner.start()
        self.addCleanup(self.runner.stopService)
        path = FilePath(self.mktemp())
        path.makedirs()
        self.storage = SqliteStorage(path.child("db.sqlite"), self.runner)

    async def test_concurrentWritesSerialise(self) -> None:
        """Concurrent read-modify-write transactions never lose an update."""
        from twisted.internet.defer import gatherResults

        def increment(txn: Any) -> None:
            txn.set("counter", (txn.get("counter") or 0) + 1)

        await gatherResults([self.storage.write(increment) for _ in range(50)])
        self.assertEqual(await self.storage.read(lambda v: v.get("counter")), 50)
        self.assertEqual(self.storage.currentSerial(), 49)
        await self.storage.close()
