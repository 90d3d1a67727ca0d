"""
The twistd plugin (options, C{makeService}) and the C{devpi-twisted} console
script, on temporary server directories and an in-memory reactor.
"""

import hashlib
import io
import json
import os
import queue
import re
import stat
import sys
import time
from typing import Any, Callable

from twisted.application.service import IServiceMaker
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.admin import cli

from devpi_twisted.app import tap
from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.config import DEFAULT_LISTEN, DEFAULT_SERVERDIR
from devpi_twisted.errors import ServerDirError, StorageError
from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.app.serverdir import FORMAT_TEXT, ServerDir
from devpi_twisted.config import BackendSettings
from devpi_twisted.storage.plugin import findBackend
from devpi_twisted.storage.threads import SynchronousRunner

ROOT_PYPI = {
    "type": "mirror",
    "volatile": False,
    "title": "PyPI",
    "mirror_url": "https://pypi.org/simple/",
    "mirror_web_url_fmt": "https://pypi.org/project/{name}/",
}


class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also takes C{callFromThread}, which the
    storage thread pools use to hand results back.  The calls queue up until
    the test runs them with L{runUntil}, on the test's thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fromThreads.put((f, args, kwargs))

    def runUntil(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Run the calls the threads send back until C{condition()} holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("the storage threads did not answer in time")
            try:
                f, args, kwargs = self.fromThreads.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            f(*args, **kwargs)


def readState(path: FilePath, function: Callable[[Any], Any]) -> Any:
    """Read the stored state of a (stopped) server directory."""
    storage = findBackend("sqlite").open(path, SynchronousRunner(), BackendSettings())
    results: list[Any] = []
    storage.read(function).addBoth(results.append)
    storage.close()
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def snapshot(path: FilePath) -> dict[str, tuple[int, str]]:
    """Every file below C{path}: its modification time and content digest."""
    result = {}
    for child in path.walk():
        if child.isfile():
            relative = "/".join(child.segmentsFrom(path))
            result[relative] = (os.stat(child.path).st_mtime_ns, hashlib.sha256(child.getContent()).hexdigest())
    return result


def allBytes(path: FilePath) -> bytes:
    return b"".join(child.getContent() for child in path.walk() if child.isfile())


class OptionsTests(SynchronousTestCase):
    """Parsing C{twistd devpi} options and their environment variables."""

    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> tap.Options:
        self.patch(os, "environ", dict(environ or {}))
        options = tap.Options()
        options.parseOptions(argv)
        return options

    def test_defaults(self) -> None:
        """Without options or environment the documented defaults apply."""
        options = self.parse([])
        self.assertEqual(options["serverdir"], DEFAULT_SERVERDIR)
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:3141:interface=127.0.0.1")
        self.assertEqual(options["storage"], "sqlite")
        self.assertEqual(options["mirror-creators"], "root")
        self.assertEqual(options["mirror-cache-expiry"], 1800)
        self.assertIsNone(options["restrict-modify"])
        self.assertIsNone(options["root-passwd"])
        self.assertFalse(options["no-root-pypi"])
        config = options.toConfig()
        self.assertEqual(config.serverdir.path, os.path.expanduser("~/.devpi-twisted/server"))
        self.assertEqual(config.listen, (DEFAULT_LISTEN,))
        self.assertEqual(config.policy, Policy())
        self.assertIsNone(config.outsideURL)

    def test_listenRepeats(self) -> None:
        """--listen may be given several times and keeps the order."""
        options = self.parse(["--listen", "tcp:1:interface=127.0.0.1", "--listen", "tcp:2:interface=127.0.0.1"])
        self.assertEqual(options.toConfig().listen, ("tcp:1:interface=127.0.0.1", "tcp:2:interface=127.0.0.1"))

    def test_environment(self) -> None:
        """DEVPI_TWISTED_<OPTION> sets options, converted like the command line."""
        options = self.parse([], {
            "DEVPI_TWISTED_SERVERDIR": "/srv/devpi",
            "DEVPI_TWISTED_LISTEN": "tcp:1:interface=127.0.0.1 tcp:2:interface=127.0.0.1",
            "DEVPI_TWISTED_MIRROR_CACHE_EXPIRY": "60",
            "DEVPI_TWISTED_MIRROR_CREATORS": "users",
            "DEVPI_TWISTED_RESTRICT_MODIFY": "alice, :admins",
            "DEVPI_TWISTED_OUTSIDE_URL": "https://pypi.example.com/devpi/",
            "DEVPI_TWISTED_NO_ROOT_PYPI": "yes",
            "OTHER": "ignored",
        })
        config = options.toConfig()
        self.assertEqual(config.serverdir.path, "/srv/devpi")
        self.assertEqual(config.listen, ("tcp:1:interface=127.0.0.1", "tcp:2:interface=127.0.0.1"))
        self.assertEqual(config.mirrorCacheExpiry, 60)
        self.assertEqual(config.policy, Policy(restrictModify=("alice", ":admins"), mirrorCreators="users"))
        self.assertEqual(config.outsideURL, "https://pypi.example.com/devpi")
        self.assertTrue(options["no-root-pypi"])

    def test_commandLineWins(self) -> None:
        """An option on the command line overrides its environment variable."""
        options = self.parse(
            ["--serverdir", "/cli", "--listen", "tcp:9:interface=127.0.0.1", "--mirror-cache-expiry", "30",
             "--no-root-pypi", "--mirror-creators", "root"],
            {
                "DEVPI_TWISTED_SERVERDIR": "/env",
                "DEVPI_TWISTED_LISTEN": "tcp:1:interface=127.0.0.1",
                "DEVPI_TWISTED_MIRROR_CACHE_EXPIRY": "60",
                "DEVPI_TWISTED_NO_ROOT_PYPI": "0",
                "DEVPI_TWISTED_MIRROR_CREATORS": "users",
            },
        )
        config = options.toConfig()
        self.assertEqual(config.serverdir.path, "/cli")
        self.assertEqual(config.listen, ("tcp:9:interface=127.0.0.1",))
        self.assertEqual(config.mirrorCacheExpiry, 30)
        self.assertEqual(config.policy.mirrorCreators, "root")
        self.assertTrue(options["no-root-pypi"])

    def test_environmentFlagOff(self) -> None:
        """A flag set to a false word in the environment stays off."""
        for value in ["0", "no", "false", "off"]:
            self.assertFalse(self.parse([], {"DEVPI_TWISTED_NO_ROOT_PYPI": value})["no-root-pypi"])

    def test_mirrorCreators(self) -> None:
        """--mirror-creators takes only 'root' or 'users', from either source."""
        self.assertEqual(self.parse(["--mirror-creators", "users"]).toConfig().policy.mirrorCreators, "users")
        self.assertRaises(usage.UsageError, self.parse, ["--mirror-creators", "everyone"])
        self.assertRaises(usage.UsageError, self.parse, [], {"DEVPI_TWISTED_MIRROR_CREATORS": "anyone"})

    def test_badNumbers(self) -> None:
        """A non-number or a negative cache expiry is a usage error, also from the environment."""
        self.assertRaises(usage.UsageError, self.parse, ["--mirror-cache-expiry", "soon"])
        self.assertRaises(usage.UsageError, self.parse, ["--mirror-cache-expiry", "-1"])
        error = self.assertRaises(usage.UsageError, self.parse, [], {"DEVPI_TWISTED_MIRROR_CACHE_EXPIRY": "soon"})
        self.assertIn("DEVPI_TWISTED_MIRROR_CACHE_EXPIRY", str(error))

    def test_helpShowsOptions(self) -> None:
        """--help lists every option with its default and mentions the environment variables."""
        text = str(tap.Options())
        for option in ["--serverdir", "--listen", "--storage", "--outside-url", "--restrict-modify",
                       "--mirror-creators", "--mirror-cache-expiry", "--root-passwd", "--no-root-pypi"]:
            self.assertIn(option, text)
        self.assertIn("[default: ~/.devpi-twisted/server]", text)
        self.assertIn("DEVPI_TWISTED_", " ".join(text.split()))


class MakeServiceTests(SynchronousTestCase):
    """C{makeService} on a temporary server directory and a memory reactor."""

    def setUp(self) -> None:
        self.path = FilePath(os.path.abspath(self.mktemp()))
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.patch(os, "environ", {})

    def options(self, *extra: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--serverdir", self.path.path, "--root-passwd", "pw", *extra])
        return options

    def build(self, *extra: str) -> tuple[Any, ThreadedMemoryReactor]:
        reactor = ThreadedMemoryReactor()
        service = tap.makeService(self.options(*extra), reactor=reactor)
        return service, reactor

    def start(self, *extra: str) -> tuple[Any, ThreadedMemoryReactor]:
        """Build and start a server; it is stopped again when the test ends."""
        service, reactor = self.build(*extra)
        self.addCleanup(self.stop, service, reactor)
        service.startService()
        return service, reactor

    def stop(self, service: Any, reactor: ThreadedMemoryReactor) -> None:
        if service.running:
            d = service.stopService()
            reactor.runUntil(lambda: d.called)

    def test_initialisesEmptyDirectory(self) -> None:
        """A missing directory is initialised, in the current format, when the server is built."""
        self.start()
        self.assertEqual(self.path.child(".serverversion").getContent().decode().strip(), FORMAT_TEXT)

    def test_initialisedStateReadable(self) -> None:
        """After a start and stop the directory holds root and root/pypi as init makes them."""
        service, reactor = self.start()
        self.stop(service, reactor)
        root, pypi = readState(self.path, lambda v: (v.get(keys.userKey("root")), v.get(keys.indexKey("root", "pypi"))))
        self.assertTrue(PasswordHashing().verify(root["pwhash"], "pw"))
        self.assertEqual({k: pypi[k] for k in ROOT_PYPI}, ROOT_PYPI)

    def test_noRootPypi(self) -> None:
        """--no-root-pypi initialises without the mirror."""
        service, reactor = self.start("--no-root-pypi")
        self.stop(service, reactor)
        self.assertIsNone(readState(self.path, lambda v: v.get(keys.indexKey("root", "pypi"))))

    def test_listens(self) -> None:
        """After startService the site listens on each --listen endpoint and interface."""
        service, reactor = self.start("--listen", "tcp:3141:interface=127.0.0.1",
                                      "--listen", "tcp:3142:interface=127.0.0.2")
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(3141, "127.0.0.1"), (3142, "127.0.0.2")],
        )
        self.assertIs(reactor.tcpServers[0][1], reactor.tcpServers[1][1])

    def test_defaultListen(self) -> None:
        """Without --listen the server listens on 127.0.0.1:3141 only."""
        service, reactor = self.start()
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(3141, "127.0.0.1")])

    def test_serves(self) -> None:
        """The listening factory answers HTTP with devpi's headers and the stored users."""
        service, reactor = self.start()
        factory = reactor.tcpServers[0][1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n")
        reactor.runUntil(lambda: b"\r\n0\r\n\r\n" in transport.value() or b'"type": "list:userconfig"' in transport.value())
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"X-Devpi-Api-Version: 2", head)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b'"root"', body)
        self.assertNotIn(b"pwhash", body)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_storageReadyLogged(self) -> None:
        """Starting logs that the storage is ready, with its serial and directory."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, reactor = self.start()

        def ready() -> list[Any]:
            return [e for e in observer if "storage ready" in e.get("log_format", "")]

        reactor.runUntil(lambda: bool(ready()))
        self.assertEqual((ready()[0]["serial"], ready()[0]["path"]), (0, self.path.path))

    def test_lockHeldWhileRunning(self) -> None:
        """While a server runs nobody else can take its directory; after stop anyone can."""
        service, reactor = self.start()
        self.assertRaises(ServerDirError, ServerDir(self.path).lock)
        self.stop(service, reactor)
        other = ServerDir(self.path)
        other.lock()
        other.unlock()

    def test_secondServerRefused(self) -> None:
        """A second makeService on a directory in use exits with a clear message."""
        self.start()
        error = self.assertRaises(SystemExit, self.build, "--listen", "tcp:3143:interface=127.0.0.1")
        self.assertEqual(error.code, 1)
        message = self.stderr.getvalue()
        self.assertIn("another devpi-twisted server is already using", message)
        self.assertIn(self.path.path, message)

    def test_wrongFormatRefused(self) -> None:
        """A directory of another format is refused with the export/import hint."""
        service, reactor = self.start()
        self.stop(service, reactor)
        self.path.child(".serverversion").setContent(b"devpi-twisted 99\n")
        error = self.assertRaises(SystemExit, self.build)
        self.assertEqual(error.code, 1)
        message = self.stderr.getvalue()
        self.assertIn("'devpi-twisted 99'", message)
        self.assertIn("devpi-twisted export DIR", message)
        self.assertIn("devpi-twisted import DIR", message)

    def test_foreignDirectoryRefused(self) -> None:
        """A non-empty directory that is no server directory is refused, and left alone."""
        self.path.makedirs()
        self.path.child("precious.txt").setContent(b"mine")
        error = self.assertRaises(SystemExit, self.build)
        self.assertEqual(error.code, 1)
        self.assertIn("not empty", self.stderr.getvalue())
        self.assertEqual(self.path.listdir(), ["precious.txt"])

    def test_unknownStorageRefused(self) -> None:
        """A --storage no plugin provides is refused with the list of installed ones."""
        error = self.assertRaises(SystemExit, self.build, "--storage", "nosuch")
        self.assertEqual(error.code, 1)
        self.assertIn("sqlite", self.stderr.getvalue())


class PluginTests(SynchronousTestCase):
    """The dropins in C{twisted/plugins}."""

    def test_serviceMaker(self) -> None:
        """twistd finds a service maker with tapname 'devpi' built from devpi_twisted.app.tap."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "devpi"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, tap.Options)
        self.assertIs(makers[0].makeService, tap.makeService)
        self.assertTrue(makers[0].description)

    def test_storageBackend(self) -> None:
        """The sqlite backend is a plugin; an unknown name is a StorageError listing it."""
        self.assertEqual(findBackend("sqlite").name, "sqlite")
        error = self.assertRaises(StorageError, findBackend, "nosuch")
        self.assertIn("sqlite", str(error))


class CLITests(SynchronousTestCase):
    """The C{devpi-twisted} console script."""

    def setUp(self) -> None:
        self.path = FilePath(os.path.abspath(self.mktemp()))
        self.out = io.StringIO()
        self.err = io.StringIO()

    def main(self, *argv: str, readPassword: Any = None) -> int:
        kwargs = {} if readPassword is None else {"readPassword": readPassword}
        self.out.seek(0), self.out.truncate()
        self.err.seek(0), self.err.truncate()
        return cli.main(list(argv), out=self.out, err=self.err, **kwargs)

    def init(self, *extra: str) -> int:
        return self.main("init", "--serverdir", self.path.path, *extra)

    def root(self) -> dict[str, Any]:
        return readState(self.path, lambda v: v.get(keys.userKey("root")))

    def test_init(self) -> None:
        """init creates the directory with its identity, root and the root/pypi mirror."""
        self.assertEqual(self.init("--root-passwd", "pw"), 0)
        self.assertIn(self.path.path, self.err.getvalue())
        self.assertTrue(ServerDir(self.path).isInitialised())
        ServerDir(self.path).checkFormat()
        nodeinfo = json.loads(self.path.child(".nodeinfo").getContent())
        self.assertRegex(nodeinfo["uuid"], r"^[0-9a-f]{32}$")
        self.assertEqual(nodeinfo["storage"], "sqlite")
        self.assertEqual(stat.S_IMODE(os.stat(self.path.child(".secret").path).st_mode), 0o600)
        self.assertGreaterEqual(len(self.path.child(".secret").getContent()), 32)
        state = readState(self.path, lambda v: (v.items(keys.USER), v.items(keys.INDEX), v.serial))
        users, indexes, serial = state
        self.assertEqual([k for k, _ in users], ["user/root"])
        self.assertEqual([k for k, _ in indexes], ["index/root/pypi"])
        pypi = indexes[0][1]
        self.assertEqual({k: pypi[k] for k in ROOT_PYPI}, ROOT_PYPI)
        self.assertEqual(pypi["mirror_cache_expiry"], 1800)
        self.assertEqual(serial, 0)
        self.assertTrue(PasswordHashing().verify(users[0][1]["pwhash"], "pw"))
        self.assertEqual([p for p in self.path.parent().listdir() if ".init-" in p], [])

    def test_generatedPassword(self) -> None:
        """Without --root-passwd a password is generated, shown once and stored only hashed."""
        self.assertEqual(self.init(), 0)
        output = self.out.getvalue() + self.err.getvalue()
        match = re.search(r"generated password\s+(\S+)", output)
        self.assertIsNotNone(match, output)
        password = match.group(1)
        self.assertGreaterEqual(len(password), 16)
        self.assertEqual(output.count(password), 1)
        self.assertTrue(PasswordHashing().verify(self.root()["pwhash"], password))
        self.assertNotIn(password.encode(), allBytes(self.path))
        self.assertEqual(self.init(), 1)
        self.assertNotIn(password, self.out.getvalue() + self.err.getvalue())

    def test_generatedPasswordsDiffer(self) -> None:
        """Two inits generate two different passwords."""
        self.init()
        first = re.search(r"generated password\s+(\S+)", self.err.getvalue()).group(1)
        self.path = FilePath(os.path.abspath(self.mktemp()))
        self.init()
        second = re.search(r"generated password\s+(\S+)", self.err.getvalue()).group(1)
        self.assertNotEqual(first, second)

    def test_emptyPasswordWarns(self) -> None:
        """--root-passwd '' works but warns loudly."""
        self.assertEqual(self.init("--root-passwd", ""), 0)
        self.assertIn("WARNING", self.err.getvalue())
        self.assertIn("EMPTY password", self.err.getvalue())
        self.assertTrue(PasswordHashing().verify(self.root()["pwhash"], ""))

    def test_noRootPypi(self) -> None:
        """--no-root-pypi creates root and no index."""
        self.assertEqual(self.init("--root-passwd", "pw", "--no-root-pypi"), 0)
        self.assertEqual(readState(self.path, lambda v: v.items(keys.INDEX)), [])
        self.assertIsNotNone(self.root())

    def test_mirrorURL(self) -> None:
        """--mirror-url points root/pypi elsewhere; a non-URL is a usage error."""
        self.assertEqual(self.init("--root-passwd", "pw", "--mirror-url", "https://mirror.example/simple"), 0)
        pypi = readState(self.path, lambda v: v.get(keys.indexKey("root", "pypi")))
        self.assertEqual(pypi["mirror_url"], "https://mirror.example/simple")
        other = FilePath(os.path.abspath(self.mktemp()))
        self.assertEqual(self.main("init", "--serverdir", other.path, "--mirror-url", "ftp://x/"), 2)
        self.assertFalse(other.exists())

    def test_initTwice(self) -> None:
        """init on an initialised directory exits 1 and touches nothing."""
        self.assertEqual(self.init("--root-passwd", "pw"), 0)
        before = snapshot(self.path)
        self.assertEqual(self.init("--root-passwd", "other"), 1)
        self.assertIn("already initialised", self.err.getvalue())
        self.assertEqual(snapshot(self.path), before)
        self.assertTrue(PasswordHashing().verify(self.root()["pwhash"], "pw"))

    def test_initNonEmpty(self) -> None:
        """init into a directory with other files exits 1 and leaves them."""
        self.path.makedirs()
        self.path.child("x").setContent(b"x")
        self.assertEqual(self.init("--root-passwd", "pw"), 1)
        self.assertIn("not empty", self.err.getvalue())
        self.assertEqual(self.path.listdir(), ["x"])

    def test_initEmptyExisting(self) -> None:
        """init into an existing empty directory works."""
        self.path.makedirs()
        self.assertEqual(self.init("--root-passwd", "pw"), 0)
        self.assertTrue(ServerDir(self.path).isInitialised())

    def test_passwd(self) -> None:
        """passwd sets a user's password from the prompt; the old one stops working."""
        self.init("--root-passwd", "old")
        prompts: list[str] = []

        def readPassword(prompt: str) -> str:
            prompts.append(prompt)
            return "new"

        self.assertEqual(self.main("passwd", "--serverdir", self.path.path, "root", readPassword=readPassword), 0)
        self.assertEqual(prompts, ["new password for root: "])
        self.assertIn("password of 'root' changed", self.out.getvalue())
        root = self.root()
        self.assertTrue(PasswordHashing().verify(root["pwhash"], "new"))
        self.assertFalse(PasswordHashing().verify(root["pwhash"], "old"))
        self.assertRegex(root["modified"], r"Z$")

    def test_passwdUnknownUser(self) -> None:
        """passwd for a user that does not exist exits 1 and changes nothing."""
        self.init("--root-passwd", "pw")
        serial = readState(self.path, lambda v: v.serial)
        self.assertEqual(self.main("passwd", "--serverdir", self.path.path, "nobody", readPassword=lambda p: "x"), 1)
        self.assertIn("no user 'nobody'", self.err.getvalue())
        self.assertEqual(readState(self.path, lambda v: v.serial), serial)

    def test_passwdWhileServing(self) -> None:
        """passwd refuses a directory a running server holds."""
        self.init("--root-passwd", "pw")
        running = ServerDir(self.path)
        running.lock()
        self.addCleanup(running.unlock)
        self.assertEqual(self.main("passwd", "--serverdir", self.path.path, "root", readPassword=lambda p: "x"), 1)
        self.assertIn("already using", self.err.getvalue())
        self.assertTrue(PasswordHashing().verify(self.root()["pwhash"], "pw"))

    def test_passwdNotAServerDir(self) -> None:
        """passwd on a directory that is no server directory exits 1."""
        self.assertEqual(self.main("passwd", "--serverdir", self.path.path, "root", readPassword=lambda p: "x"), 1)
        self.assertIn("not a devpi-twisted server directory", self.err.getvalue())

    def test_usage(self) -> None:
        """No command, or an unknown one, is a usage error with exit status 2."""
        self.assertEqual(self.main(), 2)
        self.assertIn("a command is required", self.err.getvalue())
        self.assertEqual(self.main("frobnicate"), 2)
