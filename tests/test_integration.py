"""
The real server: C{twistd -n devpi} processes on 127.0.0.1, driven over HTTP.

These run the whole stack (plugin discovery, SQLite on disk, thread pools,
the lock, logging) in separate processes, restart them, kill them with
SIGKILL in the middle of writes, and check what survives.  They measure how
long a start takes and print it, but assert nothing about speed.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from .helpers import basicAuth, devpiAuth

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT_PASSWORD = "secret"
JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}

log = Logger()


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def childEnvironment() -> dict[str, str]:
    """The test's environment without any DEVPI_TWISTED_* setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DEVPI_TWISTED_")}


class ServerProcess:
    """
    One C{twistd -n devpi} process on a server directory, on a fresh port.

    Each start writes its own log file (C{--logfile}) and captures the
    process's stdout and stderr in an output file.
    """

    def __init__(self, testCase: TestCase, serverdir: str, workdir: str, number: int) -> None:
        self.serverdir = serverdir
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = os.path.join(workdir, f"twistd-{number}.log")
        self.outputPath = os.path.join(workdir, f"output-{number}.txt")
        self._output = open(self.outputPath, "wb")
        self.startedAt = time.monotonic()
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "devpi",
             "--serverdir", serverdir, "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--root-passwd", ROOT_PASSWORD],
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, env=childEnvironment(),
        )
        testCase.addCleanup(self.cleanup)

    def output(self) -> str:
        self._output.flush()
        with open(self.outputPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def logText(self) -> str:
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind in the server."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    async def stop(self) -> int:
        """SIGTERM, as systemd stops it, and wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return await deferToThread(self.process.wait, 60)

    async def stopCleanly(self, testCase: TestCase) -> None:
        """
        Stop with SIGTERM and check it shut down in order: twistd re-raises
        the signal after a clean shutdown, so the status is 0 or -SIGTERM.
        """
        status = await self.stop()
        testCase.assertEqual(status, 0, self.output())
        text = self.logText()
        testCase.assertIn("Server Shut Down.", text)
        testCase.assertNotIn("Traceback", text)
        testCase.assertNotIn("Unhandled", text)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._output.close()


class Writer(threading.Thread):
    """
    Creates users C{uNNNN} one after another, as fast as the server lets it,
    on its own keep-alive connection, and records which ones were answered
    201.  It stops at the first error (the server died) or when asked.
    """

    def __init__(self, port: int, first: int) -> None:
        super().__init__(name="devpi-integration-writer", daemon=True)
        self.port = port
        self.next = first
        self.acked: list[str] = []
        self.inFlight: str | None = None
        self.error: Any = None
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while not self.stopping.is_set():
                name = userName(self.next)
                self.inFlight = name
                conn.request("PUT", "/" + name, body=json.dumps(userBody(self.next)),
                             headers={"Content-Type": "application/json", "Accept": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 201:
                    self.error = f"PUT /{name} answered {response.status}"
                    return
                self.acked.append(name)
                self.inFlight = None
                self.next += 1
        except (OSError, http.client.HTTPException) as e:
            self.error = e
        finally:
            conn.close()


def userName(n: int) -> str:
    return f"u{n:04d}"


def userBody(n: int) -> dict[str, Any]:
    return {"password": f"pw{n}", "email": f"{userName(n)}@example.com", "custom_data": {"n": n}}


class ServerProcessTests(TestCase):
    """Real C{twistd devpi} processes: restarts, crashes and the directory lock."""

    timeout = 600

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.serverdir = os.path.join(self.workdir, "server")
        self.starts = 0
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool = pool
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(lambda: self.pool.closeCachedConnections())

    def launch(self) -> ServerProcess:
        self.starts += 1
        return ServerProcess(self, self.serverdir, self.workdir, self.starts)

    async def start(self) -> ServerProcess:
        """Start a server and wait until it answers; print how long that took."""
        server = self.launch()
        deadline = time.monotonic() + 30
        while True:
            if server.process.poll() is not None:
                self.fail(f"twistd exited with {server.process.returncode}:\n{server.output()}{server.logText()}")
            try:
                response = await self.client.get(server.url + "/+api", headers={b"Accept": [b"application/json"]})
                await response.content()
                if response.code == 200:
                    break
            except (ConnectError, ResponseNeverReceived, ResponseFailed):
                pass
            if time.monotonic() > deadline:
                self.fail(f"the server did not answer within 30 s:\n{server.output()}{server.logText()}")
            await deferLater(reactor, 0.05, lambda: None)
        elapsed = time.monotonic() - server.startedAt
        log.info("process start to first answer: {elapsed:.3f}s", elapsed=elapsed)
        sys.stderr.write(f"\n  devpi-twisted: process start to first answered request: {elapsed:.3f} s\n")
        return server

    async def request(self, server: ServerProcess, method: str, path: str, body: Any = None,
                      headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any, Any]:
        """One JSON request: (status, parsed body, response headers)."""
        sendHeaders = dict(JSON_HEADERS)
        sendHeaders.update(headers or {})
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await self.client.request(method, server.url + path, data=data, headers=sendHeaders)
        content = await response.content()
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Api-Version"), [b"2"])
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response.code, json.loads(content), response.headers

    async def serial(self, server: ServerProcess) -> int:
        code, body, headers = await self.request(server, "GET", "/+status")
        self.assertEqual(code, 200)
        self.assertEqual(int(headers.getRawHeaders(b"X-Devpi-Serial")[0]), body["result"]["serial"])
        return body["result"]["serial"]

    async def waitForLog(self, server: ServerProcess, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in server.logText():
            if time.monotonic() > deadline:
                self.fail(f"{text!r} is not in the log:\n{server.logText()}")
            await deferLater(reactor, 0.05, lambda: None)

    async def test_restartKeepsDataAndTokens(self) -> None:
        """Users, indexes and login tokens survive a clean restart."""
        server = await self.start()
        code, _, _ = await self.request(server, "PUT", "/alice", {"password": "alicepw", "email": "a@example.com"})
        self.assertEqual(code, 201)
        code, _, _ = await self.request(server, "PUT", "/alice/dev", {"bases": "root/pypi", "title": "Dev"},
                                        headers=basicAuth("alice", "alicepw"))
        self.assertEqual(code, 200)
        code, body, _ = await self.request(server, "POST", "/+login", {"user": "alice", "password": "alicepw"})
        self.assertEqual(code, 200)
        token = body["result"]["password"]
        code, body, _ = await self.request(server, "POST", "/+login", {"user": "root", "password": ROOT_PASSWORD})
        self.assertEqual(code, 200)
        serialBefore = await self.serial(server)
        await server.stopCleanly(self)

        server = await self.start()
        self.assertEqual(await self.serial(server), serialBefore)
        code, body, _ = await self.request(server, "GET", "/+api", headers=devpiAuth("alice", token))
        self.assertEqual(body["result"]["authstatus"], ["ok", "alice", []])
        code, body, _ = await self.request(server, "GET", "/alice/dev?no_projects=")
        self.assertEqual(code, 200)
        self.assertEqual((body["result"]["bases"], body["result"]["title"]), (["root/pypi"], "Dev"))
        code, body, _ = await self.request(server, "GET", "/alice")
        self.assertEqual(body["result"]["email"], "a@example.com")
        code, body, headers = await self.request(server, "PATCH", "/alice/dev", ["title=After restart"],
                                                 headers=devpiAuth("alice", token))
        self.assertEqual(code, 200)
        self.assertEqual(body["result"]["title"], "After restart")
        self.assertEqual(int(headers.getRawHeaders(b"X-Devpi-Serial")[0]), serialBefore + 1)
        code, _, _ = await self.request(server, "POST", "/+login", {"user": "root", "password": ROOT_PASSWORD})
        self.assertEqual(code, 200)
        await server.stopCleanly(self)

    async def test_killDuringWrites(self) -> None:
        """After SIGKILL during a stream of writes every acknowledged change is there, whole, exactly once."""
        server = await self.start()
        initialSerial = await self.serial(server)
        known: list[str] = []
        for cycle in range(3):
            writer = Writer(server.port, len(known))
            writer.start()
            deadline = time.monotonic() + 60
            while not writer.acked and writer.is_alive() and time.monotonic() < deadline:
                await deferLater(reactor, 0.05, lambda: None)
            self.assertTrue(writer.acked, f"no write was acknowledged: {writer.error!r}")
            await deferLater(reactor, 1.5, lambda: None)
            server.kill()
            writer.stopping.set()
            await deferToThread(writer.join, 60)
            self.assertFalse(writer.is_alive())
            self.assertEqual(server.process.returncode, -signal.SIGKILL)
            await self.pool.closeCachedConnections()

            server = await self.start()
            code, body, _ = await self.request(server, "GET", "/")
            self.assertEqual(code, 200)
            present = sorted(name for name in body["result"] if name.startswith("u"))
            self.assertEqual(present, [userName(i) for i in range(len(present))], "users missing in between")
            self.assertLessEqual(set(known) | set(writer.acked), set(present), "acknowledged users lost")
            unacknowledged = set(present) - set(known) - set(writer.acked)
            self.assertLessEqual(unacknowledged, {writer.inFlight}, "users nobody asked for")
            for name in present[len(known):]:
                n = int(name[1:])
                code, user, _ = await self.request(server, "GET", "/" + name)
                self.assertEqual(code, 200)
                config = user["result"]
                self.assertEqual(
                    (config["username"], config["email"], config["custom_data"], config["indexes"]),
                    (name, f"{name}@example.com", {"n": n}, {}),
                )
                self.assertRegex(config["created"], r"Z$")
                self.assertNotIn("pwhash", config)
            last = present[-1]
            code, _, _ = await self.request(server, "POST", "/+login",
                                            {"user": last, "password": f"pw{int(last[1:])}"})
            self.assertEqual(code, 200)
            serial = await self.serial(server)
            self.assertEqual(serial, initialSerial + len(present))
            await self.waitForLog(server, f"storage ready at serial {serial}")
            known = present
            log.info("kill cycle {cycle}: {acked} acknowledged, {present} present",
                     cycle=cycle, acked=len(writer.acked), present=len(present))
        code, _, headers = await self.request(server, "PUT", "/after", {"password": "pw"})
        self.assertEqual(code, 201)
        self.assertEqual(int(headers.getRawHeaders(b"X-Devpi-Serial")[0]), initialSerial + len(known) + 1)
        await server.stopCleanly(self)

    async def test_secondServerRefused(self) -> None:
        """A second server on a directory in use exits non-zero naming the directory; the first keeps serving."""
        first = await self.start()
        second = self.launch()
        status = await deferToThread(second.process.wait, 60)
        self.assertNotEqual(status, 0)
        output = second.output() + second.logText()
        self.assertIn("another devpi-twisted server is already using", output)
        self.assertIn(self.serverdir, output)
        code, body, _ = await self.request(first, "GET", "/+api")
        self.assertEqual(code, 200)
        await first.stopCleanly(self)
