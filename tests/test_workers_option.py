"""
C{--workers N}: the main process and its C{--requests-only} children.

The unit tests drive L{WorkerPool} with a fake process spawner and a
L{Clock}; L{WorkersProcessTests} runs the real C{twistd -n devpi --workers 2}
on 127.0.0.1.
"""

import io
import json
import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, jsonFileLogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from devpi_twisted.app import options as optionsModule
from devpi_twisted.app.endpoints import ReusePortEndpoint
from devpi_twisted.app.options import Options
from devpi_twisted.app.shutdown import DrainService
from devpi_twisted.app.workers import (
    PARENT_VARIABLE, ParentWatch, WorkerPool, childCommand, parentWatch, reusePortDescription,
)

from .distbuilder import buildWheel, uploadBody
from .serverprocess import RealServerCase


class ListenRewriteTests(SynchronousTestCase):
    """Which listeners several processes can share, and how."""

    def test_tcpBecomesReusePort(self) -> None:
        """tcp: and tcp6: listeners are served as reuseport: on the same port and interface."""
        self.assertEqual(reusePortDescription("tcp:3141:interface=127.0.0.1"), "reuseport:3141:interface=127.0.0.1")
        self.assertEqual(reusePortDescription("tcp:port=3141"), "reuseport:3141")
        self.assertEqual(reusePortDescription("tcp:3141:backlog=7"), "reuseport:3141:backlog=7")
        self.assertEqual(reusePortDescription("tcp6:3141"), "reuseport:3141:interface=\\:\\:")
        self.assertEqual(reusePortDescription("tcp6:3141:interface=\\:\\:1"), "reuseport:3141:interface=\\:\\:1")
        self.assertEqual(reusePortDescription("reuseport:3141:interface=127.0.0.1"),
                         "reuseport:3141:interface=127.0.0.1")

    def test_refused(self) -> None:
        """systemd and UNIX listeners, port 0 and unknown arguments are refused in one line (TLS: tests.test_workers_tls)."""
        for description in ("systemd:domain=INET:index=0", "unix:/tmp/s"):
            error = self.assertRaises(ValueError, reusePortDescription, description)
            self.assertIn("--workers needs listeners on a TCP port", str(error))
            self.assertNotIn("\n", str(error))
        for description in ("tcp:0", "tcp:3141:interfce=127.0.0.1"):
            error = self.assertRaises(ValueError, reusePortDescription, description)
            self.assertIn("--workers needs a fixed port", str(error))

    def test_usageError(self) -> None:
        """C{--workers 2} with a UNIX socket listener is a usage error; with one process it is fine."""
        self.patch(optionsModule.os, "environ", {})
        error = self.assertRaises(usage.UsageError, Options().parseOptions,
                                  ["--workers", "2", "--listen", "unix:/tmp/devpi.sock"])
        self.assertIn("--workers needs listeners on a TCP port", str(error))
        options = Options()
        options.parseOptions(["--listen", "unix:/tmp/devpi.sock"])
        self.assertEqual(options["workers"], 1)


class ChildCommandTests(SynchronousTestCase):
    """The command line and environment of a child."""

    def parse(self, argv: list[str], environ: dict[str, str]) -> Options:
        self.patch(optionsModule.os, "environ", environ)
        options = Options()
        options.parseOptions(argv)
        return options

    def test_optionsPassedThrough(self) -> None:
        """The child parses the main's options (backend ones included), --requests-only, one worker, reuseport."""
        serverdir = os.path.abspath(self.mktemp())
        main = self.parse(
            ["--serverdir", serverdir, "--workers=3", "--listen", "tcp:3141:interface=127.0.0.1",
             "--storage", "postgresql", "--pg-dsn", "host=db password=hidden", "--max-connections", "7",
             "--offline-mode", "--shutdown-grace", "2.5"],
            {"DEVPI_TWISTED_MIRROR_CACHE_EXPIRY": "99", "DEVPI_TWISTED_LISTEN": "tcp:1", "HOME": "/home/x"},
        )
        self.assertEqual(main["workers"], 3)
        listen = [reusePortDescription(d) for d in main["listen"]]
        args, env = childCommand(main, listen, {"HOME": "/home/x", "DEVPI_TWISTED_LISTEN": "tcp:1"},
                                 twistd=["/venv/bin/twistd"], parentPid=1234)
        self.assertEqual(args[:3], ["/venv/bin/twistd", "--nodaemon", "--pidfile="])
        devpi = args[args.index("devpi") + 1:]
        self.assertEqual(devpi, ["--requests-only", "--workers=1", "--listen=reuseport:3141:interface=127.0.0.1"])
        self.assertNotIn("hidden", " ".join(args))  # secrets stay out of ps
        self.assertEqual(env["HOME"], "/home/x")
        self.assertEqual(env[PARENT_VARIABLE], "1234")

        child = self.parse(devpi, env)
        config = child.toConfig()
        self.assertTrue(config.requestsOnly)
        self.assertEqual(config.workers, 1)
        self.assertEqual(config.listen, ("reuseport:3141:interface=127.0.0.1",))
        self.assertEqual(config.serverdir.path, serverdir)
        self.assertEqual(config.backend, main.toConfig().backend)
        self.assertEqual(config.backend.pgDSN, "host=db password=hidden")
        self.assertEqual((config.maxConnections, config.offlineMode, config.shutdownGrace, config.mirrorCacheExpiry),
                         (7, True, 2.5, 99))

    def test_unsetOptionsStayUnset(self) -> None:
        """An option the main has no value for (or that only the main uses) is taken out of the child's environment."""
        main = self.parse(["--serverdir", self.mktemp(), "--json-log", "-"], {})
        _, env = childCommand(main, [], {"DEVPI_TWISTED_OUTSIDE_URL": "http://stale"}, twistd=["t"])
        self.assertNotIn("DEVPI_TWISTED_OUTSIDE_URL", env)
        self.assertNotIn("DEVPI_TWISTED_JSON_LOG", env)  # the main logs the relayed events
        self.assertEqual(env["DEVPI_TWISTED_OFFLINE_MODE"], "0")
        self.assertEqual(env["DEVPI_TWISTED_REQUESTS_ONLY"], "1")


class MakeServiceTests(SynchronousTestCase):
    """What C{makeService} builds for C{--workers}."""

    def build(self, *extra: str) -> list[Any]:
        from devpi_twisted.app import tap
        from .test_tap import ThreadedMemoryReactor

        self.patch(optionsModule.os, "environ", {})
        self.patch(tap.sys, "stderr", io.StringIO())
        options = tap.Options()
        options.parseOptions(["--serverdir", os.path.abspath(self.mktemp()), "--root-passwd", "pw",
                              "--listen", "tcp:3141:interface=127.0.0.1", *extra])
        top = tap.makeService(options, reactor=ThreadedMemoryReactor())

        def walk(service: Any) -> list[Any]:
            return [service, *(s for child in getattr(service, "services", []) for s in walk(child))]
        return walk(top)

    def test_workers(self) -> None:
        """With C{--workers 3}: a pool of two children that stops next to the drain; reuseport listeners."""
        services = self.build("--workers", "3")
        [pool] = [s for s in services if isinstance(s, WorkerPool)]
        self.assertEqual(sorted(pool.children), [1, 2])
        self.assertIn(DrainService, [type(s) for s in pool.parent])
        endpoints = [s.endpoint for s in services if hasattr(s, "endpoint")]
        self.assertEqual([type(e) for e in endpoints], [ReusePortEndpoint])

    def test_oneProcess(self) -> None:
        """Without C{--workers}: no pool, the tcp listener as given."""
        services = self.build()
        self.assertFalse([s for s in services if isinstance(s, (WorkerPool, ParentWatch))])
        endpoints = [s.endpoint for s in services if hasattr(s, "endpoint")]
        self.assertNotIn(ReusePortEndpoint, [type(e) for e in endpoints])
        self.assertEqual(len(endpoints), 1)


class FakeTransport:
    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []
        self.stdinClosed = False
        self.exited = False

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def exit(self, reason: Any) -> None:
        self.exited = True
        self.protocol.processEnded(Failure(reason))


class FakeSpawner(Clock):
    """A clock whose C{spawnProcess} records the children instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeTransport, str, list[str], dict[str, str], str | None]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                     path: str | None = None) -> FakeTransport:
        transport = FakeTransport(protocol, 100 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((transport, executable, args, env, path))
        return transport


class WorkerPoolTests(SynchronousTestCase):
    """Starting, restarting and stopping the children."""

    def setUp(self) -> None:
        self.reactor = FakeSpawner()
        self.ready: Deferred[None] = Deferred()
        self.events: list[dict[str, Any]] = []
        self.pool = WorkerPool(self.reactor, 3, lambda: (["/bin/twistd", "devpi"], {"A": "1"}),
                               ready=lambda: self.ready, stopTimeout=10, path="/srv",
                               observer=self.events.append)
        self.pool.log = Logger(observer=self.events.append)

    def transports(self) -> list[FakeTransport]:
        return [spawned[0] for spawned in self.reactor.spawned]

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def test_startAfterReady(self) -> None:
        """N-1 children start once the main's storage is ready, with the command given."""
        self.pool.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.ready.callback(None)
        self.assertEqual([(e, a, env, p) for _, e, a, env, p in self.reactor.spawned],
                         [("/bin/twistd", ["/bin/twistd", "devpi"], {"A": "1"}, "/srv")] * 2)
        self.assertTrue(all(t.stdinClosed for t in self.transports()))
        self.assertIn("worker 2 started (pid 101)", self.messages())

    def test_restartWithBackoff(self) -> None:
        """A child that exits is started again after 1, 2, 4 ... up to 30 s; after a long run from 1 s again."""
        self.pool.startService()
        self.ready.callback(None)
        delays = []
        for _ in range(7):
            self.transports()[-1].exit(ProcessTerminated(signal=signal.SIGKILL))
            count = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == count:
                self.reactor.advance(0.5)
                waited += 0.5
                self.assertLess(waited, 60)
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30])
        self.assertTrue(any("worker 2 (pid 101) exited unexpectedly" in m and "again in 1 s" in m
                            for m in self.messages()), self.messages())
        self.assertTrue(all(e["log_level"] == LogLevel.warn for e in self.events if "unexpectedly" in formatEvent(e)))
        # The other child was left alone.
        self.assertEqual(self.transports()[0].signals, [])
        self.reactor.advance(31)  # a long, stable run
        self.transports()[-1].exit(ProcessDone(0))
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2 + 8)

    def test_noRestartWhileStopping(self) -> None:
        """On stop each child gets SIGTERM; children ending then are not started again; stop waits for them."""
        self.pool.startService()
        self.ready.callback(None)
        first, second = self.transports()
        first.exit(ProcessTerminated(exitCode=1))  # a restart pending
        stopped = self.pool.stopService()
        self.assertEqual(second.signals, ["TERM"])
        self.assertNoResult(stopped)
        second.exit(ProcessDone(0))
        self.successResultOf(stopped)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_killAfterBound(self) -> None:
        """A child still running C{stopTimeout} seconds after SIGTERM gets SIGKILL."""
        self.pool.startService()
        self.ready.callback(None)
        first, second = self.transports()
        stopped = self.pool.stopService()
        first.exit(ProcessDone(0))
        self.reactor.advance(9.9)
        self.assertEqual(second.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        second.exit(ProcessTerminated(signal=signal.SIGKILL))
        self.successResultOf(stopped)
        self.assertTrue(any("did not stop within 10 s" in m for m in self.messages()))

    def test_stopBeforeReady(self) -> None:
        """Stopped before the storage was ready: no child is ever started."""
        self.pool.startService()
        self.successResultOf(self.pool.stopService())
        self.ready.callback(None)
        self.assertEqual(self.reactor.spawned, [])

    def test_logRelay(self) -> None:
        """A child's JSON events reach the main's log with their level and the worker's number; other output as warnings."""
        self.pool.startService()
        self.ready.callback(None)
        lines: list[str] = []

        class Out:
            def write(self, text: str) -> None:
                lines.append(text)

            def flush(self) -> None:
                pass

        Logger(namespace="child", observer=jsonFileLogObserver(Out())).error(
            "upload of {name} failed", name="demo-1.0.whl")
        data = "".join(lines).encode()
        protocol = self.transports()[1].protocol
        protocol.childDataReceived(1, data[:10])
        self.assertEqual(self.events[-1]["log_format"], "worker {worker} started (pid {pid})")
        protocol.childDataReceived(1, data[10:] + b"not json\n")
        protocol.childDataReceived(2, b"Traceback (most recent")
        self.transports()[1].exit(ProcessDone(0))
        relayed = [e for e in self.events if e.get("devpi_worker") == 2]
        self.assertEqual([formatEvent(e) for e in relayed], ["worker 2: upload of demo-1.0.whl failed"])
        self.assertEqual((relayed[0]["log_level"], relayed[0]["log_namespace"], relayed[0]["name"]),
                         (LogLevel.error, "child", "demo-1.0.whl"))
        messages = self.messages()
        self.assertIn("worker 2: not json", messages)
        self.assertIn("worker 2: Traceback (most recent", messages)


class ParentWatchTests(SynchronousTestCase):
    """A child stops when its main process is gone."""

    def test_stopsWhenOrphaned(self) -> None:
        clock = Clock()
        stops: list[None] = []
        clock.running = True  # type: ignore[attr-defined]
        clock.stop = lambda: stops.append(None)  # type: ignore[attr-defined]
        parent = [42]
        watch = ParentWatch(clock, 42, getppid=lambda: parent[0])
        watch.startService()
        clock.advance(5)
        self.assertEqual(stops, [])
        parent[0] = 1
        clock.advance(1)
        self.assertEqual(stops, [None])
        clock.advance(5)
        self.assertEqual(stops, [None])
        watch.stopService()

    def test_onlyInChildren(self) -> None:
        self.assertIsNone(parentWatch(Clock(), {}))
        watch = parentWatch(Clock(), {PARENT_VARIABLE: "17"})
        self.assertIsInstance(watch, ParentWatch)


def alive(pid: int) -> bool:
    """Whether C{pid} is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class WorkersProcessTests(RealServerCase):
    """The real C{twistd -n devpi --workers 2}."""

    timeout = 120

    def workerPids(self) -> list[int]:
        import re

        return [int(pid) for pid in re.findall(r"worker 1 started \(pid (\d+)\)", self.server.log())]

    async def waitForLog(self, predicate: Any, what: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not predicate(self.server.log()):
            if time.monotonic() > deadline or not self.server.alive():
                self.fail(f"{what} did not happen:\n{self.server.output()}")
            await deferLater(reactor, 0.1, lambda: None)

    async def get(self, path: str, **kw: Any) -> tuple[int, bytes]:
        response = await self.http.get(self.url + path, **kw)
        return response.code, await response.content()

    async def test_workers(self) -> None:
        """
        Both processes accept connections, an upload through either is served
        by both within a second, a killed child is started again, SIGTERM
        stops everything with exit status 0, and the main's logs have the
        child's events.
        """
        if not hasattr(__import__("socket"), "SO_REUSEPORT"):
            raise SkipTest("no SO_REUSEPORT on this system")
        await self.startForeground("--workers", "2", "--json-log", "events.jsonl")
        await self.waitForLog(lambda log: "worker 1: Starting factory" in log, "the child's start")
        [child] = self.workerPids()
        self.assertTrue(alive(child))

        # The kernel spreads new connections over both processes.
        for n in range(30):
            code, _ = await self.get(f"/+api?probe={n}")
            self.assertEqual(code, 200)
        await self.waitForLog(lambda log: log.count("probe=") >= 30, "the access log lines")
        probes = [line for line in self.server.log().splitlines() if '"GET /+api?probe=' in line]
        byChild = [line for line in probes if "worker 1: " in line]
        self.assertEqual(len(probes), 30)
        self.assertTrue(0 < len(byChild) < 30, probes)

        # An upload through one is served by both within a second.
        auth = ("alice", "alicepw")
        response = await self.http.put(self.url + "/alice", json.dumps({"password": "alicepw"}).encode())
        self.assertEqual(response.code, 201, await response.content())
        response = await self.http.put(self.url + "/alice/dev", b"{}", auth=auth)
        self.assertEqual(response.code, 200, await response.content())
        upload = uploadBody(buildWheel("demo-pkg", "1.0"))
        response = await self.http.post(self.url + "/alice/dev/", upload.body, auth=auth,
                                        headers={"Content-Type": upload.contentType})
        self.assertEqual(response.code, 200, await response.content())
        await deferLater(reactor, 1.0, lambda: None)
        for n in range(20):
            code, body = await self.get(f"/alice/dev/+simple/demo-pkg/?after={n}")
            self.assertEqual(code, 200)
            self.assertIn(b"demo_pkg-1.0-py3-none-any.whl", body)
        await self.waitForLog(lambda log: log.count("after=") >= 20, "the access log lines")
        after = [line for line in self.server.log().splitlines() if "+simple/demo-pkg/?after=" in line]
        self.assertTrue(0 < len([line for line in after if "worker 1: " in line]) < 20, after)

        # A child killed is started again.
        os.kill(child, signal.SIGKILL)
        await self.waitForLog(lambda log: len(self.workerPids()) == 2 and log.count("worker 1: Starting factory") == 2,
                              "the child's restart")
        self.assertIn("exited unexpectedly", self.server.log())
        restarted = self.workerPids()[1]
        self.assertNotEqual(restarted, child)
        self.assertTrue(alive(restarted))

        # SIGTERM to the main stops both; exit status 0.
        self.server.process.send_signal(signal.SIGTERM)
        status = await deferToThread(self.server.process.wait, 60)
        self.assertEqual(status, 0, self.server.output())
        self.assertFalse(alive(restarted))
        log = self.server.log()
        self.assertIn("worker 1: Server Shut Down.", log)
        self.assertIn(f"worker 1 (pid {restarted}) stopped", log)
        self.assertNotIn("Traceback", log)
        # The main's --json-log has the children's events too, each once, with the worker's number.
        with open(os.path.join(self.workdir, "events.jsonl")) as f:
            records = [json.loads(line) for line in f]
        childProbes = [r for r in records if r.get("devpi_worker") == 1 and "probe=" in r.get("path", "")]
        self.assertEqual(len(childProbes), len(byChild))
        self.assertEqual(childProbes[0]["namespace"], "devpi_twisted.access")

    async def test_childStopsWithoutMain(self) -> None:
        """When the main process is killed (it cannot stop its children), the child stops by itself."""
        await self.startForeground("--workers", "2")
        await self.waitForLog(lambda log: "worker 1: Starting factory" in log, "the child's start")
        [child] = self.workerPids()
        self.server.process.kill()
        await deferToThread(self.server.process.wait, 30)
        deadline = time.monotonic() + 10
        while alive(child):
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                self.fail("the child outlived its main process by 10 s")
            await deferLater(reactor, 0.1, lambda: None)
