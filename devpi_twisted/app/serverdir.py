"""
The server directory: its format, identity, signing secret and lock.

Layout (besides what the storage backend keeps):
  - C{.serverversion}: C{devpi-twisted <format>}; written last by init, so a
    directory without it was never completely initialised;
  - C{.nodeinfo}: JSON C{{"uuid", "role", "storage"}};
  - C{.secret}: the token signing secret, mode 0600;
  - C{.lock}: held (flock) by the one server process using the directory;
  - C{.workers.lock}: shared by C{--requests-only} workers (see L{ServerDir.lockAsWorker}).
"""

import fcntl
from contextlib import contextmanager
import json
import os
import secrets
import time
import uuid
from typing import Any, Iterator, Callable

from twisted.python.filepath import FilePath

from devpi_twisted.errors import ServerDirError

FORMAT = 1
FORMAT_TEXT = f"devpi-twisted {FORMAT}"


class ServerDir:
    """An initialised server directory."""

    def __init__(self, path: FilePath) -> None:
        self.path = path
        self._lockFile: Any = None
        self._workersFile: Any = None

    def isInitialised(self) -> bool:
        return self.path.child(".serverversion").exists()

    def isEmpty(self) -> bool:
        return not self.path.exists() or (self.path.isdir() and not self.path.listdir())

    def checkFormat(self) -> None:
        """Refuse a directory of another format, saying how to move the data."""
        try:
            text = self.path.child(".serverversion").getContent().decode("utf-8").strip()
        except OSError as e:
            raise ServerDirError(f"{self.path.path} is not a devpi-twisted server directory: {e}")
        if text != FORMAT_TEXT:
            raise ServerDirError(
                f"{self.path.path} has format {text!r}, this version needs {FORMAT_TEXT!r}. "
                "Move the data with 'devpi-twisted export DIR' using the version that wrote it, "
                "then 'devpi-twisted import DIR' into a new server directory."
            )

    def lock(self) -> None:
        """Take the directory for this process, or refuse if another server has it."""
        handle = open(self.path.child(".lock").path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ServerDirError(
                f"another devpi-twisted server is already using {self.path.path}; "
                "stop it first, or give this one another --serverdir"
            )
        self._lockFile = handle

    def unlock(self) -> None:
        if self._lockFile is not None:
            self._lockFile.close()
            self._lockFile = None
        self.releaseWorkers()

    # --requests-only workers share the directory: each holds a shared lock
    # on .workers.lock; maintenance commands and the main process's startup
    # cleanup need it exclusively.

    def _tryWorkersLock(self, exclusive: bool) -> Any:
        handle = open(self.path.child(".workers.lock").path, "a+")
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def lockForMaintenance(self) -> None:
        """L{lock}, and refuse as well while C{--requests-only} workers use the directory."""
        self.lock()
        if not self.holdOutWorkers():
            self.unlock()
            raise ServerDirError(
                f"devpi-twisted --requests-only workers are using {self.path.path}; stop them first"
            )

    def lockAsWorker(self, timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """
        Share the directory as a C{--requests-only} worker, waiting up to
        C{timeout} seconds while a maintenance command or the main process's
        startup cleanup holds it.
        """
        deadline = time.monotonic() + timeout
        while True:
            handle = self._tryWorkersLock(exclusive=False)
            if handle is not None:
                self._workersFile = handle
                return
            if time.monotonic() > deadline:
                raise ServerDirError(
                    f"{self.path.path} is busy (a maintenance command, or the main server's "
                    "startup cleanup); try again"
                )
            sleep(0.1)

    def holdOutWorkers(self) -> bool:
        """
        Keep workers from starting, if none is running.  @return: whether
        they are held out (until L{releaseWorkers}).
        """
        handle = self._tryWorkersLock(exclusive=True)
        if handle is None:
            return False
        self.releaseWorkers()
        self._workersFile = handle
        return True

    def releaseWorkers(self) -> None:
        handle = self._workersFile
        if handle is not None:
            handle.close()
            self._workersFile = None

    def workersRunning(self) -> bool:
        """Whether any C{--requests-only} worker uses the directory now."""
        handle = self._tryWorkersLock(exclusive=True)
        if handle is None:
            return True
        handle.close()
        return False

    def nodeinfo(self) -> dict[str, Any]:
        return json.loads(self.path.child(".nodeinfo").getContent())

    def checkBackend(self, settings: Any) -> Any:
        """
        C{settings} (L{devpi_twisted.config.BackendSettings}), when they
        choose the backends this directory was made with; else
        L{ServerDirError} saying which those are.
        """
        return _checkBackendOf(self.nodeinfo(), self.path.path, settings)

    def updateNodeinfo(self, changes: dict[str, Any]) -> None:
        """Change entries of C{.nodeinfo}, atomically (blocking: call from a thread)."""
        info = self.nodeinfo()
        info.update(changes)
        target = self.path.child(".nodeinfo")
        temporary = self.path.child(f".nodeinfo.{secrets.token_hex(4)}")
        _writeFile(temporary, json.dumps(info).encode())
        os.rename(temporary.path, target.path)

    def secret(self) -> bytes:
        return self.path.child(".secret").getContent().strip()

    def spoolDirectory(self) -> FilePath:
        """Where request bodies wait until they are handled (created if missing)."""
        spool = self.path.child("+spool")
        spool.makedirs(ignoreExistingDirectory=True)
        return spool


MIN_SECRET_SIZE = 32


def loadSecretFile(path: str) -> bytes:
    """
    The secret in C{path} (C{--secretfile}), refusing a file other users
    may read or one too short to be a secret.

    @raise ServerDirError: saying what is wrong and how to fix it.
    """
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ServerDirError(f"--secretfile {path!r} cannot be read: {e.strerror or e}")
    if mode & 0o077:
        raise ServerDirError(
            f"--secretfile {path!r} may be read by other users (mode {mode & 0o777:04o}); "
            f"run 'chmod 600 {path}'"
        )
    if len(secret) < MIN_SECRET_SIZE:
        raise ServerDirError(
            f"--secretfile {path!r} holds {len(secret)} bytes; a secret needs at least {MIN_SECRET_SIZE} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    return secret


def _writeFile(path: FilePath, content: bytes, mode: int = 0o644) -> None:
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def builtInPlace(target: FilePath, purpose: str) -> Iterator[FilePath]:
    """
    A new directory built in a temporary sibling and renamed to C{target}
    (missing or empty) when the block ends, or removed when it raises: so
    C{target} is either complete or untouched.
    """
    target.parent().makedirs(ignoreExistingDirectory=True)
    building = target.sibling(f".{target.basename()}.{purpose}-{secrets.token_hex(4)}")
    building.makedirs()
    try:
        yield building
        if target.exists():
            os.rmdir(target.path)
        os.rename(building.path, target.path)
    except BaseException:
        if building.exists():
            building.remove()
        raise


def checkCanInitialise(path: FilePath) -> None:
    """Raise L{ServerDirError} unless C{path} is missing or an empty directory."""
    target = ServerDir(path)
    if target.isInitialised():
        raise ServerDirError(f"{path.path} is already initialised; nothing was changed")
    if not target.isEmpty():
        raise ServerDirError(
            f"{path.path} is not empty and not a devpi-twisted server directory; "
            "choose an empty or new directory"
        )


def _checkBackendOf(info: dict[str, Any], path: str, settings: Any) -> Any:
    stored = (info.get("storage", "sqlite"), info.get("blobs", "files"))
    if stored != (settings.storage, settings.blobs):
        raise ServerDirError(
            f"{path} was made with --storage {stored[0]} --blobs {stored[1]}, not "
            f"--storage {settings.storage} --blobs {settings.blobs}; give the options it was made with"
        )
    return settings


def initialise(
    path: FilePath,
    backend: Any,
    populate: Callable[[FilePath], None],
    nodeinfo: dict[str, Any] | None = None,
) -> ServerDir:
    """
    Create a server directory at C{path}, which must be missing or empty.

    Everything is built in a temporary sibling directory and renamed into
    place at the end, so an interrupted init leaves nothing half-made at
    C{path}.

    @param populate: writes the initial state (root user, root/pypi) into
        the storage of the directory it is given.
    @param nodeinfo: entries of C{.nodeinfo} besides the defaults (a
        replica's role and primary URL).
    """
    with initialising(path, backend, nodeinfo) as building:
        populate(building)
    return ServerDir(path)


@contextmanager
def initialising(path: FilePath, backend: Any, nodeinfo: dict[str, Any] | None = None) -> Iterator[FilePath]:
    """
    L{initialise} for a caller that populates the directory itself, and
    may await while it does (import): the block writes the storage.
    """
    checkCanInitialise(path)
    with builtInPlace(path, "init") as building:
        os.chmod(building.path, 0o700)
        _writeFile(
            building.child(".nodeinfo"),
            json.dumps({"uuid": uuid.uuid4().hex, "role": "standalone", "storage": backend.storage,
                        "blobs": backend.blobs,
                        **(nodeinfo or {})}).encode(),
        )
        _writeFile(building.child(".secret"), secrets.token_urlsafe(48).encode("ascii"), 0o600)
        yield building
        _writeFile(building.child(".serverversion"), FORMAT_TEXT.encode("ascii"))
