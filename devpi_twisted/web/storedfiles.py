# -*- test-case-name: tests.test_storedfiles -*-
"""
Stored files answered before routing.

Installers fetch the same files again and again.  Once a file path has been
answered through the routes, what its answer needs (the blob's digest, the
size, the name, the modification time) is kept by path until a change to
files, indexes or users arrives from storage; the next GET or HEAD of that
path then costs a dictionary lookup and the open of the blob in a storage
thread, not routing and a database read.  Anything unusual (a JSON
C{Accept}, a blob that cannot be opened) takes the routed way.

Only files of public indexes are remembered: a file of an index with
C{acl_read} is answered through the routes every time, where the read check
is, so nothing answers it here to whoever asks.  A change of C{acl_read} is
an index change and forgets every path.

A download answered here is counted as the routes count it, from what is
remembered (no storage read).
"""

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model.negotiation import wantsJSONAPI
from devpi_twisted.services.fileentries import altersFilePaths
from devpi_twisted.storage import ChangeRecord
from devpi_twisted.web.files import FileRedirects, countDownload, serveBytesOrFile

log = Logger()

_MAX_KNOWN = 20000


@dataclass(frozen=True)
class KnownFile:
    """What the answer for one stored file path needs."""

    sha256: str
    size: int
    filename: str
    lastModified: str | None
    user: str = ""
    index: str = ""
    project: str = ""


class KnownFiles:
    """File paths answered before, forgotten on any change to files, indexes or users."""

    def __init__(self, storage: IStorage) -> None:
        self._known: dict[bytes, KnownFile] = {}
        self._storage = storage
        storage.subscribe(self._changed)

    def _changed(self, record: ChangeRecord) -> None:
        if self._known and altersFilePaths(record.changes):
            self._known.clear()

    def remember(self, path: bytes, entry: dict[str, Any], serial: int | None = None) -> None:
        """
        Keep what C{path} answered, if it was read at the current serial
        (C{serial}, taken before the read): a change that arrived meanwhile
        (such as the index becoming restricted) must not be outlived.
        """
        if serial is not None and serial != self._storage.currentSerial():
            return
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
        user, index = (entry.get("relpath", "").split("/", 2) + ["", ""])[:2]
        self._known[path] = KnownFile(entry["sha256"], entry["size"], entry["filename"], entry.get("last_modified"),
                                      user, index, entry.get("project", ""))

    def get(self, path: bytes) -> KnownFile | None:
        return self._known.get(path)


class KnownFileAnswers:
    """Answers GET and HEAD for known file paths; C{None} sends a request the routed way."""

    def __init__(self, files: KnownFiles, blobs: IBlobStore, redirects: FileRedirects | None = None,
                 downloads: Any = None) -> None:
        self._downloads = downloads
        self._files = files
        self._blobs = blobs
        self._redirects = redirects

    def answer(self, request: IRequest, routed: Resource) -> Any:
        if b"/+f/" not in request.path or wantsJSONAPI(request.getHeader(b"accept")):
            return None
        known = self._files.get(request.path)
        if known is None:
            return None
        if self._redirects is not None:
            countDownload(self._downloads, request, known.user, known.index, known.project, known.filename)
            return self._redirects.answer(request, known.sha256, known.filename)
        countDownload(self._downloads, request, known.user, known.index, known.project, known.filename, known.sha256)
        opening: Deferred[Any] = self._blobs.open(known.sha256)
        opening.addCallbacks(lambda file: self._send(request, routed, known, file),
                             lambda failure: self._routedLater(request, routed, failure))
        return NOT_DONE_YET

    def _send(self, request: IRequest, routed: Resource, known: KnownFile, file: Any) -> None:
        if file is None:  # gone from the blob store: the routes know what to say
            self._routedLater(request, routed, None)
            return
        body = serveBytesOrFile(request, file=file, size=known.size, filename=known.filename,
                                etag=b'"' + known.sha256.encode("ascii") + b'"', lastModified=known.lastModified)
        if body is not NOT_DONE_YET and not _gone(request):
            if body:
                request.write(body)
            request.finish()

    def _routedLater(self, request: IRequest, routed: Resource, failure: Failure | None) -> None:
        if failure is not None and failure.check(StorageUnavailable):
            log.warn("opening a known file failed ({error}); answering through the routes",
                     error=failure.getErrorMessage())
        elif failure is not None:
            log.failure("opening a known file failed; answering through the routes", failure=failure)
        if _gone(request):
            return
        body = routed.render(request)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()


def _gone(request: IRequest) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))
