"""
HTTPS from the server process itself: a throwaway CA made here, the real
C{twistd devpi} serving plain HTTP, C{ssl:} (key and certificate files) and
C{tls:} (a directory of PEM files) side by side on 127.0.0.1, and pip and
twine trusting that CA with C{--cert}.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .certs import CA
from .distbuilder import buildWheel, uploadBody, writeDist
from .helpers import basicAuth
from .serverprocess import CLIENT_TIMEOUT, Foreground, environment, freePort, tool, waitForAnswer

JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}


@implementer(IAgentEndpointFactory)
class _Loopback:
    """Connects to 127.0.0.1:C{port} whatever the URL's host, verifying TLS for C{hostname} (sent as SNI)."""

    def __init__(self, port: int, hostname: str, trustRoot: Certificate) -> None:
        self._port = port
        self._hostname = hostname
        self._trustRoot = trustRoot

    def endpointForURI(self, uri: Any) -> Any:
        return wrapClientTLS(optionsForClientTLS(self._hostname, trustRoot=self._trustRoot),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", self._port, timeout=10))


class TLSServerTests(TestCase):
    """One server with a plain, an C{ssl:} and a C{tls:} listener."""

    timeout = 600

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        tool("twistd")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.ca = CA()
        self.caFile = self.ca.writeCA(os.path.join(self.workdir, "ca.pem"))
        self.certFile, self.keyFile = self.ca.issue(["localhost"], ["127.0.0.1"]).write(self.workdir)
        self.tlsDir = os.path.join(self.workdir, "live")
        os.makedirs(self.tlsDir)
        self.ca.issue(["localhost"], ["127.0.0.1"]).writeCombined(os.path.join(self.tlsDir, "localhost.pem"))
        self.plainPort, self.sslPort, self.tlsPort = freePort(), freePort(), freePort()
        self.server = Foreground(
            self, self.workdir,
            "--listen", f"tcp:{self.plainPort}:interface=127.0.0.1",
            "--listen", f"ssl:{self.sslPort}:interface=127.0.0.1:privateKey={self.keyFile}:certKey={self.certFile}",
            # tls: listens on IPv6; the IPv4-mapped loopback address takes 127.0.0.1 connections only.
            "--listen", f"tls:{self.tlsDir}:port={self.tlsPort}:interface=\\:\\:ffff\\:127.0.0.1",
        )
        self.trustRoot = Certificate.loadPEM(self.ca.pem)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.https = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=self.trustRoot),
                                      pool=pool, connectTimeout=10))
        self.plainURL = f"http://127.0.0.1:{self.plainPort}"
        self.sslURL = f"https://127.0.0.1:{self.sslPort}"
        self.tlsURL = f"https://127.0.0.1:{self.tlsPort}"
        await waitForAnswer(self, self.https, self.sslURL + "/+api", self.server.alive, self.server.output)

    async def api(self, method: str, url: str, body: Any = None, auth: tuple[str, str] | None = None,
                  expect: int = 200) -> Any:
        headers = dict(JSON_HEADERS)
        if auth is not None:
            headers.update(basicAuth(*auth))
        data = None if body is None else json.dumps(body).encode("utf-8")
        response = await self.https.request(method, url, headers=headers, data=data, timeout=60)
        content = await response.content()
        self.assertEqual(response.code, expect, content)
        return response, json.loads(content) if content else None

    async def runClient(self, *command: str) -> subprocess.CompletedProcess:
        result = await deferToThread(
            subprocess.run, list(command), capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
            env=environment(self.workdir), cwd=self.workdir, stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0,
                         f"{command} failed:\n{result.stdout}{result.stderr}\n--- server:\n{self.server.output()}")
        return result

    async def test_uploadAndPipInstallOverHTTPS(self) -> None:
        """A wheel uploaded over HTTPS (multipart POST) installs with pip --cert through both TLS listeners."""
        await self.api("PUT", self.sslURL + "/alice", {"password": "alicepw"}, expect=201)
        await self.api("PUT", self.sslURL + "/alice/dev", {}, auth=("alice", "alicepw"))
        wheel = buildWheel(version="1.0")
        upload = uploadBody(wheel)
        response = await self.https.post(self.sslURL + "/alice/dev/", data=upload.body,
                                         headers={**upload.headers, **basicAuth("alice", "alicepw")}, timeout=60)
        self.assertEqual(response.code, 200, await response.content())
        response = await self.https.get(self.sslURL + "/alice/dev/+simple/demo-pkg/",
                                        headers={b"Accept": [b"application/vnd.pypi.simple.v1+json"]})
        page = json.loads(await response.content())
        pip = [os.path.join(os.path.dirname(sys.executable), "pip")]
        if not os.path.isfile(pip[0]):
            pip = [sys.executable, "-m", "pip"]
        for base in (self.sslURL, self.tlsURL):
            target = os.path.join(self.workdir, f"target-{base.rsplit(':', 1)[1]}")
            await self.runClient(*pip, "install", "--cert", self.caFile, "--index-url", f"{base}/alice/dev/+simple/",
                                 "--no-cache-dir", "--target", target, "demo-pkg")
            self.assertTrue(os.path.isdir(os.path.join(target, "demo_pkg")), os.listdir(target))
        self.assertIn(wheel.filename, json.dumps(page))

    async def test_twineUploadWithCert(self) -> None:
        """twine uploads over HTTPS trusting the CA with --cert."""
        twine = tool("twine")
        await self.api("PUT", self.sslURL + "/alice", {"password": "alicepw"}, expect=201)
        await self.api("PUT", self.sslURL + "/alice/dev", {}, auth=("alice", "alicepw"))
        wheel = buildWheel(version="2.0")
        path = writeDist(wheel, os.path.join(self.workdir, "dist"))
        await self.runClient(twine, "upload", "--repository-url", f"{self.sslURL}/alice/dev/", "--cert", self.caFile,
                             "-u", "alice", "-p", "alicepw", "--non-interactive", "--disable-progress-bar", path)
        _, body = await self.api("GET", self.sslURL + "/alice/dev/demo-pkg")
        self.assertIn("2.0", body["result"])

    async def test_securityHeaders(self) -> None:
        """HSTS is sent over TLS only; nosniff everywhere; the HTML page has a CSP."""
        response, _ = await self.api("GET", self.sslURL + "/+api")
        self.assertEqual(response.headers.getRawHeaders(b"Strict-Transport-Security"), [b"max-age=31536000"])
        self.assertEqual(response.headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        plain = await HTTPClient(Agent(reactor, pool=pool)).get(self.plainURL + "/+api", timeout=30)
        await plain.content()
        self.assertIsNone(plain.headers.getRawHeaders(b"Strict-Transport-Security"))
        self.assertEqual(plain.headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
        await self.api("PUT", self.sslURL + "/alice", {"password": "alicepw"}, expect=201)
        await self.api("PUT", self.sslURL + "/alice/dev", {}, auth=("alice", "alicepw"))
        html = await self.https.get(self.tlsURL + "/alice/dev/+simple/", headers={b"Accept": [b"text/html"]})
        await html.content()
        self.assertEqual(html.code, 200)
        self.assertIn(b"default-src 'none'", html.headers.getRawHeaders(b"Content-Security-Policy")[0])
        self.assertEqual(html.headers.getRawHeaders(b"Strict-Transport-Security"), [b"max-age=31536000"])

    async def test_modernProtocolsOnly(self) -> None:
        """TLS 1.3 is negotiated, 1.2 offers only AEAD ciphers, and TLS 1.1 is refused."""

        def handshake(port: int, minimum: Any, maximum: Any, ciphers: str | None = None) -> tuple[str, str]:
            context = ssl.create_default_context(cafile=self.caFile)
            context.minimum_version, context.maximum_version = minimum, maximum
            if ciphers:
                context.set_ciphers(ciphers)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return tls.version(), tls.cipher()[0]

        for port in (self.sslPort, self.tlsPort):
            version, _ = await deferToThread(handshake, port, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED)
            self.assertEqual(version, "TLSv1.3")
            version, cipher = await deferToThread(handshake, port, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
            self.assertEqual(version, "TLSv1.2")
            self.assertRegex(cipher, "GCM|CHACHA20")
            with self.assertRaises(ssl.SSLError):
                await deferToThread(handshake, port, ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1,
                                    "DEFAULT:@SECLEVEL=0")
            with self.assertRaises(ssl.SSLError):
                # a weak, non-forward-secret cipher suite is not offered
                await deferToThread(handshake, port, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2,
                                    "AES128-SHA:@SECLEVEL=0")

    async def test_tlsDirectoryPicksUpNewCertificates(self) -> None:
        """A certificate added to the tls: directory is served for its name without a restart."""
        self.ca.issue(["devpi.test"]).writeCombined(os.path.join(self.tlsDir, "devpi.test.pem"))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent.usingEndpointFactory(reactor, _Loopback(self.tlsPort, "devpi.test", self.trustRoot), pool=pool)
        response = await HTTPClient(agent).get(f"https://devpi.test:{self.tlsPort}/+api", timeout=30)
        body = json.loads(await response.content())
        self.assertEqual(response.code, 200)
        self.assertEqual(body["result"]["login"], f"https://devpi.test:{self.tlsPort}/+login")
        self.assertRegex(self.server.log(), r"TLS certificates from \S+: devpi.test, localhost")
