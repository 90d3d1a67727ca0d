"""
Real clients against a real server: C{twistd -n devpi} on 127.0.0.1, with
twine and uv publishing and pip and uv installing.

Every test starts its own server process on a fresh port and a fresh server
directory (C{--no-root-pypi}, so nothing ever reaches out to PyPI), creates
C{alice}, C{alice/dev} and C{alice/staging} (bases C{alice/dev}) over HTTP,
and kills the process in cleanup.  The clients are the ones installed next to
the test's Python (tox installs twine and uv there); a test is skipped only
when its client is missing.  Clients run in threads with bounded timeouts and
with their configuration, caches and keyrings isolated from the user's.
"""

import json as jsonlib
import os
import subprocess
import sys
from typing import Any
from urllib.parse import urljoin

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from .serverprocess import freePort, tool, waitForAnswer
from .distbuilder import Dist, buildSdist, buildWheel, moduleName, writeDist
from .releaseharness import PIP_ACCEPT, basic

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
ROOT_PASSWORD = "secret"
CLIENT_TIMEOUT = 240
JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}


def clientEnvironment(workdir: str) -> dict[str, str]:
    """
    The environment for server and clients: no settings of the user's that
    could point them elsewhere, no keyring, no proxy for 127.0.0.1, and
    caches inside the test's directory.
    """
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("DEVPI_TWISTED_", "PIP_", "UV_", "TWINE_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "pythonpath")
    }
    env.update({
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "UV_NO_CONFIG": "1",
        "UV_CACHE_DIR": os.path.join(workdir, "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "XDG_CONFIG_HOME": os.path.join(workdir, "config"),
    })
    return env


def serverEnvironment(workdir: str) -> dict[str, str]:
    """
    The clients' environment, plus a C{PYTHONPATH} that makes the server
    import the same C{devpi_twisted} (and twistd plugin) as the tests.
    """
    import devpi_twisted

    env = clientEnvironment(workdir)
    source = os.path.dirname(os.path.dirname(os.path.abspath(devpi_twisted.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return env


class ServerProcess:
    """One C{twistd -n devpi} on a fresh port, its output captured in a file."""

    def __init__(self, testCase: TestCase, workdir: str, *extra: str, rootPypi: bool = False) -> None:
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.serverdir = os.path.join(workdir, "server")
        self.outputPath = os.path.join(workdir, "twistd-output.txt")
        self._output = open(self.outputPath, "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "devpi", "--serverdir", self.serverdir,
             "--root-passwd", ROOT_PASSWORD, "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             *([] if rootPypi else ["--no-root-pypi"]), *extra],
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, env=serverEnvironment(workdir),
        )
        testCase.addCleanup(self.cleanup)

    def output(self) -> str:
        self._output.flush()
        with open(self.outputPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._output.close()


class ClientRunning:
    """
    Runs the real clients for a test with C{workdir}, C{env} and a C{server};
    the helpers talk to C{server.url}, or to the server at C{base} when given.
    """

    workdir: str
    env: dict[str, str]
    server: Any

    async def runClient(self, *command: str, timeout: int = CLIENT_TIMEOUT,
                        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a client in a thread; its output goes to the test log when it fails."""
        result = await deferToThread(
            subprocess.run, list(command), capture_output=True, text=True, timeout=timeout,
            env=env or self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
        )
        result.output = result.stdout + result.stderr  # type: ignore[attr-defined]
        return result

    def assertSucceeded(self, result: subprocess.CompletedProcess) -> None:
        self.assertEqual(  # type: ignore[attr-defined]
            result.returncode, 0, f"{result.args} failed:\n{result.output}\n--- server:\n{self.server.output()}")

    def prepareClients(self) -> None:
        """A fresh work directory, the clients' environment in it, and an HTTP client."""
        tool("twistd")
        self.workdir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.workdir)
        self.env = clientEnvironment(self.workdir)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)  # type: ignore[attr-defined]
        self.http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))

    async def api(self, method: str, path: str, body: Any = None, auth: Any = ("alice", "alicepw"),
                  headers: dict[bytes, list[bytes]] | None = None, data: bytes | None = None,
                  base: str | None = None) -> tuple[int, bytes, Any]:
        """One request to the server (or the one at C{base}): C{(code, body, response)}."""
        sendHeaders = dict(JSON_HEADERS)
        if auth is not None:
            sendHeaders.update(basic(*auth))
        sendHeaders.update(headers or {})
        if body is not None:
            data = jsonlib.dumps(body).encode("utf-8")
        response = await self.http.request(method, (base or self.server.url) + path, headers=sendHeaders,
                                           data=data, timeout=60)
        content = await response.content()
        return response.code, content, response

    async def mustAPI(self, method: str, path: str, body: Any = None, auth: Any = ("alice", "alicepw"),
                      expect: int = 200, base: str | None = None) -> Any:
        code, content, _ = await self.api(method, path, body, auth, base=base)
        self.assertEqual(code, expect, content)  # type: ignore[attr-defined]
        return jsonlib.loads(content) if content else None

    async def simpleFiles(self, stage: str, project: str, base: str | None = None) -> dict[str, str] | None:
        """C{{filename: sha256}} of the JSON simple page, or C{None} on 404."""
        code, content, _ = await self.api("GET", f"/{stage}/+simple/{project}/", auth=None,
                                          headers={b"Accept": [PIP_ACCEPT]}, base=base)
        if code == 404:
            return None
        self.assertEqual(code, 200, content)  # type: ignore[attr-defined]
        return {f["filename"]: f["hashes"]["sha256"] for f in jsonlib.loads(content)["files"]}

    def distDir(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    # the clients

    async def twineUpload(self, stage: str, dist: Dist, base: str | None = None) -> subprocess.CompletedProcess:
        path = writeDist(dist, self.distDir(f"dist-{dist.sha256[:12]}"))
        return await self.runClient(
            tool("twine"), "upload", "--repository-url", f"{base or self.server.url}/{stage}/",
            "-u", "alice", "-p", "alicepw", "--non-interactive", "--disable-progress-bar", path,
        )

    async def uvPublish(self, stage: str, dist: Dist, base: str | None = None) -> subprocess.CompletedProcess:
        path = writeDist(dist, self.distDir(f"dist-{dist.sha256[:12]}"))
        return await self.runClient(
            tool("uv"), "publish", "--publish-url", f"{base or self.server.url}/{stage}/",
            "-u", "alice", "-p", "alicepw", path,
        )

    def indexURL(self, stage: str, base: str | None = None) -> str:
        return f"{base or self.server.url}/{stage}/+simple/"

    async def pipInstall(self, stage: str, *requirements: str,
                     base: str | None = None) -> tuple[subprocess.CompletedProcess, str]:
        target = self.distDir(f"pip-target-{len(os.listdir(self.workdir))}")
        pip = os.path.join(BIN, "pip")
        command = [pip] if os.path.isfile(pip) else [sys.executable, "-m", "pip"]
        result = await self.runClient(*command, "install", "--index-url", self.indexURL(stage, base),
                                "--no-cache-dir", "--target", target, *requirements)
        return result, target

    async def uvInstall(self, stage: str, *requirements: str,
                     base: str | None = None) -> tuple[subprocess.CompletedProcess, str]:
        target = self.distDir(f"uv-target-{len(os.listdir(self.workdir))}")
        result = await self.runClient(tool("uv"), "pip", "install", "--index-url", self.indexURL(stage, base),
                                "--target", target, "--no-cache", "--python", sys.executable,
                                *requirements)
        return result, target

    async def importedVersion(self, target: str, module: str = "demo_pkg") -> str:
        """Import C{module} from C{target} in a fresh Python and return its C{VERSION}."""
        env = dict(self.env, PYTHONPATH=target)
        result = await self.runClient(sys.executable, "-c",
                                f"import {module}; print({module}.VERSION); print({module}.__file__)", env=env)
        self.assertSucceeded(result)
        version, path = result.stdout.split()
        self.assertTrue(  # type: ignore[attr-defined]
            os.path.realpath(path).startswith(os.path.realpath(target)), path)
        return version

    async def waitForServer(self) -> None:
        await waitForAnswer(self, self.http, self.server.url + "/+api",
                            lambda: self.server.process.poll() is None, self.server.output)


class _ClientCase(ClientRunning, TestCase):
    """A running server with alice, alice/dev and alice/staging, and the clients."""

    timeout = 600
    serverOptions: tuple[str, ...] = ()

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.prepareClients()
        self.server = ServerProcess(self, self.workdir, *self.serverOptions)
        await self.waitForServer()
        await self.mustAPI("PUT", "/alice", {"password": "alicepw"}, auth=None, expect=201)
        await self.mustAPI("PUT", "/alice/dev", {})
        await self.mustAPI("PUT", "/alice/staging", {"bases": ["alice/dev"]})


class PublishTests(_ClientCase):
    """twine and uv publish into a private index."""

    async def test_twineAndUv(self) -> None:
        """twine uploads a wheel and uv publish an sdist; both are listed with their hashes."""
        wheel = buildWheel()
        sdist = buildSdist()
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        self.assertSucceeded(await self.uvPublish("alice/dev", sdist))
        files = await self.simpleFiles("alice/dev", "demo-pkg")
        self.assertEqual(files, {wheel.filename: wheel.sha256, sdist.filename: sdist.sha256})

    async def test_twineReupload(self) -> None:
        """A second twine upload of the same file succeeds and changes nothing."""
        wheel = buildWheel()
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        _, before, _ = await self.api("GET", "/alice/dev/demo-pkg", auth=None)
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        _, after, _ = await self.api("GET", "/alice/dev/demo-pkg", auth=None)
        self.assertEqual(before, after)

    async def test_twineConflict(self) -> None:
        """On a non-volatile index twine fails on other bytes under the name: "File already exists"."""
        await self.mustAPI("PUT", "/alice/prod", {"volatile": False})
        first = buildWheel(summary="first")
        second = buildWheel(summary="second")
        self.assertEqual(first.filename, second.filename)
        self.assertSucceeded(await self.twineUpload("alice/prod", first))
        result = await self.twineUpload("alice/prod", second)
        self.assertNotEqual(result.returncode, 0, result.output)
        self.assertIn("File already exists", result.output)
        self.assertEqual(await self.simpleFiles("alice/prod", "demo-pkg"), {first.filename: first.sha256})

    async def test_uvPublishWheel(self) -> None:
        """uv publish uploads a wheel (its part has no Content-Type) that pip then installs."""
        wheel = buildWheel(version="2.0")
        self.assertSucceeded(await self.uvPublish("alice/dev", wheel))
        self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg"), {wheel.filename: wheel.sha256})
        result, target = await self.pipInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "2.0")


class InstallTests(_ClientCase):
    """pip and uv install from an index that inherits the uploads."""

    def setUp(self) -> Deferred:
        d = super().setUp()

        async def upload(_: Any) -> None:
            self.wheel = buildWheel(version="1.0", requiresPython=">=3.8")
            self.sdist = buildSdist(version="1.0", requiresPython=">=3.8")
            self.assertSucceeded(await self.twineUpload("alice/dev", self.wheel))
            self.assertSucceeded(await self.uvPublish("alice/dev", self.sdist))

        return d.addCallback(lambda r: Deferred.fromCoroutine(upload(r)))

    async def test_pipInstall(self) -> None:
        """pip installs the wheel through alice/staging and the module imports."""
        result, target = await self.pipInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")

    async def test_uvInstall(self) -> None:
        """uv pip installs the wheel through alice/staging and the module imports."""
        result, target = await self.uvInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")

    async def test_pipDownload(self) -> None:
        """pip downloads the wheel byte for byte, its hash checked against the page."""
        dest = self.distDir("downloads")
        pip = os.path.join(BIN, "pip")
        command = [pip] if os.path.isfile(pip) else [sys.executable, "-m", "pip"]
        result = await self.runClient(*command, "download", "--index-url", self.indexURL("alice/staging"),
                                      "--no-cache-dir", "--no-deps", "--only-binary", ":all:",
                                      "-d", dest, "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(os.listdir(dest), [self.wheel.filename])
        with open(os.path.join(dest, self.wheel.filename), "rb") as f:
            self.assertEqual(f.read(), self.wheel.data)

    async def test_sdistServed(self) -> None:
        """The sdist uv published is served byte for byte at its listed URL."""
        code, content, _ = await self.api("GET", "/alice/staging/+simple/demo-pkg/", auth=None,
                                          headers={b"Accept": [PIP_ACCEPT]})
        self.assertEqual(code, 200)
        page = f"{self.server.url}/alice/staging/+simple/demo-pkg/"
        (entry,) = [f for f in jsonlib.loads(content)["files"] if f["filename"] == self.sdist.filename]
        response = await self.http.get(urljoin(page, entry["url"]), timeout=60)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), self.sdist.data)

    async def test_unknownProject(self) -> None:
        """pip reports a project the index does not have as not found."""
        result, _ = await self.pipInstall("alice/staging", "no-such-project")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("No matching distribution", result.output)


class YankedInstallTests(_ClientCase):
    """Installers skip a yanked version unless it is pinned."""

    def setUp(self) -> Deferred:
        d = super().setUp()

        async def uploadAndYank(_: Any) -> None:
            for version in ("1.0", "1.1"):
                self.assertSucceeded(await self.twineUpload("alice/dev", buildWheel(version=version)))
            await self.mustAPI("PATCH", "/alice/dev/demo-pkg/1.1", {"yanked": "broken"})

        return d.addCallback(lambda r: Deferred.fromCoroutine(uploadAndYank(r)))

    async def test_pipSkipsYanked(self) -> None:
        """pip picks 1.0 when 1.1 is yanked and nothing is pinned."""
        result, target = await self.pipInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")

    async def test_pipPinnedYanked(self) -> None:
        """pip still installs the yanked 1.1 when it is pinned exactly."""
        result, target = await self.pipInstall("alice/staging", "demo-pkg==1.1")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.1")

    async def test_uvSkipsYanked(self) -> None:
        """uv picks 1.0 when 1.1 is yanked and nothing is pinned."""
        result, target = await self.uvInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")

    async def test_unyankedIsPicked(self) -> None:
        """After an unyank pip picks 1.1 again."""
        await self.mustAPI("PATCH", "/alice/dev/demo-pkg/1.1", {"yanked": False})
        result, target = await self.pipInstall("alice/staging", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.1")


class UploadLimitTests(_ClientCase):
    """A server started with a small C{--max-upload-size}."""

    serverOptions = ("--max-upload-size", "8192")

    def bigWheel(self) -> Dist:
        return buildWheel(extraFiles={f"{moduleName('demo-pkg')}/blob.bin": os.urandom(64 * 1024)})

    async def test_treq(self) -> None:
        """An HTTP upload larger than the limit gets 413 with a message, and nothing is stored."""
        from .distbuilder import uploadBody

        upload = uploadBody(self.bigWheel())
        code, content, response = await self.api(
            "POST", "/alice/dev/", headers={b"Content-Type": [upload.contentType]}, data=upload.body)
        self.assertEqual(code, 413, content)
        self.assertIn("--max-upload-size", jsonlib.loads(content)["message"])
        self.assertIsNone(await self.simpleFiles("alice/dev", "demo-pkg"))

    async def test_twine(self) -> None:
        """twine fails on an upload larger than the limit and shows the 413."""
        result = await self.twineUpload("alice/dev", self.bigWheel())
        self.assertNotEqual(result.returncode, 0, result.output)
        self.assertIn("413", result.output)
        self.assertIsNone(await self.simpleFiles("alice/dev", "demo-pkg"))

    async def test_smallUploadStillWorks(self) -> None:
        """An upload under the limit succeeds on the same server."""
        wheel = buildWheel()
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg"), {wheel.filename: wheel.sha256})


