"""
Reading one member of a stored documentation zip a chunk at a time, in the
storage's file threads.

A member can unpack to far more than its zip (a page of 250 MiB from a zip
of 9 MB): reading it whole would hold it in memory and, on the reactor
thread, stop the server while it decompresses.  Here the zip's directory is
read, and each chunk decompressed, by the injected C{runFile}; the caller
asks for the next chunk only when its consumer wants more.
"""

import lzma
import zipfile
import zlib
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from devpi_twisted.errors import NotFound
from devpi_twisted.model.doczip import findDocMember
from devpi_twisted.storage.readers import RunFile, blockingFile

CHUNK = 64 * 1024

log = Logger()


class DocMemberError(Exception):
    """The member's data does not match what the zip declares for it."""


class DocMember:
    """
    An open member of a documentation zip.

    @ivar name: the member's name in the zip.
    @ivar size: the size the zip declares; L{read} delivers exactly that many
        bytes in all or fails, so it may be sent as C{Content-Length}.
    """

    def __init__(self, runFile: RunFile, file: BinaryIO, archive: zipfile.ZipFile,
                 stream: BinaryIO, name: str, size: int, chunkSize: int) -> None:
        self._runFile = runFile
        self._file = file
        self._archive = archive
        self._stream = stream
        self._chunkSize = chunkSize
        self._delivered = 0
        self._reading = False
        self._closeWanted = False
        self._closed = False
        self.name = name
        self.size = size

    def _read(self) -> bytes:
        try:
            data = self._stream.read(self._chunkSize)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
            raise DocMemberError(f"documentation member {self.name!r} is damaged: {e}") from e
        self._delivered += len(data)
        if self._delivered > self.size or (not data and self._delivered != self.size):
            raise DocMemberError(
                f"documentation member {self.name!r} holds {self._delivered} bytes, not the {self.size} declared"
            )
        return data

    def read(self) -> "Deferred[bytes]":
        """
        The next chunk, decompressed in a file thread; C{b""} after the
        last.  One read at a time: ask again after this one fires.

        @raise DocMemberError: (in the Deferred) the member is damaged or
            its size is not the declared one.
        """
        if self._reading or self._closeWanted:
            raise RuntimeError("DocMember.read while a read is running or after close")
        self._reading = True

        def _done(result: Any) -> Any:
            self._reading = False
            if self._closeWanted:
                self._closeNow()
            return result

        return self._runFile(self._read).addBoth(_done)

    def _close(self) -> None:
        try:
            self._stream.close()
            self._archive.close()
        finally:
            self._file.close()

    def _closeNow(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._runFile(self._close).addErrback(
            lambda f: log.failure("closing documentation member {name}", f, name=self.name)
        )

    def close(self) -> None:
        """
        Close the member, the zip and its file in a file thread, once the
        read that may be running has finished (never beside it).
        """
        self._closeWanted = True
        if not self._reading:
            self._closeNow()


def _closeQuietly(file: BinaryIO) -> None:
    try:
        file.close()
    except OSError:
        pass


class DocZipReader:
    """
    Opens members of stored documentation zips off the reactor.

    @param runFile: runs a blocking callable in a file thread and answers
        with a Deferred (the storage L{Runner}'s C{runFile}).
    """

    def __init__(self, runFile: RunFile, chunkSize: int = CHUNK) -> None:
        self._runFile = runFile
        self._chunkSize = chunkSize

    def _open(self, file: BinaryIO, path: str) -> DocMember | None:
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            _closeQuietly(file)
            return None
        try:
            name = findDocMember(archive.namelist(), path)
            if name is None:
                archive.close()
                _closeQuietly(file)
                return None
            info = archive.getinfo(name)
            try:
                stream = archive.open(info)
            except (NotImplementedError, RuntimeError, zipfile.BadZipFile) as e:
                # An unsupported compression method or an encrypted member.
                raise NotFound(f"documentation member {name!r} cannot be read by this server: {e}")
        except BaseException:
            archive.close()
            _closeQuietly(file)
            raise
        return DocMember(self._runFile, file, archive, stream, name, info.file_size, self._chunkSize)

    def openMember(self, reader: Any, path: str) -> "Deferred[DocMember | None]":
        """
        Open the member a documentation URL path names (see
        L{findDocMember}), reading the zip's directory in a file thread.

        Takes C{reader}, the zip's L{IBlobReader} (see L{blockingFile}):
        closed here when there is no such member, else by
        L{DocMember.close}.  Cancelling the answer (a client gone away)
        closes the member when it arrives.

        @return: a Deferred with the L{DocMember}, or C{None} when the zip
            has no such member or is no zip.
        """

        def _cancel(outer: "Deferred[DocMember | None]") -> None:
            pass  # _deliver closes what arrives after this

        outer: "Deferred[DocMember | None]" = Deferred(_cancel)

        def _deliver(member: DocMember | None) -> None:
            if outer.called:
                if member is not None:
                    member.close()
            else:
                outer.callback(member)

        def _failed(failure: Failure) -> None:
            if not outer.called:
                outer.errback(failure)

        async def _openFile() -> DocMember | None:
            file = await blockingFile(reader, self._runFile)
            return await self._runFile(self._open, file, path)

        ensureDeferred(_openFile()).addCallbacks(_deliver, _failed)
        return outer
