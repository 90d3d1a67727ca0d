# -*- test-case-name: tests.test_search -*-
"""
Search: L{Search} answers queries from the search index with what the
requester may read; L{SearchIndexer} keeps the index current by following
the changelog.

The index is derived data (L{devpi_twisted.interfaces.ISearchIndex}): it
keeps the position (serial) it has indexed up to, so indexing resumes
after a restart; an empty index (new, cleared by C{POST /+search/rebuild},
or behind a state that went back) is built from the current state, then
follows the changelog.  The work runs in the storage runner's threads a
batch at a time, resting between batches as long as a batch took (half a
core at most), so requests are never held up for long.

Several nodes sharing PostgreSQL share one index: the node holding the
lease on its position row (renewed every batch) indexes, the others only
read it.
"""

import html.parser
import re
import time
import zipfile
from typing import Any, BinaryIO, Callable, Iterator

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from devpi_twisted.errors import BadRequest
from devpi_twisted.interfaces import IBlobStore, IReadView, ISearchIndex, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.acl import identityMayRead
from devpi_twisted.model.identity import Identity
from devpi_twisted.model.names import normalizeProject
from devpi_twisted.model.search import Highlight, SearchHit, SearchResults
from devpi_twisted.services.readrules import ReadRules
from devpi_twisted.storage import BLOB_REF, ChangeRecord, HistoryPruned
from devpi_twisted.storage.readers import blockingFile
from devpi_twisted.storage.searchindex import (
    MAX_QUERY, DocPage, IndexHit, Moved, ProjectDoc, makeQuery, mergeHits, queryWords,
)

log = Logger()


# highlighting (pure)

def highlight(text: str, words: tuple[str, ...], name: str = "") -> tuple[Highlight, ...]:
    """
    C{text} cut into pieces, those that start a word of the query (or are
    the query's name form, ignoring C{-_.} and case) marked as matches.
    """
    if not text:
        return ()
    patterns = [re.escape(w) for w in words if w]
    if name:
        patterns.insert(0, "[-_. ]?".join(re.escape(part) for part in name.split("-")))
    if not patterns:
        return (Highlight(text, False),)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")", re.IGNORECASE)
    pieces = []
    at = 0
    for match in pattern.finditer(text):
        if match.start() > at:
            pieces.append(Highlight(text[at:match.start()], False))
        if match.end() > match.start():
            pieces.append(Highlight(match.group(0), True))
        at = match.end()
    if at < len(text):
        pieces.append(Highlight(text[at:], False))
    return tuple(pieces)


def snippet(text: str, words: tuple[str, ...], width: int = 200) -> str:
    """About C{width} characters of C{text} around its first match (whitespace folded)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    lowered = text.lower()
    first = min((i for i in (lowered.find(w) for w in words) if i >= 0), default=0)
    start = max(0, first - width // 3)
    piece = text[start:start + width]
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(text) else "")


def _hasMatch(pieces: tuple[Highlight, ...]) -> bool:
    return any(p.match for p in pieces)


def toSearchHit(hit: IndexHit, words: tuple[str, ...], name: str, text: str | None) -> SearchHit:
    fields: list[tuple[str, tuple[Highlight, ...]]] = []
    if hit.kind == "doc":
        for field, value in (("title", hit.title), ("text", snippet(text or "", words))):
            pieces = highlight(value, words)
            if _hasMatch(pieces):
                fields.append((field, pieces))
        summary = hit.title
    else:
        for field, value in (("name", hit.display), ("summary", hit.summary),
                             ("description", snippet(text or "", words))):
            pieces = highlight(value, words, name if field == "name" else "")
            if _hasMatch(pieces):
                fields.append((field, pieces))
        summary = hit.summary
    return SearchHit(index=hit.index, project=hit.display, version=hit.version, summary=summary, kind=hit.kind,
                     docPath=hit.docPath, score=float(hit.rank * 1000 - hit.score), highlights=tuple(fields))


def resultsAsJSON(results: SearchResults) -> dict[str, Any]:
    """The JSON answer of C{/+search}."""
    return {
        "query": results.query, "page": results.page, "pagesize": results.pageSize, "total": results.total,
        "pages": max(1, -(-results.total // results.pageSize)),
        "hits": [{
            "index": h.index, "project": h.project, "version": h.version, "summary": h.summary, "kind": h.kind,
            "docpath": h.docPath,
            "url": f"/{h.index}/{h.project}" + (f"/{h.version}/+doc/{h.docPath}" if h.kind == "doc" else ""),
            "highlights": {field: [[p.text, p.match] for p in pieces] for field, pieces in h.highlights},
        } for h in results.hits],
    }


class Search:
    """
    Answers searches: ranked, paged, and only from indexes the requester
    may read (the restricted ones it may not are left out in the index
    query itself, so totals and pages never count them).
    """

    def __init__(self, index: ISearchIndex, readRules: ReadRules, runRead: Callable[..., Deferred[Any]],
                 pageSize: int = 20, maxResults: int = 1000) -> None:
        self.index = index
        self._readRules = readRules
        self._runRead = runRead
        self.pageSize = pageSize
        self.maxResults = maxResults

    async def excludedFor(self, identity: Identity | None) -> frozenset[str]:
        await self._readRules.load()
        return frozenset(f"{user}/{index}" for (user, index), config in list(self._readRules.restricted.items())
                         if not identityMayRead(identity, user, index, config))

    async def search(self, identity: Identity | None, query: str, page: int = 1) -> SearchResults:
        query = " ".join(query.split())
        if len(query) > MAX_QUERY:
            raise BadRequest(f"the query is longer than {MAX_QUERY} characters")
        if page < 1:
            raise BadRequest("page must be 1 or more")
        q = makeQuery(query, await self.excludedFor(identity), self.maxResults)
        if not q.name and not q.words:
            return SearchResults(query=query, page=page, pageSize=self.pageSize, total=0)

        def _search() -> tuple[int, list[IndexHit], dict[Any, str]]:
            merged = mergeHits([self.index.search(q)], self.maxResults)
            shown = merged[(page - 1) * self.pageSize:page * self.pageSize]
            return len(merged), shown, self.index.texts(shown) if shown else {}

        total, shown, texts = await self._runRead(_search)
        words = queryWords(query)
        hits = tuple(toSearchHit(hit, words, q.name, texts.get(hit.key)) for hit in shown)
        return SearchResults(query=query, page=page, pageSize=self.pageSize, total=total, hits=hits)

    async def rebuild(self, runFile: Callable[..., Deferred[Any]]) -> None:
        """Empty the index: the indexer builds it again from the state."""
        await runFile(self.index.clear)


# documentation pages (blocking, in a file thread)

class _TextOf(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head", "nav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: list[str] = []
        self.text: list[str] = []
        self._skipping = 0
        self._inTitle = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "title":
            self._inTitle = True
        elif tag in self._SKIP:
            self._skipping += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._inTitle = False
        elif tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if self._inTitle:
            self.title.append(data)
        elif not self._skipping:
            self.text.append(data)


def pageText(raw: bytes) -> tuple[str, str]:
    """The title and the visible text of an HTML page, tags stripped."""
    parser = _TextOf()
    try:
        parser.feed(raw.decode("utf-8", "replace"))
        parser.close()
    except Exception:  # html.parser copes with nearly anything; a page it cannot read has no text
        pass
    return " ".join("".join(parser.title).split()), " ".join(" ".join(parser.text).split())


def docPages(file: BinaryIO, maxPages: int = 2000, maxPageSize: int = 2 * 1024 * 1024,
             maxText: int = 100_000) -> list[DocPage]:
    """The text of a documentation zip's HTML pages (bounded: pages, bytes read, text kept)."""
    pages = []
    try:
        with zipfile.ZipFile(file) as archive:
            stripTop = _commonRoot(archive)
            for info in archive.infolist():
                if len(pages) >= maxPages:
                    break
                if info.is_dir() or not info.filename.lower().endswith((".html", ".htm")):
                    continue
                if info.file_size > maxPageSize or info.filename.startswith("/") or ".." in info.filename.split("/"):
                    continue
                try:
                    raw = archive.read(info)
                except Exception:
                    continue
                title, text = pageText(raw)
                path = info.filename.split("/", 1)[1] if stripTop else info.filename
                pages.append(DocPage(path=path, title=title or path, text=text[:maxText]))
    except (zipfile.BadZipFile, OSError, EOFError):
        return []
    finally:
        file.close()
    return pages


def _commonRoot(archive: zipfile.ZipFile) -> bool:
    """
    Whether every file sits in one top directory, which the C{+doc} URLs
    leave out (the rule of L{devpi_twisted.model.doczip.findDocMember}).
    """
    files = [n for n in archive.namelist() if not n.endswith("/")]
    tops = {n.split("/", 1)[0] for n in files if "/" in n}
    return len(tops) == 1 and all("/" in n for n in files)


# the indexer

def _versionOrder(v: str) -> tuple[int, Any]:
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(v))
    except InvalidVersion:
        return (0, v)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value if v)
    return str(value)


def projectState(view: IReadView, user: str, index: str, project: str) -> tuple[Any, dict[str, Any] | None]:
    """
    What the index should hold for a project: a L{ProjectDoc} (or C{None}
    when it is gone) and its newest documentation zip's entry.
    """
    config = view.get(keys.indexKey(user, index))
    stored = view.get(keys.projectKey(user, index, project))
    if config is None or stored is None:
        return None, None
    metadata: dict[str, Any] = {}
    versions = [m for _, m in view.items(keys.versionsPrefix(user, index, project))]
    if versions:
        metadata = max(versions, key=lambda m: _versionOrder(str(m.get("version", ""))))
    docs = [e for _, e in view.items(keys.filesPrefix(user, index, project)) if e.get("rel") == "doczip"]
    doc = max(docs, key=lambda e: _versionOrder(str(e.get("version", "")))) if docs else None
    display = stored.get("name") or metadata.get("name") or project
    return ProjectDoc(
        index=f"{user}/{index}", name=project, display=display, version=metadata.get("version"),
        summary=_text(metadata.get("summary"))[:1000], description=_text(metadata.get("description"))[:200_000],
        keywords=_text(metadata.get("keywords")), classifiers=_text(metadata.get("classifiers")),
        author=" ".join(_text(metadata.get(k)) for k in ("author", "maintainer", "author_email", "maintainer_email")),
    ), doc


def changedThings(records: list[ChangeRecord]) -> tuple[set[tuple[str, str, str]], dict[str, Any], set[str]]:
    """
    What changelog records touch: projects C{(user, index, project)}, mirror
    name lists (by C{"user/index"}: the record's value) and deleted indexes.
    """
    projects: set[tuple[str, str, str]] = set()
    names: dict[str, Any] = {}
    dropped: set[str] = set()
    for record in records:
        for key, value in record.changes.items():
            kind, _, rest = key.partition("/")
            parts = rest.split("/")
            if kind in ("project", "version") and len(parts) >= 3:
                projects.add((parts[0], parts[1], parts[2]))
            elif kind == "file" and len(parts) >= 4 and parts[-1].endswith(".doc.zip"):
                projects.add((parts[0], parts[1], parts[2]))
            elif kind == "mirrornames" and len(parts) == 2:
                names[rest] = value
            elif kind == "index" and len(parts) == 2:
                if value is None:
                    dropped.add(rest)
                else:
                    dropped.discard(rest)
    return projects, names, dropped


class SearchIndexer(Service):
    """
    Keeps the search index current (see the module's docstring).

    @param runIndex: runs the index's blocking writes (the storage runner's
        C{runFile}).
    @param ready: fires once storage may be read for indexing (the startup
        cleanup is over).
    """

    batch = 200
    namesChunk = 20_000
    lease = 60.0
    pollInterval = 30.0
    duty = 0.5  # at most this share of a core, over a batch and the rest after it

    def __init__(self, storage: IStorage, blobs: IBlobStore, index: ISearchIndex, runIndex: Callable[..., Deferred[Any]],
                 runFile: Callable[..., Deferred[Any]], clock: IReactorTime, node: str,
                 ready: Callable[[], Deferred[Any]] | None = None) -> None:
        self._storage = storage
        self._blobs = blobs
        self._index = index
        self._runIndex = runIndex
        self._runFile = runFile
        self._clock = clock
        self._node = node
        self._ready = ready
        self._unsubscribe: Callable[[], Any] | None = None
        self._poller: Any = None
        self._running = False
        self._again = False
        self._sleeping: Deferred[Any] | None = None
        self.stopping = False
        self.idle: Deferred[None] | None = None
        self.batches = 0

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        ready = self._ready() if self._ready is not None else None

        async def _start() -> None:
            if ready is not None:
                await ready
            if self.stopping:
                return
            self._unsubscribe = self._storage.subscribe(lambda record: self.wake())
            self._poll()

        ensureDeferred(_start()).addErrback(lambda f: log.failure("search indexing did not start", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poller is not None and self._poller.active():
            self._poller.cancel()
        if self._sleeping is not None:
            self._sleeping.cancel()
        idle = self.idle
        if idle is None:
            return Deferred.fromCoroutine(_nothingToWait())
        waiting: Deferred[None] = Deferred()
        idle.chainDeferred(waiting)
        return waiting

    def _poll(self) -> None:
        """Look now and then: nodes sharing storage do not hear of each other's commits, and leases lapse."""
        self.wake()
        if not self.stopping:
            self._poller = self._clock.callLater(self.pollInterval, self._poll)

    def wake(self) -> None:
        if self.stopping:
            return
        if self._running:
            self._again = True
            return
        self._running = True
        self.idle = Deferred()
        ensureDeferred(self._run()).addErrback(lambda f: log.failure("search indexing stopped", f))

    async def _run(self) -> None:
        try:
            while not self.stopping:
                self._again = False
                try:
                    worked = await self._step()
                except (CancelledError, _Stopped):
                    return
                except Moved:
                    continue  # cleared or indexed elsewhere: look again
                except Exception:
                    log.failure("search indexing failed; again in {delay} s", delay=self.pollInterval)
                    return
                if not worked and not self._again:
                    return
        finally:
            self._running = False
            idle, self.idle = self.idle, None
            if idle is not None:
                idle.callback(None)

    async def _rest(self, busy: float) -> None:
        """Rest after C{busy} seconds of work, so indexing takes at most L{duty} of a core."""
        if self.stopping:
            raise _Stopped()
        self._sleeping = deferLater(self._clock, busy * (1 - self.duty) / self.duty, lambda: None)
        try:
            await self._sleeping
        except CancelledError:
            raise _Stopped()
        finally:
            self._sleeping = None

    async def _step(self) -> bool:
        """One batch; C{False} when there was nothing to do (or another node indexes)."""
        if not await self._runIndex(self._index.claim, self._node, self._clock.seconds(), self.lease):
            return False
        position = await self._runIndex(self._index.position)
        current = self._storage.currentSerial()
        if position < 0 or position > current:
            await self.rebuildFromState()
            return True
        if position >= current:
            return False
        started = time.monotonic()
        try:
            records = await self._storage.changesSince(position, self.batch)
        except HistoryPruned:
            # Stopped longer than the history is kept: the changes are gone, the state is not.
            await self.rebuildFromState()
            return True
        if not records:
            return False
        projects, names, dropped = changedThings(records)
        operations: list[tuple[Any, ...]] = [("dropIndex", index) for index in sorted(dropped)]
        for index, value in sorted(names.items()):
            if index not in dropped:
                operations += await self._namesOperations(index, value)
        operations += await self._projectOperations(sorted(projects))
        await self._runIndex(self._index.apply, operations, position, records[-1].serial)
        self.batches += 1
        await self._rest(time.monotonic() - started)
        return True

    async def rebuildFromState(self) -> None:
        """Build the index from the current state, then set the position to that state's serial."""
        log.info("search index: building it from the state")
        await self._runIndex(self._index.clear)

        def _scan(view: IReadView) -> tuple[int, list[tuple[str, str, str]], dict[str, Any]]:
            projects = []
            for key, _ in view.items("project/"):
                parts = key.split("/")
                if len(parts) == 4:
                    projects.append((parts[1], parts[2], parts[3]))
            names = {key[len("mirrornames/"):]: value for key, value in view.items("mirrornames/")}
            return view.serial, projects, names

        serial, projects, names = await self._storage.read(_scan)
        for start in range(0, len(projects), self.batch):
            started = time.monotonic()
            operations = await self._projectOperations(projects[start:start + self.batch])
            await self._runIndex(self._index.apply, operations, -1, -1)
            await self._rest(time.monotonic() - started)
        for index, value in sorted(names.items()):
            operations = await self._namesOperations(index, value)
            await self._runIndex(self._index.apply, operations, -1, -1)
        await self._runIndex(self._index.apply, [], -1, serial)
        log.info("search index built at serial {serial}: {count} projects", serial=serial, count=len(projects))

    async def _projectOperations(self, projects: list[tuple[str, str, str]]) -> list[tuple[Any, ...]]:
        if not projects:
            return []

        def _states(view: IReadView) -> list[tuple[tuple[str, str, str], Any, Any]]:
            return [(p, *projectState(view, *p)) for p in projects]

        states = await self._storage.read(_states)
        pairs = [(f"{u}/{i}", p) for (u, i, p), doc, entry in states if doc is not None]
        indexed = await self._runIndex(self._index.docDigests, pairs)
        operations: list[tuple[Any, ...]] = []
        for (user, index, project), doc, entry in states:
            name = f"{user}/{index}"
            if doc is None:
                operations.append(("dropProject", name, project))
                continue
            operations.append(("project", doc))
            if entry is None:
                if (name, project) in indexed:
                    operations.append(("dropDocs", name, project))
            elif indexed.get((name, project)) != entry.get("sha256"):
                pages = await self._docPages(entry)
                operations.append(("docs", name, project, str(entry.get("version", "")), entry.get("sha256", ""), pages))
        return operations

    async def _docPages(self, entry: dict[str, Any]) -> list[DocPage]:
        reader = await self._blobs.open(entry.get(BLOB_REF) or entry.get("sha256"))
        if reader is None:
            return []
        file = await blockingFile(reader, self._runFile)
        return await self._runFile(docPages, file)

    async def _namesOperations(self, index: str, value: Any) -> list[tuple[Any, ...]]:
        """
        Stage a mirror's project list a chunk at a time (resting between
        chunks); the operation that makes it the index's list goes with the batch.
        """
        if value is None:
            return [("dropNames", index)]
        sha256 = value.get(BLOB_REF) if isinstance(value, dict) else None
        if not sha256 or await self._runIndex(self._index.namesDigest, index) == sha256:
            return []
        reader = await self._blobs.open(sha256)
        if reader is None:
            return []
        lines = _NameLines(await blockingFile(reader, self._runFile))
        await self._runIndex(self._index.clearStage)
        try:
            while not lines.ended:
                started = time.monotonic()
                await self._runIndex(self._index.stageNames, lines.next(self.namesChunk))
                await self._rest(time.monotonic() - started)
        finally:
            await self._runFile(lines.file.close)
        return [("names", index, sha256)]


class _NameLines:
    """
    The names of a list file (one per line) with their normalised forms,
    streamed into the index a chunk at a time: no list of a million
    tuples for the garbage collector to walk.
    """

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.ended = False

    def next(self, count: int) -> Iterator[tuple[str, str]]:
        for _ in range(count):
            line = self.file.readline()
            if not line:
                self.ended = True
                return
            display = line.decode("utf-8", "replace").strip()
            if display:
                yield normalizeProject(display), display


class _Stopped(Exception):
    pass


async def _nothingToWait() -> None:
    return None
