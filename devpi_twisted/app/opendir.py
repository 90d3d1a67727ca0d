"""
The server directory at startup: opened, initialised when empty, checked
against the options, and locked (shared, for a C{--requests-only} worker).

Apart from L{devpi_twisted.app.serverdir}, which the admin commands that
initialise a directory build on.
"""

from devpi_twisted.admin.initstate import PYPI_URL, createReplicaDir, createServerDir
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.config import ServerConfig
from devpi_twisted.errors import ServerDirError


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
            config.serverdir, config.backend, config.rootPassword,
            rootPypi=not noRootPypi, mirrorURL=PYPI_URL, cacheExpiry=config.mirrorCacheExpiry,
        )
    serverdir.checkFormat()
    if serverdir.nodeinfo().get("role") == "replica":
        raise ServerDirError(
            f"{config.serverdir.path} is the server directory of a replica of "
            f"{serverdir.nodeinfo().get('primary-url')}; start it with --primary-url and --secretfile"
        )
    serverdir.checkBackend(config.backend)
    if config.requestsOnly:
        serverdir.lockAsWorker()
    else:
        serverdir.lock()
    return serverdir


def _openReplicaDir(config: ServerConfig, serverdir: ServerDir) -> ServerDir:
    """A replica's directory: created empty (its state comes from the primary), or one of a replica."""
    assert config.primaryURL is not None
    if not serverdir.isInitialised():
        serverdir = createReplicaDir(config.serverdir, config.backend, config.primaryURL)
    serverdir.checkFormat()
    info = serverdir.nodeinfo()
    if info.get("role") != "replica":
        raise ServerDirError(
            f"{config.serverdir.path} is the server directory of a {info.get('role', 'standalone')} server; "
            "a replica (--primary-url) starts from an empty directory"
        )
    serverdir.checkBackend(config.backend)
    serverdir.lock()
    return serverdir
