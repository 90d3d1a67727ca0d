"""
Running the real C{twistd devpi} for the operations tests (TLS, daemon mode,
shutdown), on 127.0.0.1 only, with the clients' environments isolated.
"""

import os
import socket
import subprocess
import sys
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

import devpi_twisted
from devpi_twisted.testing.fakepypi import FakePyPI, buildWheel

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
ROOT_PASSWORD = "secret"
START_TIMEOUT = 60
CLIENT_TIMEOUT = 240


def readText(path: str) -> str:
    """A log or output file's text so far; empty if it is not there yet."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """The program C{name} next to the test's Python, or skip the test."""
    path = os.path.join(BIN, name)
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    raise SkipTest(f"{name} is not installed next to {sys.executable}")


def environment(workdir: str) -> dict[str, str]:
    """
    For servers and clients: nothing of the user's settings that could point
    them elsewhere, caches in the test's directory, no proxy, and the same
    C{devpi_twisted} as the tests.
    """
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("DEVPI_TWISTED_", "PIP_", "UV_", "TWINE_"))
        # CA settings that would override a client's --cert (requests prefers them)
        and not k.endswith(("_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "pythonpath")
    }
    env.update({
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "XDG_CONFIG_HOME": os.path.join(workdir, "config"),
    })
    source = os.path.dirname(os.path.dirname(os.path.abspath(devpi_twisted.__file__)))
    env["PYTHONPATH"] = source
    return env


async def waitForAnswer(testCase: TestCase, http: HTTPClient, url: str, alive: Any,
                        output: Any, timeout: float = START_TIMEOUT) -> None:
    """Poll C{url} until it answers 200; fail early when C{alive()} turns false."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            testCase.fail(f"the server exited:\n{output()}")
        try:
            response = await http.get(url, timeout=5)
            await response.content()
            if response.code == 200:
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            testCase.fail(f"the server did not answer within {timeout}s:\n{output()}")
        await deferLater(reactor, 0.1, lambda: None)


class Foreground:
    """C{twistd -n devpi ...} as a child process, its output in a file, killed in cleanup."""

    def __init__(self, testCase: TestCase, workdir: str, *options: str, logfile: str | None = None) -> None:
        self.workdir = workdir
        self.outputPath = os.path.join(workdir, "twistd-output.txt")
        self.logfile = logfile or os.path.join(workdir, "twistd.log")
        self._output = open(self.outputPath, "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "devpi",
             "--serverdir", os.path.join(workdir, "server"), "--root-passwd", ROOT_PASSWORD, "--no-root-pypi",
             *options],
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, env=environment(workdir),
        )
        testCase.addCleanup(self.cleanup)

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        self._output.flush()
        return readText(self.outputPath) + readText(self.logfile)

    def log(self) -> str:
        return readText(self.logfile)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._output.close()


class FakeUpstream:
    """A L{FakePyPI} on a loopback port that can be stopped and started again on the same port."""

    def __init__(self, testCase: TestCase) -> None:
        self.fake = FakePyPI()
        # Tracks connections, so stopping also drops the persistent ones.
        self.site = WrappingFactory(Site(self.fake.resource()))
        self.port: Any = None
        self.number = 0
        testCase.addCleanup(self.stop)

    async def start(self) -> None:
        listening = await TCP4ServerEndpoint(reactor, self.number, interface="127.0.0.1").listen(self.site)
        self.port = listening
        self.number = listening.getHost().port

    async def stop(self) -> None:
        """Stop listening and drop every open connection (keep-alive ones too)."""
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        for protocol in list(self.site.protocols):
            protocol.transport.abortConnection()

    @property
    def simpleURL(self) -> str:
        return f"http://127.0.0.1:{self.number}/simple/"

    def fileRequests(self) -> list[str]:
        return [path for _, path in self.fake.requests if path.startswith("/files/")]

    def addWheel(self, name: str, version: str, *requiresDist: str) -> str:
        filename, data, metadata = buildWheel(name, version, requiresDist=requiresDist)
        self.fake.addFile(name, filename, data, coreMetadata=metadata, uploadTime="2025-01-01T00:00:00Z")
        return filename


class RealServerCase(TestCase):
    """
    A test against a real C{twistd devpi} on 127.0.0.1: a work directory, a
    free port, an HTTP client that keeps no connections, and the server.
    """

    def prepare(self) -> None:
        """The work directory, port, URL and client, for a server the test starts itself."""
        tool("twistd")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))

    def startForeground(self, *options: str) -> "Deferred[None]":
        """C{twistd -n devpi} on the port with C{options}; fires once it answers."""
        self.prepare()
        self.server = Foreground(self, self.workdir, "--listen", f"tcp:{self.port}:interface=127.0.0.1", *options)
        return Deferred.fromCoroutine(
            waitForAnswer(self, self.http, self.url + "/+api", self.server.alive, self.server.output))
