"""
The C{devpi-twisted} console script: maintenance on a server directory.

Subcommands work on a stopped server (they take the directory's lock):
  - C{init}: create a server directory;
  - C{passwd USER}: set a user's password.
"""

import getpass
import sys
from typing import Any, TextIO

from twisted.python import usage

from .auth import PasswordHashing
from .config import DEFAULT_SERVERDIR, serverdirPath
from .errors import DevpiError, ServerDirError, StorageError
from .initstate import PYPI_URL, createServerDir
from .model import indexconfig, keys
from .serverdir import ServerDir
from .storage.plugin import findBackend
from .storage.threads import SynchronousRunner
from .timeutil import isoNow


class InitOptions(usage.Options):
    synopsis = "--serverdir DIR [--root-passwd PW] [--no-root-pypi] [--mirror-url URL]"
    optParameters = [
        ["serverdir", None, DEFAULT_SERVERDIR, "The server directory to create."],
        ["root-passwd", None, None, "root's password (default: generate one and print it once)."],
        ["mirror-url", None, PYPI_URL, "The upstream simple index of root/pypi."],
        ["storage", None, "sqlite", "The storage backend plugin."],
    ]
    optFlags = [["no-root-pypi", None, "Do not create the root/pypi mirror index."]]

    def postOptions(self) -> None:
        try:
            self["mirror-url"] = indexconfig.coerce(
                {"type": "mirror", "mirror_url": self["mirror-url"]}, dropForeign=False
            )["mirror_url"]
        except DevpiError as e:
            raise usage.UsageError(e.message)


class PasswdOptions(usage.Options):
    synopsis = "[--serverdir DIR] USER"
    optParameters = [["serverdir", None, DEFAULT_SERVERDIR, "The server directory."]]

    def parseArgs(self, user: str) -> None:
        self["user"] = user


class Options(usage.Options):
    synopsis = "COMMAND [options]"
    subCommands = [
        ["init", None, InitOptions, "Create a new server directory."],
        ["passwd", None, PasswdOptions, "Set a user's password (server stopped)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


def _init(options: InitOptions, out: TextIO) -> None:
    createServerDir(
        serverdirPath(options["serverdir"]),
        options["storage"],
        options["root-passwd"],
        rootPypi=not options["no-root-pypi"],
        mirrorURL=options["mirror-url"],
        out=out,
    )
    out.write(f"devpi-twisted: initialised {serverdirPath(options['serverdir']).path}\n")


def _passwd(options: PasswdOptions, out: TextIO, readPassword: Any) -> None:
    serverdir = ServerDir(serverdirPath(options["serverdir"]))
    serverdir.checkFormat()
    serverdir.lock()
    try:
        backend = findBackend(serverdir.nodeinfo().get("storage", "sqlite"))
        storage, _ = backend.open(serverdir.path, SynchronousRunner(), None)
        user = options["user"]
        password = readPassword(f"new password for {user}: ")
        pwhash = PasswordHashing().hash(password)

        def _set(txn: Any) -> None:
            config = txn.get(keys.userKey(user))
            if config is None:
                raise ServerDirError(f"no user {user!r}")
            config["pwhash"] = pwhash
            config["modified"] = isoNow()
            txn.set(keys.userKey(user), config)

        failures: list[Any] = []
        storage.write(_set).addErrback(failures.append)
        storage.close()
        if failures:
            failures[0].raiseException()
        out.write(f"devpi-twisted: password of {user!r} changed\n")
    finally:
        serverdir.unlock()


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         readPassword: Any = getpass.getpass) -> int:
    """Run a subcommand; return the exit status."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        err.write(f"{options}\ndevpi-twisted: {e}\n")
        return 2
    try:
        if options.subCommand == "init":
            _init(options.subOptions, err)
        elif options.subCommand == "passwd":
            _passwd(options.subOptions, out, readPassword)
    except (ServerDirError, StorageError) as e:
        err.write(f"devpi-twisted: {e}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
