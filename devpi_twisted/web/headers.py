"""
The headers devpi puts on every response, errors and files included.
"""

from typing import Any

from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from .responses import jsonBody


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
        self._static = [
            (b"X-Devpi-Api-Version", b"2"),
            (b"X-Devpi-Server-Version", version.encode("ascii")),
            (b"X-Devpi-Uuid", uuid.encode("ascii")),
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


def setSerial(request: IRequest, serial: int) -> None:
    request.setHeader(b"X-Devpi-Serial", str(serial).encode("ascii"))
