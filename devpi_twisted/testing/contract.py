"""
Contract tests for storage backends.

A backend's test module subclasses the mixins with a C{makeStorage} or
C{makeBlobStore} method and C{SynchronousTestCase}; the same tests then run
against the in-memory fake and every real backend.
"""

import hashlib
import time
from typing import Any

from zope.interface.verify import verifyObject

from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.storage import BLOB_REF, ChangeRecord, SerialMismatch


class StorageContract:
    """What every L{IStorage} must do.  Needs C{makeStorage()}."""

    def makeStorage(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def write(self, function: Any) -> Any:
        return self.successResultOf(self.storage.write(function))

    def read(self, function: Any) -> Any:
        return self.successResultOf(self.storage.read(function))

    def test_interface(self) -> None:
        """The backend provides IStorage."""
        self.assertTrue(verifyObject(IStorage, self.storage))

    def test_emptySerial(self) -> None:
        """An empty store is at serial -1 with no commit time."""
        self.assertEqual(self.storage.currentSerial(), -1)
        self.assertIsNone(self.storage.lastCommitTime())

    def test_writeRaisesSerial(self) -> None:
        """Each committed transaction raises the serial by one and is readable."""
        serial, result = self.write(lambda txn: txn.set("user/a", {"x": 1}) or "done")
        self.assertEqual((serial, result), (0, "done"))
        serial, _ = self.write(lambda txn: txn.set("user/b", {"x": 2}))
        self.assertEqual(serial, 1)
        self.assertEqual(self.storage.currentSerial(), 1)
        self.assertIsNotNone(self.storage.lastCommitTime())
        self.assertEqual(self.read(lambda v: (v.get("user/a"), v.get("user/b"), v.serial)),
                         ({"x": 1}, {"x": 2}, 1))

    def test_noChangeNoSerial(self) -> None:
        """A transaction that changes nothing does not raise the serial."""
        self.write(lambda txn: txn.set("k", 1))
        serial, result = self.write(lambda txn: txn.get("k"))
        self.assertEqual((serial, result), (0, 1))
        self.assertEqual(self.storage.currentSerial(), 0)

    def test_failedTransactionCommitsNothing(self) -> None:
        """When the function raises, none of its writes are kept."""
        def boom(txn: Any) -> None:
            txn.set("a", 1)
            raise ValueError("no")

        self.failureResultOf(self.storage.write(boom), ValueError)
        self.assertEqual(self.storage.currentSerial(), -1)
        self.assertIsNone(self.read(lambda v: v.get("a")))

    def test_transactionSeesItsOwnWrites(self) -> None:
        """Reads inside a transaction include what it wrote and deleted."""
        self.write(lambda txn: [txn.set("p/1", 1), txn.set("p/2", 2)])

        def edit(txn: Any) -> Any:
            txn.set("p/3", 3)
            txn.delete("p/1")
            return txn.get("p/3"), txn.get("p/1"), txn.items("p/")

        _, seen = self.write(edit)
        self.assertEqual(seen, (3, None, [("p/2", 2), ("p/3", 3)]))

    def test_itemsByPrefix(self) -> None:
        """items() lists exactly the keys under the prefix, sorted."""
        self.write(lambda txn: [txn.set(k, k) for k in ("a/b", "a/a", "ab", "a0", "b/a")])
        self.assertEqual(self.read(lambda v: v.items("a/")), [("a/a", "a/a"), ("a/b", "a/b")])

    def test_delete(self) -> None:
        """A deleted key reads as None; deleting a missing key is harmless."""
        self.write(lambda txn: txn.set("k", {"v": 1}))
        self.write(lambda txn: [txn.delete("k"), txn.delete("never")])
        self.assertIsNone(self.read(lambda v: v.get("k")))

    def test_setNoneRefused(self) -> None:
        """None is not a value: deletes are explicit."""
        self.failureResultOf(self.storage.write(lambda txn: txn.set("k", None)), ValueError)

    def test_valuesAreCopies(self) -> None:
        """Mutating a value read back does not change the stored one."""
        self.write(lambda txn: txn.set("k", {"list": [1]}))
        value = self.read(lambda v: v.get("k"))
        value["list"].append(2)
        self.assertEqual(self.read(lambda v: v.get("k")), {"list": [1]})

    def test_readAsOf(self) -> None:
        """A view as of a serial shows the state right after that change."""
        self.write(lambda txn: txn.set("k", 1))
        self.write(lambda txn: [txn.set("k", 2), txn.set("j", 1)])
        self.write(lambda txn: txn.delete("k"))
        views = [
            self.successResultOf(self.storage.readAsOf(s, lambda v: (v.get("k"), v.items(""), v.serial)))
            for s in range(3)
        ]
        self.assertEqual(views, [
            (1, [("k", 1)], 0),
            (2, [("j", 1), ("k", 2)], 1),
            (None, [("j", 1)], 2),
        ])

    def test_changesSince(self) -> None:
        """The changelog lists each change with its serial, oldest first, up to a limit."""
        self.write(lambda txn: txn.set("a", 1))
        self.write(lambda txn: [txn.set("b", 2), txn.delete("a")])
        self.write(lambda txn: txn.set("c", 3))
        records = self.successResultOf(self.storage.changesSince(-1, 2))
        self.assertEqual([(r.serial, r.changes) for r in records],
                         [(0, {"a": 1}), (1, {"a": None, "b": 2})])
        self.assertTrue(all(isinstance(r, ChangeRecord) and r.time > 0 for r in records))
        later = self.successResultOf(self.storage.changesSince(1, 100))
        self.assertEqual([r.serial for r in later], [2])

    def test_isBlobReferenced(self) -> None:
        """A blob is referenced while a current value names it."""
        digest = "c" * 64
        self.write(lambda txn: txn.set("f/1", {BLOB_REF: digest}))
        self.assertTrue(self.successResultOf(self.storage.isBlobReferenced(digest)))
        self.write(lambda txn: txn.delete("f/1"))
        self.assertFalse(self.successResultOf(self.storage.isBlobReferenced(digest)))

    def test_subscribe(self) -> None:
        """Subscribers hear of each commit until they unsubscribe."""
        heard: list[Any] = []
        unsubscribe = self.storage.subscribe(heard.append)
        self.write(lambda txn: txn.set("a", 1))
        self.write(lambda txn: txn.get("a"))
        unsubscribe()
        self.write(lambda txn: txn.set("b", 1))
        self.assertEqual([(r.serial, r.changes) for r in heard], [(0, {"a": 1})])

    def test_applyChange(self) -> None:
        """A record from elsewhere commits at its own serial and time, readable and in the changelog."""
        self.assertEqual(self.successResultOf(self.storage.applyChange(
            ChangeRecord(0, 1000.5, {"a": {"x": [1]}, "b": 2}))), 0)
        self.assertEqual(self.successResultOf(self.storage.applyChange(
            ChangeRecord(1, 1001.0, {"a": None, "c": {BLOB_REF: "d" * 64}}))), 1)
        self.assertEqual(self.storage.currentSerial(), 1)
        self.assertEqual(self.storage.lastCommitTime(), 1001.0)
        self.assertEqual(self.read(lambda v: (v.items(""), v.serial)), ([("b", 2), ("c", {BLOB_REF: "d" * 64})], 1))
        records = self.successResultOf(self.storage.changesSince(-1, 10))
        self.assertEqual([(r.serial, r.time, r.changes) for r in records], [
            (0, 1000.5, {"a": {"x": [1]}, "b": 2}),
            (1, 1001.0, {"a": None, "c": {BLOB_REF: "d" * 64}}),
        ])
        self.assertEqual(self.successResultOf(self.storage.readAsOf(0, lambda v: v.get("a"))), {"x": [1]})
        self.assertTrue(self.successResultOf(self.storage.isBlobReferenced("d" * 64)))
        serial, _ = self.write(lambda txn: txn.set("local", 1))
        self.assertEqual(serial, 2)

    def test_applyChangeOutOfOrder(self) -> None:
        """A record that is not the next serial is refused and changes nothing."""
        self.write(lambda txn: txn.set("a", 1))
        for serial in (0, 2, 5):
            self.failureResultOf(self.storage.applyChange(ChangeRecord(serial, 1.0, {"a": 9})), SerialMismatch)
        self.assertEqual(self.storage.currentSerial(), 0)
        self.assertEqual(self.read(lambda v: v.get("a")), 1)

    def test_applyChangeNotifies(self) -> None:
        """Subscribers hear of applied records as of written ones."""
        heard: list[Any] = []
        self.storage.subscribe(heard.append)
        self.successResultOf(self.storage.applyChange(ChangeRecord(0, 5.0, {"k": "v"})))
        self.assertEqual([(r.serial, r.time, r.changes) for r in heard], [(0, 5.0, {"k": "v"})])

    def test_referencedBlobs(self) -> None:
        """Values carrying a blob reference report it; deleted ones don't."""
        d1, d2 = "a" * 64, "b" * 64
        self.write(lambda txn: [txn.set("f/1", {BLOB_REF: d1}), txn.set("f/2", {BLOB_REF: d2}),
                                txn.set("x", {"other": 1})])
        self.write(lambda txn: txn.delete("f/2"))
        self.assertEqual(self.successResultOf(self.storage.referencedBlobs()), {d1})


class BlobStoreContract:
    """What every L{IBlobStore} must do.  Needs C{makeBlobStore()}."""

    def makeBlobStore(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.blobs = self.makeBlobStore()

    def store(self, *chunks: bytes) -> Any:
        writer = self.blobs.openWriter()
        for chunk in chunks:
            self.successResultOf(writer.write(chunk))
        return self.successResultOf(writer.commit())

    def content(self, digest: str) -> bytes | None:
        f = self.successResultOf(self.blobs.open(digest))
        if f is None:
            return None
        with f:
            return f.read()

    def test_interface(self) -> None:
        """The backend provides IBlobStore."""
        self.assertTrue(verifyObject(IBlobStore, self.blobs))

    def test_storeAndRead(self) -> None:
        """A blob written in chunks is stored under its sha256 and reads back whole."""
        info = self.store(b"hello ", b"world")
        self.assertEqual(info.sha256, hashlib.sha256(b"hello world").hexdigest())
        self.assertEqual(info.size, 11)
        self.assertEqual(self.content(info.sha256), b"hello world")
        self.assertTrue(self.successResultOf(self.blobs.exists(info.sha256)))

    def test_sameContentTwice(self) -> None:
        """Storing the same bytes again gives the same digest and keeps them."""
        self.assertEqual(self.store(b"x").sha256, self.store(b"x").sha256)
        self.assertEqual(self.content(hashlib.sha256(b"x").hexdigest()), b"x")

    def test_missing(self) -> None:
        """An unknown digest is absent."""
        digest = hashlib.sha256(b"nothing").hexdigest()
        self.assertIsNone(self.content(digest))
        self.assertFalse(self.successResultOf(self.blobs.exists(digest)))

    def test_extraHashes(self) -> None:
        """md5 and blake2b-256 are computed on request, as uploads must verify them."""
        writer = self.blobs.openWriter(("md5", "blake2b_256"))
        self.successResultOf(writer.write(b"abc"))
        info = self.successResultOf(writer.close())
        self.assertEqual(info.hashes, {
            "sha256": hashlib.sha256(b"abc").hexdigest(),
            "md5": hashlib.md5(b"abc").hexdigest(),
            "blake2b_256": hashlib.blake2b(b"abc", digest_size=32).hexdigest(),
        })

    def test_closedIsNotVisibleUntilCommit(self) -> None:
        """A closed blob can be inspected but is not stored until committed."""
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(b"inspect me"))
        info = self.successResultOf(writer.close())
        self.assertEqual(self.successResultOf(writer.read(lambda f: f.read())), b"inspect me")
        self.assertFalse(self.successResultOf(self.blobs.exists(info.sha256)))
        self.assertEqual(self.successResultOf(writer.commit()).sha256, info.sha256)
        self.assertEqual(self.content(info.sha256), b"inspect me")

    def test_abortAfterClose(self) -> None:
        """A closed blob that is aborted is never stored."""
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(b"refused"))
        info = self.successResultOf(writer.close())
        self.successResultOf(writer.abort())
        self.assertFalse(self.successResultOf(self.blobs.exists(info.sha256)))

    def test_abort(self) -> None:
        """An aborted writer stores nothing."""
        writer = self.blobs.openWriter()
        self.successResultOf(writer.write(b"partial"))
        self.successResultOf(writer.abort())
        self.assertFalse(self.successResultOf(self.blobs.exists(hashlib.sha256(b"partial").hexdigest())))

    def test_delete(self) -> None:
        """A deleted blob is gone; deleting a missing one is harmless."""
        info = self.store(b"gone soon")
        self.successResultOf(self.blobs.delete(info.sha256))
        self.assertIsNone(self.content(info.sha256))
        self.successResultOf(self.blobs.delete(info.sha256))

    def test_deleteUnreferenced(self) -> None:
        """Garbage collection keeps referenced blobs and removes the rest."""
        keep, drop = self.store(b"keep"), self.store(b"drop")
        removed = self.successResultOf(self.blobs.deleteUnreferenced({keep.sha256}))
        self.assertGreaterEqual(removed, 1)
        self.assertEqual(self.content(keep.sha256), b"keep")
        self.assertIsNone(self.content(drop.sha256))

    # the collector beside writers (IBlobStore.collect)

    def collect(self, referenced: set[str], now: float, grace: float = 60.0) -> Any:
        return self.successResultOf(self.blobs.collect(referenced, now, grace))

    def test_collectRetiresThenDeletesOldUnreferenced(self) -> None:
        """An unreferenced blob is retired after the grace period and removed one grace period later."""
        keep, drop = self.store(b"keep"), self.store(b"drop")
        now = time.time()
        self.assertEqual(self.collect({keep.sha256}, now).retired, 0)  # just stored
        self.assertEqual(self.collect({keep.sha256}, now + 61).retired, 1)
        self.assertEqual(self.collect({keep.sha256}, now + 62).deleted, 0)  # retired only just now
        self.assertEqual(self.collect({keep.sha256}, now + 122).deleted, 1)
        self.assertIsNone(self.content(drop.sha256))
        self.assertFalse(self.successResultOf(self.blobs.exists(drop.sha256)))
        self.assertEqual(self.content(keep.sha256), b"keep")

    def test_collectBringsBackWhatIsReferencedAgain(self) -> None:
        blob = self.store(b"referenced again")
        now = time.time()
        self.assertEqual(self.collect(set(), now + 61).retired, 1)
        self.assertEqual(self.collect({blob.sha256}, now + 62).restored, 1)
        result = self.collect({blob.sha256}, now + 1000)
        self.assertEqual((result.retired, result.deleted), (0, 0))
        self.assertEqual(self.content(blob.sha256), b"referenced again")

    def test_retiredBlobIsStillReadable(self) -> None:
        """Metadata that points at a retired blob (stored again during a pass) still gets its bytes."""
        blob = self.store(b"still read")
        self.collect(set(), time.time() + 61)
        self.assertTrue(self.successResultOf(self.blobs.exists(blob.sha256)))
        self.assertEqual(self.content(blob.sha256), b"still read")

    def test_storingAgainSavesRetiredContent(self) -> None:
        """A writer with content that was retired brings it back, fresh: the next pass keeps it."""
        blob = self.store(b"uploaded twice")
        now = time.time()
        self.assertEqual(self.collect(set(), now + 61).retired, 1)
        self.assertEqual(self.store(b"uploaded twice").sha256, blob.sha256)
        result = self.collect(set(), time.time() + 30)
        self.assertEqual((result.retired, result.deleted), (0, 0))
        self.assertEqual(self.content(blob.sha256), b"uploaded twice")

    def test_startupCleanupEmptiesTheTrash(self) -> None:
        """At startup, retired blobs are restored if referenced and removed if not."""
        wanted, unwanted = self.store(b"wanted"), self.store(b"unwanted")
        self.collect(set(), time.time() + 61)
        self.successResultOf(self.blobs.deleteUnreferenced({wanted.sha256}))
        self.assertEqual(self.content(wanted.sha256), b"wanted")
        self.assertIsNone(self.content(unwanted.sha256))
