"""
The headers devpi puts on every response, errors and files included, and
the checks of a request's head that every request passes before routing.
"""

import re
from functools import lru_cache
from typing import Any

from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from devpi_twisted.web.responses import jsonBody


def identityHeaders(uuid: str) -> list[tuple[bytes, bytes]]:
    """
    The headers that say which devpi answers: on every response, and the
    only ones besides C{nosniff} on the raw answers written before any
    resource (L{devpi_twisted.web.limits}).
    """
    return [(b"X-Devpi-Api-Version", b"2"), (b"X-Devpi-Uuid", uuid.encode("ascii"))]


class DevpiHeadersResource(Resource):
    """
    Wraps the routed resource and adds devpi's headers to every response.

    devpi-client refuses a reply whose C{X-Devpi-Api-Version} is not C{2}.
    C{X-Devpi-Serial} is set here to the serial when the request arrived; a
    write view sets it again to the serial it committed.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource, storage: Any, uuid: str, primaryUUID: str, version: str) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._storage = storage
        self._static = identityHeaders(uuid) + [
            (b"X-Devpi-Server-Version", version.encode("ascii")),
            (b"X-Devpi-Primary-Uuid", primaryUUID.encode("ascii")),
            (b"X-Devpi-Master-Uuid", primaryUUID.encode("ascii")),
        ]

    def render(self, request: IRequest) -> Any:
        for name, value in self._static:
            request.setHeader(name, value)
        setSerial(request, self._storage.currentSerial())
        if request.method not in (b"GET", b"HEAD"):
            _serialWhenAnswered(request, self._storage)
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            # Names are text: a path that is not UTF-8 names nothing here.
            return jsonBody(request, 400, message="the URL path is not valid UTF-8")
        return self._wrapped.render(request)


def _serialWhenAnswered(request: IRequest, storage: Any) -> None:
    """
    Make a request that may write report the serial as it is when the
    headers go out, so the answer names a serial that includes its own
    change, whichever view handled it (a replica waits for that serial
    after forwarding a write).
    """
    write = request.write

    def writeWithSerial(data: bytes) -> None:
        if not request.startedWriting:
            setSerial(request, storage.currentSerial())
        write(data)

    request.write = writeWithSerial  # type: ignore[method-assign]


def contentTypeOf(contentType: bytes | None) -> bytes:
    """The media type of a C{Content-Type} value, lower-cased, without parameters."""
    return (contentType or b"").split(b";")[0].strip().lower()


def setSerial(request: IRequest, serial: int) -> None:
    request.setHeader(b"X-Devpi-Serial", str(serial).encode("ascii"))


METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"PUSH", b"OPTIONS"})
"""Every method a route serves (methods are case-sensitive: C{get} is not one)."""

_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")
_IP_LITERAL = re.compile(rb"\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{0,5})?")
_PORT = re.compile(rb"[0-9]{0,5}")


@lru_cache(maxsize=1024)
def isValidHost(host: bytes) -> bool:
    """
    Whether C{host} is C{host [":" port]} as a name can be: an IP literal in
    brackets, or labels of 1 to 63 ASCII letters, digits, C{-} or C{_}
    (IPv4 addresses included), at most 253 characters in all.  Anything else
    cannot name this server, and would fail later where the name is encoded
    (IDNA, when URLs are built).  Asked for every request: the answers for
    the few names clients use are kept.
    """
    if host.startswith(b"["):
        return _IP_LITERAL.fullmatch(host) is not None
    name, _, port = host.partition(b":")
    if name.endswith(b"."):
        name = name[:-1]
    return (0 < len(name) <= 253 and _PORT.fullmatch(port) is not None
            and all(_LABEL.fullmatch(label) for label in name.split(b".")))


def headProblem(request: IRequest) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """
    What is wrong with the request's method or C{Host}, as the status, a
    message and extra headers for the answer; C{None} when nothing is.
    Checked once, before any resource sees the request, so no view or
    library below has to cope with such values.
    """
    if request.method not in METHODS:
        method = request.method.decode("ascii", "replace")
        return 405, (f"the method {method} is not supported here (methods are case-sensitive)"), [
            (b"Allow", b", ".join(sorted(METHODS)))]
    hosts = request.requestHeaders.getRawHeaders(b"host")
    if hosts is not None:
        if len(hosts) != 1:
            return 400, "more than one Host header", []
        if not isValidHost(hosts[0]):
            return 400, "the Host header is not a valid host name", []
    return None
