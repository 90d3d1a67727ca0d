"""
Stopping the real server: daemon mode (C{twistd devpi} without C{-n}) and
the foreground, stopped with SIGTERM while a download is in flight; and
C{/+status} and C{/+metrics} after real traffic through a mirror of a fake
PyPI.  Everything listens on 127.0.0.1.

A daemon is not the test's child (twistd forks twice), so its exit status
is collected by a small helper that makes itself the daemon's "subreaper"
(Linux C{PR_SET_CHILD_SUBREAPER}): the orphaned daemon becomes its child and
C{waitpid} tells how it ended.
"""

import hashlib
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

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from devpi_twisted.testing.fakepypi import buildWheel as fakeWheel

from .distbuilder import buildWheel, moduleName, uploadBody
from .helpers import basicAuth
from .serverprocess import (
    ROOT_PASSWORD, TWISTD, FakeUpstream, Foreground, RealServerCase, environment, readText, waitForAnswer,
)

JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}
SIMPLE_JSON = b"application/vnd.pypi.simple.v1+json"
BIG = 24 * 1024 * 1024
WRONG = "Wrong-Pass-7x"

# Runs twistd in daemon mode and reports how the daemon ended, as JSON on stdout.
SUBREAPER = r"""
import ctypes, json, os, subprocess, sys, time
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    print(json.dumps({"error": "prctl failed"})); sys.exit(0)
pidfile = sys.argv[1]
launcher = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL)
if launcher.returncode != 0:
    print(json.dumps({"error": f"twistd exited with {launcher.returncode}"})); sys.exit(0)
deadline = time.monotonic() + 60
while not os.path.exists(pidfile) and time.monotonic() < deadline:
    time.sleep(0.05)
pid = int(open(pidfile).read().strip())
print(json.dumps({"pid": pid}), flush=True)
_, status = os.waitpid(pid, 0)
print(json.dumps({"pid": pid, "exited": os.WIFEXITED(status),
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
"""


class SlowDownload(threading.Thread):
    """Downloads a URL on its own connection, reading slowly; records the bytes' sha256."""

    def __init__(self, port: int, path: str, chunk: int = 64 * 1024, pause: float = 0.01) -> None:
        super().__init__(name="devpi-slow-download", daemon=True)
        self.port, self.path, self.chunk, self.pause = port, path, chunk, pause
        self.started = threading.Event()
        self.status: int | None = None
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.error: Any = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            self.status = response.status
            while True:
                data = response.read(self.chunk)
                if not data:
                    break
                self.size += len(data)
                self.sha256.update(data)
                self.started.set()
                time.sleep(self.pause)
        except Exception as e:
            self.error = e
        finally:
            self.started.set()
            conn.close()


def refused(port: int) -> bool:
    """Whether a new connection to 127.0.0.1:C{port} is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class _ServerCase(RealServerCase):
    timeout = 600

    def setUp(self) -> None:
        self.prepare()

    async def api(self, method: str, path: str, body: Any = None, auth: tuple[str, str] | None = ("alice", "alicepw"),
                  expect: int = 200, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        sendHeaders = {**JSON_HEADERS, **(basicAuth(*auth) if auth else {}), **(headers or {})}
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await self.http.request(method, self.url + path, headers=sendHeaders, data=data, timeout=60)
        content = await response.content()
        self.assertEqual(response.code, expect, content)
        return json.loads(content) if content else None

    async def uploadBig(self) -> Any:
        """alice/dev with one wheel of about 24 MB; returns the wheel."""
        await self.api("PUT", "/alice", {"password": "alicepw"}, auth=None, expect=201)
        await self.api("PUT", "/alice/dev", {})
        wheel = buildWheel(version="1.0", extraFiles={f"{moduleName('demo-pkg')}/blob.bin": os.urandom(BIG)})
        upload = uploadBody(wheel)
        response = await self.http.post(self.url + "/alice/dev/", data=upload.body,
                                        headers={**upload.headers, **basicAuth("alice", "alicepw")}, timeout=120)
        self.assertEqual(response.code, 200, await response.content())
        return wheel

    async def fileURL(self, stage: str, project: str) -> str:
        response = await self.http.get(f"{self.url}/{stage}/+simple/{project}/", headers={b"Accept": [SIMPLE_JSON]})
        page = json.loads(await response.content())
        url = page["files"][0]["url"]
        return "/" + url.split("/", 3)[3] if url.startswith("http") else \
            os.path.normpath(f"/{stage}/+simple/{project}/{url}").split("#")[0]

    async def downloadDuringStop(self, wheel: Any, stop: Any) -> SlowDownload:
        """Start a slow download of the wheel, call C{stop()} once bytes flow, and wait for the download."""
        path = await self.fileURL("alice/dev", "demo-pkg")
        download = SlowDownload(self.port, path)
        download.start()
        await deferToThread(download.started.wait, 60)
        self.assertIsNone(download.error)
        stop()
        # the listener closes at once, while the transfer goes on
        deadline = time.monotonic() + 10
        while not await deferToThread(refused, self.port):
            self.assertLess(time.monotonic(), deadline, "the listener did not close")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(download.is_alive(), "the download ended before the listener closed")
        await deferToThread(download.join, 120)
        self.assertIsNone(download.error)
        self.assertEqual((download.status, download.size), (200, len(wheel.data)))
        self.assertEqual(download.sha256.hexdigest(), wheel.sha256)
        return download


class DaemonTests(_ServerCase):
    """C{twistd devpi} without C{-n}."""

    def setUp(self) -> None:
        super().setUp()
        if not sys.platform.startswith("linux"):
            raise SkipTest("collecting a daemon's exit status needs Linux's PR_SET_CHILD_SUBREAPER")
        self.pidfile = os.path.join(self.workdir, "devpi.pid")
        self.logfile = os.path.join(self.workdir, "devpi.log")
        self.reportPath = os.path.join(self.workdir, "report.txt")
        self._report = open(self.reportPath, "wb")
        self.helper = subprocess.Popen(
            [sys.executable, "-c", SUBREAPER, self.pidfile, TWISTD, f"--pidfile={self.pidfile}",
             f"--logfile={self.logfile}", "devpi", "--serverdir", os.path.join(self.workdir, "server"),
             "--root-passwd", ROOT_PASSWORD, "--no-root-pypi", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--shutdown-grace", "60"],
            stdout=self._report, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            env=environment(self.workdir),
        )
        self.addCleanup(self.cleanup)

    def reports(self) -> list[dict[str, Any]]:
        self._report.flush()
        with open(self.reportPath, "rb") as f:
            return [json.loads(line) for line in f.read().decode("utf-8", "replace").splitlines()
                    if line.startswith("{")]

    def log(self) -> str:
        return readText(self.logfile)

    def output(self) -> str:
        with open(self.reportPath, "rb") as f:
            return f.read().decode("utf-8", "replace") + self.log()

    def cleanup(self) -> None:
        reports = self.reports()
        pids = [r["pid"] for r in reports if "pid" in r]
        if pids and not any("exited" in r for r in reports):
            try:
                os.kill(pids[0], signal.SIGKILL)  # the daemon this test started
            except ProcessLookupError:
                pass
        try:
            self.helper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.helper.kill()
            self.helper.wait(timeout=30)
        self._report.close()

    async def test_sigtermWithTransferInFlight(self) -> None:
        """The daemon detaches and writes its pidfile; SIGTERM lets a download finish, removes the pidfile, exits 0."""
        await waitForAnswer(self, self.http, self.url + "/+api", lambda: True, self.output)
        started = [r for r in self.reports() if "pid" in r]
        self.assertTrue(started, self.output())
        pid = started[0]["pid"]
        self.assertNotEqual(pid, self.helper.pid)
        with open(self.pidfile) as f:
            self.assertEqual(int(f.read()), pid)
        self.assertIn("storage ready", self.log())
        wheel = await self.uploadBig()
        await self.downloadDuringStop(wheel, lambda: os.kill(pid, signal.SIGTERM))
        await deferToThread(self.helper.wait, 120)
        ended = self.reports()[-1]
        self.assertEqual((ended["exited"], ended["code"]), (True, 0), self.output())
        self.assertFalse(os.path.exists(self.pidfile))
        log = self.log()
        for text in ("Received SIGTERM", "waiting up to 60.0s for 1 requests in flight", "no requests in flight",
                     "Server Shut Down."):
            self.assertIn(text, log)
        self.assertRegex(log, r'"GET /alice/dev/\+f/\S+" 200 %d ' % len(wheel.data))
        self.assertNotIn("Traceback", log)


def metric(text: str, name: str) -> float:
    """The value of one sample (name with labels, as exposed) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


class ForegroundTests(_ServerCase):
    """C{twistd -n devpi}: status and metrics after traffic, and a clean stop."""

    def setUp(self) -> Deferred:
        super().setUp()
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.upstream = FakeUpstream(self)
        filename, data, metadata = fakeWheel("mirrored-pkg", "1.0")
        self.upstream.fake.addFile("mirrored-pkg", filename, data, coreMetadata=metadata,
                                   uploadTime="2025-01-01T00:00:00Z")
        self.mirroredData = data
        await self.upstream.start()
        self.server = Foreground(self, self.workdir, "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                                 "--json-log", os.path.join(self.workdir, "devpi.json"))
        await waitForAnswer(self, self.http, self.url + "/+api", self.server.alive, self.server.output)

    async def test_statusAndMetricsAfterTraffic(self) -> None:
        """After uploads, mirror misses and hits, /+status and /+metrics tell about them, and no log holds a secret."""
        root = ("root", ROOT_PASSWORD)
        await self.api("PUT", "/root/up", {"type": "mirror", "mirror_url": self.upstream.simpleURL}, auth=root)
        await self.uploadBig()
        for _ in range(2):
            response = await self.http.get(self.url + "/root/up/+simple/mirrored-pkg/",
                                           headers={b"Accept": [SIMPLE_JSON]})
            self.assertEqual(response.code, 200, await response.content())
            await response.content()
        path = await self.fileURL("root/up", "mirrored-pkg")
        for _ in range(2):
            response = await self.http.get(self.url + path)
            self.assertEqual(response.code, 200)
            self.assertEqual(await response.content(), self.mirroredData)
            await deferLater(reactor, 1.0, lambda: None)  # the first transfer is recorded as stored
        await self.api("POST", "/+login", {"user": "alice", "password": WRONG}, auth=None, expect=401)

        status = (await self.api("GET", "/+status", auth=None))["result"]
        self.assertEqual(status["serial"], status["event-serial"])
        mirror = status["mirrors"]["root/up"]
        self.assertEqual(mirror["state"], "online")
        self.assertIsNotNone(mirror["last-success"])
        self.assertIsNone(mirror["last-failure"])
        listed = {name: value for name, _, value in status["metrics"]}
        self.assertEqual(listed["devpi_uploads_total"], 1)

        response = await self.http.get(self.url + "/+metrics")
        self.assertEqual(response.code, 200)
        text = (await response.content()).decode("utf-8")
        self.assertEqual(metric(text, "devpi_serial"), status["serial"])
        self.assertEqual(metric(text, 'devpi_uploads_total{status="200"}'), 1)
        self.assertGreaterEqual(metric(text, "devpi_upload_bytes_total"), BIG)
        self.assertEqual(metric(text, 'devpi_mirror_state{mirror="root/up",state="online"}'), 1)
        self.assertGreaterEqual(metric(text, 'devpi_upstream_requests_total{kind="page",status="200"}'), 1)
        self.assertGreaterEqual(metric(text, 'devpi_upstream_requests_total{kind="file",status="200"}'), 1)
        self.assertEqual(metric(text, 'devpi_mirror_cache_total{kind="file",result="miss"}'), 1)
        self.assertEqual(metric(text, 'devpi_mirror_cache_total{kind="file",result="hit"}'), 1)
        self.assertGreaterEqual(metric(text, 'devpi_mirror_cache_total{kind="page",result="hit"}'), 1)
        self.assertEqual(metric(text, 'devpi_http_requests_total{method="POST",route="/+login",status="401"}'), 1)
        self.assertGreaterEqual(
            metric(text, 'devpi_http_request_duration_seconds_count{route="/{user}/{index}/+f/{relpath}"}'), 2)
        self.assertGreaterEqual(metric(text, 'devpi_http_response_bytes_total{route="/{user}/{index}/+f/{relpath}"}'),
                                2 * len(self.mirroredData))
        self.assertIn("process_resident_memory_bytes", text)

        with open(os.path.join(self.workdir, "devpi.json"), "rb") as f:
            records = [json.loads(line) for line in f]
        access = [r for r in records if r.get("namespace") == "devpi_twisted.access"]
        self.assertIn({"method": "POST", "path": "/+login", "status": 401},
                      [{k: r[k] for k in ("method", "path", "status")} for r in access])
        uploads = [r for r in records if r.get("filename", "").startswith("demo_pkg-1.0")]
        self.assertTrue(uploads, "no upload event")
        logs = self.server.log() + json.dumps(records)
        for secret in ("alicepw", WRONG, "YWxpY2U6YWxpY2Vwdw"):  # the last: alice:alicepw in base64
            self.assertNotIn(secret, logs)

    async def test_sigtermExitsZero(self) -> None:
        """In the foreground too, SIGTERM lets the download in flight finish and the process exits 0."""
        wheel = await self.uploadBig()
        await self.downloadDuringStop(wheel, self.server.process.terminate)
        status = await deferToThread(self.server.process.wait, 120)
        self.assertEqual(status, 0, self.server.output())
        log = self.server.log()
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
