"""
Tests for L{devpi_twisted.web.uploadform}: upload forms parsed while the
body arrives, with the C{multipart} library's push parser.

Bodies are written out by hand, so the tests pin the wire format rather than
whatever some client library happens to produce, and every body is fed in
many chunkings, because the parse must not care where the network splits.
The last tests drive the real site, body gate and upload view over a fake
connection and a file blob store whose writes run when the test says.
"""

import json
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import BadRequest
from devpi_twisted.storage.blobs import FileBlobStore
from devpi_twisted.testing import MemoryBlobStore
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits
from devpi_twisted.web.uploadform import (
    BATCH_SIZE,
    FormLimits,
    MultipartReceiver,
    UploadForm,
    formReceiver,
    parseBoundary,
)

from .distbuilder import buildWheel, uploadBody
from .helpers import APIHarness, basicAuth
from .test_ops import Connection

BOUNDARY = b"----devpiBoundary7MA4YWxk"
CONTENT_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


def part(headers: list[bytes], content: bytes) -> bytes:
    """One part, without its delimiter."""
    return b"".join(h + b"\r\n" for h in headers) + b"\r\n" + content


def body(*parts: bytes, boundary: bytes = BOUNDARY, preamble: bytes = b"",
         epilogue: bytes = b"") -> bytes:
    """A complete body holding C{parts}."""
    out = preamble
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n" + epilogue


def field(name: bytes, value: bytes) -> bytes:
    return part([b'Content-Disposition: form-data; name="' + name + b'"'], value)


def contentPart(filename: bytes, data: bytes = b"data", disposition: bytes | None = None) -> bytes:
    """The C{content} file part."""
    if disposition is None:
        disposition = b'Content-Disposition: form-data; name="content"; filename="' + filename + b'"'
    return part([disposition], data)


class Received:
    """A form as the view gets it: fields, file name, and the written content."""

    def __init__(self, form: UploadForm) -> None:
        self.fields = form.fields
        self.filename = form.filename
        self.content: bytes | None = None
        if form.writer is not None:
            self.content = resultOf(form.writer.read(lambda f: f.read()))


def resultOf(result: Any) -> Any:
    """The result of a coroutine or Deferred that has run to its end (raising its failure)."""
    box: list[Any] = []
    ensureDeferred(result).addBoth(box.append)
    assert box, "not finished"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def receive(data: bytes, chunkSize: int | None = None, contentType: bytes = CONTENT_TYPE,
            **limits: int) -> Received:
    """Feed C{data} in chunks of C{chunkSize} (one piece if C{None}) and finish."""
    receiver = formReceiver(MemoryBlobStore(), contentType, FormLimits(**limits))
    size = chunkSize or max(len(data), 1)
    for start in range(0, len(data), size):
        receiver.feed(data[start:start + size])
    return Received(resultOf(receiver.finish()))


# A file whose content looks like multipart syntax without being a delimiter:
# CRLFs, the boundary without a leading CRLF, the delimiter string in the
# middle of a line, and a line that starts like the delimiter but is shorter.
TRICKY_CONTENT = (
    b"PK\x03\x04\r\n\r\nline\r\n--" + BOUNDARY[:-1] + b"\r\n"
    b"x--" + BOUNDARY + b"\r\n"
    b"x\r\n-" + BOUNDARY + b"--\r\n\r\n"
)

UPLOAD = body(
    field(b":action", b"file_upload"),
    field(b"protocol_version", b"1"),
    field(b"classifiers", b"Programming Language :: Python"),
    field(b"classifiers", b"License :: OSI Approved :: MIT License"),
    part([b'Content-Disposition: form-data; name="content"; filename="demo_pkg-1.0.tar.gz"'],
         TRICKY_CONTENT),
    part([b"Content-Disposition: form-data; name=gpg_signature; filename=demo.asc",
          b"Content-Type: application/octet-stream"], b"signature"),
    field(b"description", "caf\u00e9\r\nsecond line".encode()),
    preamble=b"This is the preamble.\r\n",
    epilogue=b"This is the epilogue.\r\n",
)

UPLOAD_FIELDS = {
    ":action": ["file_upload"],
    "protocol_version": ["1"],
    "classifiers": ["Programming Language :: Python", "License :: OSI Approved :: MIT License"],
    "description": ["caf\u00e9\r\nsecond line"],
}


class ParseBoundaryTests(SynchronousTestCase):
    """Tests for L{parseBoundary}."""

    def test_plain(self) -> None:
        """An unquoted boundary, as requests and twine send it, is returned as bytes."""
        self.assertEqual(parseBoundary(CONTENT_TYPE), BOUNDARY)

    def test_quotedAndCase(self) -> None:
        """A quoted boundary and upper-case media type and parameter name are accepted."""
        self.assertEqual(
            parseBoundary('Multipart/Form-Data; charset=utf-8; BOUNDARY="a b:c"'), b"a b:c")

    def test_notMultipart(self) -> None:
        """Another media type is refused, naming it."""
        error = self.assertRaises(
            BadRequest, parseBoundary, "application/x-www-form-urlencoded")
        self.assertIn("not multipart/form-data", error.message)

    def test_missing(self) -> None:
        """No header, or no boundary parameter, is refused."""
        self.assertRaises(BadRequest, parseBoundary, None)
        error = self.assertRaises(BadRequest, parseBoundary, "multipart/form-data")
        self.assertIn("boundary", error.message)
        self.assertRaises(BadRequest, parseBoundary, 'multipart/form-data; boundary=""')

    def test_invalid(self) -> None:
        """A boundary that is too long or not ASCII is refused."""
        self.assertRaises(BadRequest, parseBoundary, "multipart/form-data; boundary=" + "b" * 201)
        self.assertRaises(BadRequest, parseBoundary, "multipart/form-data; boundary=caf\u00e9")

    def test_badBoundaryIsBadForm(self) -> None:
        """A receiver for a bad Content-Type takes the body and refuses the form."""
        receiver = formReceiver(MemoryBlobStore(), b"multipart/form-data")
        receiver.feed(UPLOAD)
        error = self.assertRaises(BadRequest, resultOf, receiver.finish())
        self.assertIn("boundary", error.message)


class MultipartReceiverTests(SynchronousTestCase):
    """Tests for L{MultipartReceiver}: the body in, the form out."""

    def assertUpload(self, received: Received) -> None:
        self.assertEqual(received.fields, UPLOAD_FIELDS)
        self.assertEqual(received.filename, "demo_pkg-1.0.tar.gz")
        self.assertEqual(received.content, TRICKY_CONTENT)

    def test_onePiece(self) -> None:
        """
        A whole body gives fields (repeated ones in order) and the content
        file; another file part (a signature) is not kept, and preamble and
        epilogue mean nothing.
        """
        self.assertUpload(receive(UPLOAD))

    def test_everySplit(self) -> None:
        """Chunks of every size from 1 to 17 bytes give the same form as one piece."""
        for size in range(1, 18):
            self.assertUpload(receive(UPLOAD, size))

    def test_everySplitPoint(self) -> None:
        """Splitting the body in two at any offset gives the same form."""
        for cut in range(len(UPLOAD) + 1):
            receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE)
            receiver.feed(UPLOAD[:cut])
            receiver.feed(UPLOAD[cut:])
            self.assertUpload(Received(resultOf(receiver.finish())))

    def test_fileIsStreamed(self) -> None:
        """File bytes go to the blob writer as they are fed, a batch at a time, never kept whole."""
        writes: list[int] = []
        blobs = MemoryBlobStore()
        openWriter = blobs.openWriter

        def spyWriter(extraHashes: tuple[str, ...] = ()) -> Any:
            writer = openWriter(extraHashes)
            write = writer.write
            writer.write = lambda data: (writes.append(len(data)), write(data))[1]  # type: ignore[method-assign]
            return writer

        blobs.openWriter = spyWriter  # type: ignore[method-assign]
        receiver = MultipartReceiver(blobs, CONTENT_TYPE)
        receiver.feed(b"--" + BOUNDARY + b"\r\n" + part(
            [b'Content-Disposition: form-data; name="content"; filename="big.whl"'], b""))
        chunk = b"x" * 65536
        for _ in range(40):
            receiver.feed(chunk)
            self.assertLess(receiver._pendingSize, BATCH_SIZE)
        self.assertEqual(writes, [BATCH_SIZE, BATCH_SIZE])
        receiver.feed(b"\r\n--" + BOUNDARY + b"--")
        received = Received(resultOf(receiver.finish()))
        self.assertEqual(sum(writes), 40 * len(chunk))
        self.assertEqual(received.content, chunk * 40)

    def test_noContentType(self) -> None:
        """A file part without Content-Type (as uv publish sends it) is the content file."""
        received = receive(body(contentPart(b"a-1.whl")))
        self.assertEqual((received.filename, received.content), ("a-1.whl", b"data"))

    def test_emptyFilenameIsFile(self) -> None:
        """A part with C{filename=""} (an empty browser file input) is still a file part."""
        received = receive(body(contentPart(b"", b"")))
        self.assertEqual((received.filename, received.content), ("", b""))

    def test_contentAsFieldIsNoFile(self) -> None:
        """A C{content} part without a filename is a field, not the file."""
        received = receive(body(field(b"content", b"x")))
        self.assertEqual((received.fields, received.content), ({"content": ["x"]}, None))

    def test_quotingStylesInNames(self) -> None:
        """httpx backslash escapes and WHATWG percent escapes in names are decoded; quoted ';' is kept."""
        received = receive(body(
            part([b'Content-Disposition: form-data; name="a\\"b"'], b"1"),
            part([b'Content-Disposition: form-data; name="q%22r"'], b"2"),
            part([b'content-disposition: FORM-DATA; NAME="semi;colon"'], b"v"),
        ))
        self.assertEqual(received.fields, {'a"b': ["1"], 'q"r': ["2"], "semi;colon": ["v"]})

    def test_quotingStylesInFilenames(self) -> None:
        """Escaped quotes and backslashes, WHATWG %22/%0A and RFC 5987 C{filename*} are decoded."""
        cases = [
            (b'Content-Disposition: form-data; name="content"; filename="x\\\\y\\".whl"', 'x\\y".whl'),
            (b'Content-Disposition: form-data; name="content"; filename="s%0At%22.whl"', 's\nt".whl'),
            (b"Content-Disposition: form-data; name=content; filename=\"u.whl\"; "
             b"filename*=UTF-8''caf%C3%A9.whl", "caf\u00e9.whl"),
            (b"Content-Disposition: form-data; name=content; filename*=utf-8''a%20b.whl", "a b.whl"),
            # Windows paths (old browsers) come down to the file's own name.
            (b'Content-Disposition: form-data; name="content"; filename="C:\\dir\\n.whl"', "n.whl"),
        ]
        for disposition, filename in cases:
            self.assertEqual(receive(body(contentPart(b"", disposition=disposition))).filename, filename,
                             disposition)

    def test_utf8Headers(self) -> None:
        """Raw UTF-8 in a filename (as browsers send it) is decoded; other bytes are Latin-1."""
        self.assertEqual(receive(body(contentPart("\u00e9.whl".encode()))).filename, "\u00e9.whl")
        self.assertEqual(receive(body(contentPart(b"\xe9.whl"))).filename, "\u00e9.whl")

    def test_foldedHeader(self) -> None:
        """A folded header line is tolerated, in any chunking."""
        data = (b"--" + BOUNDARY + b"\r\n"
                b"Content-Disposition: form-data;\r\n name=\"a\"\r\n\r\n1\r\n"
                b"--" + BOUNDARY + b"--")
        for size in (None, *range(1, 8)):
            self.assertEqual(receive(data, size).fields, {"a": ["1"]})

    def test_noParts(self) -> None:
        """A body that is only the closing delimiter is an empty form."""
        received = receive(b"--" + BOUNDARY + b"--\r\n")
        self.assertEqual((received.fields, received.content), ({}, None))

    def test_epilogueIgnored(self) -> None:
        """Data after the closing delimiter, even fed later, changes nothing."""
        receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE)
        receiver.feed(body(field(b"a", b"1")))
        receiver.feed(b"--" + BOUNDARY + b"\r\n" + field(b"b", b"2"))
        self.assertEqual(resultOf(receiver.finish()).fields, {"a": ["1"]})

    def test_truncated(self) -> None:
        """A body cut anywhere before the closing delimiter is refused, and its file dropped."""
        for cut in (0, 10, len(UPLOAD) // 2, UPLOAD.index(b"--" + BOUNDARY + b"--") + 5):
            receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE)
            receiver.feed(UPLOAD[:cut])
            error = self.assertRaises(BadRequest, resultOf, receiver.finish())
            self.assertIn("closing boundary", error.message)
            self.assertIsNone(receiver.form.writer)

    def test_wrongBoundary(self) -> None:
        """A body using another boundary never ends and is refused."""
        self.assertRaises(BadRequest, receive, UPLOAD, contentType=b"multipart/form-data; boundary=other")

    def test_notADelimiter(self) -> None:
        """The delimiter followed by anything but CRLF or "--" is malformed (RFC 2046 forbids it in content)."""
        for data in (body(field(b"a", b"1\r\n--" + BOUNDARY + b"X")),
                     b"--" + BOUNDARY + b"  \r\n" + field(b"a", b"1") + b"\r\n--" + BOUNDARY + b"--"):
            error = self.assertRaises(BadRequest, receive, data)
            self.assertIn("malformed multipart body", error.message)

    def test_oversizeField(self) -> None:
        """A field value over maxFieldSize is refused, naming the field."""
        data = body(field(b"description", b"x" * 101))
        self.assertEqual(receive(data, maxFieldSize=101).fields, {"description": ["x" * 101]})
        for size in (None, 7):
            error = self.assertRaises(BadRequest, receive, data, size, maxFieldSize=100)
            self.assertIn("'description'", error.message)

    def test_fileNotLimitedByFieldSize(self) -> None:
        """maxFieldSize does not apply to the file part."""
        self.assertEqual(receive(body(contentPart(b"f.zip", b"y" * 1000)), 13, maxFieldSize=10).content,
                         b"y" * 1000)

    def test_tooManyParts(self) -> None:
        """More parts than maxParts are refused."""
        data = body(*[field(b"classifiers", b"c") for _ in range(4)])
        self.assertEqual(receive(data, maxParts=4).fields, {"classifiers": ["c"] * 4})
        error = self.assertRaises(BadRequest, receive, data, maxParts=3)
        self.assertIn("too many", error.message)

    def test_oversizeHeaders(self) -> None:
        """A part's header line over maxHeaderSize is refused, also when it never ends."""
        big = part([b'Content-Disposition: form-data; name="a"', b"X-Pad: " + b"p" * 200], b"1")
        self.assertEqual(receive(body(big), maxHeaderSize=300).fields, {"a": ["1"]})
        for size in (None, 5):
            error = self.assertRaises(BadRequest, receive, body(big), size, maxHeaderSize=100)
            self.assertIn("limit", error.message)
        receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE, FormLimits(maxHeaderSize=100))
        receiver.feed(b"--" + BOUNDARY + b"\r\nX-Pad: ")
        receiver.feed(b"p" * 200)
        self.assertRaises(BadRequest, resultOf, receiver.finish())

    def test_tooManyHeaders(self) -> None:
        """More header lines in a part than maxHeaders are refused."""
        headers = [b'Content-Disposition: form-data; name="a"'] + [b"X-Pad: p"] * 3
        self.assertEqual(receive(body(part(headers, b"1")), maxHeaders=4).fields, {"a": ["1"]})
        self.assertRaises(BadRequest, receive, body(part(headers, b"1")), maxHeaders=3)

    def test_partWithoutName(self) -> None:
        """A part with no Content-Disposition, or one without a name, is refused."""
        self.assertRaises(BadRequest, receive, body(part([b"Content-Type: text/plain"], b"x")))
        error = self.assertRaises(
            BadRequest, receive, body(part([b'Content-Disposition: form-data; filename="a"'], b"")))
        self.assertIn("no name", error.message)

    def test_malformedHeader(self) -> None:
        """A header line without a colon is refused."""
        self.assertRaises(BadRequest, receive, body(part([b"garbage"], b"x")))

    def test_invalidUtf8Value(self) -> None:
        """A field value that is not UTF-8 is decoded with replacement characters."""
        self.assertEqual(receive(body(field(b"a", b"\xff1"))).fields, {"a": ["\ufffd1"]})

    def test_twoContentFiles(self) -> None:
        """A form with two content files is refused, and the first is dropped."""
        receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE)
        receiver.feed(body(contentPart(b"a.whl"), contentPart(b"b.whl")))
        error = self.assertRaises(BadRequest, resultOf, receiver.finish())
        self.assertIn("more than one 'content'", error.message)
        self.assertIsNone(receiver.form.writer)

    def test_digestFieldsHashedOnTheWay(self) -> None:
        """Digests the client sends before the file are computed as the file streams in."""
        receiver = formReceiver(MemoryBlobStore(), CONTENT_TYPE)
        receiver.feed(body(field(b"md5_digest", b"x"), field(b"blake2_256_digest", b"y"), contentPart(b"a.whl")))
        form = resultOf(receiver.finish())
        info = resultOf(form.writer.close())
        self.assertEqual(sorted(info.hashes), ["blake2b_256", "md5", "sha256"])


class UrlencodedTests(SynchronousTestCase):
    """An C{application/x-www-form-urlencoded} form (C{:action=submit}) goes the same way."""

    TYPE = b"application/x-www-form-urlencoded"

    def test_fields(self) -> None:
        data = b":action=submit&name=demo&classifiers=a&classifiers=b&summary="
        for size in (None, 3):
            self.assertEqual(receive(data, size, contentType=self.TYPE).fields, {
                ":action": ["submit"], "name": ["demo"], "classifiers": ["a", "b"], "summary": [""]})

    def test_tooLarge(self) -> None:
        error = self.assertRaises(BadRequest, receive, b"a=" + b"x" * 100, 7, contentType=self.TYPE,
                                  maxUrlencoded=100)
        self.assertIn("form too large", error.message)


class ManualRunner:
    """A blob store's runner whose calls wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def runFile(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    runRead = runWrite = runFile

    def runAll(self) -> int:
        ran = 0
        while self.calls:
            d, f, args = self.calls.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)
            ran += 1
        return ran


class StreamingTests(SynchronousTestCase):
    """
    The real site, body gate and upload view: an upload's body is parsed as
    it arrives and written once, into the blob store, with the connection
    paused while the disk is behind; a failed upload leaves nothing.
    """

    def setUp(self) -> None:
        self.root = FilePath(self.mktemp())
        self.runner = ManualRunner()
        self.blobs = FileBlobStore(self.root, self.runner)  # type: ignore[arg-type]
        blobs = self.blobs

        class OnFileBlobs(APIHarness):
            def collaborators(self) -> dict[str, Any]:
                return {**super().collaborators(), "blobs": blobs}

        self.harness = OnFileBlobs(self)
        self.harness.blobs = self.blobs  # type: ignore[assignment]
        self.harness.createUser("alice")
        self.harness.createIndex("alice", "dev")
        resource = self.harness.resource
        gate = self.harness.server.site.bodyGate
        request = limitedRequestFactory(8 * BATCH_SIZE, [], base=DevpiRequest, spoolDirectory=self.mktemp())
        os.mkdir(request.spoolDirectory)  # type: ignore[arg-type]
        self.done: list[Any] = []
        observer = type("Observer", (), {"requestDone": lambda _, request: self.done.append(request)})()
        self.site = DevpiSite(resource, self.harness.clock, SiteLimits(idleTimeout=None), request, [observer], gate)
        self.connection = Connection(self.site)
        self.addCleanup(self.connection.close)

    def head(self, length: int, contentType: bytes = CONTENT_TYPE) -> bytes:
        return (b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nContent-Length: %d\r\n" % length
                + b"Authorization: " + basicAuth("alice", "secret")[b"Authorization"][0] + b"\r\n"
                + b"Content-Type: " + contentType + b"\r\n\r\n")

    def sendPieces(self, data: bytes, runWrites: bool = False) -> None:
        """Send C{data} as the network would, 64 KiB at a time, optionally letting writes run after each."""
        for start in range(0, len(data), 65536):
            self.connection.send(data[start:start + 65536])
            if runWrites:
                self.runner.runAll()

    def runWrites(self) -> None:
        """Run the blob store's calls until none is left."""
        while self.runner.runAll():
            pass

    def leftovers(self) -> list[str]:
        """Files in the blob store: temporaries and blobs."""
        return sorted(str(p.path) for p in self.root.walk() if p.isfile()) if self.root.exists() else []

    def answer(self) -> tuple[int, Any]:
        [(status, headers, data)] = self.connection.responses()
        if not data:
            return status, None
        self.assertEqual(headers[b"content-type"], b"application/json")
        return status, json.loads(data)

    def test_uploadWrittenOnceWhileArriving(self) -> None:
        """
        A large wheel is written to a blob temporary while its body arrives,
        nothing is spooled, the transport pauses while a write is behind,
        and the upload completes as before.
        """
        padding = os.urandom(3 * BATCH_SIZE)
        dist = buildWheel("big-pkg", "1.0", extraFiles={"big_pkg/data.bin": padding})
        upload = uploadBody(dist)
        data = upload.body
        self.connection.send(self.head(len(data), upload.contentType))
        request = self.connection.channel.requests[-1]
        half = 2 * BATCH_SIZE + 4 * 65536
        self.sendPieces(data[:half])
        self.assertEqual(self.connection.transport.producerState, "paused", "a write is behind")
        self.assertEqual(request.content.getvalue(), b"", "nothing spooled")
        self.runner.runAll()
        self.assertEqual(self.connection.transport.producerState, "producing")
        [temporary] = self.leftovers()
        self.assertIn("/tmp/", temporary)
        self.assertGreaterEqual(os.path.getsize(temporary), BATCH_SIZE)
        self.connection.send(data[half:])
        self.runWrites()
        self.assertEqual(self.answer()[0], 200)
        [blob] = self.leftovers()
        self.assertTrue(blob.endswith(dist.sha256))
        with open(blob, "rb") as f:
            self.assertEqual(f.read(), dist.data)

    def test_pausedIsNotSlow(self) -> None:
        """While the server waits for its disk, the body's deadline does not count against the client."""
        data = body(contentPart(b"demo-1.0.tar.gz", b"q" * (3 * BATCH_SIZE)))
        self.connection.send(self.head(len(data)))
        self.sendPieces(data[:2 * BATCH_SIZE + 65536])
        self.assertEqual(self.connection.transport.producerState, "paused")
        self.harness.clock.advance(60)
        self.harness.clock.advance(60)
        self.assertEqual(self.connection.transport.value(), b"")
        self.runner.runAll()
        self.assertEqual(self.connection.transport.producerState, "producing")
        self.harness.clock.advance(60)
        self.assertEqual(self.answer()[0], 408, "a client that then sends nothing is cut off")

    def test_cutOffLeavesNothing(self) -> None:
        """A body cut off mid-way leaves no blob and no temporary."""
        data = body(contentPart(b"demo-1.0.tar.gz", os.urandom(3 * BATCH_SIZE)))
        self.connection.send(self.head(len(data)) + data[:2 * BATCH_SIZE])
        self.runner.runAll()
        self.assertNotEqual(self.leftovers(), [])
        self.connection.close()
        self.runWrites()
        self.assertEqual(self.leftovers(), [])

    def test_malformedLeavesNothing(self) -> None:
        """A body that turns malformed after megabytes of file is 400 with a JSON message; nothing is kept."""
        data = body(field(b":action", b"file_upload"),
                    contentPart(b"demo-1.0.tar.gz", os.urandom(2 * BATCH_SIZE) + b"\r\n--" + BOUNDARY + b"!"))
        self.connection.send(self.head(len(data)))
        self.sendPieces(data, runWrites=True)
        self.runWrites()
        status, answer = self.answer()
        self.assertEqual(status, 400)
        self.assertIn("malformed multipart body", answer["message"])
        self.assertEqual(self.leftovers(), [])

    def test_tooLargeLeavesNothing(self) -> None:
        """A body over --max-upload-size is 413 before it is all read; what was written is dropped."""
        data = body(contentPart(b"demo-1.0.tar.gz", b"z" * (9 * BATCH_SIZE)))
        self.connection.send(self.head(len(data), CONTENT_TYPE).replace(
            b"Content-Length: %d" % len(data), b"Transfer-Encoding: chunked"))
        sent = 0
        while not self.connection.transport.disconnecting:
            piece = data[sent:sent + 65536]
            self.connection.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
            self.runner.runAll()
        self.runWrites()
        status, answer = self.answer()
        self.assertEqual(status, 413)
        self.assertIn("--max-upload-size", answer["message"])
        self.assertEqual(self.leftovers(), [])

    def test_refusedViewDropsTheFile(self) -> None:
        """
        An upload the gate let in but the view refuses (its index was
        deleted meanwhile) leaves nothing of the megabytes written.
        """
        data = body(field(b":action", b"file_upload"), contentPart(b"demo-1.0.tar.gz", b"x" * (3 * BATCH_SIZE)))
        self.connection.send(self.head(len(data)) + data[:2 * BATCH_SIZE])
        self.runner.runAll()
        self.assertNotEqual(self.leftovers(), [])
        answer = self.harness.request("DELETE", "/alice/dev", headers=basicAuth("alice", "secret"))
        self.assertEqual(answer.code, 201, answer.body)
        self.connection.send(data[2 * BATCH_SIZE:])
        self.runWrites()
        self.assertEqual(self.answer()[0], 404)
        self.assertEqual(self.leftovers(), [])

    def test_otherBodiesSpooled(self) -> None:
        """A body that is not an upload form (a JSON push) is read into C{content} as before."""
        data = json.dumps({"name": "x", "version": "1", "targetindex": "alice/other"}).encode()
        self.connection.send(self.head(len(data), b"application/json") + data[:10])
        request = self.connection.channel.requests[-1]
        self.assertIsNone(request.bodyReceiver)
        self.assertEqual(request.content.getvalue(), data[:10])
        self.connection.send(data[10:])
        self.assertNotEqual(self.connection.responses(), [])
