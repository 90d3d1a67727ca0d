"""
The composition root: L{buildServer} builds the whole server - services,
mirrors, replica follower, web resource and site - from a L{ServerConfig}
and the collaborators it is given (reactor or clock, HTTP agents, storage,
thread runner).

C{makeService} (L{devpi_twisted.app.tap}) gives it the real ones; the test
harnesses give it fakes, so what they run is wired exactly as production,
limits included.  The real HTTP agents, each over its own connection pool,
are made here too (L{upstreamPool}, L{primaryPool}).
"""

import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredSemaphore
from twisted.web.client import (
    Agent,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    RedirectAgent,
)
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from treq.client import HTTPClient

from devpi_twisted import __version__
from devpi_twisted.config import ServerConfig
from devpi_twisted.interfaces import ISharedSecret
from devpi_twisted.mirror.agent import LimitedAgent
from devpi_twisted.mirror.service import Mirrors
from devpi_twisted.mirror.upstream import UpstreamClient, upstreamTLSPolicy
from devpi_twisted.replica.client import PrimaryClient
from devpi_twisted.replica.metrics import ReplicationCollector
from devpi_twisted.web.replicaproxy import ReplicaProxyResource
from devpi_twisted.replica.readonly import ReadOnlyStorage
from devpi_twisted.replica.service import ReplicaService
from devpi_twisted.services.auth import Authenticator, PasswordHashing
from devpi_twisted.services.downloads import DownloadCounter
from devpi_twisted.services.mirrorcache import MirrorCache
from devpi_twisted.services.indexes import Indexes
from devpi_twisted.services.push import pushClient
from devpi_twisted.services.releases import Releases
from devpi_twisted.services.retention import Retention, RetentionSchedule
from devpi_twisted.services.simple import SimplePages
from devpi_twisted.services.throttle import LoginThrottle
from devpi_twisted.services.tokens import Tokens
from devpi_twisted.services.users import Users
from devpi_twisted.services.events import EventDispatcher, PositionFile, SharedPositions, installedSubscribers
from devpi_twisted.services.webhooks import WebhookRegistry, WebhookSender, WebhookSubscriber, webhookPoster
from devpi_twisted.storage.threads import Runner
from devpi_twisted.web.accesslog import AccessLog
from devpi_twisted.web.files import fileRedirects
from devpi_twisted.web.changelog import ChangelogFeed
from devpi_twisted.web.headers import identityHeaders, setSerial
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.mirrorfiles import MirrorFileAnswers
from devpi_twisted.web.metrics import (
    BlobCollectorMetrics, CountingMirrorFiles, CountingMirrors, Metrics, MetricsView, MirrorCacheMetrics,
    RetentionMetrics, RouteLabeler, UpstreamStats, makeRegistry,
)
from devpi_twisted.web.routes import Routes, makeWebResource
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits
from devpi_twisted.services.readrules import ReadRules
from devpi_twisted.services.search import Search, SearchIndexer
from devpi_twisted.web.search import SearchViews
from devpi_twisted.web.readgate import ReadGate
from devpi_twisted.web.upload import UploadGate


@dataclass
class Server:
    """
    A built server: the parts its process runs (L{site}, the services
    L{mirrors} and L{replica}, the L{feed} to stop first) and those tests
    look into.
    """

    config: ServerConfig
    nodeinfo: dict[str, Any]
    storage: Any  # what requests read and write: read-only on a replica
    blobs: Any
    auth: Authenticator
    throttle: LoginThrottle
    users: Users
    indexes: Indexes
    releases: Releases
    pages: SimplePages
    mirrors: Mirrors  # the service; requests see it through the counting wrapper
    upstreamStats: UpstreamStats
    metrics: Metrics
    feed: ChangelogFeed
    replica: ReplicaService | None
    resource: Resource
    site: DevpiSite
    webhooks: Any = None  # the registry behind the +webhooks routes
    downloads: Any = None  # the DownloadCounter (a child service of mirrors)
    mirrorCache: Any = None  # the MirrorCache (a child service of mirrors)
    retention: Any = None  # the retention runs behind +retention and the schedule
    search: Any = None  # services.search.Search
    searchViews: Any = None  # web.search.SearchViews: the JSON answer of /+search and its rebuild
    searchIndexer: Any = None  # the service that keeps the index current (not in --requests-only workers)


class _PoolService(Service):
    """Closes the upstream connection pool when the server stops."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self._pool.closeCachedConnections()


def upstreamPool(config: ServerConfig, reactor: Any) -> tuple[IAgent, Service]:
    """
    The agent that reaches upstream indexes, over its own connection pool
    and C{--upstream-ca} TLS policy, and the service that closes the pool.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    policy = upstreamTLSPolicy(config.upstreamCA)
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=config.requestTimeout)
    return agent, _PoolService(pool)


def mirrorsOver(config: ServerConfig, storage: Any, blobs: Any, agent: IAgent, reactor: Any,
                stats: UpstreamStats | None = None, filesElsewhere: Any = None,
                runner: Runner | None = None) -> Mirrors:
    """
    The mirror coordinator asking upstream through C{agent}: redirects
    followed, pages decoded, at most C{--max-upstream-fetches} upstream
    requests at once, counted in C{stats}, and C{--request-timeout}.
    Upstream pages and project lists are parsed in C{runner} (the storage
    service's threads; inline when not given).
    """
    agent = RedirectAgent(agent)
    stats = stats if stats is not None else UpstreamStats(config.maxUpstreamFetches)
    slots = DeferredSemaphore(config.maxUpstreamFetches)
    idle = config.requestTimeout * 6
    fileAgent = LimitedAgent(agent, slots, reactor, "file", stats, releaseAfter=idle)
    pageAgent = LimitedAgent(ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)]), slots, reactor, "page", stats,
                             releaseAfter=idle)
    upstream = UpstreamClient(fileAgent, pageAgent, reactor, timeout=config.requestTimeout,
                              idleTimeout=config.requestTimeout * 6)
    return Mirrors(storage, blobs, upstream, reactor, offlineMode=config.offlineMode,
                   filesElsewhere=filesElsewhere, parseRunner=runner)


def primaryPool(config: ServerConfig, reactor: Any) -> tuple[IAgent, Service]:
    """
    The agent a replica reaches C{--primary-url} with (the follower and the
    forwarding proxy share it), and the service that closes its pool.
    """
    from twisted.web.client import _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False  # no "Starting factory" lines for every connection to the primary

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    pool._factory = QuietFactory
    # --upstream-ca, when given, is trusted for an https primary as well
    agent = Agent(reactor, contextFactory=upstreamTLSPolicy(config.upstreamCA), pool=pool, connectTimeout=10)
    return agent, _PoolService(pool)


def makeReplica(config: ServerConfig, nodeinfo: dict[str, Any], storage: Any, blobs: Any, secret: bytes,
                reactor: Any, agent: IAgent, rememberPrimaryUUID: Callable[[str], Any],
                ready: Callable[[], Any] | None) -> ReplicaService:
    """The follower of C{--primary-url}, writing to C{storage}."""
    assert config.primaryURL is not None
    client = PrimaryClient(HTTPClient(agent), config.primaryURL, secret, reactor, nodeinfo["uuid"])
    return ReplicaService(
        storage, blobs, client, reactor, pollTimeout=config.replicaPollTimeout,
        primaryUUID=nodeinfo.get("primary-uuid"),
        rememberPrimaryUUID=rememberPrimaryUUID,
        ready=ready,
    )


def _refusalHeaders(storage: Any, nodeinfo: dict[str, Any], version: str) -> Callable[[Any], None]:
    """devpi's headers for a refusal written in front of a replica's proxy."""
    primaryUUID = (nodeinfo.get("primary-uuid") or nodeinfo["uuid"]).encode("ascii")
    static = identityHeaders(nodeinfo["uuid"]) + [
        (b"X-Devpi-Server-Version", version.encode("ascii")),
        (b"X-Devpi-Primary-Uuid", primaryUUID),
        (b"X-Devpi-Master-Uuid", primaryUUID),
    ]

    def stamp(request: Any) -> None:
        for name, value in static:
            request.setHeader(name, value)
        setSerial(request, storage.currentSerial())

    return stamp


def buildServer(
    config: ServerConfig,
    *,
    reactor: Any,
    nodeinfo: dict[str, Any],
    storage: Any,
    blobs: Any,
    runner: Runner,
    secret: bytes,
    upstreamAgent: IAgent,
    primaryAgent: IAgent | None = None,
    pushAgent: Any = None,
    storageReady: Callable[[], Any] | None = None,
    updateNodeinfo: Callable[[dict[str, Any]], None] | None = None,
    collector: Any = None,
    filesElsewhere: Callable[[], bool] | None = None,
    spoolDirectory: str | None = None,
    hashing: PasswordHashing | None = None,
    version: str = __version__,
    searchIndex: Any = None,
) -> Server:
    """
    The whole server over the given collaborators.

    @param reactor: the reactor, or a clock with what the site needs.
    @param storage: the opened (writable) storage; on a replica
        (C{config.primaryURL}) only the follower writes to it.
    @param runner: runs blocking file and storage work off the reactor.
    @param upstreamAgent: reaches upstream indexes; L{mirrorsOver} puts the
        limits around it.
    @param primaryAgent: reaches the primary, on a replica.
    @param pushAgent: the client of pushes to other servers (default: the
        real one, L{pushClient}).
    @param storageReady: fires once storage may be written (the startup
        cleanup is over); the follower waits for it.
    @param updateNodeinfo: records changes to the node information (run on
        C{runner}).
    @param collector: the blob collector, whose figures the metrics show.
    @param filesElsewhere: whether mirror files not stored here can still be
        had (default: on a replica, while its primary is reachable).
    @param hashing: the password hashing (default: argon2's defaults).
    @param searchIndex: the L{devpi_twisted.interfaces.ISearchIndex} (default:
        L{openSearchIndex}).
    """
    followerStorage = storage
    if config.primaryURL is not None:
        storage = ReadOnlyStorage(storage)  # on a replica only the follower writes
    throttle = LoginThrottle(reactor, config.loginMaxFailures, config.loginWindow,
                             config.loginMaxUserFailures, config.loginMaxAddressFailures)
    # API tokens: last use is written on the primary only (a replica cannot write)
    tokens = Tokens(storage, secret, reactor, config.policy, throttle=throttle,
                    persistUse=config.primaryURL is None)
    auth = Authenticator(storage, runner.runFile, secret, reactor, hashing=hashing, throttle=throttle,
                         tokens=tokens)
    upstreamStats = UpstreamStats(config.maxUpstreamFetches)
    feed = ChangelogFeed(storage, blobs, secret, reactor)
    replica = None
    if config.primaryURL is not None:
        assert primaryAgent is not None and updateNodeinfo is not None
        remember = updateNodeinfo
        replica = makeReplica(
            config, nodeinfo, followerStorage, blobs, secret, reactor, primaryAgent,
            rememberPrimaryUUID=lambda uuid: runner.runFile(remember, {"primary-uuid": uuid}),
            ready=storageReady,
        )
        replica.feed = feed
    # A replica never asks upstream: its primary does, and the files
    # replicate; while the primary answers, it serves the files not here yet.
    mirrorConfig = replace(config, offlineMode=True) if config.primaryURL else config
    if filesElsewhere is None and replica is not None:
        filesElsewhere = replica.isReachable
    realMirrors = mirrorsOver(mirrorConfig, storage, blobs, upstreamAgent, reactor, upstreamStats,
                              filesElsewhere=filesElsewhere, runner=runner)
    metrics = Metrics(RouteLabeler(Routes.app.url_map), storage=storage, mirrors=realMirrors,
                      throttle=throttle, upstream=upstreamStats, version=version)
    mirrors = CountingMirrors(realMirrors, metrics)
    # Downloads are written on the primary only (a replica's storage is the
    # follower's); the primary's main process alone evicts mirror files.
    downloads = DownloadCounter(storage, reactor, persist=config.primaryURL is None)
    mirrorCache = MirrorCache(storage, reactor, downloads, ready=storageReady,
                              evict=config.primaryURL is None and not config.requestsOnly)
    downloads.setServiceParent(realMirrors)
    mirrorCache.setServiceParent(realMirrors)
    mirrorFiles = CountingMirrorFiles(
        MirrorFileAnswers(realMirrors, fileRedirects(config.backend.s3Redirect, blobs), downloads), metrics)
    registry = makeRegistry(metrics)
    registry.register(MirrorCacheMetrics(mirrorCache))  # type: ignore[arg-type]
    pages = SimplePages(storage, mirrors, runner, config.pageCacheSize)
    if replica is not None:
        # Pages of mirror-backed indexes list the files not here yet only
        # while the primary can serve them: rendered pages are redone then.
        replica.onReachabilityChange(lambda reachable: pages.invalidateAll())
    if replica is not None:
        registry.register(ReplicationCollector(replica))  # type: ignore[arg-type]
    if collector is not None:
        registry.register(BlobCollectorMetrics(collector))  # type: ignore[arg-type]
    releases = Releases(storage, reactor.seconds)
    users = Users(storage, auth, config.policy)
    indexes = Indexes(storage, config.policy, config.mirrorCacheExpiry)
    readRules = ReadRules(storage)
    webhooks = WebhookRegistry(storage, reactor.seconds)
    retention = Retention(storage, reactor.seconds)
    registry.register(RetentionMetrics(retention))  # type: ignore[arg-type]
    if searchIndex is None:
        searchIndex = openSearchIndex(config)
    search = Search(searchIndex, readRules, runner.runRead)
    searchIndexer = None
    if not config.requestsOnly:
        # A random id: the lease of a node that died lapses; a restarted one takes it then.
        searchIndexer = SearchIndexer(storage, blobs, searchIndex, runner.runFile, runner.runFile, reactor,
                                      uuid.uuid4().hex, ready=storageReady)
    searchViews = SearchViews(search, auth, runner.runFile, wake=searchIndexer.wake if searchIndexer else None)
    # A replica forwards uploads to its primary, which decides.
    bodyGate = UploadGate(auth, releases, blobs, Routes.app.url_map) if replica is None else None
    resource = makeWebResource(
        config=config,
        nodeinfo=nodeinfo,
        storage=storage,
        blobs=blobs,
        auth=auth,
        users=users,
        indexes=indexes,
        releases=releases,
        pages=pages,
        mirrors=mirrors,
        mirrorFiles=mirrorFiles,
        pushAgent=pushAgent if pushAgent is not None else pushClient(reactor),
        version=version,
        metrics=MetricsView(metrics, registry),
        changelog=feed,
        replication=replica,
        runFile=runner.runFile,
        readRules=readRules,
        webhooks=webhooks,
        downloads=downloads,
        retention=retention,
        searchViews=searchViews,
        search=search,
    )
    if replica is not None:
        resource = ReplicaProxyResource(resource, primaryAgent, replica.primaryURL, storage, blobs, reactor,
                                        replica, config.outsideURL, runFile=runner.runFile)
        # Reads the proxy sends to the primary are refused here first, with
        # the replicated acl_read and users, as the replica's own answers are.
        resource = ReadGate(resource, readRules, auth, stamp=_refusalHeaders(storage, nodeinfo, version))
    # Answers written before any resource (rawAnswer adds nosniff itself).
    requestClass = limitedRequestFactory(
        config.maxUploadSize,
        identityHeaders(nodeinfo["uuid"]),
        base=DevpiRequest,
        spoolDirectory=spoolDirectory,
    )
    limits = SiteLimits(
        idleTimeout=config.idleTimeout, headerTimeout=config.headerTimeout, maxHeaderSize=config.maxHeaderSize,
        maxConnections=config.maxConnections, trustedProxies=frozenset(config.trustedProxies),
        bodyTimeout=config.bodyTimeout, minBodyRate=config.minBodyRate,
    )
    observers: list[Any] = [metrics]
    if config.accessLog:
        observers.append(AccessLog())
    site = DevpiSite(resource, reactor, limits, requestClass, observers, bodyGate)  # type: ignore[arg-type]
    metrics.site = site
    return Server(
        config=config, nodeinfo=nodeinfo, storage=storage, blobs=blobs, auth=auth, throttle=throttle,
        users=users, indexes=indexes, releases=releases, pages=pages, mirrors=realMirrors,
        upstreamStats=upstreamStats, metrics=metrics, feed=feed, replica=replica, resource=resource, site=site,
        webhooks=webhooks, downloads=downloads, mirrorCache=mirrorCache, retention=retention,
        search=search, searchViews=searchViews, searchIndexer=searchIndexer,
    )


def runsRetention(config: ServerConfig) -> bool:
    """Whether this process runs the retention schedule: a primary's main process, when it is on."""
    return config.primaryURL is None and not config.requestsOnly and config.retentionInterval > 0


def retentionSchedule(server: Server, reactor: Any, ready: Callable[[], Any] | None = None) -> RetentionSchedule:
    """The scheduled retention runs (README "Retention"), for the process L{runsRetention} names."""
    return RetentionSchedule(server.retention, reactor, server.config.retentionInterval, ready=ready)


def openSearchIndex(config: ServerConfig) -> Any:
    """
    The search index: in the state's PostgreSQL database (shared by its
    nodes), else SQLite's C{search.sqlite} in the server directory (in
    memory when there is none: the tests' servers).
    """
    if config.backend.storage == "postgresql" and config.backend.pgDSN:
        from devpi_twisted.storage.searchindex_postgres import PostgresSearchIndex

        return PostgresSearchIndex(config.backend.pgDSN)
    from devpi_twisted.storage.searchindex_sqlite import openSQLiteIndex

    return openSQLiteIndex(config.serverdir.path)


def deliversEvents(config: ServerConfig) -> bool:
    """Whether this process delivers events: a primary's main process, never a replica or a worker."""
    return config.primaryURL is None and not config.requestsOnly


def eventServices(config: ServerConfig, storage: Any, reactor: Any, runner: Runner, node: str,
                  ready: Callable[[], Any] | None = None, subscribers: Any = None,
                  resolve: Any = None) -> MultiService:
    """
    The event dispatcher (installed subscribers and webhooks) and the
    webhook sender, for the one process that delivers: a primary's main
    process (README "Events and webhooks").

    @param node: this node's own uuid: it claims deliveries when several
        nodes share the storage.
    @param subscribers: the plugin subscribers (default: those installed).
    """
    services = MultiService()
    # Nodes sharing the storage (PostgreSQL) claim what they deliver in it.
    shared = ISharedSecret.providedBy(storage)
    sender = WebhookSender(storage, reactor, webhookPoster(reactor, config.webhookAllowPrivate, resolve),
                           node, shared=shared, ready=ready)
    hooks = WebhookSubscriber(storage, reactor.seconds, config.outsideURL or "", wake=sender.wake)
    if subscribers is None:
        subscribers = installedSubscribers()
    positions: Any = (SharedPositions(storage, reactor, node) if shared else
                      PositionFile(config.serverdir.child("+events").child("positions.json"), runner.runFile))
    EventDispatcher(storage, reactor, [hooks, *subscribers], positions, ready=ready).setServiceParent(services)
    sender.setServiceParent(services)
    return services
