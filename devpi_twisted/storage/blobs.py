"""
The content-addressed blob store under C{+files/}.

A blob is written to a temporary file under C{+files/tmp/}, fsynced, and
renamed to C{+files/<aa>/<sha256>}; only then may metadata point to it.  A
crash leaves at most a temporary file or an unreferenced blob, and both are
removed at startup by L{FileBlobStore.deleteUnreferenced}.

While the server runs, L{FileBlobStore.collect} retires blobs that nothing
refers to into C{+files/trash/} and removes them a grace period later.  A
blob's modification time tells when it was last stored: a writer that finds
its content already stored touches it, or brings it back from the trash, so
the collector leaves it alone, and reading a retired blob brings it back too.
"""

import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.filepath import FilePath
from zope.interface import implementer

from devpi_twisted.interfaces import IBlobStore, IBlobWriter, ILocalBlobReader
from devpi_twisted.storage import BlobInfo, CollectResult, newHashes
from devpi_twisted.storage.readers import ReaderBase
from devpi_twisted.storage.threads import Runner

TRASH = "trash"


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def isDigest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


@implementer(IBlobWriter)
class _FileBlobWriter:
    """Writes one blob; every step runs in the runner's file threads."""

    def __init__(self, store: "FileBlobStore", extraHashes: tuple[str, ...]) -> None:
        self._store = store
        self._tmp = store._tmpdir.child(uuid.uuid4().hex)
        self._file: BinaryIO | None = None
        self._hashes = newHashes(extraHashes)
        self._size = 0
        self._info: BlobInfo | None = None

    def _write(self, data: bytes, hashes: Any = None) -> None:
        if self._file is None:
            self._tmp.parent().makedirs(ignoreExistingDirectory=True)
            self._file = open(self._tmp.path, "wb")
        self._file.write(data)
        for h in self._hashes.values() if hashes is None else hashes:
            h.update(data)
        self._size += len(data)

    def write(self, data: bytes) -> Deferred[None]:
        """
        Write and hash C{data}.  Each extra hash runs in its own file thread
        (hashlib lets go of the GIL), so md5 and blake2b cost no more time
        than the write and sha256; the caller waits before writing again,
        which keeps every hash's updates in order.
        """
        runFile = self._store._runner.runFile
        extra = [h for name, h in self._hashes.items() if name != "sha256"]
        if len(data) < 65536 or not extra:
            return runFile(self._write, data)
        calls = [runFile(self._write, data, [self._hashes["sha256"]])]
        calls += [runFile(h.update, data) for h in extra]
        return gatherResults(calls, consumeErrors=True).addCallback(lambda _: None)

    def _close(self) -> BlobInfo:
        if self._info is None:
            if self._file is None:
                self._write(b"")
            assert self._file is not None
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            digests = {name: h.hexdigest() for name, h in self._hashes.items()}
            self._info = BlobInfo(digests["sha256"], self._size, digests)
        return self._info

    def close(self) -> Deferred[BlobInfo]:
        return self._store._runner.runFile(self._close)

    def _read(self, function: Callable[[BinaryIO], Any]) -> Any:
        with open(self._tmp.path, "rb") as f:
            return function(f)

    def read(self, function: Callable[[BinaryIO], Any]) -> Deferred[Any]:
        return self._store._runner.runFile(self._read, function)

    def _commit(self) -> BlobInfo:
        info = self._close()
        target = self._store._pathFor(info.sha256)
        if self._store._storedAgain(info.sha256):
            # The same content is stored already (and is fresh again for the collector).
            if self._tmp.exists():
                self._tmp.remove()
        else:
            target.parent().makedirs(ignoreExistingDirectory=True)
            os.rename(self._tmp.path, target.path)
            _fsyncDirectory(target.parent().path)
        return info

    def commit(self) -> Deferred[BlobInfo]:
        return self._store._runner.runFile(self._commit)

    def _abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tmp.exists():
            self._tmp.remove()

    def abort(self) -> Deferred[None]:
        return self._store._runner.runFile(self._abort)


@implementer(ILocalBlobReader)
class FileBlobReader(ReaderBase):
    """
    An open blob file: reads run in the runner's file threads; the
    descriptor is at hand for C{sendfile(2)}.
    """

    def __init__(self, fd: int, size: int, runner: Runner) -> None:
        super().__init__(size)
        self._fd: int | None = fd
        self._runner = runner

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the blob reader is closed")
        return self._fd

    def _startRead(self, size: int, position: int) -> Deferred[bytes]:
        return self._runner.runFile(os.pread, self.fileno(), size, position)

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@implementer(IBlobStore)
class FileBlobStore:
    """Blobs as files named by their sha256 under one directory."""

    def __init__(self, root: FilePath, runner: Runner) -> None:
        self._root = root
        self._tmpdir = root.child("tmp")
        self._runner = runner

    def _pathFor(self, sha256: str) -> FilePath:
        if not isDigest(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._root.child(sha256[:2]).child(sha256)

    def pathFor(self, sha256: str) -> FilePath:
        """Where the blob lives on disk."""
        return self._pathFor(sha256)

    def _retiredPath(self, sha256: str) -> FilePath:
        return self._root.child(TRASH).child(sha256)

    def _restore(self, sha256: str) -> bool:
        """Bring a retired blob back; C{False} if it is not in the trash."""
        target = self._pathFor(sha256)
        try:
            target.parent().makedirs(ignoreExistingDirectory=True)
            os.rename(self._retiredPath(sha256).path, target.path)
        except FileNotFoundError:
            return False
        return True

    def _storedAgain(self, sha256: str) -> bool:
        """
        Whether the content is stored already, after marking it as just
        stored (its modification time), or bringing it back from the trash.
        """
        target = self._pathFor(sha256).path
        for _ in range(2):
            try:
                os.utime(target)
                return True
            except FileNotFoundError:
                if not self._restore(sha256):
                    return False
        return False

    def openWriter(self, extraHashes: tuple[str, ...] = ()) -> _FileBlobWriter:
        return _FileBlobWriter(self, tuple(extraHashes))

    def open(self, sha256: str) -> "Deferred[FileBlobReader | None]":
        def _open() -> FileBlobReader | None:
            path = self._pathFor(sha256).path
            for _ in range(2):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if not self._restore(sha256):
                        return None
                    continue
                return FileBlobReader(fd, os.fstat(fd).st_size, self._runner)
            return None

        return self._runner.runFile(_open)

    def exists(self, sha256: str) -> Deferred[bool]:
        return self._runner.runFile(lambda: self._pathFor(sha256).exists() or self._restore(sha256))

    def delete(self, sha256: str) -> Deferred[None]:
        def _delete() -> None:
            path = self._pathFor(sha256)
            if path.exists():
                path.remove()

        return self._runner.runFile(_delete)

    def _shards(self) -> list[FilePath]:
        """The C{<aa>} directories that hold the blobs."""
        if not self._root.isdir():
            return []
        return [child for child in self._root.children()
                if len(child.basename()) == 2 and all(c in "0123456789abcdef" for c in child.basename())
                and child.isdir()]

    def _retired(self) -> list[FilePath]:
        trash = self._root.child(TRASH)
        return [blob for blob in trash.children() if isDigest(blob.basename())] if trash.isdir() else []

    def _deleteUnreferenced(self, referenced: set[str]) -> int:
        removed = 0
        if self._tmpdir.isdir():
            for tmp in self._tmpdir.children():
                tmp.remove()
                removed += 1
        for blob in self._retired():
            if blob.basename() in referenced:
                self._restore(blob.basename())
            else:
                blob.remove()
                removed += 1
        for shard in self._shards():
            for blob in shard.children():
                if blob.basename() not in referenced:
                    blob.remove()
                    removed += 1
        return removed

    def deleteUnreferenced(self, referenced: set[str]) -> Deferred[int]:
        return self._runner.runFile(self._deleteUnreferenced, set(referenced))

    def _collect(self, referenced: set[str], now: float, grace: float) -> CollectResult:
        restored = deleted = retired = 0
        for blob in self._retired():
            sha256 = blob.basename()
            if sha256 in referenced:
                restored += self._restore(sha256)
                continue
            try:
                if os.stat(blob.path).st_mtime > now - grace:
                    continue
                os.remove(blob.path)
            except FileNotFoundError:  # brought back meanwhile
                continue
            deleted += 1
        trash = self._root.child(TRASH)
        for shard in self._shards():
            for blob in shard.children():
                sha256 = blob.basename()
                if sha256 in referenced or not isDigest(sha256):
                    continue
                retiredPath = trash.child(sha256).path
                try:
                    if os.stat(blob.path).st_mtime > now - grace:
                        continue
                    trash.makedirs(ignoreExistingDirectory=True)
                    os.rename(blob.path, retiredPath)
                    # From now on its time says when it was retired.
                    os.utime(retiredPath, (now, now))
                except FileNotFoundError:
                    continue
                retired += 1
        return CollectResult(retired=retired, restored=restored, deleted=deleted)

    def collect(self, referenced: set[str], now: float, grace: float) -> Deferred[CollectResult]:
        return self._runner.runFile(self._collect, set(referenced), now, grace)
