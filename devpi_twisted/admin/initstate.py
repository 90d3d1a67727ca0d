"""
Creating a new server directory with its first state: the root user and,
unless asked not to, the C{root/pypi} mirror.  Shared by C{devpi-twisted init}
and by C{twistd devpi} on an empty directory.
"""

import secrets
import sys
from typing import Any, TextIO

from twisted.python.filepath import FilePath

from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.interfaces import IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.app.serverdir import ServerDir, checkCanInitialise, initialise
from devpi_twisted.config import BackendSettings
from devpi_twisted.storage.plugin import findBackend, findBlobBackend, openBackends
from devpi_twisted.storage.threads import SynchronousRunner
from devpi_twisted.model.timeutil import isoNow

PYPI_URL = "https://pypi.org/simple/"


def rootPypiConfig(mirrorURL: str, cacheExpiry: int) -> dict[str, Any]:
    return {
        "type": "mirror",
        "volatile": False,
        "title": "PyPI",
        "mirror_url": mirrorURL,
        "mirror_web_url_fmt": "https://pypi.org/project/{name}/",
        "mirror_cache_expiry": cacheExpiry,
    }


def createServerDir(
    path: FilePath,
    backend: BackendSettings,
    rootPassword: str | None,
    rootPypi: bool = True,
    mirrorURL: str = PYPI_URL,
    cacheExpiry: int = 1800,
    out: TextIO = sys.stderr,
) -> ServerDir:
    """
    Initialise C{path}.  Without C{rootPassword} a strong one is generated
    and printed once to C{out}; only its hash is kept.

    With a shared backend that another node (or C{devpi-twisted init})
    has initialised already, the new directory joins that state: nothing
    is written to it and no password is made.
    """
    checkCanInitialise(path)
    findBackend(backend.storage)
    findBlobBackend(backend.blobs)
    generated = rootPassword is None
    if rootPassword is None:
        rootPassword = secrets.token_urlsafe(18)
    pwhash = PasswordHashing().hash(rootPassword)
    created: list[bool] = []

    def populate(directory: FilePath) -> None:
        storage, _ = openBackends(backend, directory, SynchronousRunner())

        def _initial(txn: IWriteTransaction) -> bool:
            if txn.serial >= 0 or txn.get(keys.userKey("root")) is not None:
                return False  # a shared state someone initialised already
            txn.set(keys.userKey("root"), {"pwhash": pwhash, "created": isoNow()})
            if rootPypi:
                txn.set(keys.indexKey("root", "pypi"), rootPypiConfig(mirrorURL, cacheExpiry))
            return True

        failures: list[Any] = []
        storage.write(_initial).addCallbacks(lambda outcome: created.append(outcome[1]), failures.append)
        storage.close().addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    serverdir = initialise(path, backend, populate)
    if not created or not created[0]:
        out.write("devpi-twisted: joined the existing state of the shared storage (root and its "
                  "password are as they were)\n")
    elif generated:
        out.write(
            "devpi-twisted: created user 'root' with the generated password\n"
            f"    {rootPassword}\n"
            "It is shown only this once; change it with 'devpi-twisted passwd root'.\n"
        )
    elif rootPassword == "":
        out.write("devpi-twisted: WARNING: user 'root' has an EMPTY password; use this for tests only\n")
    return serverdir


def createReplicaDir(path: FilePath, backend: BackendSettings, primaryURL: str) -> ServerDir:
    """
    Initialise C{path} for a replica of C{primaryURL}: an empty state (no
    root user, no mirror), since every change comes from the primary.
    """
    checkCanInitialise(path)

    def populate(directory: FilePath) -> None:
        storage, _ = openBackends(backend, directory, SynchronousRunner())
        failures: list[Any] = []
        storage.close().addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    return initialise(path, backend, populate, {"role": "replica", "primary-url": primaryURL})
