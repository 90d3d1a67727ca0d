"""
An incremental C{multipart/form-data} parser (RFC 7578 / RFC 2046).

Uploads can be several gigabytes, so the parser is push-based: the caller
feeds the body in chunks of any size and gets back a list of events.  Small
parts (form fields) are collected and handed out whole as L{Field}; a file
part is handed out as L{FileStart}, any number of L{FileData} and L{FileEnd},
and at no time does the parser hold more than the current chunk plus a
boundary's length of file data.

Searching uses C{bytes.find} on the buffer, so the cost per chunk is one pass
in C over that chunk.

A delimiter line is C{CRLF "--" boundary}, followed either by C{"--"} (the
end) or by optional spaces/tabs and C{CRLF} (another part).  If the
delimiter string shows up in the data followed by anything else it is not a
delimiter and is passed on as data; conforming senders never produce that,
but it costs nothing to be lenient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from devpi_twisted.errors import BadRequest

__all__ = [
    "Event",
    "Field",
    "FileData",
    "FileEnd",
    "FileStart",
    "MultipartParser",
    "parseBoundary",
]


@dataclass(frozen=True)
class Field:
    """A part without a filename: a plain form field."""

    name: str
    value: str


@dataclass(frozen=True)
class FileStart:
    """The headers of a file part; its bytes follow as L{FileData}."""

    name: str
    filename: str
    contentType: str | None


@dataclass(frozen=True)
class FileData:
    """Some bytes of the current file part (never empty)."""

    data: bytes


@dataclass(frozen=True)
class FileEnd:
    """The current file part is complete."""


Event = Field | FileStart | FileData | FileEnd


# One parameter of a header value: C{; key=value} with a quoted or bare value.
_PARAM = re.compile(
    r';\s*([^\s=;]+)\s*=\s*("(?:\\.|[^"\\])*"?|[^;]*)',
    re.DOTALL,
)
# Inside a quoted value only C{\\} and C{\"} are escapes (httpx writes
# backslashes doubled); browsers and urllib3 leave other backslashes alone.
_BACKSLASH_ESCAPE = re.compile(r'\\([\\"])')
# Browsers, urllib3 and httpx percent-encode C{"} and control characters
# (the WHATWG form encoding); ESC is left alone by all of them.
_PERCENT_ESCAPE = re.compile(r"%(22|0[0-9A-Fa-f]|1[0-9AC-Fac-f])")
# Spaces or tabs then CRLF after a delimiter ("transport padding").
_PADDING_CRLF = re.compile(rb"[ \t]*\r\n")
_PADDING_PARTIAL = re.compile(rb"[ \t]*\r?")
_MAX_PADDING = 1024
_MAX_BOUNDARY = 200


def _unquote(value: str) -> str:
    """Undo the quoting of one header parameter value."""
    value = value.strip()
    if len(value) >= 1 and value[0] == '"':
        value = value[1:-1] if len(value) >= 2 and value[-1] == '"' else value[1:]
        value = _BACKSLASH_ESCAPE.sub(r"\1", value)
        value = _PERCENT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)
    return value


def _parseParams(header: str) -> tuple[str, dict[str, str]]:
    """
    Split a header value into its main value and its parameters.

    Parameter names are lower-cased; an RFC 5987 C{key*=charset''value}
    parameter is decoded and stored under C{key}, taking precedence over a
    plain C{key=} one.
    """
    main, sep, rest = header.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    for match in _PARAM.finditer(sep + rest):
        key = match.group(1).lower()
        raw = match.group(2)
        if key.endswith("*"):
            extValue = _unquote(raw)
            if extValue.count("'") >= 2:
                charset, _, encoded = extValue.partition("'")
                _, _, encoded = encoded.partition("'")
            else:
                charset, encoded = "utf-8", extValue
            try:
                extended[key[:-1]] = unquote(encoded, encoding=charset or "utf-8", errors="replace")
            except LookupError:
                extended[key[:-1]] = unquote(encoded, encoding="utf-8", errors="replace")
        else:
            params.setdefault(key, _unquote(raw))
    params.update(extended)
    return main.strip().lower(), params


def parseBoundary(contentType: bytes | str | None) -> bytes:
    """
    Return the boundary of a C{multipart/form-data} C{Content-Type} header.

    @raise BadRequest: the type is another one or has no usable boundary.
    """
    if contentType is None:
        raise BadRequest("Content-Type multipart/form-data is required")
    if isinstance(contentType, bytes):
        contentType = contentType.decode("latin-1")
    mediaType, params = _parseParams(contentType)
    if mediaType != "multipart/form-data":
        raise BadRequest(f"Content-Type {mediaType!r} is not multipart/form-data")
    boundary = params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data Content-Type has no boundary")
    if len(boundary) > _MAX_BOUNDARY or any(c in boundary for c in "\r\n"):
        raise BadRequest("multipart/form-data boundary is invalid")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise BadRequest("multipart/form-data boundary is not ASCII") from None


def _decodeHeader(raw: bytes) -> str:
    """Header bytes as text: UTF-8 as browsers send it, else Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parseHeaders(block: bytes) -> dict[str, str]:
    """Parse a part's header block (lines separated by CRLF) into a dict."""
    headers: dict[str, str] = {}
    lastKey: str | None = None
    for line in _decodeHeader(block).split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and lastKey is not None:
            # An obsolete folded continuation line.
            headers[lastKey] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise BadRequest("malformed header in multipart part")
        lastKey = key.strip().lower()
        headers[lastKey] = value.strip()
    return headers


_PREAMBLE, _HEADERS, _FIELD, _FILE, _END = range(5)
# What _delimiterEnd says when it cannot give an offset.
_NEED_MORE, _NOT_DELIMITER, _CLOSE = -1, -2, -3


class MultipartParser:
    """
    Turn a C{multipart/form-data} body, fed in chunks, into events.

    @ivar maxFieldSize: the largest value a non-file part may have, in bytes.
    @ivar maxFields: how many parts (fields and files together) are allowed.
    @ivar maxHeaderSize: the largest header block of one part, in bytes.
    """

    def __init__(
        self,
        boundary: bytes,
        maxFieldSize: int = 1 << 20,
        maxFields: int = 1000,
        maxHeaderSize: int = 16384,
    ) -> None:
        if not boundary:
            raise ValueError("empty multipart boundary")
        self.maxFieldSize = maxFieldSize
        self.maxFields = maxFields
        self.maxHeaderSize = maxHeaderSize
        self._delimiter = b"\r\n--" + boundary
        # Pretend a CRLF came first, so a body starting with the delimiter
        # line needs no special case.
        self._buffer = b"\r\n"
        self._state = _PREAMBLE
        self._parts = 0
        self._fieldName = ""
        self._fieldChunks: list[bytes] = []
        self._fieldSize = 0

    def feed(self, data: bytes) -> list[Event]:
        """Parse the next chunk of the body; return the events it completes."""
        if self._state == _END:
            # The epilogue after the closing delimiter means nothing.
            return []
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = bytes(data)
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[Event]:
        """
        Signal the end of the body.

        @raise BadRequest: the closing delimiter has not been seen.
        """
        if self._state != _END:
            raise BadRequest("multipart body ended before the closing boundary")
        return []

    # The state machine.  Each _step consumes what it can from the buffer and
    # says whether calling it again could make progress.

    def _step(self, events: list[Event]) -> bool:
        if self._state == _PREAMBLE:
            return self._stepPreamble()
        if self._state == _HEADERS:
            return self._stepHeaders(events)
        if self._state in (_FIELD, _FILE):
            return self._stepBody(events)
        self._buffer = b""
        return False

    def _delimiterEnd(self, start: int) -> int:
        """
        Classify what follows a delimiter found at C{start}.

        @return: the buffer offset just past the delimiter line for a part
            delimiter, or L{_CLOSE}, L{_NEED_MORE} or L{_NOT_DELIMITER}.
        """
        after = start + len(self._delimiter)
        tail = self._buffer[after:after + 2]
        if len(tail) < 2:
            return _NEED_MORE if tail in (b"", b"-", b"\r", b" ", b"\t") else _NOT_DELIMITER
        if tail == b"--":
            return _CLOSE
        match = _PADDING_CRLF.match(self._buffer, after)
        if match is not None:
            return match.end()
        partial = _PADDING_PARTIAL.match(self._buffer, after)
        if partial is not None and partial.end() == len(self._buffer):
            if partial.end() - after > _MAX_PADDING:
                raise BadRequest("multipart delimiter line is too long")
            return _NEED_MORE
        return _NOT_DELIMITER

    def _stepPreamble(self) -> bool:
        searchFrom = 0
        while True:
            index = self._buffer.find(self._delimiter, searchFrom)
            if index < 0:
                # Nothing here can matter except a delimiter's beginning.
                keep = len(self._delimiter) - 1
                self._buffer = self._buffer[-keep:]
                return False
            end = self._delimiterEnd(index)
            if end == _NEED_MORE:
                self._buffer = self._buffer[index:]
                return False
            if end == _CLOSE:
                self._state = _END
                return True
            if end == _NOT_DELIMITER:
                searchFrom = index + 1
                continue
            self._buffer = self._buffer[end:]
            self._state = _HEADERS
            return True

    def _stepHeaders(self, events: list[Event]) -> bool:
        buffer = self._buffer
        if buffer.startswith(b"\r\n"):
            block, rest = b"", buffer[2:]
        elif len(buffer) < 2:
            return False
        else:
            index = buffer.find(b"\r\n\r\n", 0, self.maxHeaderSize + 4)
            if index < 0:
                if len(buffer) > self.maxHeaderSize + 3:
                    raise BadRequest(
                        f"multipart part headers are larger than {self.maxHeaderSize} bytes")
                return False
            if index > self.maxHeaderSize:
                raise BadRequest(
                    f"multipart part headers are larger than {self.maxHeaderSize} bytes")
            block, rest = buffer[:index], buffer[index + 4:]
        self._parts += 1
        if self._parts > self.maxFields:
            raise BadRequest(f"too many multipart parts (more than {self.maxFields})")
        headers = _parseHeaders(block)
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise BadRequest("multipart part has no Content-Disposition header")
        _, params = _parseParams(disposition)
        name = params.get("name")
        if name is None:
            raise BadRequest("multipart part has no name")
        self._buffer = rest
        if "filename" in params:
            self._state = _FILE
            events.append(FileStart(name, params["filename"], headers.get("content-type")))
        else:
            self._state = _FIELD
            self._fieldName = name
            self._fieldChunks = []
            self._fieldSize = 0
        return True

    def _emit(self, events: list[Event], data: bytes) -> None:
        """Hand part data to the current field or file."""
        if not data:
            return
        if self._state == _FILE:
            events.append(FileData(data))
            return
        self._fieldSize += len(data)
        if self._fieldSize > self.maxFieldSize:
            raise BadRequest(
                f"form field {self._fieldName!r} is larger than {self.maxFieldSize} bytes")
        self._fieldChunks.append(data)

    def _finishPart(self, events: list[Event]) -> None:
        if self._state == _FILE:
            events.append(FileEnd())
        else:
            value = b"".join(self._fieldChunks).decode("utf-8", errors="replace")
            self._fieldChunks = []
            events.append(Field(self._fieldName, value))

    def _stepBody(self, events: list[Event]) -> bool:
        searchFrom = 0
        while True:
            index = self._buffer.find(self._delimiter, searchFrom)
            if index < 0:
                # Everything except a possible delimiter prefix is data.
                safe = max(searchFrom, len(self._buffer) - (len(self._delimiter) - 1))
                self._emit(events, self._buffer[:safe])
                self._buffer = self._buffer[safe:]
                return False
            end = self._delimiterEnd(index)
            if end == _NOT_DELIMITER:
                searchFrom = index + 1
                continue
            self._emit(events, self._buffer[:index])
            if end == _NEED_MORE:
                self._buffer = self._buffer[index:]
                return False
            self._finishPart(events)
            if end == _CLOSE:
                self._state = _END
                self._buffer = b""
                return False
            self._buffer = self._buffer[end:]
            self._state = _HEADERS
            return True
