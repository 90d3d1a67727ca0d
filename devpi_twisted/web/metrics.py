# -*- test-case-name: tests.test_ops -*-
"""
C{/+metrics}: Prometheus metrics.

The request path only bumps plain dicts and ints (L{Metrics.requestDone} is a
request observer of L{devpi_twisted.web.server.DevpiSite}); a scrape turns
them, and the state read from the mirrors, the storage and the site at that
moment, into metric families with C{prometheus_client}, which also provides
the text and OpenMetrics exposition formats and the standard process and
Python metrics.

Routes are labelled by their template (C{/{user}/{index}/+simple/{project}/}),
never by the raw path, so the number of series stays bounded.
"""

from bisect import bisect_left
from typing import Any, Callable, Iterator
from urllib.parse import unquote

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from zope.interface import implementer

from devpi_twisted.mirror.agent import IUpstreamCounter
from devpi_twisted.web.accesslog import ABORTED
from devpi_twisted.web.responses import withLength
from devpi_twisted.web.headers import contentTypeOf
from devpi_twisted.web.server import DevpiRequest
from devpi_twisted.web.uploadform import FORM_TYPES

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "PUSH", "OPTIONS"})
UNMATCHED = "unmatched"
FILE_ROUTE = "/{user}/{index}/+f/{relpath}"
UPLOAD_ROUTES = frozenset({"/{user}/{index}/", "/{user}/{index}"})
MIRROR_STATES = ("online", "offline", "probing", "stopped")
_MISS = "_devpiMirrorMiss"


class RouteLabeler:
    """
    The route template a request path matched, from the Klein app's own
    URL map (so it cannot drift from the routes), with a bounded cache.
    """

    def __init__(self, urlMap: Map, cacheSize: int = 4096) -> None:
        self._adapter = urlMap.bind("localhost", "/")
        self._labels: dict[str, str] = {}
        self._cache: dict[tuple[bytes, bytes], str] = {}
        self._cacheSize = cacheSize

    def __call__(self, method: bytes, path: bytes) -> str:
        key = (method, path)
        label = self._cache.get(key)
        if label is None:
            label = self._match(method, path)
            if len(self._cache) >= self._cacheSize:
                self._cache.clear()
            self._cache[key] = label
        return label

    def _match(self, method: bytes, path: bytes) -> str:
        if not path:
            return UNMATCHED
        text = unquote(path.decode("utf-8", "replace"))
        for verb in (method.decode("ascii", "replace"), "GET", "POST"):
            try:
                rule, values = self._adapter.match(text, method=verb, return_rule=True)
            except HTTPException as e:
                if e.code == 405:
                    continue
                return UNMATCHED
            except Exception:
                return UNMATCHED
            if any(isinstance(v, str) and v.startswith("+") for v in values.values()):
                # a name route took a special segment (C{DELETE /+api}): label the special route
                continue
            label = self._labels.get(rule.rule)
            if label is None:
                label = self._labels[rule.rule] = _template(rule.rule)
            return label
        return UNMATCHED


def _template(rule: str) -> str:
    """C{/<user>/<path:relpath>} as C{/{user}/{relpath}}."""
    out = []
    for part in rule.split("/"):
        if part.startswith("<") and part.endswith(">"):
            part = "{" + part[1:-1].split(":")[-1] + "}"
        out.append(part)
    return "/".join(out)


@implementer(IUpstreamCounter)
class UpstreamStats:
    """What the upstream agents count (see L{devpi_twisted.mirror.agent})."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def waitingChanged(self, change: int) -> None:
        self.waiting += change

    def activeChanged(self, change: int) -> None:
        self.active += change

    def answered(self, kind: str, status: int) -> None:
        key = (kind, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 500:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def failed(self, kind: str) -> None:
        key = (kind, "error")
        self.requests[key] = self.requests.get(key, 0) + 1
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def received(self, kind: str, size: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + size


class Metrics:
    """
    The counters, and the sources read when scraped.

    @param routeOf: gives the route template of C{(method, path)}.
    @param storage: for the serial and the last commit's time.
    @param mirrors: for each mirror's state (C{statuses()}).
    @param site: for open connections and requests in flight.
    @param throttle: for failed and refused logins.
    @param upstream: the upstream agents' counts.
    """

    def __init__(self, routeOf: Callable[[bytes, bytes], str], *, storage: Any = None, mirrors: Any = None,
                 site: Any = None, throttle: Any = None, upstream: UpstreamStats | None = None,
                 version: str = "") -> None:
        self.routeOf = routeOf
        self.storage = storage
        self.mirrors = mirrors
        self.site = site
        self.throttle = throttle
        self.upstream = upstream or UpstreamStats()
        self.version = version
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, list[float]] = {}  # route -> per-bucket counts, then count, then sum
        self.responseBytes: dict[str, int] = {}
        self.uploads: dict[str, int] = {}
        self.uploadBytes = 0
        self.cache: dict[tuple[str, str], int] = {}
        self.mirrorNames: set[str] = set()

    # the hot path

    def requestDone(self, request: DevpiRequest) -> None:
        method = request.method.decode("ascii", "replace") if isinstance(request.method, bytes) else "other"
        if method not in METHODS:
            method = "other"
        path = request.path or b""
        route = self.routeOf(request.method, path) if method != "other" else UNMATCHED
        status = str(ABORTED if request.aborted else request.code)
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = [0] * (len(BUCKETS) + 3)
        duration = request.duration
        histogram[bisect_left(BUCKETS, duration)] += 1
        histogram[-2] += 1
        histogram[-1] += duration
        self.responseBytes[route] = self.responseBytes.get(route, 0) + request.sentLength
        if route == FILE_ROUTE:
            self._fileRequest(request, method, path)
        elif method == "POST" and route in UPLOAD_ROUTES:
            if contentTypeOf(request.getHeader(b"content-type")) in FORM_TYPES:
                self.uploads[status] = self.uploads.get(status, 0) + 1
                if status == "200":
                    length = request.getHeader(b"content-length")
                    self.uploadBytes += int(length) if length and length.isdigit() else 0

    def _fileRequest(self, request: DevpiRequest, method: str, path: bytes) -> None:
        if method not in ("GET", "HEAD"):
            return
        if getattr(request, _MISS, False):
            self.countCache("file", "miss")
            return
        if request.code not in (200, 206, 304):
            return
        parts = path.split(b"/", 3)
        if len(parts) > 3 and unquote(f"{parts[1].decode('utf-8', 'replace')}/{parts[2].decode('utf-8', 'replace')}") \
                in self.mirrorNames:
            self.countCache("file", "hit")

    def countCache(self, kind: str, result: str) -> None:
        key = (kind, result)
        self.cache[key] = self.cache.get(key, 0) + 1

    # devpi's +status "metrics": [name, type, value]

    def statusList(self) -> list[list[Any]]:
        return [
            ["devpi_http_requests_total", "counter", sum(self.requests.values())],
            ["devpi_http_requests_in_flight", "gauge", len(self.site.active) if self.site is not None else 0],
            ["devpi_http_connections_open", "gauge", len(self.site.channels) if self.site is not None else 0],
            ["devpi_upstream_requests_total", "counter", sum(self.upstream.requests.values())],
            ["devpi_upstream_errors_total", "counter", sum(self.upstream.errors.values())],
            ["devpi_uploads_total", "counter", sum(self.uploads.values())],
        ]

    # scraping

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._upstream()
        yield from self._mirrors()
        yield from self._state()

    def _http(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("devpi_http_requests", "HTTP requests answered, by route template, "
                                       "method and status (499: the client left first)",
                                       labels=["route", "method", "status"])
        for (route, method, status), count in sorted(self.requests.items()):
            requests.add_metric([route, method, status], count)
        yield requests
        latency = HistogramMetricFamily("devpi_http_request_duration_seconds",
                                        "Time from the request line to the last byte of the answer",
                                        labels=["route"])
        for route, counts in sorted(self.durations.items()):
            buckets, cumulative = [], 0
            for bound, count in zip(BUCKETS, counts):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", counts[-2]))
            latency.add_metric([route], buckets, sum_value=counts[-1])
        yield latency
        yield _counter("devpi_http_response_bytes", "Bytes of response bodies sent, by route template",
                       "route", self.responseBytes)
        yield _counter("devpi_uploads", "Uploads (legacy upload API), by status", "status", self.uploads)
        yield CounterMetricFamily("devpi_upload_bytes", "Bytes of successful uploads", value=self.uploadBytes)
        if self.site is not None:
            yield GaugeMetricFamily("devpi_http_connections_open", "Open client connections",
                                    value=len(self.site.channels))
            yield GaugeMetricFamily("devpi_http_connections_limit", "The connection limit (--max-connections)",
                                    value=self.site.limits.maxConnections)
            yield CounterMetricFamily("devpi_http_connections_refused",
                                      "Connections refused because of the limit or a shutdown",
                                      value=self.site.refusedConnections)
            yield GaugeMetricFamily("devpi_http_requests_in_flight", "Requests being received or answered",
                                    value=len(self.site.active))
        if self.throttle is not None:
            yield CounterMetricFamily("devpi_login_failures", "Failed password checks", value=self.throttle.failed)
            yield CounterMetricFamily("devpi_login_throttled", "Password attempts refused with 429",
                                      value=self.throttle.refused)

    def _upstream(self) -> Iterator[Metric]:
        stats = self.upstream
        requests = CounterMetricFamily("devpi_upstream_requests", "Requests to upstream indexes, by kind "
                                       "(page, file) and status ('error': no answer)", labels=["kind", "status"])
        for (kind, status), count in sorted(stats.requests.items()):
            requests.add_metric([kind, status], count)
        yield requests
        yield _counter("devpi_upstream_errors", "Upstream requests that failed or answered 5xx",
                       "kind", stats.errors)
        yield _counter("devpi_upstream_bytes", "Bytes received from upstream", "kind", stats.bytes)
        yield GaugeMetricFamily("devpi_upstream_fetches_active", "Upstream transfers in progress", value=stats.active)
        yield GaugeMetricFamily("devpi_upstream_fetches_waiting", "Upstream requests waiting for a free slot",
                                value=stats.waiting)
        yield GaugeMetricFamily("devpi_upstream_fetches_limit", "The limit (--max-upstream-fetches)",
                                value=stats.limit)
        cache = CounterMetricFamily("devpi_mirror_cache", "Mirror lookups answered from the cache (hit) or "
                                    "needing upstream (miss), by kind (page, file)", labels=["kind", "result"])
        for (kind, result), count in sorted(self.cache.items()):
            cache.add_metric([kind, result], count)
        yield cache

    def _mirrors(self) -> Iterator[Metric]:
        statuses = self.mirrors.statuses() if self.mirrors is not None else {}
        self.mirrorNames.update(statuses)
        state = GaugeMetricFamily("devpi_mirror_state", "1 for the state each mirror's status machine is in",
                                  labels=["mirror", "state"])
        failures = GaugeMetricFamily("devpi_mirror_consecutive_failures", "Upstream failures in a row",
                                     labels=["mirror"])
        lastSuccess = GaugeMetricFamily("devpi_mirror_last_success_timestamp_seconds",
                                        "When upstream last answered", labels=["mirror"])
        lastFailure = GaugeMetricFamily("devpi_mirror_last_failure_timestamp_seconds",
                                        "When upstream last failed", labels=["mirror"])
        for name, status in sorted(statuses.items()):
            for each in MIRROR_STATES:
                state.add_metric([name, each], 1 if status.get("state") == each else 0)
            failures.add_metric([name], status.get("consecutive-failures") or 0)
            if status.get("last-success") is not None:
                lastSuccess.add_metric([name], status["last-success"])
            if status.get("last-failure") is not None:
                lastFailure.add_metric([name], status["last-failure"])
        yield from (state, failures, lastSuccess, lastFailure)

    def _state(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("devpi_info", "The server's version", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        if self.storage is not None:
            yield GaugeMetricFamily("devpi_serial", "The server's serial (changes committed)",
                                    value=self.storage.currentSerial())
            last = self.storage.lastCommitTime()
            if last is not None:
                yield GaugeMetricFamily("devpi_last_commit_timestamp_seconds", "When the last change committed",
                                        value=last)


def makeRegistry(metrics: Metrics, processMetrics: bool = True) -> CollectorRegistry:
    """A registry of our own (never prometheus_client's global one) with our collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    if processMetrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class MetricsView:
    """C{/+metrics}: the registry in the format the scraper asks for; and the list for C{/+status}."""

    def __init__(self, metrics: Metrics, registry: CollectorRegistry) -> None:
        self._metrics = metrics
        self._registry = registry

    def statusList(self) -> list[list[Any]]:
        return self._metrics.statusList()

    def render(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept") or b""
        encoder, contentType = choose_encoder(accept.decode("latin-1"))
        body = encoder(self._registry)
        request.setHeader(b"Content-Type", contentType.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return withLength(request, body)


class CountingMirrors:
    """
    The mirror coordinator as the pages and views see it, counting page
    cache hits and misses on the way: a page lookup is a hit when the cached
    links are fresh.  The rest is passed on as it is.
    """

    def __init__(self, mirrors: Any, metrics: Metrics) -> None:
        self._mirrors = mirrors
        self._metrics = metrics

    def isFresh(self, stage: Any, project: str) -> bool:
        fresh = self._mirrors.isFresh(stage, project)
        self._metrics.mirrorNames.add(stage.name)
        if fresh:
            self._metrics.countCache("page", "hit")
        return fresh

    async def projectFiles(self, stage: Any, project: str, rootPrefix: str) -> Any:
        self._metrics.mirrorNames.add(stage.name)
        self._metrics.countCache("page", "hit" if self._mirrors.isFresh(stage, project) else "miss")
        return await self._mirrors.projectFiles(stage, project, rootPrefix)

    def statuses(self) -> dict[str, dict[str, Any]]:
        return self._mirrors.statuses()  # type: ignore[no-any-return]

    async def projectNames(self, stage: Any) -> Any:
        return await self._mirrors.projectNames(stage)

    async def projectNameList(self, stage: Any) -> Any:
        return await self._mirrors.projectNameList(stage)

    def projectNamesFresh(self, stage: Any) -> bool:
        return self._mirrors.projectNamesFresh(stage)  # type: ignore[no-any-return]

    async def projectStatus(self, stage: Any, project: str) -> Any:
        return await self._mirrors.projectStatus(stage, project)

    async def refresh(self, stage: Any, project: str) -> None:
        await self._mirrors.refresh(stage, project)

    async def releaseEntries(self, stage: Any, project: str, version: str) -> Any:
        return await self._mirrors.releaseEntries(stage, project, version)

    async def fileAnswer(self, stage: Any, relpath: str, wantBody: bool = True) -> Any:
        return await self._mirrors.fileAnswer(stage, relpath, wantBody)


class CountingMirrorFiles:
    """
    The answers to file requests of mirrors, marking each request as a cache
    miss: it had to come from upstream (or join a transfer from there).
    L{Metrics.requestDone} counts it when the request is done.
    """

    def __init__(self, files: Any, metrics: Metrics) -> None:
        self._files = files
        self._metrics = metrics

    async def answer(self, request: IRequest, stage: Any, relpath: str) -> Any:
        self._metrics.mirrorNames.add(stage.name)
        setattr(request, _MISS, True)
        return await self._files.answer(request, stage, relpath)


def _counter(name: str, documentation: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
    """A counter with one label, from a dict of label value to count."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class BlobCollectorMetrics:
    """What the blob collector (L{devpi_twisted.storage.collector}) did, for C{/+metrics}."""

    def __init__(self, collector: Any) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        totals = self._collector.totals
        yield CounterMetricFamily("devpi_blobs_retired", "Unreferenced file contents moved to +files/trash",
                                  value=totals.retired)
        yield CounterMetricFamily("devpi_blobs_deleted", "Retired file contents removed for good",
                                  value=totals.deleted)
        yield CounterMetricFamily("devpi_blobs_restored", "Retired file contents brought back (referenced again)",
                                  value=totals.restored)
        if self._collector.lastPass is not None:
            yield GaugeMetricFamily("devpi_blob_collector_last_pass_timestamp_seconds",
                                    "When the blob collector last finished a pass", value=self._collector.lastPass)


class MirrorCacheMetrics:
    """What each mirror has cached and evicted (L{devpi_twisted.services.mirrorcache}), for C{/+metrics}."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily("devpi_mirror_cache_bytes", "Bytes of files each mirror has cached",
                                 labels=["mirror"])
        files = GaugeMetricFamily("devpi_mirror_cache_files", "Files each mirror has cached", labels=["mirror"])
        limit = GaugeMetricFamily("devpi_mirror_cache_max_bytes", "Each mirror's mirror_cache_max_size (if set)",
                                  labels=["mirror"])
        evictions = CounterMetricFamily("devpi_mirror_cache_evictions",
                                        "Files evicted from each mirror's cache to stay under its size limit",
                                        labels=["mirror"])
        for name, figures in sorted(self._cache.mirrors.items()):
            size.add_metric([name], figures.bytes)
            files.add_metric([name], len(figures.files))
            if figures.limit is not None:
                limit.add_metric([name], figures.limit)
            evictions.add_metric([name], figures.evictions)
        yield from (size, files, limit, evictions)


class RetentionMetrics:
    """What retention policies removed (L{devpi_twisted.services.retention}), for C{/+metrics}."""

    def __init__(self, retention: Any) -> None:
        self._retention = retention

    def collect(self) -> Iterator[Metric]:
        totals = self._retention.totals
        yield CounterMetricFamily("devpi_retention_removed_versions", "Versions removed by retention policies",
                                  value=totals.versions)
        yield CounterMetricFamily("devpi_retention_removed_files", "Files removed by retention policies",
                                  value=totals.files)
        yield CounterMetricFamily("devpi_retention_removed_bytes", "Bytes of files removed by retention policies",
                                  value=totals.bytes)
