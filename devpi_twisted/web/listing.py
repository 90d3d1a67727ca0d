"""
Streaming a project list that includes a mirror's names (hundreds of
thousands for PyPI) in pieces, reading the names file as the client takes
the bytes, so neither the list nor the page is ever whole in memory.
"""

from typing import Any, Iterator

from packaging.utils import canonicalize_name
from twisted.internet.interfaces import IPullProducer
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from ..model.negotiation import JSON
from ..model.simplepage import (
    INDEX_TAIL_HTML,
    INDEX_TAIL_JSON,
    indexEntriesHTML,
    indexEntriesJSON,
    indexHeadHTML,
    indexHeadJSON,
)
from ..simple import IndexListing

CHUNK = 64 * 1024


def _names(listing: IndexListing) -> Iterator[list[str]]:
    """The names in batches: the private ones, then each mirror's new ones."""
    seen = {canonicalize_name(n) for n in listing.privateNames}
    yield listing.privateNames
    for source in listing.mirrorSources:
        if isinstance(source, list):
            batch = [n for n in source if canonicalize_name(n) not in seen]
            seen.update(canonicalize_name(n) for n in batch)
            yield batch
            continue
        rest = b""
        try:
            while True:
                data = source.read(CHUNK)
                if not data:
                    break
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                # Mirror names are not remembered: upstream's list has no
                # duplicates, and a set of them would be the whole list.
                yield [n for n in (line.decode("utf-8", "replace") for line in lines)
                       if n and canonicalize_name(n) not in seen]
            if rest:
                yield [rest.decode("utf-8", "replace")]
        finally:
            source.close()


@implementer(IPullProducer)
class _ListProducer:
    def __init__(self, request: IRequest, listing: IndexListing, mediaType: str, title: str) -> None:
        self._request = request
        self._json = mediaType == JSON
        self._batches = _names(listing)
        self._first = True
        self._tail = INDEX_TAIL_JSON if self._json else INDEX_TAIL_HTML
        request.write(indexHeadJSON(listing.lastSerial) if self._json else indexHeadHTML(title))

    def resumeProducing(self) -> None:
        for batch in self._batches:
            if not batch:
                continue
            if self._json:
                self._request.write(indexEntriesJSON(batch, first=self._first))
            else:
                self._request.write(indexEntriesHTML(batch))
            self._first = False
            return
        self._request.write(self._tail)
        self._request.unregisterProducer()
        self._request.finish()

    def stopProducing(self) -> None:
        self._batches.close()


class StreamedList(Resource):
    isLeaf = True

    def __init__(self, listing: IndexListing, mediaType: str, title: str) -> None:
        super().__init__()
        self._listing = listing
        self._mediaType = mediaType
        self._title = title

    def render(self, request: IRequest) -> Any:
        request.setHeader(b"Content-Type", self._mediaType.encode("ascii"))
        request.setHeader(b"Vary", b"Accept, User-Agent")
        request.setHeader(b"Cache-Control", b"max-age=0, must-revalidate")
        request.setHeader(b"X-PyPI-Last-Serial", str(self._listing.lastSerial).encode("ascii"))
        if request.method == b"HEAD":
            for source in self._listing.mirrorSources:
                if not isinstance(source, list):
                    source.close()
            return b""
        request.registerProducer(_ListProducer(request, self._listing, self._mediaType, self._title), False)
        return NOT_DONE_YET
