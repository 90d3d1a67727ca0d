"""
Request body limits, enforced while the body arrives, and where bodies wait.

twisted.web spools every request body before a resource sees it and has no
size limit of its own.  L{LimitedRequest} answers 413 as soon as the declared
C{Content-Length} (or, for chunked bodies, the bytes so far) exceeds the
limit, and closes the connection without reading the rest.  Large bodies
are spooled in C{spoolDirectory} (in the server directory) instead of the
system's temporary directory, which is often a RAM-backed tmpfs: a
multi-gigabyte upload must cost disk, not memory.
"""

import json
import tempfile
from typing import Any

from twisted.web.server import Request

# twisted.web keeps bodies below this many bytes in memory
_IN_MEMORY = 100000


class LimitedRequest(Request):
    """A request whose body may not exceed C{maxBodySize} bytes."""

    maxBodySize: int | None = None
    extraHeaders: list[tuple[bytes, bytes]] = []
    spoolDirectory: str | None = None

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if self.maxBodySize is not None and length is not None and length > self.maxBodySize:
            self._refuse()
            return
        if self.spoolDirectory is not None and (length is None or length >= _IN_MEMORY):
            # Unnamed (or unlinked at once): a crash leaves nothing behind.
            self.content = tempfile.TemporaryFile(dir=self.spoolDirectory)
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
                          base: type[LimitedRequest] = LimitedRequest,
                          spoolDirectory: str | None = None) -> type[LimitedRequest]:
    """A request class (a subclass of C{base}) with the configured limit, for C{Site.requestFactory}."""
    return type("ConfiguredRequest", (base,), {
        "maxBodySize": maxBodySize, "extraHeaders": list(extraHeaders), "spoolDirectory": spoolDirectory,
    })
