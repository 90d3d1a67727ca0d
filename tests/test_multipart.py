"""
Tests for L{devpi_twisted.model.multipart}.

Bodies are written out by hand, so the tests pin the wire format rather than
whatever some client library happens to produce, and every body is fed in
many chunkings, because the parser must not care where the network splits.
"""

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.multipart import (
    Event,
    Field,
    FileData,
    FileEnd,
    FileStart,
    MultipartParser,
    parseBoundary,
)

BOUNDARY = b"----devpiBoundary7MA4YWxk"


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


def feedAll(data: bytes, chunkSize: int | None = None, **kwargs: int) -> list[Event]:
    """Parse C{data} in chunks of C{chunkSize} (one piece if C{None})."""
    parser = MultipartParser(BOUNDARY, **kwargs)
    events: list[Event] = []
    size = chunkSize or max(len(data), 1)
    for start in range(0, len(data), size):
        events.extend(parser.feed(data[start:start + size]))
    events.extend(parser.close())
    return events


def coalesce(events: list[Event]) -> list[Event]:
    """Join adjacent L{FileData}, so chunkings can be compared."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, FileData) and out and isinstance(out[-1], FileData):
            out[-1] = FileData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


# A file whose content looks like multipart syntax without being a delimiter:
# CRLFs, the boundary without a leading CRLF, and the delimiter followed by
# something that is neither "--" nor a line end.
TRICKY_CONTENT = (
    b"PK\x03\x04\r\n\r\nline\r\n--" + BOUNDARY[:-1] + b"\r\n"
    b"x--" + BOUNDARY + b"\r\n"
    b"x\r\n--" + BOUNDARY + b"X not a delimiter\r\n\r\n"
)

UPLOAD = body(
    field(b":action", b"file_upload"),
    field(b"protocol_version", b"1"),
    field(b"classifiers", b"Programming Language :: Python"),
    field(b"classifiers", b"License :: OSI Approved :: MIT License"),
    part([b'Content-Disposition: form-data; name="content"; filename="demo_pkg-1.0.tar.gz"'],
         TRICKY_CONTENT),
    part([b"Content-Disposition: form-data; name=gpg_signature; filename=demo.asc",
          b"Content-Type: application/octet-stream"], b""),
    field(b"description", "caf\u00e9\r\nsecond line".encode()),
    preamble=b"This is the preamble.\r\n",
    epilogue=b"This is the epilogue.\r\n",
)

UPLOAD_EVENTS: list[Event] = [
    Field(":action", "file_upload"),
    Field("protocol_version", "1"),
    Field("classifiers", "Programming Language :: Python"),
    Field("classifiers", "License :: OSI Approved :: MIT License"),
    FileStart("content", "demo_pkg-1.0.tar.gz", None),
    FileData(TRICKY_CONTENT),
    FileEnd(),
    FileStart("gpg_signature", "demo.asc", "application/octet-stream"),
    FileEnd(),
    Field("description", "caf\u00e9\r\nsecond line"),
]


class ParseBoundaryTests(SynchronousTestCase):
    """Tests for L{parseBoundary}."""

    def test_plain(self) -> None:
        """An unquoted boundary, as requests and twine send it, is returned as bytes."""
        self.assertEqual(
            parseBoundary(b"multipart/form-data; boundary=" + BOUNDARY), BOUNDARY)

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


class MultipartParserTests(SynchronousTestCase):
    """Tests for L{MultipartParser}."""

    def test_onePiece(self) -> None:
        """A whole body fed at once gives fields, repeated fields and files in order."""
        self.assertEqual(coalesce(feedAll(UPLOAD)), UPLOAD_EVENTS)

    def test_everySplit(self) -> None:
        """Chunks of every size from 1 to 17 bytes give the same events as one piece."""
        for size in range(1, 18):
            self.assertEqual(coalesce(feedAll(UPLOAD, size)), UPLOAD_EVENTS, f"chunk size {size}")

    def test_everySplitPoint(self) -> None:
        """Splitting the body in two at any offset gives the same events."""
        for cut in range(len(UPLOAD) + 1):
            parser = MultipartParser(BOUNDARY)
            events = parser.feed(UPLOAD[:cut]) + parser.feed(UPLOAD[cut:]) + parser.close()
            self.assertEqual(coalesce(events), UPLOAD_EVENTS, f"cut at {cut}")

    def test_fileDataNeverEmpty(self) -> None:
        """No L{FileData} event carries zero bytes, even with one-byte chunks."""
        for event in feedAll(UPLOAD, 1):
            if isinstance(event, FileData):
                self.assertTrue(event.data)

    def test_fileIsStreamed(self) -> None:
        """File bytes come out as they are fed, holding back at most a delimiter's length."""
        parser = MultipartParser(BOUNDARY)
        head = b"--" + BOUNDARY + b"\r\n" + part(
            [b'Content-Disposition: form-data; name="content"; filename="big.whl"'], b"")
        events = parser.feed(head)
        self.assertEqual(events, [FileStart("content", "big.whl", None)])
        chunk = b"x" * 65536
        total = 0
        for _ in range(10):
            for event in parser.feed(chunk):
                assert isinstance(event, FileData)
                total += len(event.data)
        held = 10 * len(chunk) - total
        self.assertTrue(0 <= held < len(BOUNDARY) + 4, held)
        tail = parser.feed(b"\r\n--" + BOUNDARY + b"--")
        self.assertEqual(tail[-1], FileEnd())
        total += sum(len(e.data) for e in tail if isinstance(e, FileData))
        self.assertEqual(total, 10 * len(chunk))

    def test_noContentType(self) -> None:
        """A file part without Content-Type (as uv publish sends it) has contentType None."""
        events = feedAll(body(part(
            [b'Content-Disposition: form-data; name="content"; filename="a-1.whl"'], b"data")))
        self.assertEqual(
            coalesce(events),
            [FileStart("content", "a-1.whl", None), FileData(b"data"), FileEnd()])

    def test_emptyFilenameIsFile(self) -> None:
        """A part with C{filename=""} (an empty browser file input) is still a file part."""
        events = feedAll(body(part(
            [b'Content-Disposition: form-data; name="content"; filename=""'], b"")))
        self.assertEqual(events, [FileStart("content", "", None), FileEnd()])

    def test_quotingStyles(self) -> None:
        """httpx backslash escapes, WHATWG percent escapes and RFC 5987 values are decoded."""
        events = feedAll(body(
            part([b'Content-Disposition: form-data; name="a\\"b"; filename="x\\\\y.whl"'], b""),
            part([b'Content-Disposition: form-data; name="q%22r"; filename="s%0At%09.whl"'], b""),
            part([b'Content-Disposition: form-data; name="raw"; filename="C:\\dir\\n.whl"'], b""),
            part([b"Content-Disposition: form-data; name=plain; filename=\"u.whl\"; "
                  b"filename*=UTF-8''caf%C3%A9.whl"], b""),
            part([b'content-disposition: FORM-DATA; NAME="semi;colon"'], b"v"),
        ))
        starts = [e for e in events if isinstance(e, (FileStart, Field))]
        self.assertEqual(starts, [
            FileStart('a"b', "x\\y.whl", None),
            FileStart('q"r', "s\nt\t.whl", None),
            FileStart("raw", "C:\\dir\\n.whl", None),
            FileStart("plain", "caf\u00e9.whl", None),
            Field("semi;colon", "v"),
        ])

    def test_utf8Headers(self) -> None:
        """Raw UTF-8 in a filename (as browsers send it) is decoded."""
        events = feedAll(body(part(
            ['Content-Disposition: form-data; name="f"; filename="\u00e9.whl"'.encode()], b"")))
        self.assertEqual(events[0], FileStart("f", "\u00e9.whl", None))

    def test_foldedHeaderAndPadding(self) -> None:
        """A folded header line and spaces after a delimiter are tolerated."""
        data = (b"--" + BOUNDARY + b"  \t\r\n"
                b"Content-Disposition: form-data;\r\n name=\"a\"\r\n\r\n1\r\n"
                b"--" + BOUNDARY + b"--")
        self.assertEqual(feedAll(data), [Field("a", "1")])
        for size in range(1, 8):
            self.assertEqual(feedAll(data, size), [Field("a", "1")])

    def test_noParts(self) -> None:
        """A body that is only the closing delimiter has no events."""
        self.assertEqual(feedAll(b"--" + BOUNDARY + b"--\r\n"), [])

    def test_epilogueIgnored(self) -> None:
        """Data after the closing delimiter, even fed later, produces nothing."""
        parser = MultipartParser(BOUNDARY)
        events = parser.feed(body(field(b"a", b"1")))
        self.assertEqual(events, [Field("a", "1")])
        self.assertEqual(parser.feed(b"--" + BOUNDARY + b"\r\n" + field(b"b", b"2")), [])
        self.assertEqual(parser.close(), [])

    def test_truncated(self) -> None:
        """A body cut anywhere before the closing delimiter is refused at close."""
        for cut in (0, 10, len(UPLOAD) // 2, UPLOAD.index(b"--" + BOUNDARY + b"--") + 5):
            parser = MultipartParser(BOUNDARY)
            parser.feed(UPLOAD[:cut])
            error = self.assertRaises(BadRequest, parser.close)
            self.assertIn("closing boundary", error.message)

    def test_wrongBoundary(self) -> None:
        """A body using another boundary never ends and is refused."""
        parser = MultipartParser(b"other")
        self.assertEqual(parser.feed(UPLOAD), [])
        self.assertRaises(BadRequest, parser.close)

    def test_oversizeField(self) -> None:
        """A field value over maxFieldSize is refused, naming the field."""
        data = body(field(b"description", b"x" * 101))
        self.assertEqual(feedAll(data, maxFieldSize=101), [Field("description", "x" * 101)])
        for size in (None, 7):
            error = self.assertRaises(BadRequest, feedAll, data, size, maxFieldSize=100)
            self.assertIn("'description'", error.message)

    def test_fileNotLimitedByFieldSize(self) -> None:
        """maxFieldSize does not apply to file parts."""
        data = body(part([b'Content-Disposition: form-data; name="c"; filename="f.zip"'],
                         b"y" * 1000))
        events = coalesce(feedAll(data, 13, maxFieldSize=10))
        self.assertEqual(events[1], FileData(b"y" * 1000))

    def test_tooManyParts(self) -> None:
        """More parts than maxFields are refused."""
        data = body(*[field(b"classifiers", b"c") for _ in range(4)])
        self.assertEqual(len(feedAll(data, maxFields=4)), 4)
        error = self.assertRaises(BadRequest, feedAll, data, maxFields=3)
        self.assertIn("too many", error.message)

    def test_oversizeHeaders(self) -> None:
        """A header block over maxHeaderSize is refused, also when it never ends."""
        big = part([b'Content-Disposition: form-data; name="a"', b"X-Pad: " + b"p" * 200], b"1")
        self.assertEqual(feedAll(body(big), maxHeaderSize=300), [Field("a", "1")])
        for size in (None, 5):
            self.assertRaises(BadRequest, feedAll, body(big), size, maxHeaderSize=100)
        parser = MultipartParser(BOUNDARY, maxHeaderSize=100)
        parser.feed(b"--" + BOUNDARY + b"\r\nX-Pad: ")
        self.assertRaises(BadRequest, parser.feed, b"p" * 200)

    def test_partWithoutName(self) -> None:
        """A part with no Content-Disposition, or one without a name, is refused."""
        self.assertRaises(BadRequest, feedAll, body(part([b"Content-Type: text/plain"], b"x")))
        self.assertRaises(
            BadRequest, feedAll, body(part([b'Content-Disposition: form-data; filename="a"'], b"")))

    def test_malformedHeader(self) -> None:
        """A header line without a colon is refused."""
        self.assertRaises(BadRequest, feedAll, body(part([b"garbage"], b"x")))

    def test_invalidUtf8Value(self) -> None:
        """A field value that is not UTF-8 is decoded with replacement characters."""
        self.assertEqual(feedAll(body(field(b"a", b"\xff1"))), [Field("a", "\ufffd1")])
