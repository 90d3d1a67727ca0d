"""
C{--workers N} with HTTPS served by the processes themselves: C{tls:DIR}
becomes C{tls:DIR:reuseport=yes}, C{ssl:} becomes C{reuseport:} with the same
key and certificate files, and the main process still finds another server
on its port.  L{WorkersTLSProcessTests} runs the real C{twistd -n devpi
--workers 2 --listen tls:...} on 127.0.0.1.
"""

import io
import os
import signal
import socket
import ssl
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from devpi_twisted.app import options as optionsModule
from devpi_twisted.app.endpoints import ReusePortEndpoint, bindProblem, endpointDescription, listenSyntaxError
from devpi_twisted.app.options import Options
from devpi_twisted.app.tlsdir import CertificateDirectory
from devpi_twisted.app.workers import WorkerPool, childCommand, reusePortDescription

from . import test_workers_option as workersOption
from .certs import CA
from .serverprocess import Foreground, RealServerCase, freePort, waitForAnswer


def requireReusePort() -> None:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SkipTest("no SO_REUSEPORT on this system")


class Certificates:
    """A CA, a C{tls:} directory and C{ssl:} key and certificate files for localhost and 127.0.0.1, in C{root}."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.ca = CA()
        self.caFile = self.ca.writeCA(os.path.join(root, "ca.pem"))
        self.tlsDir = os.path.join(root, "live")
        os.makedirs(self.tlsDir)
        self.ca.issue(["localhost"], ["127.0.0.1"]).writeCombined(os.path.join(self.tlsDir, "localhost.pem"))
        self.certFile, self.keyFile = self.ca.issue(["localhost"], ["127.0.0.1"]).write(root)


class ListenRewriteTests(SynchronousTestCase):
    """How C{--workers} rewrites TLS listeners."""

    def test_tlsDirectory(self) -> None:
        """tls:DIR keeps its directory, port (443 by default), interface and backlog, and gains reuseport=yes."""
        self.assertEqual(reusePortDescription("tls:/etc/devpi-twisted/tls"),
                         "tls:/etc/devpi-twisted/tls:port=443:reuseport=yes")
        self.assertEqual(reusePortDescription("tls:/etc/tls:port=8443:interface=127.0.0.1:backlog=9"),
                         "tls:/etc/tls:port=8443:interface=127.0.0.1:backlog=9:reuseport=yes")
        self.assertEqual(reusePortDescription("tls:/etc/tls:interface=\\:\\:1:port=8443"),
                         "tls:/etc/tls:port=8443:interface=\\:\\:1:reuseport=yes")
        # A colon or equals sign in the directory stays escaped; our own tlsdir: prefix is accepted.
        self.assertEqual(reusePortDescription("tlsdir:/srv/a\\:b\\=c:port=8443"),
                         "tls:/srv/a\\:b\\=c:port=8443:reuseport=yes")
        once = reusePortDescription("tls:/etc/tls:port=8443")
        self.assertEqual(reusePortDescription(once), once)

    def test_ssl(self) -> None:
        """ssl: becomes reuseport: with the same files (ssl:'s default key file written out)."""
        self.assertEqual(
            reusePortDescription("ssl:8443:interface=127.0.0.1:privateKey=/k/key.pem:certKey=/k/cert.pem"),
            "reuseport:8443:interface=127.0.0.1:privateKey=/k/key.pem:certKey=/k/cert.pem")
        self.assertEqual(
            reusePortDescription("ssl:port=8443:privateKey=k.pem:certKey=c.pem:extraCertChain=chain.pem:backlog=7"),
            "reuseport:8443:backlog=7:privateKey=k.pem:certKey=c.pem:extraCertChain=chain.pem")
        self.assertEqual(reusePortDescription("ssl:8443"), "reuseport:8443:privateKey=server.pem")
        self.assertEqual(reusePortDescription("ssl:8443:privateKey=C\\:/k.pem"),
                         "reuseport:8443:privateKey=C\\:/k.pem")
        once = reusePortDescription("ssl:8443:privateKey=k.pem:certKey=c.pem")
        self.assertEqual(reusePortDescription(once), once)

    def test_refused(self) -> None:
        """Port 0, unknown arguments, no directory and reuseport=no are refused, in one line with the syntax."""
        for description in ("tls:/etc/tls:port=0", "tls:/etc/tls:sni=x", "tls:port=8443", "tls:/etc/tls:reuseport=no",
                            "ssl:0:privateKey=k.pem", "ssl:8443:sslmethod=TLSv1_2_METHOD", "tcp:8443:privateKey=k.pem"):
            error = self.assertRaises(ValueError, reusePortDescription, description)
            self.assertIn("--workers needs a fixed port, given as", str(error))
            self.assertIn(repr(description), str(error))
            self.assertNotIn("\n", str(error))
        error = self.assertRaises(ValueError, reusePortDescription, "tls:/etc/tls:port=0")
        self.assertIn("tls:DIRECTORY[:port=443]", str(error))

    def test_options(self) -> None:
        """C{--workers 2} takes tls: and ssl: listeners; the children get them rewritten, the main's --listen is kept."""
        self.patch(optionsModule.os, "environ", {})
        main = Options()
        main.parseOptions(["--serverdir", self.mktemp(), "--workers", "2", "--listen", "tls:/etc/tls:port=8443",
                           "--listen", "ssl:8444:privateKey=k.pem:certKey=c.pem"])
        self.assertEqual(main["listen"], ["tls:/etc/tls:port=8443", "ssl:8444:privateKey=k.pem:certKey=c.pem"])
        listen = [reusePortDescription(d) for d in main["listen"]]
        args, env = childCommand(main, listen, {}, twistd=["twistd"], parentPid=1)
        child = Options()
        self.patch(optionsModule.os, "environ", env)
        child.parseOptions(args[args.index("devpi") + 1:])
        self.assertEqual(child.toConfig().listen, ("tls:/etc/tls:port=8443:reuseport=yes",
                                                   "reuseport:8444:privateKey=k.pem:certKey=c.pem"))
        self.assertEqual(child.toConfig().workers, 1)

    def test_sslmethodSaysWhy(self) -> None:
        """With --workers too, sslmethod= is refused for what it is."""
        self.patch(optionsModule.os, "environ", {})
        error = self.assertRaises(usage.UsageError, Options().parseOptions,
                                  ["--workers", "2", "--listen", "ssl:8443:privateKey=k.pem:sslmethod=TLSv1_2_METHOD"])
        self.assertIn("sslmethod is not supported", str(error))


class Greeting(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")
        self.transport.loseConnection()


def fetchOverTLS(port: int, caFile: str, serverName: str = "localhost") -> tuple[bytes, str]:
    """What 127.0.0.1:C{port} says over TLS, verified against C{caFile}, and the TLS version (in a thread)."""
    context = ssl.create_default_context(cafile=caFile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            data = b""
            while True:
                chunk = tls.recv(100)
                if not chunk:
                    return data, str(tls.version())
                data += chunk


class EndpointTests(TestCase):
    """The endpoints the rewritten descriptions give, on real sockets on 127.0.0.1."""

    def setUp(self) -> None:
        requireReusePort()
        self.certs = Certificates(os.path.abspath(self.mktemp()))
        self.factory = Factory.forProtocol(Greeting)

    async def listenTwice(self, description: str) -> None:
        """Two listeners of C{description} on one port; each serves verified TLS while the other is gone."""
        first = await serverFromString(reactor, endpointDescription(description)).listen(self.factory)
        self.addCleanup(first.stopListening)
        second = await serverFromString(reactor, endpointDescription(description)).listen(self.factory)
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, second.getHost().port)
        await first.stopListening()
        data, version = await deferToThread(fetchOverTLS, second.getHost().port, self.certs.caFile)
        self.assertEqual(data, b"hello")
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    async def test_tlsDirectoryShared(self) -> None:
        """tls:DIR:reuseport=yes: two processes' worth of listeners share a port, with the directory's certificate."""
        port = freePort()
        await self.listenTwice(reusePortDescription(f"tls:{self.certs.tlsDir}:port={port}:interface=127.0.0.1"))

    async def test_tlsDirectoryNotShared(self) -> None:
        """Without reuseport=yes, tls: does not share its port (what --workers fixes)."""
        port = freePort()
        description = endpointDescription(f"tls:{self.certs.tlsDir}:port={port}:interface=127.0.0.1")
        first = await serverFromString(reactor, description).listen(self.factory)
        self.addCleanup(first.stopListening)
        with self.assertRaises(Exception):
            await serverFromString(reactor, description).listen(self.factory)

    async def test_sslShared(self) -> None:
        """An ssl: listener rewritten for --workers serves TLS with its key and certificate on a shared port."""
        port = freePort()
        await self.listenTwice(reusePortDescription(
            f"ssl:{port}:interface=127.0.0.1:privateKey={self.certs.keyFile}:certKey={self.certs.certFile}"))

    def test_badArguments(self) -> None:
        """reuseport= takes yes or no; reuseport: TLS files without a key are an error, and listenSyntaxError says so."""
        with self.assertRaises(ValueError):
            serverFromString(reactor, endpointDescription(f"tls:{self.certs.tlsDir}:reuseport=maybe"))
        description = f"reuseport:8443:certKey={self.certs.certFile}"
        with self.assertRaises(ValueError) as raised:
            serverFromString(reactor, description)
        self.assertIn("privateKey", listenSyntaxError(description, raised.exception))
        with self.assertRaises(TypeError) as raised:
            serverFromString(reactor, "reuseport:8443:sni=x")
        self.assertIn("[:privateKey=KEY.pem:certKey=CERT.pem]", listenSyntaxError("reuseport:8443:sni=x",
                                                                                 raised.exception))


class BindCheckTests(SynchronousTestCase):
    """bindProblem next to a listener with SO_REUSEPORT (a running --workers server)."""

    def setUp(self) -> None:
        requireReusePort()
        self.listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.listening.close)
        self.listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(5)
        self.port = self.listening.getsockname()[1]
        self.certs = Certificates(os.path.abspath(self.mktemp()))

    def test_childJoins(self) -> None:
        """The children's rewritten listeners may bind next to it."""
        for description in (f"tls:/etc/tls:port={self.port}:interface=127.0.0.1",
                            f"ssl:{self.port}:interface=127.0.0.1:privateKey=k.pem",
                            f"tcp:{self.port}:interface=127.0.0.1"):
            self.assertIsNone(bindProblem(reusePortDescription(description)), description)

    def test_userListenFindsIt(self) -> None:
        """The user's own tls:/ssl:/tcp: listeners find the port in use, in one line."""
        for description in (f"tls:/etc/tls:port={self.port}:interface=127.0.0.1",
                            f"ssl:{self.port}:interface=127.0.0.1:privateKey=k.pem",
                            f"tcp:{self.port}:interface=127.0.0.1"):
            problem = bindProblem(description)
            self.assertIsNotNone(problem, description)
            self.assertIn("the port is in use", problem)

    def build(self, *extra: str) -> list[Any]:
        from devpi_twisted.app import tap
        from .test_tap import ThreadedMemoryReactor

        self.patch(optionsModule.os, "environ", {})
        self.stderr = io.StringIO()
        self.patch(tap.sys, "stderr", self.stderr)
        options = tap.Options()
        options.parseOptions(["--serverdir", os.path.abspath(self.mktemp()), "--root-passwd", "pw", *extra])
        top = tap.makeService(options, reactor=ThreadedMemoryReactor(), checkListen=True)

        def walk(service: Any) -> list[Any]:
            return [service, *(s for child in getattr(service, "services", []) for s in walk(child))]
        return walk(top)

    def test_mainRefusesSharedPort(self) -> None:
        """A --workers main does not start on a port another server shares with SO_REUSEPORT."""
        error = self.assertRaises(SystemExit, self.build, "--workers", "2",
                                  "--listen", f"tls:{self.certs.tlsDir}:port={self.port}:interface=127.0.0.1")
        self.assertEqual(error.code, 1)
        self.assertIn("the port is in use", self.stderr.getvalue())
        self.assertIn(f"tls:{self.certs.tlsDir}:port={self.port + 1}", self.stderr.getvalue())

    def test_mainListensWithReusePort(self) -> None:
        """A --workers main on a free port: its tls: listener is TLS over a ReusePortEndpoint, and a pool."""
        self.listening.close()
        services = self.build("--workers", "2",
                              "--listen", f"tls:{self.certs.tlsDir}:port={self.port}:interface=127.0.0.1")
        [pool] = [s for s in services if isinstance(s, WorkerPool)]
        [endpoint] = [s.endpoint for s in services if hasattr(s, "endpoint")]
        self.assertIsInstance(endpoint.endpoint, ReusePortEndpoint)
        self.assertIsInstance(endpoint.connectionCreator, CertificateDirectory)
        self.assertEqual(sorted(pool.children), [1])


class WorkersTLSProcessTests(RealServerCase):
    """The real C{twistd -n devpi --workers 2 --listen tls:DIR:...}."""

    timeout = 90
    workerPids = workersOption.WorkersProcessTests.workerPids
    waitForLog = workersOption.WorkersProcessTests.waitForLog
    get = workersOption.WorkersProcessTests.get

    async def test_httpsFromBothProcesses(self) -> None:
        """
        Each process reads the certificate directory; HTTPS connections,
        verified against the test CA, are served by both; SIGTERM stops both
        with exit status 0.
        """
        requireReusePort()
        self.prepare()
        certs = Certificates(os.path.join(self.workdir, "certs"))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        trustRoot = Certificate.loadPEM(certs.ca.pem)
        self.http = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trustRoot),
                                     pool=pool, connectTimeout=10))
        self.url = f"https://127.0.0.1:{self.port}"
        self.server = Foreground(self, self.workdir, "--workers", "2",
                                 "--listen", f"tls:{certs.tlsDir}:port={self.port}:interface=127.0.0.1")
        await waitForAnswer(self, self.http, self.url + "/+api", self.server.alive, self.server.output)
        await self.waitForLog(lambda log: "worker 1: Starting factory" in log, "the child's start")
        [child] = self.workerPids()
        self.assertTrue(workersOption.alive(child))
        log = self.server.log()
        self.assertRegex(log, r"(?m)^(?!.*worker 1: ).*TLS certificates from \S+: localhost")
        self.assertRegex(log, r"worker 1: TLS certificates from \S+: localhost")

        for n in range(30):
            code, _ = await self.get(f"/+api?probe={n}")
            self.assertEqual(code, 200)
        await self.waitForLog(lambda log: log.count("probe=") >= 30, "the access log lines")
        probes = [line for line in self.server.log().splitlines() if '"GET /+api?probe=' in line]
        byChild = [line for line in probes if "worker 1: " in line]
        self.assertEqual(len(probes), 30)
        self.assertTrue(0 < len(byChild) < 30, probes)

        self.server.process.send_signal(signal.SIGTERM)
        status = await deferToThread(self.server.process.wait, 60)
        self.assertEqual(status, 0, self.server.output())
        self.assertFalse(workersOption.alive(child))
        log = self.server.log()
        self.assertIn(f"worker 1 (pid {child}) stopped", log)
        self.assertNotIn("Traceback", log)
