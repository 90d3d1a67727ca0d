"""
File contents in an S3-compatible bucket (C{--blobs s3}), shared by every
node.

A blob is the object C{<prefix><aa>/<sha256>}; a retired one (see
L{S3BlobStore.collect}) is C{<prefix>trash/<sha256>}, with the time it was
retired in its metadata.  Nothing else in the bucket is touched.

A writer spools to a local file in the node's server directory while it
hashes, so the content can be inspected before it is accepted; committing
uploads it (object first: the commit answers only once the object is in the
bucket) or, when the same content is there already, refreshes its time so
the collector leaves it alone.  A reader streams from one ranged GET at a
time.  Every request runs in the runner's blob threads; a gateway that
cannot be reached is L{StorageUnavailable} (503), and the client reconnects
by itself once it is back.
"""

import datetime
import os
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, NoCredentialsError
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from devpi_twisted.errors import StorageError, StorageUnavailable
from devpi_twisted.interfaces import IBlobReader, IBlobStore, IPresigningBlobStore
from devpi_twisted.storage import BlobInfo, CollectResult
from devpi_twisted.storage.blobs import TRASH, _FileBlobWriter, isDigest
from devpi_twisted.storage.readers import ReaderBase
from devpi_twisted.storage.threads import Runner

T = TypeVar("T")

SPOOL = "+s3spool"
# Up to 64 MiB one PUT (fewer round trips: faster than parts on SeaweedFS and
# MinIO at that size); larger files in parts of 16 MiB, several at once.
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024,
                          max_concurrency=8, use_threads=True)
_RETIRED = "retired"  # metadata: when the collector retired the object (Unix time)
_MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"})


def clientConfig(pool: int = 50) -> Config:
    """
    Fail fast (a short connect timeout, few retries) so a request waiting
    on a gone gateway answers 503 at once; enough pooled connections for
    every blob thread and a multipart upload's parts.
    """
    return Config(connect_timeout=2, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"},
                  max_pool_connections=pool, signature_version="s3v4",
                  request_checksum_calculation="when_required", response_checksum_validation="when_required")


def _errorCode(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def isMissing(error: BaseException) -> bool:
    return isinstance(error, ClientError) and (_errorCode(error) in _MISSING or _status(error) == 404)


def _unreachable(error: BaseException) -> bool:
    """Whether C{error} (or what caused it) says the gateway cannot serve just now."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, HTTPClientError)):
            return True
        if isinstance(current, ClientError) and (_status(current) >= 500 or _errorCode(current) in _BUSY):
            return True
        current = current.__cause__ or current.__context__
    return False


def contentDisposition(filename: str) -> str:
    """C{attachment} with the file's name, quoted for any client (RFC 6266)."""
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    value = f'attachment; filename="{plain}"'
    if plain != filename:
        value += f"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"
    return value


class _S3BlobWriter(_FileBlobWriter):
    """
    Spools and hashes like the file store's writer (in the file threads);
    commits to the bucket in the blob threads.
    """

    def _close(self) -> BlobInfo:
        # No fsync: the spool is only a staging copy, the bucket keeps the blob.
        if self._info is None:
            if self._file is None:
                self._write(b"")
            assert self._file is not None
            self._file.close()
            digests = {name: h.hexdigest() for name, h in self._hashes.items()}
            self._info = BlobInfo(digests["sha256"], self._size, digests)
        return self._info

    def _commit(self) -> BlobInfo:
        info = self._close()
        store: S3BlobStore = self._store  # type: ignore[assignment]
        if not store._storedAgain(info.sha256):
            store._client.upload_file(self._tmp.path, store._bucket, store._key(info.sha256), Config=TRANSFER)
        self._tmp.remove()
        return info

    def commit(self) -> Deferred[BlobInfo]:
        return self._store._guarded(self._commit)  # type: ignore[attr-defined, no-any-return]


@implementer(IBlobReader)
class S3BlobReader(ReaderBase):
    """
    An object read as a stream: one ranged GET stays open while reads go on
    from where the last ended; a read elsewhere (after L{seek}) drops it and
    opens another from there.
    """

    def __init__(self, store: "S3BlobStore", sha256: str, size: int) -> None:
        super().__init__(size)
        self._store = store
        self._sha256 = sha256
        self._body: Any = None
        self._bodyPosition = -1

    def _startRead(self, size: int, position: int) -> "Deferred[bytes]":
        return self._store._guarded(self._readAt, size, position)

    def _get(self, position: int) -> Any:
        store = self._store
        for _ in range(2):
            try:
                return store._client.get_object(Bucket=store._bucket, Key=store._key(self._sha256),
                                                Range=f"bytes={position}-")["Body"]
            except ClientError as e:
                # Retired while open: bring it back, as opening it would.
                if not isMissing(e) or not store._restore(self._sha256):
                    raise
        raise OSError(f"blob {self._sha256} is gone from the bucket")

    def _readAt(self, size: int, position: int) -> bytes:
        if position >= self.size or size <= 0:
            return b""
        if self._body is None or self._bodyPosition != position:
            self._drop()
            self._body = self._get(position)
            self._bodyPosition = position
        pieces = []
        wanted = min(size, self.size - position)
        try:
            while wanted > 0:
                piece = self._body.read(wanted)
                if not piece:
                    break
                pieces.append(piece)
                wanted -= len(piece)
        except BaseException:
            self._drop()
            raise
        data = b"".join(pieces)
        self._bodyPosition += len(data)
        return data

    def _drop(self) -> None:
        body, self._body = self._body, None
        self._bodyPosition = -1
        if body is not None:
            body.close()

    def _release(self) -> None:
        if self._body is not None:
            # Closing the connection is network work: not on the reactor thread.
            self._store._runner.runBlob(self._drop).addErrback(lambda _: None)


@implementer(IBlobStore, IPresigningBlobStore)
class S3BlobStore:
    """
    Blobs as objects named by their sha256 under a prefix of one bucket.

    @param client: a boto3 S3 client (thread-safe: shared by the blob threads).
    @param spool: the local directory where writers spool.
    """

    log = Logger()
    sharedByNodes = True  # the startup cleanup leaves the bucket to the collector

    def __init__(self, client: Any, bucket: str, prefix: str, spool: FilePath, runner: Runner,
                 endpoint: str | None = None) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._tmpdir = spool
        self._runner = runner
        self._endpoint = endpoint or "AWS"

    def _key(self, sha256: str) -> str:
        if not isDigest(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{self._prefix}{sha256[:2]}/{sha256}"

    def _retiredKey(self, sha256: str) -> str:
        return f"{self._prefix}{TRASH}/{sha256}"

    def _call(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return f(*args)
        except (BotoCoreError, ClientError, S3UploadFailedError) as e:
            if _unreachable(e):
                raise StorageUnavailable(
                    f"the object store ({self._endpoint}, bucket {self._bucket}) is unreachable just now; "
                    "try again shortly") from e
            raise

    def _guarded(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run C{f} in a blob thread, a gateway fault raised as L{StorageUnavailable}."""
        return self._runner.runBlob(self._call, f, *args)

    # single objects (blocking, in a blob thread)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self._bucket, Key=key)  # type: ignore[no-any-return]
        except ClientError as e:
            if isMissing(e):
                return None
            raise

    def _copy(self, source: str, target: str, metadata: dict[str, str], **conditions: Any) -> bool:
        """Copy (or, onto itself, refresh) an object; C{False} when the source is not there."""
        try:
            self._client.copy_object(Bucket=self._bucket, Key=target,
                                     CopySource={"Bucket": self._bucket, "Key": source},
                                     MetadataDirective="REPLACE", Metadata=metadata, **conditions)
        except ClientError as e:
            if isMissing(e):
                return False
            raise
        return True

    def _restore(self, sha256: str) -> bool:
        """Bring a retired blob back, fresh; C{False} if it is not in the trash."""
        if not self._copy(self._retiredKey(sha256), self._key(sha256), {}):
            return False
        self._client.delete_object(Bucket=self._bucket, Key=self._retiredKey(sha256))
        return True

    def _storedAgain(self, sha256: str) -> bool:
        """
        Whether the content is in the bucket already, after marking it as
        just stored (copied onto itself, which renews its modification
        time) or bringing it back from the trash.
        """
        key = self._key(sha256)
        if self._head(key) is not None and self._copy(key, key, {}):
            return True
        return self._restore(sha256)

    # IBlobStore

    def openWriter(self, extraHashes: tuple[str, ...] = ()) -> _S3BlobWriter:
        return _S3BlobWriter(self, tuple(extraHashes))

    def open(self, sha256: str) -> "Deferred[S3BlobReader | None]":
        def _open() -> S3BlobReader | None:
            key = self._key(sha256)
            head = self._head(key)
            if head is None:
                if not self._restore(sha256):
                    return None
                head = self._head(key)
                if head is None:
                    return None
            return S3BlobReader(self, sha256, int(head["ContentLength"]))

        return self._guarded(_open)

    def exists(self, sha256: str) -> Deferred[bool]:
        return self._guarded(lambda: self._head(self._key(sha256)) is not None or self._restore(sha256))

    def delete(self, sha256: str) -> Deferred[None]:
        def _delete() -> None:
            self._client.delete_object(Bucket=self._bucket, Key=self._key(sha256))

        return self._guarded(_delete)

    def _deleteUnreferenced(self) -> int:
        removed = 0
        if self._tmpdir.isdir():
            for tmp in self._tmpdir.children():
                tmp.remove()
                removed += 1
        return removed

    def deleteUnreferenced(self, referenced: set[str]) -> Deferred[int]:
        """
        Remove this node's unfinished spool files only.  The bucket is
        shared: another node may have just uploaded an object whose metadata
        is about to commit, so nothing in it is deleted at startup;
        unreferenced objects are left to L{collect}, whose grace period
        covers such uploads.
        """
        return self._runner.runFile(self._deleteUnreferenced)

    def _objects(self, prefix: str) -> Any:
        """Every object under C{prefix}, a page of listing at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            yield from page.get("Contents", ())

    def _retiredAt(self, key: str, fallback: float) -> float | None:
        head = self._head(key)
        if head is None:
            return None
        try:
            return float(head.get("Metadata", {})[_RETIRED])
        except (KeyError, ValueError):
            return fallback

    def _collect(self, referenced: set[str], now: float, grace: float) -> CollectResult:
        restored = deleted = retired = 0
        trash = f"{self._prefix}{TRASH}/"
        for obj in list(self._objects(trash)):
            sha256 = obj["Key"][len(trash):]
            if not isDigest(sha256):
                continue
            if sha256 in referenced:
                restored += self._restore(sha256)
                continue
            retiredAt = self._retiredAt(obj["Key"], obj["LastModified"].timestamp())
            if retiredAt is None or retiredAt > now - grace:
                continue
            self._client.delete_object(Bucket=self._bucket, Key=obj["Key"])
            deleted += 1
        cutoff = now - grace
        for obj in list(self._objects(self._prefix)):
            name = obj["Key"][len(self._prefix):]
            shard, _, sha256 = name.partition("/")
            if not isDigest(sha256) or shard != sha256[:2] or sha256 in referenced:
                continue
            if obj["LastModified"].timestamp() > cutoff:
                continue
            # Only if not stored again since the listing (another node's writer).
            unmodifiedSince = datetime.datetime.fromtimestamp(cutoff, datetime.timezone.utc)
            try:
                if not self._copy(obj["Key"], self._retiredKey(sha256), {_RETIRED: repr(now)},
                                  CopySourceIfUnmodifiedSince=unmodifiedSince):
                    continue
            except ClientError as e:
                if _errorCode(e) == "PreconditionFailed" or _status(e) == 412:
                    continue
                raise
            self._client.delete_object(Bucket=self._bucket, Key=obj["Key"])
            retired += 1
        return CollectResult(retired=retired, restored=restored, deleted=deleted)

    def collect(self, referenced: set[str], now: float, grace: float) -> Deferred[CollectResult]:
        return self._guarded(self._collect, set(referenced), now, grace)

    # IPresigningBlobStore

    def presignedURL(self, sha256: str, filename: str, contentType: str, expires: int) -> str:
        return self._client.generate_presigned_url(  # type: ignore[no-any-return]
            "get_object",
            Params={"Bucket": self._bucket, "Key": self._key(sha256),
                    "ResponseContentDisposition": contentDisposition(filename),
                    "ResponseContentType": contentType},
            ExpiresIn=int(expires),
        )


def openS3(serverdir: Any, runner: Runner, settings: Any) -> S3BlobStore:
    """
    Open the bucket C{settings} name, with the standard AWS credentials
    (environment, profile, instance role), after checking it can be used:
    a missing bucket or refused credentials is a L{StorageError}, a gateway
    that cannot be reached L{StorageUnavailable}.  Blocking: called once at
    startup.
    """
    bucket = settings.s3Bucket
    endpoint = settings.s3Endpoint
    where = endpoint or "AWS"
    if not bucket:
        raise StorageError("--blobs s3 needs a bucket (--s3-bucket)")
    s3: dict[str, Any] = {"addressing_style": "path"} if endpoint else {}
    config = clientConfig().merge(Config(s3=s3)) if s3 else clientConfig()
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=settings.s3Region,
                                            config=config)
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError as e:
        raise StorageError(f"no AWS credentials for S3 bucket {bucket!r} at {where} "
                           "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from e
    except (BotoCoreError, ClientError) as e:
        if _unreachable(e):
            raise StorageUnavailable(f"the S3 endpoint {where} (bucket {bucket!r}) cannot be reached: {e}") from e
        if isMissing(e):
            raise StorageError(f"S3 bucket {bucket!r} does not exist at {where}") from e
        if isinstance(e, ClientError) and _status(e) in (401, 403):
            raise StorageError(f"access to S3 bucket {bucket!r} at {where} was refused: check the AWS "
                               "credentials") from e
        raise StorageError(f"S3 bucket {bucket!r} at {where} cannot be used: {e}") from e
    root = serverdir if isinstance(serverdir, FilePath) else FilePath(os.fspath(serverdir))
    spool = root.child(SPOOL)
    spool.makedirs(ignoreExistingDirectory=True)
    S3BlobStore.log.info("blobs in S3 bucket {bucket} at {endpoint} under {prefix!r}", bucket=bucket,
                         endpoint=where, prefix=settings.s3Prefix)
    return S3BlobStore(client, bucket, settings.s3Prefix, spool, runner, endpoint)
