"""
Request body limits, enforced while the body arrives.

twisted.web spools every request body before a resource sees it and has no
size limit of its own.  L{LimitedRequest} answers 413 as soon as the declared
C{Content-Length} (or, for chunked bodies, the bytes so far) exceeds the
limit, and closes the connection without reading the rest.
"""

import json
from typing import Any

from twisted.web.server import Request


class LimitedRequest(Request):
    """A request whose body may not exceed C{maxBodySize} bytes."""

    maxBodySize: int | None = None
    extraHeaders: list[tuple[bytes, bytes]] = []

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if self.maxBodySize is not None and length is not None and length > self.maxBodySize:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self.maxBodySize is not None and self._received > self.maxBodySize:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # A refused body can still end (a chunked one does): the 413 is the
        # answer, so the request must not reach the resource as well.
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        message = f"request body larger than the limit of {self.maxBodySize} bytes (--max-upload-size)"
        body = (json.dumps({"message": message}, indent=2) + "\n").encode("utf-8")
        head = [b"HTTP/1.1 413 " + message.encode("ascii"), b"Content-Type: application/json",
                b"Content-Length: %d" % len(body), b"Connection: close"]
        head += [name + b": " + value for name, value in self.extraHeaders]
        transport: Any = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.loseConnection()


def limitedRequestFactory(maxBodySize: int, extraHeaders: list[tuple[bytes, bytes]],
                          base: type[LimitedRequest] = LimitedRequest) -> type[LimitedRequest]:
    """A request class (a subclass of C{base}) with the configured limit, for C{Site.requestFactory}."""
    return type("ConfiguredRequest", (base,), {
        "maxBodySize": maxBodySize, "extraHeaders": list(extraHeaders),
    })
