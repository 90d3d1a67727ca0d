"""
An upload's form, parsed while its body arrives.

The body of an upload (C{POST /user/index/} with a form) is handed to a
receiver chunk by chunk (L{devpi_twisted.web.limits.LimitedRequest}) instead
of being spooled first.  For C{multipart/form-data} the push parser of the
C{multipart} library turns it into parts: small fields collect in memory
within L{FormLimits}, and the file part C{content} goes straight into a blob
writer, hashed on the way, so an upload is written to disk once.  Writes run
in the blob store's threads, a batch at a time; while one runs and the next
batch is full, the connection stops reading (C{pause}), so memory stays
bounded by two batches whatever the disk's speed.

A malformed body is not answered at once: the error is kept, the rest of the
body is dropped, and the view, which checks the credentials first, gets it
(a 400) when it asks for the form, as it did when bodies were spooled.  Any
error, or a body that never reaches the view, discards the blob writer, so
nothing half-written remains.
"""

from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs

from multipart import MultipartError, MultipartSegment, ParserLimitReached, PushMultipartParser, parse_options_header
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from devpi_twisted.errors import BadRequest, DevpiError
from devpi_twisted.interfaces import IBlobStore, IBlobWriter
from devpi_twisted.web.headers import contentTypeOf

log = Logger()

BATCH_SIZE = 1024 * 1024
"""File content is written in batches of this many bytes."""

DIGEST_FIELDS = {"md5_digest": "md5", "sha256_digest": "sha256", "blake2_256_digest": "blake2b_256"}
"""The form fields with the file's digests, and the hash each names."""

MULTIPART = b"multipart/form-data"
URLENCODED = b"application/x-www-form-urlencoded"
FORM_TYPES = (MULTIPART, URLENCODED)
"""The content types that make a POST to an index an upload (the others are a push)."""


@dataclass(frozen=True)
class FormLimits:
    """
    What one upload form may hold besides its file.

    @ivar maxFieldSize: bytes of one field's value (file parts aside).
    @ivar maxParts: parts, fields and files together.
    @ivar maxHeaderSize: bytes of one header line of a part.
    @ivar maxHeaders: header lines of one part.
    @ivar maxUrlencoded: bytes of a whole C{application/x-www-form-urlencoded} body.
    @ivar maxBoundary: characters of the multipart boundary.
    """

    maxFieldSize: int = 1 << 20
    maxParts: int = 1000
    maxHeaderSize: int = 16384
    maxHeaders: int = 32
    maxUrlencoded: int = 10 * 1024 * 1024
    maxBoundary: int = 200


class UploadForm:
    """What the form carried: fields, and the C{content} file in a blob writer."""

    def __init__(self) -> None:
        self.fields: dict[str, list[str]] = {}
        self.writer: IBlobWriter | None = None
        self.filename: str | None = None

    def first(self, name: str) -> str:
        values = self.fields.get(name) or [""]
        return values[0]


class BodyReceiver(Protocol):
    """Takes a request body as it arrives (see L{LimitedRequest.bodyReceiver})."""

    def feed(self, data: bytes) -> None:
        """The next bytes of the body."""

    def discard(self) -> None:
        """The body will not be used (refused, cut off, or the request ended): drop it."""


def parseBoundary(contentType: bytes | str | None, maxLength: int = FormLimits.maxBoundary) -> bytes:
    """
    The boundary of a C{multipart/form-data} C{Content-Type} header.

    @raise BadRequest: the type is another one or has no usable boundary.
    """
    if contentType is None:
        raise BadRequest("Content-Type multipart/form-data is required")
    if isinstance(contentType, bytes):
        contentType = contentType.decode("latin-1")
    if not contentType.isascii():
        raise BadRequest("multipart/form-data Content-Type is not ASCII")
    mediaType, params = parse_options_header(contentType)
    if mediaType != "multipart/form-data":
        raise BadRequest(f"Content-Type {mediaType!r} is not multipart/form-data")
    boundary = params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data Content-Type has no boundary")
    if len(boundary) > maxLength or any(c in boundary for c in "\r\n"):
        raise BadRequest("multipart/form-data boundary is invalid")
    return boundary.encode("ascii")


def extraHashes(form: UploadForm) -> tuple[str, ...]:
    """Hashes to compute while the file streams in: those the client sent digests for."""
    return tuple(
        hashName for field, hashName in DIGEST_FIELDS.items()
        if hashName != "sha256" and form.first(field)
    )


def _headerText(value: str) -> str:
    """
    A part's header text, which the parser decodes as Latin-1 (never
    failing): UTF-8 as browsers and twine send it when it is valid UTF-8.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _extendedFilename(segment: MultipartSegment) -> str | None:
    """An RFC 5987 C{filename*=charset''value}, which wins over C{filename=} (reqwest sends it)."""
    disposition = segment.header("Content-Disposition", "")
    if "filename*" not in disposition.lower():
        return None
    message = Message()
    message["Content-Disposition"] = _headerText(disposition)
    for key, value in message.get_params(header="content-disposition") or ():
        if key == "filename" and isinstance(value, tuple):
            return collapse_rfc2231_value(value, errors="replace")
    return None


def _malformed(error: MultipartError) -> BadRequest:
    if isinstance(error, ParserLimitReached):
        return BadRequest(f"multipart body over a limit: {error}")
    return BadRequest(f"malformed multipart body: {error}")


class _Receiver:
    """What both kinds of form share: a kept error, and the hand-over of the form."""

    def __init__(self) -> None:
        self.form = UploadForm()
        self._error: DevpiError | Failure | None = None
        self._done = False

    def _fail(self, error: DevpiError | Failure) -> None:
        if self._error is None:
            self._error = error

    def _raiseError(self) -> None:
        if isinstance(self._error, Failure):
            self._error.raiseException()
        if self._error is not None:
            raise self._error

    def discard(self) -> None:
        self._done = True


class UrlencodedReceiver(_Receiver):
    """A small C{application/x-www-form-urlencoded} form (C{:action=submit}), kept in memory."""

    def __init__(self, limits: FormLimits = FormLimits()) -> None:
        super().__init__()
        self._limit = limits.maxUrlencoded
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        if self._done or self._error is not None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(BadRequest("form too large"))
            self._chunks = []
            return
        self._chunks.append(data)

    async def finish(self) -> UploadForm:
        self._done = True
        self._raiseError()
        body = b"".join(self._chunks)
        self._chunks = []
        self.form.fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return self.form


def _nothing() -> None:
    pass


class MultipartReceiver(_Receiver):
    """
    A C{multipart/form-data} form: fields in memory, the C{content} file
    part in a blob writer of C{blobs}.

    @param pause: stop reading the body (while writes catch up).
    @param resume: read it again.
    """

    def __init__(self, blobs: IBlobStore, contentType: bytes | None, limits: FormLimits = FormLimits(),
                 pause: Callable[[], None] = _nothing, resume: Callable[[], None] = _nothing) -> None:
        super().__init__()
        self._blobs = blobs
        self._limits = limits
        self._pause, self._resume = pause, resume
        self._parser: PushMultipartParser | None = None
        self._parts = 0
        self._field: str | None = None
        self._fieldChunks: list[bytes] = []
        self._fieldSize = 0
        self._inContent = False
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._writing: Deferred[None] | None = None
        self._paused = False
        try:
            self._parser = PushMultipartParser(
                parseBoundary(contentType, limits.maxBoundary), max_header_size=limits.maxHeaderSize,
                max_header_count=limits.maxHeaders, header_charset="latin-1")
        except DevpiError as error:
            self._fail(error)
        except MultipartError as error:
            self._fail(_malformed(error))

    # the body, as it arrives

    def feed(self, data: bytes) -> None:
        if self._done or self._error is not None or not data:
            return
        assert self._parser is not None
        try:
            for event in self._parser.parse(data):
                if isinstance(event, MultipartSegment):
                    self._startPart(event)
                elif event is None:
                    self._endPart()
                else:
                    self._partData(event)
        except MultipartError as error:
            self._fail(_malformed(error))
        except DevpiError as error:
            self._fail(error)
        if self._error is not None:
            self._pending, self._pendingSize = [], 0
            self._fieldChunks = []
        self._pump()

    def _startPart(self, segment: MultipartSegment) -> None:
        self._parts += 1
        if self._parts > self._limits.maxParts:
            raise BadRequest(f"too many multipart parts (more than {self._limits.maxParts})")
        name = _headerText(segment.name or "")
        if not name:
            raise BadRequest("multipart part has no name")
        filename = _extendedFilename(segment)
        if filename is None and segment.filename is not None:
            filename = _headerText(segment.filename)
        if filename is None:
            self._field, self._fieldChunks, self._fieldSize = name, [], 0
            return
        self._field = None
        if name != "content":
            return  # another file (a signature): not kept
        if self.form.writer is not None:
            raise BadRequest("more than one 'content' file in the form")
        # Hash on the way in only what the client sent digests for (fields
        # usually precede the file).
        self.form.writer = self._blobs.openWriter(extraHashes(self.form))
        self.form.filename = filename
        self._inContent = True

    def _partData(self, data: bytes) -> None:
        if self._inContent:
            self._pending.append(data)
            self._pendingSize += len(data)
        elif self._field is not None:
            self._fieldSize += len(data)
            if self._fieldSize > self._limits.maxFieldSize:
                raise BadRequest(f"form field {self._field!r} is larger than {self._limits.maxFieldSize} bytes")
            self._fieldChunks.append(data)

    def _endPart(self) -> None:
        if self._field is not None:
            value = b"".join(self._fieldChunks).decode("utf-8", errors="replace")
            self.form.fields.setdefault(self._field, []).append(value)
        self._field, self._fieldChunks, self._inContent = None, [], False

    # writing, one batch at a time

    def _pump(self, flush: bool = False) -> None:
        """Start the next write when none runs; pause the body while a full batch waits."""
        if self._writing is None and self._pending and (flush or self._pendingSize >= BATCH_SIZE):
            data = b"".join(self._pending)
            self._pending, self._pendingSize = [], 0
            assert self.form.writer is not None
            self._writing = self.form.writer.write(data)
            self._writing.addCallbacks(self._written, self._writeFailed)
        if self._pendingSize >= BATCH_SIZE and not self._paused and not self._done:
            self._paused = True
            self._pause()

    def _written(self, _: Any) -> None:
        self._writing = None
        self._pump()
        if self._paused and self._pendingSize < BATCH_SIZE:
            self._paused = False
            self._resume()

    def _writeFailed(self, failure: Failure) -> None:
        self._fail(failure)
        self._pending, self._pendingSize = [], 0
        self._written(None)

    async def _drain(self) -> None:
        """Wait until every write has finished."""
        while self._writing is not None:
            await self._writing

    # the end

    async def finish(self) -> UploadForm:
        """
        The body is complete: write what is left and hand the form over; the
        caller owns its writer from now on (commits or aborts it).

        @raise BadRequest: the body is not a complete multipart form.
        """
        self._done = True
        if self._error is None and self._parser is not None:
            try:
                self._parser.close()
            except MultipartError:
                self._fail(BadRequest("multipart body ended before the closing boundary"))
        if self._error is None:
            self._pump(flush=True)
        await self._drain()
        if self._error is None and self._pending:
            self._pump(flush=True)
            await self._drain()
        if self._error is not None:
            await self._dropWriter()
            self._raiseError()
        return self.form

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending, self._pendingSize = [], 0
        if self._paused:
            self._paused = False
            self._resume()
        ensureDeferred(self._dropWriter()).addErrback(
            lambda f: log.failure("dropping an unfinished upload failed", failure=f))

    async def _dropWriter(self) -> None:
        await self._drain()
        writer, self.form.writer = self.form.writer, None
        if writer is not None:
            await writer.abort()


FormReceiver = MultipartReceiver | UrlencodedReceiver


def formReceiver(blobs: IBlobStore, contentType: bytes | None, limits: FormLimits = FormLimits(),
                 pause: Callable[[], None] = _nothing, resume: Callable[[], None] = _nothing) -> FormReceiver:
    """The receiver for an upload form of C{contentType} (one of L{FORM_TYPES})."""
    if contentTypeOf(contentType) == URLENCODED:
        return UrlencodedReceiver(limits)
    return MultipartReceiver(blobs, contentType, limits, pause, resume)
