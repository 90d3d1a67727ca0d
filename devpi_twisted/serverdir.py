"""
The server directory: its format, identity, signing secret and lock.

Layout (besides what the storage backend keeps):
  - C{.serverversion}: C{devpi-twisted <format>}; written last by init, so a
    directory without it was never completely initialised;
  - C{.nodeinfo}: JSON C{{"uuid", "role", "storage"}};
  - C{.secret}: the token signing secret, mode 0600;
  - C{.lock}: held (flock) by the one server process using the directory.
"""

import fcntl
import json
import os
import secrets
import uuid
from typing import Any, Callable

from twisted.python.filepath import FilePath

from .errors import ServerDirError

FORMAT = 1
FORMAT_TEXT = f"devpi-twisted {FORMAT}"


class ServerDir:
    """An initialised server directory."""

    def __init__(self, path: FilePath) -> None:
        self.path = path
        self._lockFile: Any = None

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

    def nodeinfo(self) -> dict[str, Any]:
        return json.loads(self.path.child(".nodeinfo").getContent())

    def secret(self) -> bytes:
        return self.path.child(".secret").getContent().strip()


def _writeFile(path: FilePath, content: bytes, mode: int = 0o644) -> None:
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


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


def initialise(
    path: FilePath,
    storageName: str,
    populate: Callable[[FilePath], None],
) -> ServerDir:
    """
    Create a server directory at C{path}, which must be missing or empty.

    Everything is built in a temporary sibling directory and renamed into
    place at the end, so an interrupted init leaves nothing half-made at
    C{path}.

    @param populate: writes the initial state (root user, root/pypi) into
        the storage of the directory it is given.
    """
    checkCanInitialise(path)
    path.parent().makedirs(ignoreExistingDirectory=True)
    building = path.sibling(f".{path.basename()}.init-{secrets.token_hex(4)}")
    building.makedirs()
    try:
        os.chmod(building.path, 0o700)
        _writeFile(
            building.child(".nodeinfo"),
            json.dumps({"uuid": uuid.uuid4().hex, "role": "standalone", "storage": storageName}).encode(),
        )
        _writeFile(building.child(".secret"), secrets.token_urlsafe(48).encode("ascii"), 0o600)
        populate(building)
        _writeFile(building.child(".serverversion"), FORMAT_TEXT.encode("ascii"))
        if path.exists():
            os.rmdir(path.path)
        os.rename(building.path, path.path)
    except BaseException:
        if building.exists():
            building.remove()
        raise
    return ServerDir(path)
