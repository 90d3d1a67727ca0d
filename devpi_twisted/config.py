"""
The server's configuration: a frozen, typed record built from the options.
"""

import os
from dataclasses import dataclass

from twisted.python.filepath import FilePath

from devpi_twisted.model.acl import Policy

DEFAULT_LISTEN = "tcp:3141:interface=127.0.0.1"
DEFAULT_SERVERDIR = os.path.join("~", ".devpi-twisted", "server")


@dataclass(frozen=True)
class BackendSettings:
    """
    Where the state and the files live: the C{--storage} and C{--blobs}
    plugins and their options.  The two choices are independent.
    """

    storage: str = "sqlite"  # metadata: "sqlite" (embedded) or "postgresql"
    blobs: str = "files"  # file contents: "files" (server directory) or "s3"
    pgDSN: str | None = None  # libpq connection string or postgresql:// URI
    s3Endpoint: str | None = None  # None: AWS's own endpoints
    s3Bucket: str | None = None
    s3Region: str | None = None
    s3Prefix: str = ""
    s3Redirect: bool = False  # answer file requests with presigned URLs

    @property
    def shared(self) -> bool:
        """Whether other nodes may share this state (so nothing is cleaned up as if alone)."""
        return self.storage != "sqlite" or self.blobs != "files"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the services need to know, checked and converted."""

    serverdir: FilePath
    listen: tuple[str, ...]
    backend: BackendSettings = BackendSettings()
    outsideURL: str | None = None
    policy: Policy = Policy()
    mirrorCacheExpiry: int = 1800
    maxUploadSize: int = 1024 ** 3
    requestTimeout: float = 5.0
    upstreamCA: str | None = None
    offlineMode: bool = False
    docMaxEntries: int = 20000
    docMaxSize: int = 1024 ** 3
    rootPassword: str | None = None
    # replication (README "Replication")
    primaryURL: str | None = None  # set: this server is a replica of that primary
    secretFile: str | None = None  # the secret shared with replicas / the primary
    replicaPollTimeout: float = 25.0
    requestsOnly: bool = False  # a --requests-only worker (README "Workers")
    webhookAllowPrivate: bool = False  # webhooks may reach loopback/private addresses (README "Events and webhooks")
    workers: int = 1  # serving processes on this machine (--workers; README "Scaling out")
    blobCollectInterval: float = 3600.0  # 0: unreferenced files are removed only at startup
    historyKeep: float = 7 * 24 * 3600.0  # seconds of history kept (README "Retention")
    historyPruneInterval: float = 3600.0  # 0: history is never pruned
    retentionInterval: float = 86400.0  # seconds between scheduled retention runs; 0: none (README "Retention")
    # operations: limits, shutdown, logs (README "Deployment")
    shutdownGrace: float = 30.0
    idleTimeout: float = 60.0
    headerTimeout: float = 30.0
    bodyTimeout: float = 60.0
    minBodyRate: int = 8192
    maxHeaderSize: int = 16384
    maxConnections: int = 500
    maxUpstreamFetches: int = 32
    loginMaxFailures: int = 5
    loginWindow: float = 60.0
    loginMaxUserFailures: int = 50
    loginMaxAddressFailures: int = 100
    trustedProxies: tuple[str, ...] = ()
    pageCacheSize: int = 256 * 1024 * 1024
    accessLog: bool = True
    jsonLog: str | None = None


def serverdirPath(value: str | None) -> FilePath:
    return FilePath(os.path.abspath(os.path.expanduser(value or DEFAULT_SERVERDIR)))
