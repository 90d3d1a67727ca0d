"""
The S3 blob store (devpi_twisted.storage.s3) against a real SeaweedFS S3
gateway started on 127.0.0.1 (tests/engines.py): the blob store contract,
streaming reads with ranges, the collector on the bucket, presigned URLs,
prefixes, and a gateway that goes away and comes back.
"""

import hashlib
import os
import random
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from devpi_twisted.config import BackendSettings
from devpi_twisted.errors import StorageError, StorageUnavailable
from devpi_twisted.interfaces import ILocalBlobReader, IPresigningBlobStore
from devpi_twisted.storage.readers import blockingFile
from devpi_twisted.storage.s3 import contentDisposition, openS3
from devpi_twisted.storage.threads import ThreadRunner
from devpi_twisted.testing.contract import BlobStoreContract

from .engines import SeaweedS3, s3Environment, sharedS3


class _S3:
    """Opens S3 blob stores on a real gateway, with its credentials in the environment."""

    def s3Environ(self) -> None:
        saved = {name: os.environ.get(name) for name in s3Environment()}

        def restore() -> None:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

        os.environ.update(s3Environment())
        self.addCleanup(restore)  # type: ignore[attr-defined]

    def threadRunner(self) -> ThreadRunner:
        runner = ThreadRunner(reactor)
        runner.start()
        self.addCleanup(runner.stopService)  # type: ignore[attr-defined]
        return runner

    def openStore(self, server: Any, bucket: str, prefix: str = "", serverdir: FilePath | None = None,
                  runner: Any = None) -> Any:
        self.s3Environ()
        if serverdir is None:
            serverdir = FilePath(self.mktemp())  # type: ignore[attr-defined]
            serverdir.makedirs()
        settings = BackendSettings(blobs="s3", s3Endpoint=server.endpoint, s3Bucket=bucket, s3Prefix=prefix)
        return openS3(serverdir, runner or self.threadRunner(), settings)

    def countCalls(self, store: Any, *operations: str) -> dict[str, int]:
        """How often each S3 operation is called from now on."""
        counts = dict.fromkeys(operations, 0)

        def count(event_name: str, **kwargs: Any) -> None:
            counts[event_name.rsplit(".", 1)[1]] += 1

        for operation in operations:
            store._client.meta.events.register(f"before-call.s3.{operation}", count)
        return counts

    def keys(self, server: Any, bucket: str) -> list[str]:
        listing = server.client().list_objects_v2(Bucket=bucket)
        return sorted(obj["Key"] for obj in listing.get("Contents", ()))


class S3BlobStoreContractTests(_S3, BlobStoreContract, TestCase):
    """The blob store contract on a bucket, through the blob threads, as the server runs it."""

    def makeBlobStore(self) -> Any:
        server = sharedS3()
        return self.openStore(server, server.newBucket(), prefix="node/")


class S3BlobStoreTests(_S3, TestCase):
    def setUp(self) -> None:
        self.server = sharedS3()
        self.bucket = self.server.newBucket()
        self.blobs = self.openStore(self.server, self.bucket, prefix="p/")

    async def store(self, data: bytes, piece: int = 1024 * 1024) -> Any:
        writer = self.blobs.openWriter()
        for start in range(0, len(data), piece):
            await writer.write(data[start:start + piece])
        return await writer.commit()

    def test_provides(self) -> None:
        self.assertTrue(IPresigningBlobStore.providedBy(self.blobs))

    async def test_layout(self) -> None:
        """Blobs live under the prefix as aa/<sha256>, retired ones under trash/; spools are gone."""
        info = await self.store(b"laid out")
        self.assertEqual(self.keys(self.server, self.bucket), [f"p/{info.sha256[:2]}/{info.sha256}"])
        self.assertEqual(self.blobs._tmpdir.children(), [])
        await self.blobs.collect(set(), time.time() + 61, 60)
        self.assertEqual(self.keys(self.server, self.bucket), [f"p/trash/{info.sha256}"])

    async def test_streamingReadsWithRanges(self) -> None:
        """
        A multi-megabyte blob read in pieces of several sizes comes back
        whole through one GET; a seek elsewhere opens one ranged GET from
        there.
        """
        data = random.Random(13).randbytes(3 * 1024 * 1024 + 17)
        info = await self.store(data, piece=700 * 1024)
        self.assertEqual(info.sha256, hashlib.sha256(data).hexdigest())
        gets = self.countCalls(self.blobs, "GetObject")
        for size in (4096, 65536, 1024 * 1024 + 7):
            reader = await self.blobs.open(info.sha256)
            self.assertFalse(ILocalBlobReader.providedBy(reader))
            self.assertEqual(reader.size, len(data))
            before = gets["GetObject"]
            pieces = []
            while piece := await reader.read(size):
                self.assertLessEqual(len(piece), size)
                pieces.append(piece)
            self.assertEqual(b"".join(pieces), data)
            self.assertEqual(gets["GetObject"] - before, 1)
            for offset in (2 * 1024 * 1024 + 5, 17, len(data) - 3):
                reader.seek(offset)
                before = gets["GetObject"]
                self.assertEqual(await reader.read(size), data[offset:offset + size])
                self.assertEqual(gets["GetObject"] - before, 1)
            await reader.close()

    async def test_readerAsBlockingFile(self) -> None:
        """Code that parses a blob in a thread gets a copy of the bucket's object."""
        data = random.Random(5).randbytes(2 * 1024 * 1024 + 1)
        info = await self.store(data)
        reader = await self.blobs.open(info.sha256)
        file = await blockingFile(reader, self.blobs._runner.runFile)
        try:
            self.assertEqual(file.read(), data)
        finally:
            file.close()
        self.assertTrue(reader.closed)

    async def test_multipartUpload(self) -> None:
        """A blob past the multipart threshold goes up in parts and reads back whole."""
        from boto3.s3.transfer import TransferConfig

        from devpi_twisted.storage import s3

        # the real threshold is 64 MiB: a smaller one keeps the test quick
        self.patch(s3, "TRANSFER", TransferConfig(multipart_threshold=8 * 1024 * 1024,
                                                  multipart_chunksize=5 * 1024 * 1024, max_concurrency=4))
        data = random.Random(7).randbytes(20 * 1024 * 1024)
        calls = self.countCalls(self.blobs, "CreateMultipartUpload", "UploadPart", "PutObject")
        info = await self.store(data)
        self.assertEqual(calls["PutObject"], 0)
        self.assertGreaterEqual(calls["UploadPart"], 2)
        reader = await self.blobs.open(info.sha256)
        file = await blockingFile(reader, self.blobs._runner.runFile)
        try:
            self.assertEqual(hashlib.sha256(file.read()).hexdigest(), info.sha256)
        finally:
            file.close()

    async def test_storedAgainIsNotUploadedAgain(self) -> None:
        """A second writer of the same content uploads nothing and refreshes the object for the collector."""
        info = await self.store(b"twice")
        key = f"p/{info.sha256[:2]}/{info.sha256}"
        first = self.server.client().head_object(Bucket=self.bucket, Key=key)["LastModified"]
        time.sleep(1.1)  # LastModified has whole seconds
        calls = self.countCalls(self.blobs, "PutObject", "CreateMultipartUpload")
        self.assertEqual((await self.store(b"twice")).sha256, info.sha256)
        self.assertEqual(calls, {"PutObject": 0, "CreateMultipartUpload": 0})
        second = self.server.client().head_object(Bucket=self.bucket, Key=key)["LastModified"]
        self.assertGreater(second, first)
        # Fresh again: a pass whose grace reaches back only to just before the refresh keeps it.
        result = await self.blobs.collect(set(), second.timestamp() + 0.5, 1.0)
        self.assertEqual(result.retired, 0)

    async def test_collectOnTheBucket(self) -> None:
        """Retired after the grace period, brought back by open, removed a grace period after retiring."""
        keep, drop = await self.store(b"keep"), await self.store(b"drop")
        now = time.time()
        self.assertEqual((await self.blobs.collect({keep.sha256}, now, 60)).retired, 0)
        self.assertEqual((await self.blobs.collect({keep.sha256}, now + 61, 60)).retired, 1)
        self.assertIn(f"p/trash/{drop.sha256}", self.keys(self.server, self.bucket))
        reader = await self.blobs.open(drop.sha256)  # brings it back
        self.assertEqual(await reader.read(100), b"drop")
        await reader.close()
        self.assertNotIn(f"p/trash/{drop.sha256}", self.keys(self.server, self.bucket))
        later = time.time() + 61
        self.assertEqual((await self.blobs.collect({keep.sha256}, later, 60)).retired, 1)
        self.assertEqual((await self.blobs.collect({keep.sha256}, later + 59, 60)).deleted, 0)
        self.assertEqual((await self.blobs.collect({keep.sha256}, later + 61, 60)).deleted, 1)
        self.assertEqual(self.keys(self.server, self.bucket), [f"p/{keep.sha256[:2]}/{keep.sha256}"])
        self.assertIsNone(await self.blobs.open(drop.sha256))

    async def test_collectLeavesOtherObjects(self) -> None:
        """Objects that are not blobs of this prefix are never touched."""
        client = self.server.client()
        for key in ("other.txt", "p/notes.txt", "p/ab/not-a-digest", "q/trash/" + "0" * 64):
            client.put_object(Bucket=self.bucket, Key=key, Body=b"x")
        result = await self.blobs.collect(set(), time.time() + 1000, 60)
        self.assertEqual((result.retired, result.deleted), (0, 0))
        await self.blobs.collect(set(), time.time() + 2000, 60)
        self.assertEqual(len(self.keys(self.server, self.bucket)), 4)

    async def test_deleteUnreferencedKeepsTheBucket(self) -> None:
        """At startup only this node's spool leftovers go; every object stays."""
        info = await self.store(b"in the bucket")
        writer = self.blobs.openWriter()
        await writer.write(b"left behind")
        await writer.close()
        self.blobs._tmpdir.child("stray").setContent(b"crashed upload")
        self.assertEqual(await self.blobs.deleteUnreferenced(set()), 2)
        self.assertEqual(self.blobs._tmpdir.children(), [])
        self.assertEqual(self.keys(self.server, self.bucket), [f"p/{info.sha256[:2]}/{info.sha256}"])

    async def test_presignedURL(self) -> None:
        """A plain HTTP GET of a presigned URL answers the content, named and typed."""
        info = await self.store(b"fetch me directly")
        url = self.blobs.presignedURL(info.sha256, "pkg-1.0.tar.gz", "application/x-tar", 60)

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read(), response.headers

        body, headers = await deferToThread(fetch)
        self.assertEqual(body, b"fetch me directly")
        self.assertEqual(headers["Content-Type"], "application/x-tar")
        self.assertEqual(headers["Content-Disposition"], 'attachment; filename="pkg-1.0.tar.gz"')

    def test_contentDisposition(self) -> None:
        self.assertEqual(contentDisposition("a.whl"), 'attachment; filename="a.whl"')
        self.assertEqual(contentDisposition('x"é.zip'),
                         "attachment; filename=\"x__.zip\"; filename*=UTF-8''x%22%C3%A9.zip")

    async def test_prefixesAreSeparate(self) -> None:
        """Two stores with different prefixes in one bucket see only their own blobs."""
        other = self.openStore(self.server, self.bucket, prefix="other/")
        mine = await self.store(b"mine")
        self.assertFalse(await other.exists(mine.sha256))
        self.assertIsNone(await other.open(mine.sha256))
        result = await other.collect(set(), time.time() + 1000, 60)
        self.assertEqual(result.retired, 0)
        self.assertTrue(await self.blobs.exists(mine.sha256))


class OpenS3Tests(_S3, TestCase):
    def test_missingBucket(self) -> None:
        """A bucket that is not there is a one-line StorageError naming it and the endpoint."""
        server = sharedS3()
        error = self.assertRaises(StorageError, self.openStore, server, "no-such-bucket-here")
        self.assertIn("'no-such-bucket-here'", str(error))
        self.assertIn(server.endpoint, str(error))
        self.assertNotIn("\n", str(error))

    def test_wrongCredentials(self) -> None:
        """Credentials the gateway refuses are a StorageError naming the bucket."""
        server = sharedS3()
        bucket = server.newBucket()
        self.s3Environ()
        os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
        serverdir = FilePath(self.mktemp())
        settings = BackendSettings(blobs="s3", s3Endpoint=server.endpoint, s3Bucket=bucket)
        error = self.assertRaises(StorageError, openS3, serverdir, self.threadRunner(), settings)
        self.assertIn(repr(bucket), str(error))

    def test_noBucket(self) -> None:
        self.assertRaises(StorageError, openS3, FilePath(self.mktemp()), None, BackendSettings(blobs="s3"))


class S3FaultTests(_S3, TestCase):
    """A private gateway, stopped and started: operations fail fast with 503 meanwhile and work after."""

    def setUp(self) -> None:
        self.server = SeaweedS3().start()
        self.addCleanup(self.server.destroy)
        self.bucket = self.server.newBucket()
        self.blobs = self.openStore(self.server, self.bucket)

    async def assertUnavailable(self, operation: Any) -> None:
        started = time.monotonic()
        try:
            await operation()
        except StorageUnavailable as e:
            self.assertIn(self.bucket, str(e))
        else:
            self.fail("no StorageUnavailable")
        self.assertLess(time.monotonic() - started, 3.0)

    async def test_gatewayStoppedAndStarted(self) -> None:
        writer = self.blobs.openWriter()
        await writer.write(b"before")
        before = await writer.commit()
        self.server.stop()
        await self.assertUnavailable(lambda: self.blobs.exists(before.sha256))
        await self.assertUnavailable(lambda: self.blobs.open(before.sha256))
        writer = self.blobs.openWriter()
        await writer.write(b"during")
        await self.assertUnavailable(writer.commit)
        await writer.abort()
        await self.assertUnavailable(lambda: self.blobs.collect(set(), time.time(), 60))
        self.assertRaises(StorageUnavailable, self.openStore, self.server, self.bucket)
        self.server.start()
        self.assertTrue(await self.blobs.exists(before.sha256))
        writer = self.blobs.openWriter()
        await writer.write(b"after")
        after = await writer.commit()
        reader = await self.blobs.open(after.sha256)
        self.assertEqual(await reader.read(100), b"after")
        await reader.close()

    async def test_gatewayStoppedDuringRead(self) -> None:
        """A stream whose gateway goes away fails with StorageUnavailable, not a hang."""
        data = random.Random(3).randbytes(4 * 1024 * 1024)
        writer = self.blobs.openWriter()
        await writer.write(data)
        info = await writer.commit()
        reader = await self.blobs.open(info.sha256)
        self.assertEqual(await reader.read(1024), data[:1024])
        self.server.stop()
        reader.seek(3 * 1024 * 1024)
        await self.assertUnavailable(lambda: reader.read(1024))
        await reader.close()
        self.server.start()
        reader = await self.blobs.open(info.sha256)
        reader.seek(3 * 1024 * 1024)
        self.assertEqual(await reader.read(1024), data[3 * 1024 * 1024:3 * 1024 * 1024 + 1024])
        await reader.close()
