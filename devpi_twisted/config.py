"""
The server's configuration: a frozen, typed record built from the options.
"""

import os
from dataclasses import dataclass

from twisted.python.filepath import FilePath

from .model.acl import Policy

DEFAULT_LISTEN = "tcp:3141:interface=127.0.0.1"
DEFAULT_SERVERDIR = os.path.join("~", ".devpi-twisted", "server")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the services need to know, checked and converted."""

    serverdir: FilePath
    listen: tuple[str, ...]
    storage: str = "sqlite"
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


def serverdirPath(value: str | None) -> FilePath:
    return FilePath(os.path.abspath(os.path.expanduser(value or DEFAULT_SERVERDIR)))
