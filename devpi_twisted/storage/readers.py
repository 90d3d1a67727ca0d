"""
Blob readers that are not a blob store's own: bytes held in memory, a
spooled file read in threads, and a blocking file of any reader's content
for code that parses it in a thread; L{PiecePump}, which producers use to
pass a reader's pieces on, and L{ReaderBodyProducer} and
L{BytesBodyProducer}, a reader or a few bytes as the body of an outgoing
request.
"""

import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from devpi_twisted.interfaces import IBlobReader, ILocalBlobReader

CHUNK = 1024 * 1024
# A L{devpi_twisted.storage.threads.Runner}'s C{runFile}: (f, *args) -> Deferred.
RunFile = Callable[..., "Deferred[Any]"]


class ReaderBase:
    """
    What every L{IBlobReader} here shares: its position, one read at a
    time, and a close that waits for the read in flight (whose thread may
    still use the file).  Subclasses start a read in C{_startRead} and let
    go in C{_release}.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.closed = False
        self._position = 0
        self._reading: Deferred[bytes] | None = None

    def _startRead(self, size: int, position: int) -> "Deferred[bytes]":
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def seek(self, offset: int) -> None:
        self._position = offset

    def read(self, size: int) -> "Deferred[bytes]":
        if self._reading is not None:
            raise RuntimeError("one read at a time")
        if self.closed:
            return fail(ValueError("read of a closed blob reader"))
        reading = self._reading = self._startRead(size, self._position)

        def _done(data: Any) -> Any:
            self._reading = None
            if isinstance(data, bytes):
                self._position += len(data)
            return data

        return reading.addBoth(_done)

    def close(self) -> "Deferred[None]":
        if self.closed:
            return succeed(None)
        self.closed = True
        if self._reading is None:
            self._release()
            return succeed(None)
        closed: Deferred[None] = Deferred()

        def _afterRead(result: Any) -> Any:
            self._release()
            closed.callback(None)
            return result

        self._reading.addBoth(_afterRead)
        return closed


@implementer(IBlobReader)
class BytesReader(ReaderBase):
    """
    An L{IBlobReader} over bytes in memory (core metadata, the memory fake).

    @param later: runs each read, as a storage runner's C{runFile} does; by
        default at once.  A runner that answers later makes this behave as
        a blob store across the network.
    """

    def __init__(self, data: bytes, later: RunFile = maybeDeferred) -> None:
        super().__init__(len(data))
        self._data = data
        self._later = later

    def _startRead(self, size: int, position: int) -> "Deferred[bytes]":
        return self._later(lambda: self._data[position:position + size])


class PiecePump:
    """
    Passes the pieces of an asynchronous C{read()} to C{write} for a
    producer: one read at a time, none while paused, in a loop rather than
    by recursion (a reader that answers at once would otherwise recurse once
    per piece).  After the last piece C{ended()} is called, or C{failed} with
    a read's failure; after L{stop} neither is.
    """

    def __init__(self, read: Callable[[], "Deferred[bytes]"], write: Callable[[bytes], object],
                 ended: Callable[[], object], failed: Callable[[Failure], object]) -> None:
        self._read = read
        self._write = write
        self._ended = ended
        self._failed = failed
        self._paused = False
        self._reading = False
        self._looping = False
        self.stopped = False

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.pump()

    def stop(self) -> None:
        self.stopped = True

    def pump(self) -> None:
        """Read on, unless paused (a producer paused before it starts stays so)."""
        if self._looping:
            return
        self._looping = True
        try:
            while not (self._paused or self._reading or self.stopped):
                self._reading = True
                self._read().addCallbacks(self._piece, self._readFailed)
        finally:
            self._looping = False

    def _piece(self, data: bytes) -> None:
        self._reading = False
        if self.stopped:
            return
        if not data:
            self.stopped = True
            self._ended()
            return
        # May pause us at once, when the consumer's buffer is full.
        self._write(data)
        self.pump()

    def _readFailed(self, failure: Failure) -> None:
        self._reading = False
        if self.stopped:
            return
        self.stopped = True
        self._failed(failure)


def _appendToTemporary(data: bytes, file: BinaryIO | None) -> BinaryIO:
    if file is None:
        file = tempfile.TemporaryFile()
    file.write(data)
    return file


async def blockingFile(reader: Any, runFile: RunFile) -> BinaryIO:
    """
    A blocking file of C{reader}'s content, to be read (only) in a thread:
    zip directories and name lists are parsed there.  A local blob's own
    file is used; any other reader is copied into a temporary file first.
    Takes C{reader} (closed here); the caller closes the file.
    """
    try:
        if ILocalBlobReader.providedBy(reader):
            # The same open file (a blob retired meanwhile stays readable),
            # read from its start.
            file = os.fdopen(os.dup(reader.fileno()), "rb")
            file.seek(0)
            return file
        copy: BinaryIO | None = None
        reader.seek(0)
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data and copy is not None:
                    break
                copy = await runFile(_appendToTemporary, data, copy)
            await runFile(copy.seek, 0)
        except BaseException:
            if copy is not None:
                copy.close()
            raise
        return copy
    finally:
        await reader.close()


@implementer(IBodyProducer)
class BytesBodyProducer:
    """A small request body, written at once (a webhook's JSON, a small forwarded body)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class ReaderBodyProducer:
    """
    An open reader as a request body (a pushed file, a forwarded upload),
    read through its asynchronous reads a piece at a time as the connection
    takes it: nothing is read on the reactor thread, and a blob that is not
    a local file is not copied first.  The caller closes the reader.
    """

    def __init__(self, reader: IBlobReader, pieceSize: int = 64 * 1024) -> None:
        self.length = reader.size
        self._reader = reader
        self._pieceSize = pieceSize
        self._pump: PiecePump | None = None

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        done: Deferred[None] = Deferred()
        self._pump = PiecePump(lambda: self._reader.read(self._pieceSize), consumer.write,
                               lambda: done.callback(None), done.errback)
        self._reader.seek(0)
        self._pump.pump()
        return done

    def pauseProducing(self) -> None:
        if self._pump is not None:
            self._pump.pause()

    def resumeProducing(self) -> None:
        if self._pump is not None:
            self._pump.resume()

    def stopProducing(self) -> None:
        """Read no more; as for any body producer, the start's Deferred never fires."""
        if self._pump is not None:
            self._pump.stop()


@implementer(IBlobReader)
class FileObjectReader(ReaderBase):
    """
    A blocking file object of C{size} bytes (a request body spooled to disk)
    as an L{IBlobReader} whose reads run through C{runFile}, off the
    reactor.  Closing it leaves the file open: it is its owner's.
    """

    def __init__(self, file: BinaryIO, size: int, runFile: RunFile) -> None:
        super().__init__(size)
        self._file = file
        self._runFile = runFile

    def _startRead(self, size: int, position: int) -> "Deferred[bytes]":
        return self._runFile(self._readAt, size, position)

    def _readAt(self, size: int, position: int) -> bytes:
        self._file.seek(position)
        return self._file.read(size)
