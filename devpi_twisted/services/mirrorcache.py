# -*- test-case-name: tests.test_mirrorcache -*-
"""
Mirror caches with a size limit (C{mirror_cache_max_size}).

The bytes and files each mirror has cached are kept here, read once at
start and then kept up to date from the committed changes (a file entry
stored or removed, an index config changed), so no request and no eviction
pass scans storage.  When a mirror holds more than its limit, the least
recently downloaded files are evicted until it is under the limit again.

Evicting a file removes its entry and the pointer of its stable path (no
tombstone): the mirror then has it "not cached yet", exactly as before its
first request.  Its link stays on the simple page (the page comes from
upstream's), and the next request fetches it again from upstream, verified
by hash as any mirror fetch.  Nothing refers to the blob any more, so the
blob collector gives the space back.  The download record is kept (it is
the file's history, not its cache).

A file whose blob is being sent (L{DownloadCounter.isTransferring}) is
skipped; a file being fetched has no entry yet, so it cannot be chosen.
A pass evicts at most L{BATCH} files in one transaction; if the mirror is
still over its limit the next pass follows a moment later.  Passes run after
a mirror file is stored while the mirror is over its limit, and every
L{INTERVAL} seconds.  Only the primary's main process evicts (C{evict});
elsewhere the figures are kept for the metrics.
"""

import calendar
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from devpi_twisted.interfaces import IReadView, IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.services.downloads import DownloadCounter
from devpi_twisted.services.fileentries import forgetFileEntry
from devpi_twisted.storage import BLOB_REF, ChangeRecord, blobRef

log = Logger()

BATCH = 200
"""The most files one pass evicts (one transaction)."""

INTERVAL = 300.0
"""Seconds between the periodic passes."""

AGAIN = 1.0
"""Seconds before the next pass when one pass was not enough."""


@dataclass(slots=True)
class CachedFile:
    """One cached file (slots: a large mirror has many)."""

    size: int
    sha256: str
    last: float  # when it was last downloaded (or stored)


@dataclass
class MirrorFigures:
    """What one mirror has cached."""

    limit: int | None = None
    files: dict[tuple[str, str], CachedFile] = field(default_factory=dict)  # (project, filename)
    bytes: int = 0
    evictions: int = 0

    def put(self, project: str, filename: str, cached: CachedFile) -> None:
        old = self.files.get((project, filename))
        if old is not None:
            self.bytes -= old.size
            cached.last = max(cached.last, old.last)
        self.files[(project, filename)] = cached
        self.bytes += cached.size

    def drop(self, project: str, filename: str) -> None:
        old = self.files.pop((project, filename), None)
        if old is not None:
            self.bytes -= old.size

    def over(self) -> bool:
        return self.limit is not None and self.bytes > self.limit


def _limitOf(config: dict[str, Any]) -> int | None:
    limit = config.get("mirror_cache_max_size")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _splitIndexKey(key: str, kind: str) -> list[str]:
    """C{[user, index, rest...]} of C{kind/user/index/...}."""
    return key[len(kind):].split("/", 3)


class MirrorCache(Service):
    """The cached bytes of every mirror, and eviction under C{mirror_cache_max_size}."""

    def __init__(self, storage: IStorage, clock: IReactorTime, downloads: DownloadCounter, evict: bool = True,
                 interval: float = INTERVAL, batch: int = BATCH,
                 ready: Callable[[], "Deferred[None]"] | None = None) -> None:
        """
        @param evict: whether this process evicts (else it keeps the figures).
        @param ready: fires once storage may be read and written (after the
            startup cleanup); the figures are read then.
        """
        self._ready = ready
        self._storage = storage
        self._clock = clock
        self._downloads = downloads
        self._evict = evict
        self._interval = interval
        self._batch = batch
        self.mirrors: dict[str, MirrorFigures] = {}  # "user/index"
        self._loaded = False
        self._early: list[ChangeRecord] = []
        self._passing: Deferred[Any] | None = None
        self._soon: Any = None
        self._loop: LoopingCall | None = None
        storage.subscribe(self._changed)
        downloads.listen(self._downloaded)

    # the figures

    def load(self) -> "Deferred[None]":
        """Read what every mirror has cached (once, at start); changes meanwhile are applied after."""
        d: Deferred[Any] = self._storage.read(_readFigures)
        d.addCallback(self._gotFigures)
        return d

    def _gotFigures(self, read: tuple[int, dict[str, MirrorFigures]]) -> None:
        serial, mirrors = read
        self.mirrors = mirrors
        self._loaded = True
        early, self._early = self._early, []
        for record in early:
            if record.serial > serial:
                self._changed(record)
        for name, figures in self.mirrors.items():
            if figures.over():
                self._passSoon(0)
        log.info("mirror caches: {summary}", summary=", ".join(
            f"{name} {f.bytes} bytes in {len(f.files)} files" for name, f in sorted(mirrors.items())) or "none")

    def _changed(self, record: ChangeRecord) -> None:
        if not self._loaded:
            self._early.append(record)
            return
        stored = False
        for key, value in record.changes.items():
            if key.startswith(keys.INDEX):
                parts = _splitIndexKey(key, keys.INDEX)
                if len(parts) != 2:
                    continue
                name = "/".join(parts)
                if value is None or value.get("type") != MIRROR:
                    self.mirrors.pop(name, None)
                    continue
                figures = self.mirrors.setdefault(name, MirrorFigures())
                figures.limit = _limitOf(value)
                stored = stored or figures.over()
            elif key.startswith("file/"):
                parts = _splitIndexKey(key, "file/")
                figures = self.mirrors.get("/".join(parts[:2])) if len(parts) == 4 else None
                if figures is None:
                    continue
                project, filename = parts[2], parts[3]
                ref = blobRef(value)
                if ref is None:
                    figures.drop(project, filename)
                else:
                    figures.put(project, filename, CachedFile(int(value.get("size") or 0), ref, record.time))
                    stored = stored or figures.over()
            elif key.startswith(keys.DOWNLOAD) and isinstance(value, dict):
                # Counted by another process (a worker), or written by us.
                parts = _splitIndexKey(key, keys.DOWNLOAD)
                if len(parts) == 4:
                    self._downloaded(parts[0], parts[1], parts[2], parts[3], float(value.get("last", 0)))
        if stored:
            self._passSoon(0)

    def _downloaded(self, user: str, index: str, project: str, filename: str, when: float) -> None:
        figures = self.mirrors.get(f"{user}/{index}")
        cached = figures.files.get((project, filename)) if figures is not None else None
        if cached is not None and when > cached.last:
            cached.last = when

    # eviction

    def startService(self) -> None:
        super().startService()
        waiting = self._ready() if self._ready is not None else succeed(None)
        waiting.addCallback(lambda _: self._start() if self.running else None)
        waiting.addErrback(lambda f: log.failure("mirror cache: reading the cached files failed", failure=f))

    def _start(self) -> "Deferred[None]":
        if self._evict:
            self._loop = LoopingCall(lambda: self._passSoon(0))
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=False)
        return self.load()

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return self._passing if self._passing is not None else succeed(None)

    def _passSoon(self, delay: float) -> None:
        if not self._evict or not self.running or self._soon is not None or self._passing is not None:
            return
        self._soon = self._clock.callLater(delay, self._startPass)

    def _startPass(self) -> None:
        self._soon = None
        self._passing = Deferred.fromCoroutine(self.evictOnce())

        def done(again: Any) -> None:
            self._passing = None
            if again is True and self._evict:
                self._passSoon(AGAIN)

        def failed(failure: Any) -> None:
            log.failure("mirror cache: an eviction pass failed; trying again later", failure=failure)
            return None

        self._passing.addErrback(failed).addCallback(done)

    def candidates(self, figures: MirrorFigures) -> list[tuple[str, str, CachedFile]]:
        """The least recently downloaded files whose eviction brings the mirror under its limit."""
        if not figures.over():
            return []
        assert figures.limit is not None
        excess = figures.bytes - figures.limit
        idle = ((cached.last, project, filename, cached) for (project, filename), cached in figures.files.items()
                if not self._downloads.isTransferring(cached.sha256))
        chosen: list[tuple[str, str, CachedFile]] = []
        for _, project, filename, cached in heapq.nsmallest(self._batch, idle, key=lambda item: item[:3]):
            if excess <= 0:
                break
            chosen.append((project, filename, cached))
            excess -= cached.size
        return chosen

    async def evictOnce(self) -> bool:
        """One pass over every mirror over its limit; whether another pass is needed."""
        again = False
        for name, figures in list(self.mirrors.items()):
            chosen = self.candidates(figures)
            if not chosen:
                continue
            user, index = name.split("/", 1)
            _, evicted = await self._storage.write(lambda txn: _evict(txn, user, index, chosen, self._downloads))
            figures.evictions += len(evicted)
            if evicted:
                log.info("mirror cache {mirror}: evicted {count} files ({size} bytes) to stay under {limit} bytes",
                         mirror=name, count=len(evicted), size=sum(c.size for c in evicted), limit=figures.limit)
            again = again or (figures.over() and len(chosen) == self._batch)
        return again


def _readFigures(view: IReadView) -> tuple[int, dict[str, MirrorFigures]]:
    """Every mirror's cached files and their last downloads (a storage thread)."""
    mirrors: dict[str, MirrorFigures] = {}
    for key, config in view.items(keys.INDEX):
        if config.get("type") != MIRROR:
            continue
        user, index = _splitIndexKey(key, keys.INDEX)[:2]
        figures = mirrors[f"{user}/{index}"] = MirrorFigures(limit=_limitOf(config))
        prefix = f"file/{user}/{index}/"
        for fileKey, entry in view.items(prefix):
            ref = blobRef(entry)
            if ref is None:
                continue
            project, _, filename = fileKey[len(prefix):].partition("/")
            figures.put(project, filename, CachedFile(int(entry.get("size") or 0), ref, _storedAt(entry)))
        downloads = keys.downloadsPrefix(user, index)
        for downloadKey, record in view.items(downloads):
            project, _, filename = downloadKey[len(downloads):].partition("/")
            cached = figures.files.get((project, filename))
            if cached is not None and isinstance(record, dict):
                cached.last = float(record.get("last", 0))
    return view.serial, mirrors


def _storedAt(entry: dict[str, Any]) -> float:
    """When the mirror stored a file (its entry's last log record), for files never downloaded since."""
    try:
        return float(calendar.timegm(tuple(entry["log"][-1]["when"][:6]) + (0, 0, 0)))
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0


def _evict(txn: IWriteTransaction, user: str, index: str, chosen: list[tuple[str, str, CachedFile]],
           downloads: DownloadCounter) -> list[CachedFile]:
    """
    Remove the chosen entries that are still the same blob and not being
    sent; those removed.
    """
    evicted: list[CachedFile] = []
    for project, filename, cached in chosen:
        fileKey = keys.fileKey(user, index, project, filename)
        entry = txn.get(fileKey)
        if entry is None or entry.get(BLOB_REF) != cached.sha256 or downloads.isTransferring(cached.sha256):
            continue
        forgetFileEntry(txn, user, index, entry)
        evicted.append(cached)
    return evicted
