"""
The twistd plugin's options and C{makeService}: the only composition root.

This is the one module that picks concrete classes and may import the global
reactor; everything below it receives its collaborators.
"""

import os
import sys
from dataclasses import replace
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.web.client import (
    Agent,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    RedirectAgent,
)
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.python import usage
from treq.client import HTTPClient

from devpi_twisted import __version__
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.config import DEFAULT_LISTEN, DEFAULT_SERVERDIR, ServerConfig, serverdirPath
from devpi_twisted.app.endpoints import bindProblem, listenSyntaxError
from devpi_twisted.errors import ServerDirError, StorageError
from devpi_twisted.services.indexes import Indexes
from devpi_twisted.admin.initstate import PYPI_URL, createReplicaDir, createServerDir
from devpi_twisted.mirror.service import Mirrors
from devpi_twisted.mirror.upstream import UpstreamClient, upstreamTLSPolicy
from devpi_twisted.app.options import Options as TypedOptions
from devpi_twisted.services.push import pushClient
from devpi_twisted.model.acl import Policy
from devpi_twisted.app.serverdir import ServerDir, loadSecretFile
from devpi_twisted.storage.collector import BlobCollector
from devpi_twisted.storage.plugin import findBackend
from devpi_twisted.storage.threads import ThreadRunner
from devpi_twisted.services.releases import Releases
from devpi_twisted.services.simple import SimplePages
from devpi_twisted.services.users import Users
from devpi_twisted.app.logs import JSONLogService
from devpi_twisted.app.shutdown import DrainService, ExitZeroOnSIGTERM, SequentialStopService, WebService
from devpi_twisted.services.throttle import LoginThrottle
from devpi_twisted.app.tlsdir import tlsDirectoryEndpoint
from devpi_twisted.mirror.agent import LimitedAgent
from devpi_twisted.web.accesslog import AccessLog
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.metrics import (
    BlobCollectorMetrics, CountingMirrors, Metrics, MetricsView, RouteLabeler, UpstreamStats, makeRegistry,
)
from devpi_twisted.web.changelog import ChangelogFeed, FeedStopper
from devpi_twisted.web.routes import Routes, makeWebResource
from devpi_twisted.web.upload import UploadGate
from devpi_twisted.replica.client import PrimaryClient
from devpi_twisted.replica.metrics import ReplicationCollector
from devpi_twisted.replica.proxy import ReplicaProxyResource
from devpi_twisted.replica.readonly import ReadOnlyStorage
from devpi_twisted.replica.service import ReplicaService
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits

ENV_PREFIX = "DEVPI_TWISTED_"


class Options(TypedOptions):
    """Options of C{twistd devpi}; each also reads C{DEVPI_TWISTED_<OPTION>}."""

    synopsis = "[options]"
    longdesc = (
        "Serve a devpi-compatible package index. An empty or missing --serverdir is "
        "initialised first (root user, root/pypi mirror). Every option can also be set "
        "with an environment variable DEVPI_TWISTED_<OPTION>, e.g. DEVPI_TWISTED_SERVERDIR; "
        "the command line wins."
    )
    optParameters = [
        ["serverdir", None, DEFAULT_SERVERDIR, "The server directory (state, files, secret)."],
        ["storage", None, "sqlite", "The storage backend plugin."],
        ["outside-url", None, None, "The URL clients reach this server at (behind a proxy)."],
        ["restrict-modify", None, None,
         "Comma-separated users who alone may create and change users and indexes (root always may)."],
        ["mirror-creators", None, "root",
         "Who may create mirror indexes or set mirror_url: 'root' or 'users' (devpi's behaviour)."],
        ["mirror-cache-expiry", None, 1800, "Default seconds before a mirror page is revalidated.", int],
        ["max-upload-size", None, 1024 ** 3, "Largest request body (upload) in bytes; larger ones get 413.", int],
        ["doc-max-entries", None, 20000, "Most files a documentation zip may hold.", int],
        ["doc-max-size", None, 1024 ** 3, "Most bytes a documentation zip may unpack to.", int],
        ["root-passwd", None, None, "Password for root when the directory is initialised."],
        ["request-timeout", None, 5.0,
         "Seconds to wait for an upstream index to start answering (and between chunks, times 6).", float],
        ["upstream-ca", None, None,
         "PEM file of CA certificates trusted for upstream TLS, instead of the system's."],
        # operations (README "Deployment")
        ["shutdown-grace", None, 30.0,
         "Seconds requests in flight may take to finish after SIGTERM before they are cut off.", float],
        ["idle-timeout", None, 60.0, "Seconds a connection may stay silent between requests.", float],
        ["header-timeout", None, 30.0, "Seconds a client may take to send a request's line and headers.", float],
        ["body-timeout", None, 60.0,
         "Seconds a request body gets; it gets more while it keeps coming at --min-body-rate, "
         "else 408.", float],
        ["min-body-rate", None, 8192,
         "Bytes a second a request body must keep coming at, over each --body-timeout.", int],
        ["max-header-size", None, 16384, "Largest request line plus headers, in bytes.", int],
        ["max-connections", None, 500, "Most client connections open at once; more are answered 503.", int],
        ["max-upstream-fetches", None, 32, "Most requests to upstream indexes running at once.", int],
        ["login-max-failures", None, 5,
         "Failed logins of one user from one address within --login-window before 429 (0: no throttling).", int],
        ["login-user-failures", None, 50,
         "Failed logins of one user from all addresses within --login-window before 429, except from "
         "addresses the user has logged in from (0: no such limit).", int],
        ["login-addr-failures", None, 100,
         "Failed logins from one address (IPv6: one /64) for all users within --login-window before 429, "
         "except for users who have logged in from there (0: no such limit).", int],
        ["login-window", None, 60.0, "Seconds a failed login counts for throttling.", float],
        ["trusted-proxies", None, None,
         "Comma-separated addresses of reverse proxies whose X-Forwarded-For names the client."],
        ["page-cache-size", None, 256 * 1024 ** 2,
         "Most bytes of rendered simple pages and project lists kept in memory (least recently used "
         "go first; a page larger than this is rendered for each request).", int],
        ["json-log", None, None, "Also log JSON lines to this file ('-': standard output)."],
        ["blob-collect-interval", None, 3600.0,
         "Seconds between passes that free the disk space of files nothing refers to any more "
         "(deleted, overwritten); such a file goes after two to three intervals (0: only at startup).", float],
        # replication (README "Replication")
        ["primary-url", None, None,
         "Run as a replica of the devpi-twisted primary at this URL (an empty --serverdir is "
         "filled from it); writes sent here are forwarded to it."],
        ["secretfile", None, None,
         "File with the secret shared by a primary and its replicas (mode 0600, at least 32 bytes); "
         "signs login tokens and replication credentials. Default: the server directory's .secret "
         "(a replica needs it: give it a copy of the primary's)."],
        ["replica-poll-timeout", None, 25.0,
         "Seconds a replica's request for changes may wait on the primary (long poll).", float],
    ]
    optFlags = [
        ["no-root-pypi", None, "When initialising, do not create the root/pypi mirror."],
        ["offline-mode", None, "Never contact upstream indexes; mirrors list only cached files."],
        ["requests-only", None,
         "Run as an extra worker next to the main process on the same --serverdir: serve requests, "
         "run no background jobs (README \"Workers\")."],
        ["no-access-log", None, "Do not log a line per request."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, repeatable [default: tcp:3141:interface=127.0.0.1]."""
        self["listen"].append(description)

    def parseOptions(self, options: Any = None) -> None:
        try:
            self._applyEnvironment(os.environ)
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd, which would print the whole --help above the error.
            sys.stderr.write(f"devpi-twisted: {e} (see 'twistd devpi --help')\n")
            raise SystemExit(1)

    def _applyEnvironment(self, environ: Any) -> None:
        for long, _, _, _, *coerce in self.optParameters:
            name = ENV_PREFIX + long.upper().replace("-", "_")
            value = environ.get(name)
            if value is not None:
                try:
                    self[long] = coerce[0](value) if coerce else value
                except ValueError:
                    raise usage.UsageError(f"{name}={value!r} is not a valid value for --{long}")
        for long, _, _ in self.optFlags:
            value = environ.get(ENV_PREFIX + long.upper().replace("-", "_"))
            if value is not None:
                self[long] = 1 if value.strip().lower() in ("1", "true", "yes", "on") else 0
        listen = environ.get(ENV_PREFIX + "LISTEN")
        if listen:
            self._envListen = listen.split()

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = getattr(self, "_envListen", None) or [DEFAULT_LISTEN]
        if self["mirror-creators"] not in ("root", "users"):
            raise usage.UsageError("--mirror-creators must be 'root' or 'users'")
        if self["mirror-cache-expiry"] < 0:
            raise usage.UsageError("--mirror-cache-expiry must not be negative")
        if self["max-upload-size"] <= 0:
            raise usage.UsageError("--max-upload-size must be positive")
        if self["request-timeout"] <= 0:
            raise usage.UsageError("--request-timeout must be positive")
        if self["upstream-ca"] is not None and not os.path.isfile(self["upstream-ca"]):
            raise usage.UsageError(f"--upstream-ca: no such file {self['upstream-ca']!r}")
        for name in ("shutdown-grace", "idle-timeout", "header-timeout", "body-timeout", "login-window"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        for name in ("max-header-size", "max-connections", "max-upstream-fetches", "min-body-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["blob-collect-interval"] < 0:
            raise usage.UsageError("--blob-collect-interval must not be negative")
        for name in ("login-max-failures", "login-user-failures", "login-addr-failures"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        if self["page-cache-size"] < 0:
            raise usage.UsageError("--page-cache-size must not be negative")
        self._checkReplication()
        for description in self["listen"]:
            if description.startswith("ssl:") and "sslmethod=" in description:
                raise usage.UsageError(
                    f"--listen {description!r}: sslmethod is not supported; TLS 1.2 and 1.3 with "
                    "modern ciphers (Twisted's defaults) are always used"
                )

    def _checkReplication(self) -> None:
        from devpi_twisted.replica.client import checkPrimaryURL
        from devpi_twisted.app.serverdir import loadSecretFile

        if self["primary-url"] is not None:
            try:
                self["primary-url"] = checkPrimaryURL(self["primary-url"])
            except ValueError as e:
                raise usage.UsageError(f"--primary-url: {e}")
            if self["secretfile"] is None:
                raise usage.UsageError(
                    "a replica (--primary-url) needs --secretfile: a copy of the primary's secret "
                    "(its --secretfile, or the .secret in its server directory)"
                )
            if self["requests-only"]:
                raise usage.UsageError("--requests-only workers of a replica are not supported")
        if self["secretfile"] is not None:
            try:
                loadSecretFile(self["secretfile"])
            except ServerDirError as e:
                raise usage.UsageError(str(e))
        if not 0 < self["replica-poll-timeout"] <= 30:
            raise usage.UsageError("--replica-poll-timeout must be more than 0 and at most 30 seconds")

    def toConfig(self) -> ServerConfig:
        restrict = self["restrict-modify"]
        return ServerConfig(
            serverdir=serverdirPath(self["serverdir"]),
            listen=tuple(self["listen"]),
            storage=self["storage"],
            outsideURL=self["outside-url"].rstrip("/") if self["outside-url"] else None,
            policy=Policy(
                restrictModify=tuple(p.strip() for p in restrict.split(",") if p.strip())
                if restrict is not None
                else None,
                mirrorCreators=self["mirror-creators"],
            ),
            mirrorCacheExpiry=self["mirror-cache-expiry"],
            maxUploadSize=self["max-upload-size"],
            docMaxEntries=self["doc-max-entries"],
            docMaxSize=self["doc-max-size"],
            requestTimeout=self["request-timeout"],
            upstreamCA=self["upstream-ca"],
            offlineMode=bool(self["offline-mode"]),
            rootPassword=self["root-passwd"],
            requestsOnly=bool(self["requests-only"]),
            blobCollectInterval=self["blob-collect-interval"],
            shutdownGrace=self["shutdown-grace"],
            idleTimeout=self["idle-timeout"],
            headerTimeout=self["header-timeout"],
            bodyTimeout=self["body-timeout"],
            minBodyRate=self["min-body-rate"],
            maxHeaderSize=self["max-header-size"],
            maxConnections=self["max-connections"],
            maxUpstreamFetches=self["max-upstream-fetches"],
            loginMaxFailures=self["login-max-failures"],
            loginWindow=self["login-window"],
            loginMaxUserFailures=self["login-user-failures"],
            loginMaxAddressFailures=self["login-addr-failures"],
            trustedProxies=tuple(p.strip() for p in (self["trusted-proxies"] or "").split(",") if p.strip()),
            pageCacheSize=self["page-cache-size"],
            accessLog=not self["no-access-log"],
            jsonLog=self["json-log"],
            primaryURL=self["primary-url"],
            secretFile=os.path.abspath(self["secretfile"]) if self["secretfile"] else None,
            replicaPollTimeout=self["replica-poll-timeout"],
        )


class StorageService(Service):
    """
    Cleans up after an interrupted run on start; closes the store on stop.

    With a C{clock}, it also shares the directory with C{--requests-only}
    workers: the cleanup runs only while no worker does (and keeps them
    from starting meanwhile), and once workers are seen the storage follows
    their commits.  A worker (C{requestsOnly}) runs no cleanup and follows
    the other processes' commits from the start.
    """

    log = Logger()

    def __init__(self, serverdir: ServerDir, storage: Any, blobs: Any, clock: Any = None,
                 requestsOnly: bool = False) -> None:
        self._serverdir = serverdir
        self._storage = storage
        self._blobs = blobs
        self._clock = clock
        self._requestsOnly = requestsOnly
        self._workersCheck: Any = None
        self._ready = False
        self._readyWaiters: list[Deferred[None]] = []

    def whenReady(self) -> "Deferred[None]":
        """Fires once the startup cleanup is over (at once without one): storage may be written."""
        waiter: Deferred[None] = Deferred()
        if self._ready:
            waiter.callback(None)
        else:
            self._readyWaiters.append(waiter)
        return waiter

    def _setReady(self) -> None:
        self._ready = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _recover(self) -> None:
        referenced = await self._storage.referencedBlobs()
        removed = await self._blobs.deleteUnreferenced(referenced)
        if removed:
            self.log.warn(
                "startup cleanup removed {removed} unfinished or unreferenced files from {path}",
                removed=removed, path=self._serverdir.path.path,
            )
        self.log.info(
            "storage ready at serial {serial} in {path}",
            serial=self._storage.currentSerial(), path=self._serverdir.path.path,
        )

    def startService(self) -> None:
        super().startService()
        if self._requestsOnly:
            self._setReady()
            self._followOthers()
            self.log.info("requests-only worker on {path} at serial {serial}: serving requests, no background jobs",
                          path=self._serverdir.path.path, serial=self._storage.currentSerial())
            return
        if self._clock is not None and not self._serverdir.holdOutWorkers():
            self.log.info("requests-only workers are running on {path}: no startup cleanup this time",
                          path=self._serverdir.path.path)
            self._setReady()
            self._followOthers()
            return
        d = Deferred.fromCoroutine(self._recover())
        d.addErrback(lambda f: self.log.failure("startup cleanup failed", failure=f))
        d.addCallback(lambda _: self._setReady())
        if self._clock is not None:
            d.addCallback(lambda _: self._watchForWorkers())

    def _watchForWorkers(self) -> None:
        from twisted.internet.task import LoopingCall

        self._serverdir.releaseWorkers()
        if not self.running:
            return
        self._workersCheck = LoopingCall(self._checkWorkers)
        self._workersCheck.clock = self._clock
        self._workersCheck.start(0.2, now=True)  # one flock(2) call: cheap

    def _checkWorkers(self) -> None:
        if self._serverdir.workersRunning():
            self.log.info("requests-only workers joined: following their commits")
            self._stopWorkersCheck()
            self._followOthers()

    def _stopWorkersCheck(self) -> None:
        check, self._workersCheck = self._workersCheck, None
        if check is not None and check.running:
            check.stop()

    def _followOthers(self) -> None:
        startWatching = getattr(self._storage, "startWatching", None)
        if startWatching is None:
            self.log.warn("this storage backend cannot follow other processes' commits; caches may be stale")
        else:
            startWatching(self._clock)

    def stopService(self) -> Any:
        super().stopService()
        self._stopWorkersCheck()
        d = self._storage.close()
        d.addBoth(lambda result: self._serverdir.unlock() or result)
        return d


def openServerDir(config: ServerConfig, noRootPypi: bool = False) -> ServerDir:
    """
    Open (initialising when empty), check and lock the server directory; a
    C{--requests-only} worker waits for the main process to initialise it,
    and shares it.
    """
    serverdir = ServerDir(config.serverdir)
    if config.requestsOnly:
        import time

        deadline = time.monotonic() + 30
        while not serverdir.isInitialised():
            if time.monotonic() > deadline:
                raise ServerDirError(
                    f"{config.serverdir.path} is not initialised; a --requests-only worker needs the "
                    "main server (or 'devpi-twisted init') to create it first"
                )
            time.sleep(0.2)
    if config.primaryURL is not None:
        return _openReplicaDir(config, serverdir)
    if not serverdir.isInitialised():
        serverdir = createServerDir(
            config.serverdir, config.storage, config.rootPassword,
            rootPypi=not noRootPypi, mirrorURL=PYPI_URL, cacheExpiry=config.mirrorCacheExpiry,
        )
    serverdir.checkFormat()
    if serverdir.nodeinfo().get("role") == "replica":
        raise ServerDirError(
            f"{config.serverdir.path} is the server directory of a replica of "
            f"{serverdir.nodeinfo().get('primary-url')}; start it with --primary-url and --secretfile"
        )
    stored = serverdir.nodeinfo().get("storage", "sqlite")
    if stored != config.storage:
        raise ServerDirError(
            f"{config.serverdir.path} uses the storage backend {stored!r}, not {config.storage!r}"
        )
    if config.requestsOnly:
        serverdir.lockAsWorker()
    else:
        serverdir.lock()
    return serverdir


def _openReplicaDir(config: ServerConfig, serverdir: ServerDir) -> ServerDir:
    """A replica's directory: created empty (its state comes from the primary), or one of a replica."""
    assert config.primaryURL is not None
    if not serverdir.isInitialised():
        serverdir = createReplicaDir(config.serverdir, config.storage, config.primaryURL)
    serverdir.checkFormat()
    info = serverdir.nodeinfo()
    if info.get("role") != "replica":
        raise ServerDirError(
            f"{config.serverdir.path} is the server directory of a {info.get('role', 'standalone')} server; "
            "a replica (--primary-url) starts from an empty directory"
        )
    if info.get("storage", "sqlite") != config.storage:
        raise ServerDirError(
            f"{config.serverdir.path} uses the storage backend {info.get('storage')!r}, not {config.storage!r}"
        )
    serverdir.lock()
    return serverdir


class _PoolService(Service):
    """Closes the upstream connection pool when the server stops."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self._pool.closeCachedConnections()


def makeMirrors(config: ServerConfig, storage: Any, blobs: Any, reactor: Any,
                stats: UpstreamStats | None = None, filesElsewhere: Any = None) -> Mirrors:
    """
    The mirror coordinator with its own connection pool and TLS policy; at
    most C{--max-upstream-fetches} upstream requests at once, counted in
    C{stats}.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    policy = upstreamTLSPolicy(config.upstreamCA)
    agent = RedirectAgent(Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=config.requestTimeout))
    stats = stats if stats is not None else UpstreamStats(config.maxUpstreamFetches)
    slots = DeferredSemaphore(config.maxUpstreamFetches)
    idle = config.requestTimeout * 6
    fileAgent = LimitedAgent(agent, slots, reactor, "file", stats, releaseAfter=idle)
    pageAgent = LimitedAgent(ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)]), slots, reactor, "page", stats,
                             releaseAfter=idle)
    upstream = UpstreamClient(fileAgent, pageAgent, reactor, timeout=config.requestTimeout,
                              idleTimeout=config.requestTimeout * 6)
    mirrors = Mirrors(storage, blobs, upstream, reactor, offlineMode=config.offlineMode,
                      filesElsewhere=filesElsewhere)
    _PoolService(pool).setServiceParent(mirrors)
    return mirrors


def makeReplica(config: ServerConfig, serverdir: ServerDir, storageService: StorageService, storage: Any,
                blobs: Any, secret: bytes, reactor: Any, runner: ThreadRunner) -> tuple[ReplicaService, Agent]:
    """
    The follower of C{--primary-url}, in a service with its connection pool,
    and the agent the forwarding proxy shares with it.
    """
    from twisted.web.client import _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False  # no "Starting factory" lines for every connection to the primary

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    pool._factory = QuietFactory
    from devpi_twisted.mirror.upstream import upstreamTLSPolicy

    # --upstream-ca, when given, is trusted for an https primary as well
    agent = Agent(reactor, contextFactory=upstreamTLSPolicy(config.upstreamCA), pool=pool, connectTimeout=10)
    nodeinfo = serverdir.nodeinfo()
    assert config.primaryURL is not None
    client = PrimaryClient(HTTPClient(agent), config.primaryURL, secret, reactor, nodeinfo["uuid"])
    replica = ReplicaService(
        storage, blobs, client, reactor, pollTimeout=config.replicaPollTimeout,
        primaryUUID=nodeinfo.get("primary-uuid"),
        rememberPrimaryUUID=lambda uuid: runner.runFile(serverdir.updateNodeinfo, {"primary-uuid": uuid}),
        ready=storageService.whenReady,
    )
    container = MultiService()
    _PoolService(pool).setServiceParent(container)
    replica.setServiceParent(container)
    return replica, agent


def makeService(options: Options, reactor: Any = None, checkListen: bool | None = None) -> MultiService:
    """
    Build the whole server from its options.  C{checkListen}: first try
    binding each C{--listen} address (default: when run by twistd, not with
    a reactor given by a test).
    """
    if checkListen is None:
        checkListen = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    config = options.toConfig()
    # Endpoints are parsed (key and certificate files read) before anything
    # is opened; the site is given to them below.
    listeners = []
    for description in config.listen:
        try:
            listener = strports.service(description, None, reactor=reactor)
            if description.startswith("tls:"):
                # Twisted's parser checked the string; ours re-reads renewed certificates.
                listener.endpoint = tlsDirectoryEndpoint(reactor, description)
            listeners.append(listener)
        except Exception as e:
            sys.stderr.write(f"devpi-twisted: {listenSyntaxError(description, e)}\n")
            raise SystemExit(1)
    # Before the directory is initialised: a first start that cannot listen
    # must not spend the one showing of root's generated password.
    for description in config.listen if checkListen else ():
        problem = bindProblem(description)
        if problem is not None:
            sys.stderr.write(f"devpi-twisted: {problem}\n")
            raise SystemExit(1)
    try:
        serverdir = openServerDir(config, noRootPypi=bool(options["no-root-pypi"]))
        backend = findBackend(config.storage)
    except (ServerDirError, StorageError) as e:
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    # Stopped one child at a time, last first: listeners and requests in
    # flight, then mirrors, storage, threads (devpi_twisted.app.shutdown).
    top = SequentialStopService()
    if config.jsonLog:
        JSONLogService(config.jsonLog).setServiceParent(top)
    runner = ThreadRunner(reactor)
    runner.setServiceParent(top)
    storage, blobs = backend.open(serverdir.path, runner, Logger())
    storageService = StorageService(serverdir, storage, blobs, reactor, config.requestsOnly)
    storageService.setServiceParent(top)
    followerStorage = storage
    collector = None
    if not config.requestsOnly and config.blobCollectInterval > 0:
        # Stopped before storage (children stop last first).
        collector = BlobCollector(storage, blobs, reactor, config.blobCollectInterval,
                                  ready=storageService.whenReady)
        collector.setServiceParent(top)
    if config.primaryURL is not None:
        storage = ReadOnlyStorage(storage)  # on a replica only the follower writes

    try:
        secret = loadSecretFile(config.secretFile) if config.secretFile else serverdir.secret()
    except ServerDirError as e:
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    throttle = LoginThrottle(reactor, config.loginMaxFailures, config.loginWindow,
                             config.loginMaxUserFailures, config.loginMaxAddressFailures)
    auth = Authenticator(storage, runner.runFile, secret, reactor, throttle=throttle)
    upstreamStats = UpstreamStats(config.maxUpstreamFetches)
    feed = ChangelogFeed(storage, blobs, secret, reactor)
    replica = None
    if config.primaryURL is not None:
        replica, primaryAgent = makeReplica(config, serverdir, storageService, followerStorage, blobs, secret, reactor,
                                            runner)
        replica.feed = feed
    # A replica never asks upstream: its primary does, and the files
    # replicate; while the primary answers, it serves the files not here yet.
    mirrorConfig = replace(config, offlineMode=True) if config.primaryURL else config
    realMirrors = makeMirrors(mirrorConfig, storage, blobs, reactor, upstreamStats,
                              filesElsewhere=replica.isReachable if replica is not None else None)
    realMirrors.setServiceParent(top)
    if replica is not None:
        replica.parent.setServiceParent(top)
    metrics = Metrics(RouteLabeler(Routes.app.url_map), storage=storage, mirrors=realMirrors,
                      throttle=throttle, upstream=upstreamStats, version=__version__)
    mirrors = CountingMirrors(realMirrors, metrics)
    nodeinfo = serverdir.nodeinfo()
    registry = makeRegistry(metrics)
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
    # A replica forwards uploads to its primary, which decides.
    bodyGate = UploadGate(auth, releases, blobs, Routes.app.url_map) if replica is None else None
    resource = makeWebResource(
        config=config,
        nodeinfo=nodeinfo,
        storage=storage,
        blobs=blobs,
        auth=auth,
        users=Users(storage, auth, config.policy),
        indexes=Indexes(storage, config.policy, config.mirrorCacheExpiry),
        releases=releases,
        pages=pages,
        mirrors=mirrors,
        pushAgent=pushClient(reactor),
        version=__version__,
        metrics=MetricsView(metrics, registry),
        changelog=feed,
        replication=replica,
        runFile=runner.runFile,
    )
    if replica is not None:
        resource = ReplicaProxyResource(resource, primaryAgent, replica.primaryURL, storage, blobs, reactor,
                                        replica, config.outsideURL)
    requestClass = limitedRequestFactory(
        config.maxUploadSize,
        [(b"X-Devpi-Api-Version", b"2"), (b"X-Devpi-Uuid", nodeinfo["uuid"].encode()),
         (b"X-Content-Type-Options", b"nosniff")],
        base=DevpiRequest,
        spoolDirectory=serverdir.spoolDirectory().path,
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
    web = WebService(DrainService(site, config.shutdownGrace))
    for listener in listeners:
        listener.factory = site
        web.addListener(listener)
    FeedStopper(feed).setServiceParent(web)  # stopped first: long polls must not hold up the drain
    web.setServiceParent(top)
    ExitZeroOnSIGTERM(reactor).setServiceParent(top)
    return top
