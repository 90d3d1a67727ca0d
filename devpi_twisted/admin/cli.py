"""
The C{devpi-twisted} console script: maintenance on a server directory.

Subcommands work on a stopped server (they take the directory's lock):
  - C{init}: create a server directory;
  - C{passwd USER}: set a user's password;
  - C{export DIR}: write the whole state in devpi's export layout;
  - C{import DIR}: create a server directory from an export (ours or devpi's);
and C{gen-config} writes systemd units for this installation.
"""

import getpass
import os
import sys
from typing import Any, Callable, TextIO

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python import usage
from twisted.python.filepath import FilePath

from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.config import DEFAULT_SERVERDIR, serverdirPath
from devpi_twisted.errors import DevpiError, ServerDirError, StorageError
from devpi_twisted.admin.genconfig import GenConfigOptions, genConfig
from devpi_twisted.admin.initstate import PYPI_URL, createServerDir
from devpi_twisted.model import indexconfig, keys
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.app.backendoptions import BACKEND_FLAGS, BACKEND_PARAMETERS, backendSettings
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.threads import Runner, SynchronousRunner, ThreadRunner
from devpi_twisted.model.timeutil import isoNow


class InitOptions(usage.Options):
    synopsis = "--serverdir DIR [--root-passwd PW] [--no-root-pypi] [--mirror-url URL]"
    optParameters = [
        ["serverdir", None, DEFAULT_SERVERDIR, "The server directory to create."],
        ["root-passwd", None, None, "root's password (default: generate one and print it once)."],
        ["mirror-url", None, PYPI_URL, "The upstream simple index of root/pypi."],
        *BACKEND_PARAMETERS,
    ]
    optFlags = [["no-root-pypi", None, "Do not create the root/pypi mirror index."], *BACKEND_FLAGS]

    def postOptions(self) -> None:
        self["backend"] = backendSettings(self)
        try:
            self["mirror-url"] = indexconfig.coerce(
                {"type": "mirror", "mirror_url": self["mirror-url"]}, dropForeign=False
            )["mirror_url"]
        except DevpiError as e:
            raise usage.UsageError(e.message)


class PasswdOptions(usage.Options):
    synopsis = "[--serverdir DIR] USER"
    optParameters = [["serverdir", None, DEFAULT_SERVERDIR, "The server directory."], *BACKEND_PARAMETERS]
    optFlags = BACKEND_FLAGS

    def postOptions(self) -> None:
        self["backend"] = backendSettings(self)

    def parseArgs(self, user: str) -> None:
        self["user"] = user


class ExportOptions(usage.Options):
    synopsis = "[--serverdir DIR] [--include-mirrored-files] EXPORTDIR"
    optParameters = [["serverdir", None, DEFAULT_SERVERDIR, "The server directory (server stopped)."],
                     *BACKEND_PARAMETERS]
    optFlags = [["include-mirrored-files", None, "Export the files mirror indexes have cached, too."],
                *BACKEND_FLAGS]

    def postOptions(self) -> None:
        self["backend"] = backendSettings(self)

    def parseArgs(self, directory: str) -> None:
        self["directory"] = directory


class ImportOptions(usage.Options):
    synopsis = "--serverdir DIR [--root-passwd PW] [--no-root-pypi] [--skip-import-type TYPE] EXPORTDIR"
    optParameters = [
        ["serverdir", None, DEFAULT_SERVERDIR, "The server directory to create (missing or empty)."],
        ["root-passwd", None, None, "Give root this password (default: root's password from the export)."],
        *BACKEND_PARAMETERS,
    ]
    optFlags = [["no-root-pypi", None, "Do not create (or import) the root/pypi mirror index."], *BACKEND_FLAGS]

    def postOptions(self) -> None:
        self["backend"] = backendSettings(self)

    def __init__(self) -> None:
        super().__init__()
        self["skip-import-type"] = []

    def opt_skip_import_type(self, indexType: str) -> None:
        """Leave out indexes of this type (made by a devpi plugin), repeatable."""
        self["skip-import-type"].append(indexType)

    def parseArgs(self, directory: str) -> None:
        self["directory"] = directory


class Options(usage.Options):
    synopsis = "COMMAND [options]"
    subCommands = [
        ["init", None, InitOptions, "Create a new server directory."],
        ["passwd", None, PasswdOptions, "Set a user's password (server stopped)."],
        ["export", None, ExportOptions, "Export the whole state in devpi's export layout (server stopped)."],
        ["import", None, ImportOptions, "Create a server directory from an export (ours or devpi-server's)."],
        ["gen-config", None, GenConfigOptions, "Write systemd units for this installation."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required: " + ", ".join(c[0] for c in self.subCommands))


def _init(options: InitOptions, out: TextIO) -> None:
    createServerDir(
        serverdirPath(options["serverdir"]),
        options["backend"],
        options["root-passwd"],
        rootPypi=not options["no-root-pypi"],
        mirrorURL=options["mirror-url"],
        out=out,
    )
    out.write(f"devpi-twisted: initialised {serverdirPath(options['serverdir']).path}\n")


def _passwd(options: PasswdOptions, out: TextIO, readPassword: Any) -> None:
    serverdir = ServerDir(serverdirPath(options["serverdir"]))
    serverdir.checkFormat()
    serverdir.lockForMaintenance()
    try:
        settings = serverdir.checkBackend(options["backend"])
        storage, _ = openBackends(settings, serverdir.path, SynchronousRunner())
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


async def _export(options: ExportOptions, out: TextIO, runner: Runner) -> None:
    from devpi_twisted.admin.exporter import exportServerDir

    await exportServerDir(
        serverdirPath(options["serverdir"]),
        FilePath(os.path.abspath(os.path.expanduser(options["directory"]))),
        includeMirrored=bool(options["include-mirrored-files"]),
        out=out,
        runner=runner,
        backend=options["backend"],
    )


async def _import(options: ImportOptions, out: TextIO, runner: Runner) -> None:
    from devpi_twisted.admin.importer import importServerDir

    await importServerDir(
        serverdirPath(options["serverdir"]),
        FilePath(os.path.abspath(os.path.expanduser(options["directory"]))),
        backend=options["backend"],
        rootPassword=options["root-passwd"],
        rootPypi=not options["no-root-pypi"],
        skipTypes=tuple(options["skip-import-type"]),
        out=out,
        runner=runner,
    )


# The commands that read or write a whole server directory through the
# storage interfaces: they run on the reactor, the storage on its threads.
_ON_REACTOR = {"export": _export, "import": _import}
_FAILED = (ServerDirError, StorageError, OSError)


def _parse(argv: list[str] | None, err: TextIO) -> Options | None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        # One line, not the whole --help above it.
        command = f" {options.subCommand}" if options.subCommand else ""
        err.write(f"devpi-twisted: {e} (see 'devpi-twisted{command} --help')\n")
        return None
    return options


def _runDirectly(options: Options, out: TextIO, err: TextIO, readPassword: Any) -> int:
    try:
        if options.subCommand == "init":
            _init(options.subOptions, err)
        elif options.subCommand == "passwd":
            _passwd(options.subOptions, out, readPassword)
        elif options.subCommand == "gen-config":
            genConfig(options.subOptions, out)
    except _FAILED as e:
        err.write(f"devpi-twisted: {e}\n")
        return 1
    return 0


async def _runOnReactor(reactor: Any, options: Options, out: TextIO, err: TextIO) -> int:
    runner = ThreadRunner(reactor)
    runner.start()
    try:
        await _ON_REACTOR[options.subCommand](options.subOptions, out, runner)
    except _FAILED as e:
        err.write(f"devpi-twisted: {e}\n")
        return 1
    finally:
        runner.stopService()
    return 0


async def run(reactor: Any, argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr,
              readPassword: Any = getpass.getpass) -> int:
    """Run a subcommand on a running C{reactor}; the exit status."""
    options = _parse(argv, err)
    if options is None:
        return 2
    if options.subCommand in _ON_REACTOR:
        return await _runOnReactor(reactor, options, out, err)
    return _runDirectly(options, out, err, readPassword)


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         readPassword: Any = getpass.getpass, react: Callable[..., None] = task.react) -> int:
    """
    The console script: run a subcommand; return the exit status.  Export
    and import run on the reactor, started and stopped by C{react}.
    """
    options = _parse(argv, err)
    if options is None:
        return 2
    if options.subCommand not in _ON_REACTOR:
        return _runDirectly(options, out, err, readPassword)
    status: list[int] = []

    def _main(reactor: Any) -> Deferred[None]:
        return ensureDeferred(_runOnReactor(reactor, options, out, err)).addCallback(status.append)

    try:
        react(_main)
    except SystemExit:
        # react ends with sys.exit; the status is ours to return.
        if not status:
            raise
    return status[0]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
