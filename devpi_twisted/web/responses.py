"""
Response bodies in devpi's shapes.

devpi-client checks C{Content-Type} for the exact string C{application/json}
(no charset), and reads C{message} from error bodies.
"""

import json
from typing import Any

from twisted.web.iweb import IRequest

JSON = b"application/json"


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


def readJSON(request: IRequest, limit: int = 10 * 1024 * 1024) -> Any:
    """
    The request body decoded as JSON, or L{BadRequest} in devpi's words.
    """
    from ..errors import BadRequest, TooLarge

    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"JSON body larger than {limit} bytes")
    request.content.seek(0)
    raw = request.content.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"JSON body larger than {limit} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Bad request: could not decode json")
