"""
The mirror with real processes on 127.0.0.1: a L{FakePyPI} serving real
wheels on a loopback port, C{twistd -n devpi} mirroring it as C{root/pypi},
and pip and uv installing through it.

Every test starts a fresh fake and a fresh server (C{--request-timeout 2});
the server's C{root/pypi} (created by the first start, as for users) is
pointed at the fake with a PATCH.  The fake is stopped and started again on
the same port to show the mirror keeping cached packages installable while
upstream is gone, failing fast for the rest, and resuming when it is back.

Also here: upstream TLS, verified against C{--upstream-ca}, with a
throwaway CA and a fake served over TLS on 127.0.0.1.
"""

import json as jsonlib
import os
import subprocess
import sys
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from devpi_twisted.testing.fakepypi import FakePyPI, buildWheel

from .releaseharness import PIP_ACCEPT, basic
from .serverprocess import FakeUpstream
from .test_clients import BIN, ClientRunning, ServerProcess, tool

ROOT_PASSWORD = "secret"
FAIL_FAST = 15.0
JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}


def MirrorServer(testCase: TestCase, workdir: str, *extra: str) -> ServerProcess:
    """C{twistd -n devpi} on a fresh port and directory, with the default C{root/pypi}."""
    return ServerProcess(testCase, workdir, "--request-timeout", "2", *extra, rootPypi=True)


class MirrorClientTests(ClientRunning, TestCase):
    """pip and uv through C{root/pypi} while the fake upstream comes and goes."""

    timeout = 900

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.prepareClients()
        self.upstream = FakeUpstream(self)
        self.files = {
            "lib": self.upstream.addWheel("mirror-lib", "1.0"),
            "app": self.upstream.addWheel("mirror-app", "1.0", "mirror-lib>=1.0"),
            "extra": self.upstream.addWheel("mirror-extra", "1.0"),
            "late": self.upstream.addWheel("mirror-late", "2.0"),
        }
        await self.upstream.start()
        self.server = MirrorServer(self, self.workdir)
        await self.waitForServer()
        await self.api("PATCH", "/root/pypi", {"mirror_url": self.upstream.simpleURL, "mirror_cache_expiry": 0})


    async def api(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        headers = {**JSON_HEADERS, **basic("root", ROOT_PASSWORD)}
        data = None if body is None else jsonlib.dumps(body).encode("utf-8")
        response = await self.http.request(method, self.server.url + path, headers=headers, data=data, timeout=60)
        content = await response.content()
        self.assertEqual(response.code, expect, content)
        return jsonlib.loads(content)

    async def mirrorState(self) -> str:
        result = await self.api("GET", "/+status")
        return result["result"]["mirrors"].get("root/pypi", {}).get("state", "online")

    # the clients

    def target(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(path)
        return path

    @property
    def indexURL(self) -> str:
        return f"{self.server.url}/root/pypi/+simple/"

    async def pipInstall(self, target: str, *requirements: str) -> subprocess.CompletedProcess:
        pip = os.path.join(BIN, "pip")
        command = [pip] if os.path.isfile(pip) else [sys.executable, "-m", "pip"]
        return await self.runClient(*command, "install", "--index-url", self.indexURL, "--no-cache-dir",
                                    "--target", self.target(target), *requirements)

    async def uvInstall(self, target: str, *requirements: str) -> subprocess.CompletedProcess:
        return await self.runClient(tool("uv"), "pip", "install", "--index-url", self.indexURL,
                                    "--target", self.target(target), "--no-cache", "--python", sys.executable,
                                    *requirements)

    async def imported(self, target: str, *modules: str) -> list[str]:
        """The C{VERSION} of each module, imported from C{target} in a fresh Python."""
        env = dict(self.env, PYTHONPATH=os.path.join(self.workdir, target))
        code = "; ".join(f"import {m}; print({m}.VERSION)" for m in modules)
        result = await self.runClient(sys.executable, "-c", code, env=env)
        self.assertSucceeded(result)
        return result.stdout.split()

    async def cacheAppAndLib(self) -> None:
        result = await self.pipInstall("pip-first", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(await self.imported("pip-first", "mirror_app", "mirror_lib"), ["1.0", "1.0"])
        fetched = set(self.upstream.fileRequests())
        self.assertIn(f"/files/{self.files['app']}", fetched)
        self.assertIn(f"/files/{self.files['lib']}", fetched)

    async def waitUntilProbing(self, limit: float = 400.0) -> None:
        """Wait until the offline mirror's back-off delay is over."""
        deadline = time.monotonic() + limit
        while await self.mirrorState() == "offline":
            if time.monotonic() > deadline:
                self.fail(f"root/pypi stayed offline for {limit}s")
            await deferLater(reactor, 0.5, lambda: None)

    # the tests

    async def test_installThroughMirror(self) -> None:
        """pip installs app and lib through the mirror; uv and pip again take no file from upstream."""
        await self.cacheAppAndLib()
        before = list(self.upstream.fileRequests())
        result = await self.uvInstall("uv-second", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(await self.imported("uv-second", "mirror_app", "mirror_lib"), ["1.0", "1.0"])
        result = await self.pipInstall("pip-third", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(self.upstream.fileRequests(), before)

    async def test_uvFirst(self) -> None:
        """uv installs app and lib through a cold mirror, fetching each file once."""
        result = await self.uvInstall("uv-first", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(await self.imported("uv-first", "mirror_app", "mirror_lib"), ["1.0", "1.0"])
        wheels = [path for path in self.upstream.fileRequests() if path.endswith(".whl")]
        self.assertEqual(sorted(wheels), sorted(f"/files/{self.files[k]}" for k in ("app", "lib")))

    async def uncachedFailsFast(self, installer: str, limit: float) -> None:
        """The server answers an uncached project at once; the whole client run stays bounded."""
        started = time.monotonic()
        response = await self.http.get(self.server.url + "/root/pypi/+simple/mirror-extra/",
                                       headers={b"Accept": [PIP_ACCEPT]}, timeout=30)
        body = await response.content()
        self.assertEqual(response.code, 502, body)
        self.assertIn("mirror-extra", jsonlib.loads(body)["message"])
        self.assertLess(time.monotonic() - started, 3.0)
        install = self.pipInstall if installer == "pip" else self.uvInstall
        started = time.monotonic()
        result = await install(f"{installer}-uncached-{len(os.listdir(self.workdir))}", "mirror-extra")
        elapsed = time.monotonic() - started
        self.assertNotEqual(result.returncode, 0, result.output)
        self.assertLess(elapsed, limit, result.output)

    async def test_upstreamGoneAndBack(self) -> None:
        """With upstream stopped cached packages install and others fail fast; when it returns the mirror resumes."""
        await self.cacheAppAndLib()
        await self.upstream.stop()

        result = await self.pipInstall("pip-down", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(await self.imported("pip-down", "mirror_app", "mirror_lib"), ["1.0", "1.0"])
        result = await self.uvInstall("uv-down", "mirror-app")
        self.assertSucceeded(result)
        self.assertEqual(await self.mirrorState(), "offline")

        # pip retries a 502 five times (about 8 s), uv three times with
        # back-off (about 11 s): their own policies, the server answers at once.
        await self.uncachedFailsFast("pip", FAIL_FAST)
        await self.uncachedFailsFast("uv", FAIL_FAST + 5)

        await self.upstream.start()
        await self.waitUntilProbing()
        result = await self.pipInstall("pip-back", "mirror-late")
        self.assertSucceeded(result)
        self.assertEqual(await self.imported("pip-back", "mirror_late"), ["2.0"])
        self.assertEqual(await self.mirrorState(), "online")
        self.assertIn(f"/files/{self.files['late']}", self.upstream.fileRequests())

    async def test_upstreamHangs(self) -> None:
        """An upstream that accepts connections and never answers makes uncached installs fail fast too."""
        await self.cacheAppAndLib()
        self.upstream.fake.hang = True
        result = await self.pipInstall("pip-hang", "mirror-app")
        self.assertSucceeded(result)
        await self.uncachedFailsFast("pip", FAIL_FAST)
        self.upstream.fake.hang = False


# -- upstream TLS ------------------------------------------------------------


def _name(common: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def makeCertificate(common: str, issuer: Any = None, *, ca: bool = False,
                    ip: str | None = None, dns: str | None = None) -> tuple[Any, Any]:
    """A key and a certificate, self-signed or signed by C{issuer} (a key and certificate)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signerKey, signerCert = issuer if issuer is not None else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(signerCert.subject if signerCert is not None else _name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    names: list[Any] = []
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    if dns is not None:
        names.append(x509.DNSName(dns))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(signerKey, hashes.SHA256())


def pem(key: Any = None, certificate: Any = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data = b""
    if certificate is not None:
        data += certificate.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    return data


class UpstreamTLSTests(TestCase):
    """Upstream certificates are verified, against C{--upstream-ca} when given."""

    timeout = 120

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = makeCertificate("test CA", ca=True)
        self.otherCA = makeCertificate("another CA", ca=True)
        self.fake = FakePyPI()
        filename, data, _ = buildWheel("demo-pkg", "1.0")
        self.fake.addFile("demo-pkg", filename, data)
        self.filename = filename

    async def serve(self, serverCert: tuple[Any, Any]) -> str:
        from twisted.internet.endpoints import SSL4ServerEndpoint
        from twisted.internet.ssl import PrivateCertificate

        key, certificate = serverCert
        options = PrivateCertificate.loadPEM(pem(key, certificate)).options()
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            Site(self.fake.resource()))
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}/simple/"

    def caFile(self, *certificates: Any) -> str:
        path = os.path.join(self.dir, f"ca-{len(os.listdir(self.dir))}.pem")
        with open(path, "wb") as f:
            for certificate in certificates:
                f.write(pem(certificate=certificate))
        return path

    async def projectFiles(self, mirrorURL: str, caFile: str | None) -> Any:
        """The mirror's files of C{demo-pkg}, through the mirror parts C{makeService} builds."""
        from twisted.python.filepath import FilePath

        from devpi_twisted.config import ServerConfig
        from devpi_twisted.model.inheritance import Stage
        from devpi_twisted.app.compose import mirrorsOver, upstreamPool
        from devpi_twisted.testing import MemoryBlobStore, MemoryStorage

        config = ServerConfig(serverdir=FilePath(self.dir), listen=(), upstreamCA=caFile, requestTimeout=10)
        agent, pool = upstreamPool(config, reactor)
        mirrors = mirrorsOver(config, MemoryStorage(clock=reactor.seconds), MemoryBlobStore(), agent, reactor)
        pool.setServiceParent(mirrors)
        mirrors.startService()
        self.addCleanup(mirrors.stopService)
        stage = Stage("root", "pypi", {"type": "mirror", "mirror_url": mirrorURL, "mirror_cache_expiry": 1800})
        return await mirrors.projectFiles(stage, "demo-pkg", "../")

    async def test_verifiedWithUpstreamCA(self) -> None:
        """A certificate issued by the --upstream-ca CA for 127.0.0.1 is accepted."""
        url = await self.serve(makeCertificate("127.0.0.1", self.ca, ip="127.0.0.1"))
        files = await self.projectFiles(url, self.caFile(self.ca[1]))
        self.assertEqual([f.filename for f in files], [self.filename])

    async def test_untrusted(self) -> None:
        """Without the issuing CA the connection is refused and upstream never sees a request."""
        from devpi_twisted.errors import UpstreamError

        url = await self.serve(makeCertificate("127.0.0.1", self.ca, ip="127.0.0.1"))
        with self.assertRaises(UpstreamError):
            await self.projectFiles(url, self.caFile(self.otherCA[1]))
        with self.assertRaises(UpstreamError):
            await self.projectFiles(url, None)
        self.assertEqual(self.fake.requests, [])

    async def test_wrongHost(self) -> None:
        """A certificate from the right CA for another host name is refused."""
        from devpi_twisted.errors import UpstreamError

        url = await self.serve(makeCertificate("other.example", self.ca, dns="other.example"))
        with self.assertRaises(UpstreamError):
            await self.projectFiles(url, self.caFile(self.ca[1]))
        self.assertEqual(self.fake.requests, [])

    async def test_policyFromBundle(self) -> None:
        """upstreamTLSPolicy trusts every CA of a bundle, not only the first."""
        from twisted.web.client import Agent, HTTPConnectionPool

        from devpi_twisted.mirror.upstream import upstreamTLSPolicy

        url = await self.serve(makeCertificate("127.0.0.1", self.ca, ip="127.0.0.1"))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=upstreamTLSPolicy(self.caFile(self.otherCA[1], self.ca[1])),
                      pool=pool)
        response = await HTTPClient(agent).get(url + "demo-pkg/")
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_caBundle(self) -> None:
        """An --upstream-ca bundle whose second certificate issued upstream's is accepted."""
        url = await self.serve(makeCertificate("127.0.0.1", self.ca, ip="127.0.0.1"))
        files = await self.projectFiles(url, self.caFile(self.otherCA[1], self.ca[1]))
        self.assertEqual([f.filename for f in files], [self.filename])
