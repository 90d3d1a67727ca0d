"""
C{--requests-only} workers: several processes serving one server directory.

L{WatchingTests} drive two L{SqliteStorage} instances on one database file
(as two processes would have) with a fake clock; L{WorkerProcessTests} run a
real main process and a real worker (C{twistd -n devpi}) on 127.0.0.1 and
check that what one stores the other serves within a second.
"""

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from devpi_twisted.admin import cli
from devpi_twisted.errors import ServerDirError
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.storage.sqlite import SqliteStorage
from devpi_twisted.storage.threads import SynchronousRunner

from .distbuilder import buildWheel, uploadBody
from .serverprocess import readText

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ALICE = ("alice", "alicepw")
PIP_JSON = "application/vnd.pypi.simple.v1+json"


class WatchingTests(SynchronousTestCase):
    """A storage following the commits another process makes on the same database."""

    def setUp(self) -> None:
        path = FilePath(self.mktemp())
        path.makedirs()
        self.mine = SqliteStorage(path.child("db.sqlite"), SynchronousRunner())
        self.other = SqliteStorage(path.child("db.sqlite"), SynchronousRunner())
        self.told: list[Any] = []
        self.mine.subscribe(self.told.append)
        self.clock = Clock()

    def tearDown(self) -> None:
        self.successResultOf(self.mine.close())
        self.successResultOf(self.other.close())

    def write(self, storage: SqliteStorage, key: str, value: Any) -> int:
        serial, _ = self.successResultOf(storage.write(lambda txn: txn.set(key, value)))
        return serial

    def test_offByDefault(self) -> None:
        """Without watching, a store does not look for other processes' commits."""
        self.write(self.other, "a", 1)
        self.clock.advance(10)
        self.assertEqual(self.told, [])
        self.assertEqual(self.mine.currentSerial(), -1)
        self.assertFalse(self.mine.isWatching())

    def test_seesOtherCommits(self) -> None:
        """A watching store tells its subscribers of another process's commit within one interval."""
        self.mine.startWatching(self.clock, interval=0.2)
        self.write(self.other, "a", {"v": 1})
        self.assertEqual(self.told, [])
        self.clock.advance(0.2)
        self.assertEqual([(r.serial, r.changes) for r in self.told], [(0, {"a": {"v": 1}})])
        self.assertEqual(self.mine.currentSerial(), 0)
        self.assertEqual(self.mine.lastCommitTime(), self.other.lastCommitTime())
        self.clock.advance(1)
        self.assertEqual(len(self.told), 1)

    def test_ownCommitAfterAnother(self) -> None:
        """When another process commits just before us, both changes are told, each once."""
        self.mine.startWatching(self.clock, interval=0.2)
        self.write(self.other, "a", 1)
        self.assertEqual(self.write(self.mine, "b", 2), 1)
        self.assertEqual(sorted(r.serial for r in self.told), [0, 1])
        self.assertEqual(self.mine.currentSerial(), 1)
        self.clock.advance(1)
        self.assertEqual(sorted(r.serial for r in self.told), [0, 1])

    def test_startWatchingCatchesUp(self) -> None:
        """Changes committed elsewhere before watching started are told when it starts, not lost."""
        self.write(self.other, "a", 1)
        self.write(self.mine, "b", 2)
        self.assertEqual([r.serial for r in self.told], [1])
        self.mine.startWatching(self.clock)
        self.assertEqual(sorted(r.serial for r in self.told), [0, 1])
        self.clock.advance(1)
        self.assertEqual(len(self.told), 2)

    def test_closeStopsWatching(self) -> None:
        """Closing the store stops its polling."""
        self.mine.startWatching(self.clock)
        self.successResultOf(self.mine.close())
        self.assertFalse(self.mine.isWatching())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.mine = SqliteStorage(FilePath(self.mktemp() + ".db"), SynchronousRunner())


class DirectoryLockTests(SynchronousTestCase):
    """Who may share a server directory."""

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.makedirs()

    def test_workersShare(self) -> None:
        """Workers share the directory with each other; maintenance is refused until they stop."""
        first, second = ServerDir(self.path), ServerDir(self.path)
        first.lockAsWorker()
        second.lockAsWorker(timeout=0)
        self.assertTrue(ServerDir(self.path).workersRunning())
        error = self.assertRaises(ServerDirError, ServerDir(self.path).lockForMaintenance)
        self.assertIn("--requests-only workers", str(error))
        first.unlock()
        second.unlock()
        self.assertFalse(ServerDir(self.path).workersRunning())
        maintenance = ServerDir(self.path)
        maintenance.lockForMaintenance()
        maintenance.unlock()

    def test_workerWaitsForCleanup(self) -> None:
        """A worker does not start while the main process holds workers out for its startup cleanup."""
        main = ServerDir(self.path)
        self.assertTrue(main.holdOutWorkers())
        sleeps: list[float] = []
        error = self.assertRaises(ServerDirError, ServerDir(self.path).lockAsWorker, 0.05, sleeps.append)
        self.assertIn("busy", str(error))
        main.releaseWorkers()
        ServerDir(self.path).lockAsWorker(timeout=0)


class Process:
    """One C{twistd -n devpi} on the shared directory, on its own port, with its own log."""

    def __init__(self, testCase: TestCase, serverdir: str, name: str, *extra: str, port: int | None = None,
                 endpoint: str = "tcp") -> None:
        from .test_clients import freePort, serverEnvironment

        workdir = os.path.dirname(serverdir)
        self.port = port or freePort()
        self.logfile = os.path.join(workdir, f"{name}.log")
        self._output = open(os.path.join(workdir, f"{name}.out"), "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "devpi", "--serverdir", serverdir,
             "--listen", f"{endpoint}:{self.port}:interface=127.0.0.1", "--root-passwd", "secret",
             "--no-root-pypi", "--no-access-log", *extra],
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            env=serverEnvironment(workdir),
        )
        testCase.addCleanup(self.cleanup)

    def log(self) -> str:
        return readText(self.logfile)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"Accept": "application/json"}
        if auth is not None:
            sent["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        sent.update(headers or {})
        try:
            conn.request(method, path, body, sent)
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        await deferToThread(self.process.wait, 60)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._output.close()


class WorkerProcessTests(TestCase):
    """A main process and a --requests-only worker on one server directory."""

    timeout = 300

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.serverdir = os.path.join(self.workdir, "server")

    async def start(self, name: str, *extra: str, **kw: Any) -> Process:
        process = Process(self, self.serverdir, name, *extra, **kw)
        deadline = time.monotonic() + 60
        while True:
            if process.process.poll() is not None:
                self.fail(f"{name} exited:\n{process.log()}")
            try:
                # On a shared port another process may answer: wait for this one's listening, too.
                if "Starting factory" in process.log():
                    status, _, _ = await deferToThread(process.request, "GET", "/+api")
                    if status == 200:
                        return process
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail(f"{name} did not answer:\n{process.log()}")
            await deferLater(reactor, 0.05, lambda: None)

    async def call(self, process: Process, method: str, path: str, body: Any = None, expect: int | None = None,
                   **kw: Any) -> tuple[int, bytes, dict[str, str]]:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        status, content, headers = await deferToThread(process.request, method, path, data, **kw)
        if expect is not None:
            self.assertEqual(status, expect, content)
        return status, content, headers

    async def upload(self, process: Process, version: str) -> None:
        body = uploadBody(buildWheel("demo-pkg", version))
        await self.call(process, "POST", "/alice/dev/", body.body, expect=200, auth=ALICE,
                        headers={"Content-Type": body.contentType.decode()})

    async def files(self, process: Process) -> tuple[list[str], str]:
        status, content, headers = await self.call(process, "GET", "/alice/dev/+simple/demo-pkg/",
                                                   headers={"Accept": PIP_JSON})
        names = [f["filename"] for f in json.loads(content)["files"]] if status == 200 else []
        return names, headers.get("x-devpi-serial", "")

    async def waitForFiles(self, process: Process, expected: list[str], within: float) -> float:
        """Poll C{process}'s simple page until it lists C{expected}; return how long that took."""
        started = time.monotonic()
        while True:
            names, _ = await self.files(process)
            elapsed = time.monotonic() - started
            if sorted(names) == sorted(expected):
                return elapsed
            if elapsed > within:
                self.fail(f"after {elapsed:.2f}s the page lists {names}, not {expected}")
            await deferLater(reactor, 0.02, lambda: None)

    async def test_writesVisibleAcrossProcesses(self) -> None:
        """An upload through either process is served by the other within a second, with the same serial."""
        main = await self.start("main")
        worker = await self.start("worker", "--requests-only")
        self.assertIn("requests-only worker on", worker.log())
        await self.call(worker, "PUT", "/alice", {"password": "alicepw"}, expect=201)
        await self.call(main, "PUT", "/alice/dev", {}, expect=200, auth=ALICE)
        await self.upload(main, "0.9")
        # Both render (and cache) the page before the next uploads.
        first = ["demo_pkg-0.9-py3-none-any.whl"]
        self.assertEqual((await self.files(main))[0], first)
        await self.waitForFiles(worker, first, within=1.0)

        await self.upload(worker, "1.0")
        second = first + ["demo_pkg-1.0-py3-none-any.whl"]
        self.assertEqual(sorted((await self.files(worker))[0]), second)
        elapsed = await self.waitForFiles(main, second, within=1.0)
        sys.stderr.write(f"\n  devpi-twisted: worker upload seen by the main process after {elapsed:.3f} s\n")

        await self.upload(main, "2.0")
        both = second + ["demo_pkg-2.0-py3-none-any.whl"]
        elapsed = await self.waitForFiles(worker, both, within=1.0)
        sys.stderr.write(f"  devpi-twisted: main upload seen by the worker after {elapsed:.3f} s\n")
        _, mainSerial = await self.files(main)
        _, workerSerial = await self.files(worker)
        self.assertEqual(mainSerial, workerSerial)
        for process in (main, worker):
            await process.stop()
            self.assertNotIn("Traceback", process.log())

    async def test_workerFirst(self) -> None:
        """A main process started while a worker runs skips its startup cleanup and follows the worker."""
        self.assertEqual(cli.main(["init", "--serverdir", self.serverdir, "--root-passwd", "secret",
                                   "--no-root-pypi"], io.StringIO(), io.StringIO()), 0)
        worker = await self.start("worker", "--requests-only")
        main = await self.start("main")
        self.assertIn("no startup cleanup this time", main.log())
        await self.call(main, "PUT", "/alice", {"password": "alicepw"}, expect=201)
        await self.call(worker, "PUT", "/alice/dev", {}, expect=200, auth=ALICE)
        self.assertEqual((await self.files(main))[0], [])
        await self.upload(worker, "1.0")
        await self.waitForFiles(main, ["demo_pkg-1.0-py3-none-any.whl"], within=1.0)

    async def test_maintenanceWaitsForWorkers(self) -> None:
        """Maintenance commands refuse the directory while a worker serves it, and work once it stopped."""
        main = await self.start("main")
        worker = await self.start("worker", "--requests-only")
        await main.stop()
        err = io.StringIO()
        export = os.path.join(self.workdir, "export")
        self.assertEqual(await cli.run(reactor, ["export", "--serverdir", self.serverdir, export], io.StringIO(), err), 1)
        self.assertIn("--requests-only workers are using", err.getvalue())
        self.assertFalse(os.path.exists(export))
        await worker.stop()
        self.assertEqual(await cli.run(reactor, ["export", "--serverdir", self.serverdir, export], io.StringIO(), err),
                         0, err.getvalue())

    async def test_reusePort(self) -> None:
        """With the reuseport: endpoint a main process and a worker share one port; it keeps answering when one stops."""
        if not hasattr(__import__("socket"), "SO_REUSEPORT"):
            raise SkipTest("no SO_REUSEPORT on this system")
        main = await self.start("main", endpoint="reuseport")
        worker = await self.start("worker", "--requests-only", port=main.port, endpoint="reuseport")
        await self.call(worker, "PUT", "/alice", {"password": "alicepw"}, expect=201)
        await self.call(main, "PUT", "/alice/dev", {}, expect=200, auth=ALICE)
        for _ in range(20):  # new connections, spread by the kernel
            await self.call(main, "GET", "/alice/dev", expect=200)
        await main.stop()
        await self.upload(worker, "1.0")
        self.assertEqual((await self.files(worker))[0], ["demo_pkg-1.0-py3-none-any.whl"])
