# -*- test-case-name: tests.test_upstreampage -*-
"""
An upstream index's project list (C{<upstream>/}), PEP 503 HTML or PEP 691
JSON.

The list can be hundreds of megabytes, so L{ProjectListScanner} reads it
incrementally and holds only the construct it is in the middle of;
L{parseProjectList} is the one-shot form.  Names that are not valid project
names are dropped.

Pure code: no I/O, no Twisted.
"""

import html
import json
import re
from typing import Any

from devpi_twisted.model.names import isValidProjectName
from devpi_twisted.model.upstream.common import (
    BOM,
    WHITESPACE,
    UpstreamPageError,
    bodyBytes,
    checkMajor,
    declaredKind,
)

# Longest single construct (tag, comment, anchor, JSON token) the project
# list scanner will hold while waiting for the rest of it.
MAX_LIST_CONSTRUCT = 64 * 1024


def _validName(name: str) -> str | None:
    """C{name} stripped, if it is a valid project name (the one rule, PEP 508)."""
    name = name.strip()
    return name if isValidProjectName(name) else None


def parseProjectList(body: bytes, contentType: str | None) -> list[str]:
    """
    The project names on an upstream root page, in page order.

    JSON pages give C{projects[].name}; HTML pages give the text of each
    anchor.  Names that are not valid project names are left out.

    @raise UpstreamPageError: if the body is not a usable project list.
    """
    scanner = ProjectListScanner(contentType)
    names = scanner.feed(body)
    names.extend(scanner.close())
    return names


# Pieces of the HTML list scanner.
_COMMENT_START = b"<!--"
_COMMENT_END = b"-->"
_ANCHOR = re.compile(
    rb"<a(?:[\s/](?:[^>\"']|\"[^\"]*\"|'[^']*')*)?>(.*?)</a[\s]*>", re.I | re.S
)
_OTHER_TAG = re.compile(rb"<[^>\"']*(?:(?:\"[^\"]*\"|'[^']*')[^>\"']*)*>")
_INNER_TAG = re.compile(rb"<[^>]*>")
_ATTRIBUTE = re.compile(
    rb"([^\s\"'>/=]+)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>]+)))?"
)
_TAG_OPENER = frozenset(b"!/?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Pieces of the JSON list scanner.
_MAX_JSON_DEPTH = 64
_JSON_WS = re.compile(rb"[ \t\r\n]*")
_JS = rb"[ \t\r\n]*"
_JSTR = rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_JNUMBER = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JSON_STRING = re.compile(_JSTR)
_JSON_STRING_PREFIX = re.compile(
    rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,3})?)?\Z'
)
_JSON_NUMBER = re.compile(_JNUMBER)
_JSON_NUMBER_RUN = re.compile(rb"[0-9eE.+-]*")
_JSON_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
# A whole project object with one "name" key and other plain keys (no
# escapes) holding scalars: the common case, read in one regex match.
_JPLAIN_MEMBER = (
    rb'"(?!name")[^"\\\x00-\x1f]*"' + _JS + rb":" + _JS
    + rb"(?:" + _JSTR + rb"|" + _JNUMBER + rb"|true|false|null)" + _JS
)
_JSON_FAST_PROJECT = re.compile(
    rb"\{" + _JS + rb"(?:" + _JPLAIN_MEMBER + rb"," + _JS + rb")*"
    + rb'"name"' + _JS + rb":" + _JS + rb"(" + _JSTR + rb")" + _JS
    + rb"(?:," + _JS + _JPLAIN_MEMBER + rb")*\}"
)

# What a JSON container is, in a project list.
_ROOT, _META, _PROJECTS, _PROJECT, _OTHER = range(5)
# What a value fills: the top-level document, a slot of a container of the
# roles above, or the two scalars we read.
_SLOT_ROOT, _SLOT_META, _SLOT_PROJECTS, _SLOT_PROJECT, _SLOT_NAME, _SLOT_API_VERSION, _SLOT_OTHER = range(7)
# States of an open JSON container.
_KEY_OR_END, _KEY, _COLON, _VALUE, _VALUE_OR_END, _COMMA_OR_END = range(6)


class _Frame:
    """One open JSON object or array."""

    __slots__ = ("isObject", "state", "role", "key", "name")

    def __init__(self, isObject: bool, role: int) -> None:
        self.isObject = isObject
        self.state = _KEY_OR_END if isObject else _VALUE_OR_END
        self.role = role
        self.key: bytes | None = None
        self.name: str | None = None


def _jsonStringValue(token: bytes) -> str:
    """Decode a complete JSON string token."""
    inner = token[1:-1]
    if b"\\" not in inner:
        return inner.decode("utf-8", "replace")
    return json.loads(token.decode("utf-8", "replace"))


class ProjectListScanner:
    """
    Read a project list (PEP 503 HTML or PEP 691 JSON) as it arrives.

    Feed the body in chunks of any size; each L{feed} returns the names
    completed by that chunk and L{close} returns the rest.  The result
    does not depend on where the body is split.  Only the construct
    currently being read is held (a tag, comment, anchor or JSON token), at
    most L{MAX_LIST_CONSTRUCT} bytes; a longer one is an error, as is JSON
    nested deeper than 64 levels.

    JSON must be an object with C{meta.api-version} 1.x and a C{projects}
    array; entries that are not objects, or whose C{name} is not a string,
    are skipped.  HTML gives the text of every anchor outside comments.
    Names that are not valid project names are skipped.  After an error
    the scanner refuses further input.
    """

    def __init__(self, contentType: str | None) -> None:
        self._declared, _, self._contentTypeError = declaredKind(contentType)
        self._kind: str | None = None
        self._buf = b""
        self._started = False
        self._failed: UpstreamPageError | None = None
        self._closed = False
        # HTML state
        self._sawTag = False
        # JSON state
        self._stack: list[_Frame] = []
        self._done = False
        self._sawAPIVersion = False
        self._sawProjects = False

    @property
    def buffered(self) -> int:
        """How many bytes the scanner currently holds."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[str]:
        """
        Take the next piece of the body.

        @return: the names completed by this piece.
        @raise UpstreamPageError: if the body is not a usable project list.
        """
        return self._guarded(chunk, final=False)

    def close(self) -> list[str]:
        """
        Signal the end of the body.

        @return: the names not yet returned.
        @raise UpstreamPageError: if the body was not a complete project list.
        """
        return self._guarded(b"", final=True)

    def _guarded(self, chunk: Any, final: bool) -> list[str]:
        """Run one step; any failure becomes a sticky L{UpstreamPageError}."""
        if self._failed is not None:
            raise self._failed
        if self._closed:
            error = UpstreamPageError("the scanner is already closed")
        else:
            self._closed = final
            try:
                return self._step(bodyBytes(chunk), final)
            except UpstreamPageError as e:
                error = e
            except RecursionError:
                error = UpstreamPageError("the list is nested too deeply")
            except Exception as e:
                error = UpstreamPageError(f"cannot read the list ({e.__class__.__name__})")
        self._failed = error
        self._buf = b""
        self._stack = []
        raise error

    def _step(self, chunk: bytes, final: bool) -> list[str]:
        buf = self._buf + chunk if self._buf else chunk
        if self._kind is None:
            buf = self._sniff(buf, final)
            if self._kind is None:
                self._buf = buf
                if final:
                    raise UpstreamPageError("the list is empty")
                return []
        self._buf = buf
        if self._kind == "json":
            return self._scanJSON(final)
        return self._scanHTML(final)

    def _sniff(self, buf: bytes, final: bool) -> bytes:
        """Skip a BOM and leading whitespace, then decide between JSON and HTML."""
        if not self._started:
            if len(buf) < len(BOM) and BOM.startswith(buf) and not final:
                return buf
            self._started = True
            if buf.startswith(BOM):
                buf = buf[len(BOM):]
        buf = buf.lstrip(WHITESPACE)
        if not buf:
            return b""
        if buf[:1] == b"{":
            self._kind = "json"
        elif self._declared == "json":
            raise UpstreamPageError("the list is declared JSON but is not a JSON object")
        elif self._contentTypeError is not None:
            raise self._contentTypeError
        else:
            self._kind = "html"
        return buf

    # -- HTML --

    def _scanHTML(self, final: bool) -> list[str]:
        buf = self._buf
        if b"\x00" in buf:
            raise UpstreamPageError("the list contains NUL bytes; it is not HTML")
        names: list[str] = []
        size = len(buf)
        pos = 0
        while True:
            lt = buf.find(b"<", pos)
            if lt < 0:
                pos = size
                break
            if lt + 1 >= size:
                # A lone "<" at the end: we cannot tell yet what it starts.
                pos = size if final else lt
                break
            opener = buf[lt + 1]
            if opener not in _TAG_OPENER:
                pos = lt + 1
                continue
            limit = lt + MAX_LIST_CONSTRUCT
            head = buf[lt:lt + 4]
            if opener == 0x21 and _COMMENT_START.startswith(head):  # "<!", "<!-" or "<!--"
                if head != _COMMENT_START:
                    pos = size if final else lt
                    break
                end = buf.find(_COMMENT_END, lt + 4, limit)
                if end < 0:
                    if size >= limit:
                        raise UpstreamPageError("a comment in the list is too long")
                    pos = size if final else lt
                    break
                self._sawTag = True
                pos = end + len(_COMMENT_END)
                continue
            if opener in b"aA":
                if lt + 2 >= size and not final:
                    pos = lt
                    break
                if lt + 2 >= size or buf[lt + 2] in b" \t\r\n\f/>":
                    match = _ANCHOR.match(buf, lt, min(size, limit))
                    if match is None:
                        if size >= limit:
                            raise UpstreamPageError("an anchor in the list is too long")
                        pos = size if final else lt
                        break
                    self._sawTag = True
                    name = self._anchorName(match.group(1))
                    if name is not None:
                        names.append(name)
                    pos = match.end()
                    continue
            match = _OTHER_TAG.match(buf, lt, min(size, limit))
            if match is None:
                if size >= limit:
                    raise UpstreamPageError("a tag in the list is too long")
                pos = size if final else lt
                break
            self._sawTag = True
            if buf[lt + 1:lt + 5].lower() == b"meta":
                self._checkMeta(match.group())
            pos = match.end()
        self._buf = buf[pos:]
        if final and not self._sawTag:
            raise UpstreamPageError("the list is neither HTML nor JSON")
        return names

    @staticmethod
    def _anchorName(inner: bytes) -> str | None:
        """The project name an anchor's content gives, if valid."""
        text = _INNER_TAG.sub(b"", inner).decode("utf-8", "replace")
        return _validName(html.unescape(text))

    @staticmethod
    def _checkMeta(tag: bytes) -> None:
        """Refuse an HTML list whose C{pypi:repository-version} major is not 1."""
        attributes: dict[bytes, bytes] = {}
        for match in _ATTRIBUTE.finditer(tag, 5, len(tag) - 1):
            value = match.group(2) or match.group(3) or match.group(4) or b""
            attributes.setdefault(match.group(1).lower(), value)
        name = html.unescape(attributes.get(b"name", b"").decode("utf-8", "replace"))
        if name.strip().lower() == "pypi:repository-version":
            checkMajor(
                html.unescape(attributes.get(b"content", b"").decode("utf-8", "replace")),
                "pypi:repository-version",
            )

    # -- JSON --

    def _scanJSON(self, final: bool) -> list[str]:
        buf = self._buf
        size = len(buf)
        names: list[str] = []
        stack = self._stack
        pos = 0
        while True:
            pos = _JSON_WS.match(buf, pos).end()
            if pos >= size:
                break
            if self._done:
                raise UpstreamPageError("unexpected data after the JSON document")
            frame = stack[-1] if stack else None
            limit = min(size, pos + MAX_LIST_CONSTRUCT)
            char = buf[pos]

            if char == 0x7B and frame is not None and frame.role == _PROJECTS \
                    and frame.state in (_VALUE, _VALUE_OR_END):
                fast = _JSON_FAST_PROJECT.match(buf, pos, limit)
                if fast is not None:
                    name = _validName(_jsonStringValue(fast.group(1)))
                    if name is not None:
                        names.append(name)
                    frame.state = _COMMA_OR_END
                    pos = fast.end()
                    continue

            if char == 0x22:  # '"'
                match = _JSON_STRING.match(buf, pos, limit)
                if match is None:
                    if size - pos >= MAX_LIST_CONSTRUCT:
                        raise UpstreamPageError("a string in the list is too long")
                    if not final and _JSON_STRING_PREFIX.match(buf, pos):
                        break
                    raise UpstreamPageError("invalid JSON string in the list")
                pos = match.end()
                if frame is not None and frame.isObject and frame.state in (_KEY_OR_END, _KEY):
                    key = match.group()
                    if b"\\" in key:
                        # Compare escaped keys in their plain spelling.
                        key = json.dumps(_jsonStringValue(key)).encode("ascii")
                    frame.key = key
                    frame.state = _COLON
                else:
                    self._scalar(frame, match.group(), True)
                continue
            if char == 0x7B or char == 0x5B:  # "{" "["
                self._open(frame, char == 0x7B)
                pos += 1
                continue
            if char == 0x7D or char == 0x5D:  # "}" "]"
                self._closeContainer(frame, char == 0x7D, names)
                pos += 1
                continue
            if char == 0x3A:  # ":"
                if frame is None or frame.state != _COLON:
                    raise UpstreamPageError("unexpected ':' in the JSON list")
                frame.state = _VALUE
                pos += 1
                continue
            if char == 0x2C:  # ","
                if frame is None or frame.state != _COMMA_OR_END:
                    raise UpstreamPageError("unexpected ',' in the JSON list")
                frame.state = _KEY if frame.isObject else _VALUE
                pos += 1
                continue
            if char == 0x2D or 0x30 <= char <= 0x39:  # "-" or a digit
                # The token is the whole run of number characters; if it
                # reaches the end of the buffer it may go on in the next chunk.
                run = _JSON_NUMBER_RUN.match(buf, pos, limit).end()
                if run == size and not final:
                    if size - pos >= MAX_LIST_CONSTRUCT:
                        raise UpstreamPageError("a number in the list is too long")
                    break
                match = _JSON_NUMBER.match(buf, pos, run)
                if match is None or match.end() != run:
                    raise UpstreamPageError("invalid JSON number in the list")
                pos = run
                self._scalar(frame, match.group(), False)
                continue
            literal = _JSON_LITERALS.get(char)
            if literal is not None:
                if buf.startswith(literal, pos):
                    pos += len(literal)
                    self._scalar(frame, literal, False)
                    continue
                if not final and size - pos < len(literal) and literal.startswith(buf[pos:]):
                    break
            raise UpstreamPageError("invalid JSON in the list")
        self._buf = buf[pos:]
        if final:
            if not self._done:
                raise UpstreamPageError("the JSON list is truncated")
            if not self._sawAPIVersion:
                raise UpstreamPageError("the JSON list has no meta.api-version")
            if not self._sawProjects:
                raise UpstreamPageError("the JSON list has no projects array")
        return names

    def _slot(self, frame: _Frame | None) -> int:
        """Check that a value may start here and say which slot it fills."""
        if frame is None:
            if self._done:
                raise UpstreamPageError("unexpected data after the JSON document")
            return _SLOT_ROOT
        if frame.isObject:
            if frame.state != _VALUE:
                raise UpstreamPageError("unexpected value in the JSON list")
            frame.state = _COMMA_OR_END
            key = frame.key
            if frame.role == _ROOT:
                if key == b'"meta"':
                    return _SLOT_META
                if key == b'"projects"':
                    return _SLOT_PROJECTS
            elif frame.role == _META and key == b'"api-version"':
                return _SLOT_API_VERSION
            elif frame.role == _PROJECT and key == b'"name"':
                return _SLOT_NAME
            return _SLOT_OTHER
        if frame.state not in (_VALUE, _VALUE_OR_END):
            raise UpstreamPageError("unexpected value in the JSON list")
        frame.state = _COMMA_OR_END
        return _SLOT_PROJECT if frame.role == _PROJECTS else _SLOT_OTHER

    def _open(self, frame: _Frame | None, isObject: bool) -> None:
        """Start an object or array."""
        slot = self._slot(frame)
        if len(self._stack) >= _MAX_JSON_DEPTH:
            raise UpstreamPageError("the JSON list is nested too deeply")
        if slot == _SLOT_ROOT:
            if not isObject:
                raise UpstreamPageError("the JSON list is not an object")
            role = _ROOT
        elif slot == _SLOT_META:
            if not isObject:
                raise UpstreamPageError("meta in the JSON list is not an object")
            role = _META
        elif slot == _SLOT_PROJECTS:
            if isObject:
                raise UpstreamPageError("projects in the JSON list is not an array")
            self._sawProjects = True
            role = _PROJECTS
        elif slot == _SLOT_API_VERSION:
            raise UpstreamPageError("meta.api-version in the JSON list is not a string")
        elif slot == _SLOT_PROJECT and isObject:
            role = _PROJECT
        else:
            if slot == _SLOT_NAME:
                # "name" holding a container: this entry has no usable name.
                assert frame is not None
                frame.name = None
            role = _OTHER
        self._stack.append(_Frame(isObject, role))

    def _closeContainer(self, frame: _Frame | None, isObject: bool, names: list[str]) -> None:
        """End an object or array; a project entry yields its name."""
        if frame is None or frame.isObject != isObject:
            raise UpstreamPageError("mismatched bracket in the JSON list")
        if frame.state not in (_KEY_OR_END, _VALUE_OR_END, _COMMA_OR_END):
            raise UpstreamPageError("unexpected end of a container in the JSON list")
        self._stack.pop()
        if frame.role == _PROJECT and frame.name is not None:
            names.append(frame.name)
        if not self._stack:
            self._done = True

    def _scalar(self, frame: _Frame | None, token: bytes, isString: bool) -> None:
        """Take a string, number or literal value."""
        slot = self._slot(frame)
        if slot == _SLOT_ROOT:
            raise UpstreamPageError("the JSON list is not an object")
        if slot == _SLOT_META:
            raise UpstreamPageError("meta in the JSON list is not an object")
        if slot == _SLOT_PROJECTS:
            raise UpstreamPageError("projects in the JSON list is not an array")
        if slot == _SLOT_API_VERSION:
            self._sawAPIVersion = True
            checkMajor(_jsonStringValue(token) if isString else None, "meta.api-version")
        elif slot == _SLOT_NAME:
            assert frame is not None
            frame.name = _validName(_jsonStringValue(token)) if isString else None
