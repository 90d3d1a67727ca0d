"""
Response bodies in devpi's shapes.

devpi-client checks C{Content-Type} for the exact string C{application/json}
(no charset), and reads C{message} from error bodies.
"""

import json
import re
from collections.abc import Callable
from typing import Any, Iterable

from twisted.web.iweb import IRequest

JSON = b"application/json"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def jsonBody(request: IRequest, status: int = 200, *, result: Any = None, type: str | None = None,
             message: str | None = None) -> bytes:
    """Set status and headers and return devpi's envelope, keys in devpi's order."""
    body: dict[str, Any] = {}
    if result is not None:
        body["result"] = result
    if type is not None:
        body["type"] = type
    if message is not None:
        body["message"] = message
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON)
    return withLength(request, (json.dumps(body, indent=2) + "\n").encode("utf-8"))


def withLength(request: IRequest, body: bytes) -> bytes:
    """Set Content-Length so the answer is not chunked (and HEAD tells the size)."""
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def redirect(request: IRequest, location: str, status: int = 302) -> bytes:
    """Redirect to C{location}, a path on this server (see L{localLocation})."""
    request.setResponseCode(status)
    request.setHeader(b"Location", localLocation(location).encode("utf-8"))
    return withLength(request, b"")


def localLocation(location: str) -> str:
    """
    C{location} as a path-absolute reference, which stays on this server.
    Redirects are built from the request's path, and a path such as
    C{//evil.example/...} (or C{/\\evil.example}, which browsers treat
    alike, or an absolute-form request target) would otherwise send the
    client to another host.
    """
    if not location.startswith("/"):
        location = _SCHEME.sub("", location, count=1)
    return "/" + location.lstrip("/\\")


def rawAnswer(status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = (),
              reason: bytes | None = None) -> bytes:
    """
    A whole HTTP/1.1 answer with a JSON message that closes the connection,
    for the channel to write when no resource will answer: a malformed or
    oversized head, a body refused or too slow, a connection given up.  The
    message is also the reason phrase (unless C{reason} is given), since
    some clients (twine) show only that.
    """
    body = (json.dumps({"message": message}, indent=2) + "\n").encode("utf-8")
    if reason is None:
        reason = " ".join(message.split()).encode("ascii", "replace")[:200]
    head = [b"HTTP/1.1 %d " % status + reason, b"Connection: close", b"Content-Type: " + JSON,
            b"X-Content-Type-Options: nosniff", b"Content-Length: %d" % len(body)]
    head += [name + b": " + value for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# Bodies up to this size are decoded inline (well under a millisecond);
# larger ones, spooled to disk above 100 kB, are read and decoded in a thread.
_INLINE_JSON = 64 * 1024


async def readJSON(request: IRequest, runFile: Callable[..., Any], limit: int = 10 * 1024 * 1024) -> Any:
    """
    The request body decoded as JSON, or L{BadRequest} in devpi's words.
    A large body is read and decoded through C{runFile}, off the reactor.
    """
    from devpi_twisted.errors import TooLarge

    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"JSON body larger than {limit} bytes")
    if length is not None and length.isdigit() and int(length) <= _INLINE_JSON:
        return _decodeJSON(request.content, limit)
    return await runFile(_decodeJSON, request.content, limit)


def _decodeJSON(content: Any, limit: int) -> Any:
    from devpi_twisted.errors import BadRequest, TooLarge

    content.seek(0)
    raw = content.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"JSON body larger than {limit} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Bad request: could not decode json")
