"""
Contract tests for storage backends.

A backend's test module subclasses the mixins with a C{makeStorage} or
C{makeBlobStore} method and trial's C{TestCase}; the same tests then run
against the in-memory fake and every real backend.  They await every
answer and never count on a Deferred having fired already, so they hold for
a backend on real threads or across the network (L{AnswersLater} makes any
backend answer on a later turn of the reactor).
"""

import hashlib
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from devpi_twisted.interfaces import IBlobReader, IBlobStore, ILocalBlobReader, IStorage
from devpi_twisted.storage import BLOB_REF, ChangeRecord, HistoryPruned, SerialMismatch


class AnswersLater:
    """
    Runs a callable on a later turn of the reactor (the shape of a storage
    runner's C{runFile}), as a backend across the network answers: for the
    memory fakes' C{later}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.calls = 0

    def __call__(self, f: Any, *args: Any) -> "Deferred[Any]":
        self.calls += 1
        return deferLater(self._clock, 0.0, f, *args)


class StorageContract:
    """What every L{IStorage} must do.  Needs C{makeStorage()}."""

    def makeStorage(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    async def write(self, function: Any) -> Any:
        return await self.storage.write(function)

    async def read(self, function: Any) -> Any:
        return await self.storage.read(function)

    async def test_interface(self) -> None:
        """The backend provides IStorage."""
        self.assertTrue(verifyObject(IStorage, self.storage))

    async def test_emptySerial(self) -> None:
        """An empty store is at serial -1 with no commit time."""
        self.assertEqual(self.storage.currentSerial(), -1)
        self.assertIsNone(self.storage.lastCommitTime())

    async def test_writeRaisesSerial(self) -> None:
        """Each committed transaction raises the serial by one and is readable."""
        serial, result = await self.write(lambda txn: txn.set("user/a", {"x": 1}) or "done")
        self.assertEqual((serial, result), (0, "done"))
        serial, _ = await self.write(lambda txn: txn.set("user/b", {"x": 2}))
        self.assertEqual(serial, 1)
        self.assertEqual(self.storage.currentSerial(), 1)
        self.assertIsNotNone(self.storage.lastCommitTime())
        self.assertEqual(await self.read(lambda v: (v.get("user/a"), v.get("user/b"), v.serial)),
                         ({"x": 1}, {"x": 2}, 1))

    async def test_noChangeNoSerial(self) -> None:
        """A transaction that changes nothing does not raise the serial."""
        await self.write(lambda txn: txn.set("k", 1))
        serial, result = await self.write(lambda txn: txn.get("k"))
        self.assertEqual((serial, result), (0, 1))
        self.assertEqual(self.storage.currentSerial(), 0)

    async def test_failedTransactionCommitsNothing(self) -> None:
        """When the function raises, none of its writes are kept."""
        def boom(txn: Any) -> None:
            txn.set("a", 1)
            raise ValueError("no")

        await self.assertFailure(self.storage.write(boom), ValueError)
        self.assertEqual(self.storage.currentSerial(), -1)
        self.assertIsNone(await self.read(lambda v: v.get("a")))

    async def test_transactionSeesItsOwnWrites(self) -> None:
        """Reads inside a transaction include what it wrote and deleted."""
        await self.write(lambda txn: [txn.set("p/1", 1), txn.set("p/2", 2)])

        def edit(txn: Any) -> Any:
            txn.set("p/3", 3)
            txn.delete("p/1")
            return txn.get("p/3"), txn.get("p/1"), txn.items("p/")

        _, seen = await self.write(edit)
        self.assertEqual(seen, (3, None, [("p/2", 2), ("p/3", 3)]))

    async def test_itemsByPrefix(self) -> None:
        """items() lists exactly the keys under the prefix, sorted."""
        await self.write(lambda txn: [txn.set(k, k) for k in ("a/b", "a/a", "ab", "a0", "b/a")])
        self.assertEqual(await self.read(lambda v: v.items("a/")), [("a/a", "a/a"), ("a/b", "a/b")])

    async def test_delete(self) -> None:
        """A deleted key reads as None; deleting a missing key is harmless."""
        await self.write(lambda txn: txn.set("k", {"v": 1}))
        await self.write(lambda txn: [txn.delete("k"), txn.delete("never")])
        self.assertIsNone(await self.read(lambda v: v.get("k")))

    async def test_setNoneRefused(self) -> None:
        """None is not a value: deletes are explicit."""
        await self.assertFailure(self.storage.write(lambda txn: txn.set("k", None)), ValueError)

    async def test_valuesAreCopies(self) -> None:
        """Mutating a value read back does not change the stored one."""
        await self.write(lambda txn: txn.set("k", {"list": [1]}))
        value = await self.read(lambda v: v.get("k"))
        value["list"].append(2)
        self.assertEqual(await self.read(lambda v: v.get("k")), {"list": [1]})

    async def test_readAsOf(self) -> None:
        """A view as of a serial shows the state right after that change."""
        await self.write(lambda txn: txn.set("k", 1))
        await self.write(lambda txn: [txn.set("k", 2), txn.set("j", 1)])
        await self.write(lambda txn: txn.delete("k"))
        views = [
            await self.storage.readAsOf(s, lambda v: (v.get("k"), v.items(""), v.serial))
            for s in range(3)
        ]
        self.assertEqual(views, [
            (1, [("k", 1)], 0),
            (2, [("j", 1), ("k", 2)], 1),
            (None, [("j", 1)], 2),
        ])

    async def test_changesSince(self) -> None:
        """The changelog lists each change with its serial, oldest first, up to a limit."""
        await self.write(lambda txn: txn.set("a", 1))
        await self.write(lambda txn: [txn.set("b", 2), txn.delete("a")])
        await self.write(lambda txn: txn.set("c", 3))
        records = await self.storage.changesSince(-1, 2)
        self.assertEqual([(r.serial, r.changes) for r in records],
                         [(0, {"a": 1}), (1, {"a": None, "b": 2})])
        self.assertTrue(all(isinstance(r, ChangeRecord) and r.time > 0 for r in records))
        later = await self.storage.changesSince(1, 100)
        self.assertEqual([r.serial for r in later], [2])

    async def test_isBlobReferenced(self) -> None:
        """A blob is referenced while a current value names it."""
        digest = "c" * 64
        await self.write(lambda txn: txn.set("f/1", {BLOB_REF: digest}))
        self.assertTrue(await self.storage.isBlobReferenced(digest))
        await self.write(lambda txn: txn.delete("f/1"))
        self.assertFalse(await self.storage.isBlobReferenced(digest))

    async def test_subscribe(self) -> None:
        """Subscribers hear of each commit until they unsubscribe."""
        heard: list[Any] = []
        unsubscribe = self.storage.subscribe(heard.append)
        await self.write(lambda txn: txn.set("a", 1))
        await self.write(lambda txn: txn.get("a"))
        unsubscribe()
        await self.write(lambda txn: txn.set("b", 1))
        self.assertEqual([(r.serial, r.changes) for r in heard], [(0, {"a": 1})])

    async def test_applyChange(self) -> None:
        """A record from elsewhere commits at its own serial and time, readable and in the changelog."""
        self.assertEqual(await self.storage.applyChange(
            ChangeRecord(0, 1000.5, {"a": {"x": [1]}, "b": 2})), 0)
        self.assertEqual(await self.storage.applyChange(
            ChangeRecord(1, 1001.0, {"a": None, "c": {BLOB_REF: "d" * 64}})), 1)
        self.assertEqual(self.storage.currentSerial(), 1)
        self.assertEqual(self.storage.lastCommitTime(), 1001.0)
        self.assertEqual(await self.read(lambda v: (v.items(""), v.serial)), ([("b", 2), ("c", {BLOB_REF: "d" * 64})], 1))
        records = await self.storage.changesSince(-1, 10)
        self.assertEqual([(r.serial, r.time, r.changes) for r in records], [
            (0, 1000.5, {"a": {"x": [1]}, "b": 2}),
            (1, 1001.0, {"a": None, "c": {BLOB_REF: "d" * 64}}),
        ])
        self.assertEqual(await self.storage.readAsOf(0, lambda v: v.get("a")), {"x": [1]})
        self.assertTrue(await self.storage.isBlobReferenced("d" * 64))
        serial, _ = await self.write(lambda txn: txn.set("local", 1))
        self.assertEqual(serial, 2)

    async def test_applyChangeOutOfOrder(self) -> None:
        """A record that is not the next serial is refused and changes nothing."""
        await self.write(lambda txn: txn.set("a", 1))
        for serial in (0, 2, 5):
            await self.assertFailure(self.storage.applyChange(ChangeRecord(serial, 1.0, {"a": 9})), SerialMismatch)
        self.assertEqual(self.storage.currentSerial(), 0)
        self.assertEqual(await self.read(lambda v: v.get("a")), 1)

    async def test_applyChangeNotifies(self) -> None:
        """Subscribers hear of applied records as of written ones."""
        heard: list[Any] = []
        self.storage.subscribe(heard.append)
        await self.storage.applyChange(ChangeRecord(0, 5.0, {"k": "v"}))
        self.assertEqual([(r.serial, r.time, r.changes) for r in heard], [(0, 5.0, {"k": "v"})])

    async def test_referencedBlobs(self) -> None:
        """Values carrying a blob reference report it; deleted ones don't."""
        d1, d2 = "a" * 64, "b" * 64
        await self.write(lambda txn: [txn.set("f/1", {BLOB_REF: d1}), txn.set("f/2", {BLOB_REF: d2}),
                                txn.set("x", {"other": 1})])
        await self.write(lambda txn: txn.delete("f/2"))
        self.assertEqual(await self.storage.referencedBlobs(), {d1})

    # pruned history (IStorage.pruneHistory, oldestKeptSerial, applySnapshot)

    async def history(self) -> None:
        """Serials 0-4: k set, overwritten and deleted; j set twice; x set."""
        await self.write(lambda txn: txn.set("k", 1))
        await self.write(lambda txn: [txn.set("k", 2), txn.set("j", 1)])
        await self.write(lambda txn: txn.delete("k"))
        await self.write(lambda txn: txn.set("j", 2))
        await self.write(lambda txn: txn.set("x", 1))

    async def asOf(self, serial: int) -> Any:
        return await self.storage.readAsOf(serial, lambda v: (v.get("k"), v.get("j"), v.items(""), v.serial))

    async def test_nothingPrunedAtFirst(self) -> None:
        """A store that was never pruned answers for every serial."""
        self.assertEqual(await self.storage.oldestKeptSerial(), -1)
        await self.history()
        self.assertEqual(await self.storage.oldestKeptSerial(), -1)
        self.assertEqual(await self.asOf(-1), (None, None, [], -1))
        self.assertEqual([r.serial for r in await self.storage.changesSince(-1, 10)], [0, 1, 2, 3, 4])

    async def test_pruneHistory(self) -> None:
        """
        After a prune to serial 2, reads as of 2 and later are exact, older
        ones and the changes after older serials fail with HistoryPruned,
        and the current state is as before.
        """
        await self.history()
        exact = {s: await self.asOf(s) for s in (2, 3, 4)}
        current = await self.read(lambda v: (v.items(""), v.serial))
        # k@0, k@1, j@1, k@2 (deleted) are up to 2; only j@1 is still needed.
        self.assertEqual(await self.storage.pruneHistory(2), 3)
        self.assertEqual(await self.storage.oldestKeptSerial(), 2)
        for serial in (-1, 0, 1):
            failure = await self.assertFailure(self.storage.readAsOf(serial, lambda v: v.get("j")), HistoryPruned)
            self.assertEqual((failure.serial, failure.oldest), (serial, 2))
            await self.assertFailure(self.storage.changesSince(serial, 10), HistoryPruned)
        self.assertEqual({s: await self.asOf(s) for s in (2, 3, 4)}, exact)
        self.assertEqual(exact[2], (None, 1, [("j", 1)], 2))
        self.assertEqual(await self.read(lambda v: (v.items(""), v.serial)), current)
        self.assertEqual([(r.serial, r.changes) for r in await self.storage.changesSince(2, 10)],
                         [(3, {"j": 2}), (4, {"x": 1})])
        self.assertEqual(self.storage.currentSerial(), 4)

    async def test_pruneNeverBackNorAhead(self) -> None:
        """The horizon only moves forward, and not past the current serial."""
        await self.history()
        await self.storage.pruneHistory(3)
        self.assertEqual(await self.storage.pruneHistory(1), 0)
        self.assertEqual(await self.storage.oldestKeptSerial(), 3)
        await self.storage.pruneHistory(100)
        self.assertEqual(await self.storage.oldestKeptSerial(), 4)
        self.assertEqual(await self.asOf(4), (None, 2, [("j", 2), ("x", 1)], 4))
        self.assertEqual(await self.storage.changesSince(4, 10), [])
        serial, _ = await self.write(lambda txn: txn.set("k", 5))
        self.assertEqual(serial, 5)
        self.assertEqual(await self.asOf(4), (None, 2, [("j", 2), ("x", 1)], 4))
        self.assertEqual([(r.serial, r.changes) for r in await self.storage.changesSince(4, 10)], [(5, {"k": 5})])

    async def test_pruneOlderThan(self) -> None:
        """With a time, the horizon stops at the last change committed by then."""
        for serial in range(4):
            await self.storage.applyChange(ChangeRecord(serial, 1000.0 + serial, {"k": serial}))
        await self.storage.pruneHistory(3, olderThan=1001.5)
        self.assertEqual(await self.storage.oldestKeptSerial(), 1)
        self.assertEqual(await self.storage.readAsOf(1, lambda v: v.get("k")), 1)
        await self.storage.pruneHistory(3, olderThan=999.0)
        self.assertEqual(await self.storage.oldestKeptSerial(), 1)

    async def test_pruneInSteps(self) -> None:
        """
        A prune over many serials (in several transactions, where a backend
        has steps) and prunes that follow one another keep reads exact.
        """
        if hasattr(self.storage, "pruneStep"):
            self.storage.pruneStep = 3
        for i in range(12):
            await self.write(lambda txn, i=i: [txn.set("hot", i)] + ([txn.set(f"cold/{i}", i)] if i % 4 == 0 else [])
                             + ([txn.delete(f"cold/{i - 4}")] if i == 8 else []))
        expected = {s: await self.storage.readAsOf(s, lambda v: v.items("")) for s in range(6, 12)}
        removed = await self.storage.pruneHistory(6)
        self.assertEqual(await self.storage.oldestKeptSerial(), 6)
        removed += await self.storage.pruneHistory(9)
        self.assertEqual(await self.storage.oldestKeptSerial(), 9)
        # hot@0-8, cold/4 (deleted at 8) and its deletion.
        self.assertEqual(removed, 9 + 2)
        self.assertEqual({s: await self.storage.readAsOf(s, lambda v: v.items("")) for s in range(9, 12)},
                         {s: expected[s] for s in range(9, 12)})
        self.assertEqual(expected[9], [("cold/0", 0), ("cold/8", 8), ("hot", 9)])

    async def test_applySnapshot(self) -> None:
        """
        A snapshot replaces the state at its serial: subscribers hear what
        changed, history before it is gone, and changes follow it.
        """
        await self.write(lambda txn: [txn.set("a", 1), txn.set("b", 2)])
        heard: list[Any] = []
        self.storage.subscribe(heard.append)
        digest = "e" * 64
        state = {"b": 3, "c": {BLOB_REF: digest}, "d": 1}
        self.assertEqual(await self.storage.applySnapshot(10, 5000.0, state), 10)
        self.assertEqual((self.storage.currentSerial(), self.storage.lastCommitTime()), (10, 5000.0))
        self.assertEqual(await self.read(lambda v: (v.items(""), v.serial)), (sorted(state.items()), 10))
        self.assertEqual([(r.serial, r.time, r.changes) for r in heard],
                         [(10, 5000.0, {"a": None, "b": 3, "c": {BLOB_REF: digest}, "d": 1})])
        self.assertEqual(await self.storage.oldestKeptSerial(), 10)
        await self.assertFailure(self.storage.readAsOf(9, lambda v: v.get("b")), HistoryPruned)
        await self.assertFailure(self.storage.changesSince(9, 10), HistoryPruned)
        self.assertEqual(await self.storage.readAsOf(10, lambda v: v.items("")), sorted(state.items()))
        self.assertEqual(await self.storage.changesSince(10, 10), [])
        self.assertEqual(await self.storage.referencedBlobs(), {digest})
        self.assertEqual(await self.storage.applyChange(ChangeRecord(11, 5001.0, {"d": None})), 11)
        self.assertEqual((await self.write(lambda txn: txn.set("e", 1)))[0], 12)
        self.assertEqual([(r.serial, r.changes) for r in await self.storage.changesSince(10, 10)],
                         [(11, {"d": None}), (12, {"e": 1})])
        await self.assertFailure(self.storage.applySnapshot(12, 6000.0, {}), SerialMismatch)
        self.assertEqual(self.storage.currentSerial(), 12)


class BlobStoreContract:
    """What every L{IBlobStore} must do.  Needs C{makeBlobStore()}."""

    def makeBlobStore(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.blobs = self.makeBlobStore()

    async def store(self, *chunks: bytes) -> Any:
        writer = self.blobs.openWriter()
        for chunk in chunks:
            await writer.write(chunk)
        return await writer.commit()

    async def content(self, digest: str, chunk: int = 3) -> bytes | None:
        """The blob's bytes, read a few at a time through its reader."""
        reader = await self.blobs.open(digest)
        if reader is None:
            return None
        pieces = []
        try:
            while data := await reader.read(chunk):
                pieces.append(data)
        finally:
            await reader.close()
        return b"".join(pieces)

    async def test_interface(self) -> None:
        """The backend provides IBlobStore."""
        self.assertTrue(verifyObject(IBlobStore, self.blobs))

    async def test_storeAndRead(self) -> None:
        """A blob written in chunks is stored under its sha256 and reads back whole."""
        info = await self.store(b"hello ", b"world")
        self.assertEqual(info.sha256, hashlib.sha256(b"hello world").hexdigest())
        self.assertEqual(info.size, 11)
        self.assertEqual(await self.content(info.sha256), b"hello world")
        self.assertTrue(await self.blobs.exists(info.sha256))

    async def test_reader(self) -> None:
        """
        An open blob is an L{IBlobReader}: its size is known, reads go on
        from where the last ended, or from where C{seek} put them, and end
        with C{b""}; a local file's reader gives its descriptor.
        """
        info = await self.store(b"0123456789")
        reader = await self.blobs.open(info.sha256)
        self.assertTrue(verifyObject(IBlobReader, reader))
        self.assertEqual(reader.size, 10)
        self.assertEqual(await reader.read(4), b"0123")
        self.assertEqual(await reader.read(4), b"4567")
        reader.seek(1)
        self.assertEqual(await reader.read(2), b"12")
        reader.seek(8)
        self.assertEqual(await reader.read(100), b"89")
        self.assertEqual(await reader.read(100), b"")
        if ILocalBlobReader.providedBy(reader):
            self.assertTrue(verifyObject(ILocalBlobReader, reader))
            self.assertIsInstance(reader.fileno(), int)
        await reader.close()
        await reader.close()

    async def test_closeDuringRead(self) -> None:
        """A reader closed while a read runs lets that read finish first."""
        info = await self.store(b"read me whole")
        reader = await self.blobs.open(info.sha256)
        reading = reader.read(100)
        closing = reader.close()
        self.assertEqual(await reading, b"read me whole")
        await closing

    async def test_sameContentTwice(self) -> None:
        """Storing the same bytes again gives the same digest and keeps them."""
        self.assertEqual((await self.store(b"x")).sha256, (await self.store(b"x")).sha256)
        self.assertEqual(await self.content(hashlib.sha256(b"x").hexdigest()), b"x")

    async def test_missing(self) -> None:
        """An unknown digest is absent."""
        digest = hashlib.sha256(b"nothing").hexdigest()
        self.assertIsNone(await self.content(digest))
        self.assertFalse(await self.blobs.exists(digest))

    async def test_extraHashes(self) -> None:
        """md5 and blake2b-256 are computed on request, as uploads must verify them."""
        writer = self.blobs.openWriter(("md5", "blake2b_256"))
        await writer.write(b"abc")
        info = await writer.close()
        self.assertEqual(info.hashes, {
            "sha256": hashlib.sha256(b"abc").hexdigest(),
            "md5": hashlib.md5(b"abc").hexdigest(),
            "blake2b_256": hashlib.blake2b(b"abc", digest_size=32).hexdigest(),
        })

    async def test_closedIsNotVisibleUntilCommit(self) -> None:
        """A closed blob can be inspected but is not stored until committed."""
        writer = self.blobs.openWriter()
        await writer.write(b"inspect me")
        info = await writer.close()
        self.assertEqual(await writer.read(lambda f: f.read()), b"inspect me")
        self.assertFalse(await self.blobs.exists(info.sha256))
        self.assertEqual((await writer.commit()).sha256, info.sha256)
        self.assertEqual(await self.content(info.sha256), b"inspect me")

    async def test_abortAfterClose(self) -> None:
        """A closed blob that is aborted is never stored."""
        writer = self.blobs.openWriter()
        await writer.write(b"refused")
        info = await writer.close()
        await writer.abort()
        self.assertFalse(await self.blobs.exists(info.sha256))

    async def test_abort(self) -> None:
        """An aborted writer stores nothing."""
        writer = self.blobs.openWriter()
        await writer.write(b"partial")
        await writer.abort()
        self.assertFalse(await self.blobs.exists(hashlib.sha256(b"partial").hexdigest()))

    async def test_delete(self) -> None:
        """A deleted blob is gone; deleting a missing one is harmless."""
        info = await self.store(b"gone soon")
        await self.blobs.delete(info.sha256)
        self.assertIsNone(await self.content(info.sha256))
        await self.blobs.delete(info.sha256)

    async def test_deleteUnreferenced(self) -> None:
        """
        The startup cleanup removes unfinished writes; a store of this node
        alone also removes unreferenced blobs, but a store several nodes
        share (C{sharedByNodes}) keeps them: another node may have just
        stored one whose metadata is about to commit, so the collector,
        with its grace period, removes them instead.
        """
        keep, drop = await self.store(b"keep"), await self.store(b"drop")
        writer = self.blobs.openWriter()
        await writer.write(b"unfinished")
        removed = await self.blobs.deleteUnreferenced({keep.sha256})
        self.assertGreaterEqual(removed, 1)
        self.assertEqual(await self.content(keep.sha256), b"keep")
        if getattr(self.blobs, "sharedByNodes", False):
            self.assertEqual(removed, 1)
            self.assertEqual(await self.content(drop.sha256), b"drop")
        else:
            self.assertIsNone(await self.content(drop.sha256))

    # the collector beside writers (IBlobStore.collect)

    async def collect(self, referenced: set[str], now: float, grace: float = 60.0) -> Any:
        return await self.blobs.collect(referenced, now, grace)

    async def test_collectRetiresThenDeletesOldUnreferenced(self) -> None:
        """An unreferenced blob is retired after the grace period and removed one grace period later."""
        keep, drop = await self.store(b"keep"), await self.store(b"drop")
        now = time.time()
        self.assertEqual((await self.collect({keep.sha256}, now)).retired, 0)  # just stored
        self.assertEqual((await self.collect({keep.sha256}, now + 61)).retired, 1)
        self.assertEqual((await self.collect({keep.sha256}, now + 62)).deleted, 0)  # retired only just now
        self.assertEqual((await self.collect({keep.sha256}, now + 122)).deleted, 1)
        self.assertIsNone(await self.content(drop.sha256))
        self.assertFalse(await self.blobs.exists(drop.sha256))
        self.assertEqual(await self.content(keep.sha256), b"keep")

    async def test_collectBringsBackWhatIsReferencedAgain(self) -> None:
        blob = await self.store(b"referenced again")
        now = time.time()
        self.assertEqual((await self.collect(set(), now + 61)).retired, 1)
        self.assertEqual((await self.collect({blob.sha256}, now + 62)).restored, 1)
        result = await self.collect({blob.sha256}, now + 1000)
        self.assertEqual((result.retired, result.deleted), (0, 0))
        self.assertEqual(await self.content(blob.sha256), b"referenced again")

    async def test_retiredBlobIsStillReadable(self) -> None:
        """Metadata that points at a retired blob (stored again during a pass) still gets its bytes."""
        blob = await self.store(b"still read")
        await self.collect(set(), time.time() + 61)
        self.assertTrue(await self.blobs.exists(blob.sha256))
        self.assertEqual(await self.content(blob.sha256), b"still read")

    async def test_storingAgainSavesRetiredContent(self) -> None:
        """A writer with content that was retired brings it back, fresh: the next pass keeps it."""
        blob = await self.store(b"uploaded twice")
        now = time.time()
        self.assertEqual((await self.collect(set(), now + 61)).retired, 1)
        self.assertEqual((await self.store(b"uploaded twice")).sha256, blob.sha256)
        result = await self.collect(set(), time.time() + 30)
        self.assertEqual((result.retired, result.deleted), (0, 0))
        self.assertEqual(await self.content(blob.sha256), b"uploaded twice")

    async def test_startupCleanupEmptiesTheTrash(self) -> None:
        """
        At startup, retired blobs are restored if referenced and removed if
        not; in a store several nodes share, the collector removes them
        one grace period later instead.
        """
        wanted, unwanted = await self.store(b"wanted"), await self.store(b"unwanted")
        now = time.time()
        await self.collect(set(), now + 61)
        await self.blobs.deleteUnreferenced({wanted.sha256})
        if getattr(self.blobs, "sharedByNodes", False):
            self.assertEqual((await self.collect({wanted.sha256}, now + 200)).deleted, 1)
        self.assertEqual(await self.content(wanted.sha256), b"wanted")
        self.assertIsNone(await self.content(unwanted.sha256))
