"""
The content-addressed blob store under C{+files/}.

A blob is written to a temporary file under C{+files/tmp/}, fsynced, and
renamed to C{+files/<aa>/<sha256>}; only then may metadata point to it.  A
crash leaves at most a temporary file or an unreferenced blob, and both are
removed at startup by L{FileBlobStore.deleteUnreferenced}.
"""

import os
import uuid
from typing import Any, BinaryIO, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.filepath import FilePath
from zope.interface import implementer

from ..interfaces import IBlobStore, IBlobWriter
from . import BlobInfo, newHashes
from .threads import Runner


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
        if target.exists():
            # The same content is stored already.
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

    def openWriter(self, extraHashes: tuple[str, ...] = ()) -> _FileBlobWriter:
        return _FileBlobWriter(self, tuple(extraHashes))

    def open(self, sha256: str) -> Deferred[BinaryIO | None]:
        def _open() -> BinaryIO | None:
            try:
                return open(self._pathFor(sha256).path, "rb")
            except FileNotFoundError:
                return None

        return self._runner.runFile(_open)

    def exists(self, sha256: str) -> Deferred[bool]:
        return self._runner.runFile(lambda: self._pathFor(sha256).exists())

    def delete(self, sha256: str) -> Deferred[None]:
        def _delete() -> None:
            path = self._pathFor(sha256)
            if path.exists():
                path.remove()

        return self._runner.runFile(_delete)

    def _deleteUnreferenced(self, referenced: set[str]) -> int:
        removed = 0
        if not self._root.exists():
            return 0
        for child in self._root.children():
            if child.basename() == "tmp":
                for tmp in child.children():
                    tmp.remove()
                    removed += 1
                continue
            if not child.isdir():
                continue
            for blob in child.children():
                if blob.basename() not in referenced:
                    blob.remove()
                    removed += 1
        return removed

    def deleteUnreferenced(self, referenced: set[str]) -> Deferred[int]:
        return self._runner.runFile(self._deleteUnreferenced, set(referenced))
