"""
The twistd plugin's options and C{makeService}: the only composition root.

This is the one module that picks concrete classes and may import the global
reactor; everything below it receives its collaborators.
"""

import os
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.ssl import Certificate
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    RedirectAgent,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from . import __version__
from .auth import Authenticator
from .config import DEFAULT_LISTEN, DEFAULT_SERVERDIR, ServerConfig, serverdirPath
from .errors import ServerDirError, StorageError
from .indexes import Indexes
from .initstate import PYPI_URL, createServerDir
from .mirror.service import Mirrors
from .mirror.upstream import UpstreamClient
from .model.acl import Policy
from .serverdir import ServerDir
from .storage.plugin import findBackend
from .storage.threads import ThreadRunner
from .releases import Releases
from .simple import SimplePages
from .users import Users
from .web.limits import limitedRequestFactory
from .web.routes import makeWebResource

ENV_PREFIX = "DEVPI_TWISTED_"


class Options(usage.Options):
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
    ]
    optFlags = [
        ["no-root-pypi", None, "When initialising, do not create the root/pypi mirror."],
        ["offline-mode", None, "Never contact upstream indexes; mirrors list only cached files."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, repeatable [default: tcp:3141:interface=127.0.0.1]."""
        self["listen"].append(description)

    def parseOptions(self, options: Any = None) -> None:
        self._applyEnvironment(os.environ)
        super().parseOptions(options)

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
        )


class StorageService(Service):
    """Cleans up after an interrupted run on start; closes the store on stop."""

    log = Logger()

    def __init__(self, serverdir: ServerDir, storage: Any, blobs: Any) -> None:
        self._serverdir = serverdir
        self._storage = storage
        self._blobs = blobs

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
        Deferred.fromCoroutine(self._recover()).addErrback(
            lambda f: self.log.failure("startup cleanup failed", failure=f)
        )

    def stopService(self) -> Any:
        super().stopService()
        d = self._storage.close()
        d.addBoth(lambda result: self._serverdir.unlock() or result)
        return d


def openServerDir(config: ServerConfig, noRootPypi: bool = False) -> ServerDir:
    """Open (initialising when empty), check and lock the server directory."""
    serverdir = ServerDir(config.serverdir)
    if not serverdir.isInitialised():
        serverdir = createServerDir(
            config.serverdir, config.storage, config.rootPassword,
            rootPypi=not noRootPypi, mirrorURL=PYPI_URL, cacheExpiry=config.mirrorCacheExpiry,
        )
    serverdir.checkFormat()
    stored = serverdir.nodeinfo().get("storage", "sqlite")
    if stored != config.storage:
        raise ServerDirError(
            f"{config.serverdir.path} uses the storage backend {stored!r}, not {config.storage!r}"
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


def makeMirrors(config: ServerConfig, storage: Any, blobs: Any, reactor: Any) -> Mirrors:
    """The mirror coordinator with its own connection pool and TLS policy."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    if config.upstreamCA:
        with open(config.upstreamCA, "rb") as f:
            policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))
    else:
        policy = BrowserLikePolicyForHTTPS()
    agent = RedirectAgent(Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=config.requestTimeout))
    pageAgent = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])
    upstream = UpstreamClient(agent, pageAgent, reactor, timeout=config.requestTimeout,
                              idleTimeout=config.requestTimeout * 6)
    mirrors = Mirrors(storage, blobs, upstream, reactor, offlineMode=config.offlineMode)
    _PoolService(pool).setServiceParent(mirrors)
    return mirrors


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build the whole server from its options."""
    if reactor is None:
        from twisted.internet import reactor
    config = options.toConfig()
    try:
        serverdir = openServerDir(config, noRootPypi=bool(options["no-root-pypi"]))
        backend = findBackend(config.storage)
    except (ServerDirError, StorageError) as e:
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    top = MultiService()
    runner = ThreadRunner(reactor)
    runner.setServiceParent(top)
    storage, blobs = backend.open(serverdir.path, runner, Logger())
    StorageService(serverdir, storage, blobs).setServiceParent(top)

    auth = Authenticator(storage, runner.runFile, serverdir.secret(), reactor)
    mirrors = makeMirrors(config, storage, blobs, reactor)
    mirrors.setServiceParent(top)
    nodeinfo = serverdir.nodeinfo()
    resource = makeWebResource(
        config=config,
        nodeinfo=nodeinfo,
        storage=storage,
        blobs=blobs,
        auth=auth,
        users=Users(storage, auth, config.policy),
        indexes=Indexes(storage, config.policy, config.mirrorCacheExpiry),
        releases=Releases(storage, reactor.seconds),
        pages=SimplePages(storage, mirrors),
        mirrors=mirrors,
        pushAgent=RedirectAgent(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS())),
        version=__version__,
    )
    site = Site(resource, reactor=reactor, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    site.requestFactory = limitedRequestFactory(
        config.maxUploadSize, [(b"X-Devpi-Api-Version", b"2"), (b"X-Devpi-Uuid", nodeinfo["uuid"].encode())]
    )
    for description in config.listen:
        strports.service(description, site, reactor=reactor).setServiceParent(top)
    return top
