"""
A bounded, seeded fuzz of the real server: a few thousand malformed HTTP
requests over sockets to C{twistd devpi} on 127.0.0.1, some on keep-alive
connections with pipelining; not one 5xx answer, every connection answered,
and no traceback in the server's log.
"""

import os
import random
import re
import socket
import time

from twisted.internet.threads import deferToThread

from .distbuilder import buildWheel, uploadBody
from .helpers import basicAuth
from .serverprocess import ROOT_PASSWORD, RealServerCase

SEED = 20261204
REQUESTS = 3000
DEADLINE = 40.0  # seconds for all of them; a few seconds are usual

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"PUSH", b"OPTIONS", b"get", b"Post",
           b"TRACE", b"CONNECT", b"FOO", b"G\xc3\xa9T", b"", b"GET GET", b"M-SEARCH"]
PATHS = [b"/", b"//", b"//evil.example/dev/+simple/Six/", b"/root/pypi/+simple/", b"/+api", b"/+login",
         b"/root/dev/+simple/Six", b"/%ff/", b"/root/%ff%fe/+simple/x/", b"/root/dev/+f/../../etc/passwd",
         b"/root/dev/%2e%2e/%2e%2e/", b"/+changelog/abc-", b"/+changelog/-1-", b"/+blob/xyz", b"/root/dev/x/1.0/+doc/../../",
         b"*", b"http://evil.example/root/dev/+simple/x/", b"/root/dev/+simple/x/?a=%ff&b", b"/\\evil/", b"/root",
         b"/root/dev/+f/ab/cd/x.tar.gz", b"/root/dev/+simple/" + b"a" * 3000 + b"/", b"/+status?%zz", b"/root/dev/x/1.0",
         b"/%00/", b"/root/dev/+provenance/x", b"/root/dev/+simple/x/refresh", b"/+metrics", b"/root/+api"]
HOSTS = [b"127.0.0.1", b"a" * 64 + b".example", b"\xff\xfe", b"", b"x:99999999", b"[::1]", b"[::1",
         b"evil.example", b"a..b", b".a", b"a b", b"\xc3\xa9.example", b"x" * 300, b"127.0.0.1:abc",
         b"localhost:3141", b"%41", b"*"]
OUTSIDE = [b"http://[::1", b"http://x:99999/", b"javascript:alert(1)", b"http://\xff/", b"https://ok.example/prefix/",
           b"http://a" * 100, b"http://u@evil/", b"//evil", b"http://[::1]:80/"]
ACCEPTS = [b"*/*", b"application/json", b"application/vnd.pypi.simple.v1+json;q=abc", b"text/html;q=",
           b";;;", b"\xff", b"application/vnd.pypi.simple.v1+json, text/html;q=0.01", b"a/b;q=1;q=2"]
AUTHS = [(b"Authorization", b"Basic !!!"), (b"Authorization", b"Basic " + b"QQ=="), (b"Authorization", b"Basic \xff"),
         (b"Authorization", b"Bearer x"), (b"X-Devpi-Auth", b"\xff\xfe"), (b"X-Devpi-Auth", b"bm90OmJhc2U2NA=="),
         (b"Authorization", b"Basic cm9vdDo="), (b"X-Devpi-Auth", b"Og==")]
OTHERS = [(b"If-None-Match", b'"\xff"'), (b"If-None-Match", b"*, W/"), (b"Range", b"bytes=9-1"),
          (b"Range", b"bytes=-0"), (b"Range", b"bytes=a-b, 1-"), (b"If-Modified-Since", b"yesterday"),
          (b"X-Forwarded-For", b"\xff, 1.2.3.4"), (b"Content-Type", b"multipart/form-data; boundary="),
          (b"Content-Type", b"application/x-www-form-urlencoded"), (b"Expect", b"100-continue"),
          (b"User-Agent", b"pip/\xff"), (b"Cookie", b"a=\xff; ;=;"), (b"Accept-Encoding", b"gzip;q=x")]


def request(rng: random.Random, keepAlive: bool, paths: list[bytes]) -> bytes:
    """One malformed-ish HTTP/1.1 request."""
    method = rng.choice(METHODS) if rng.random() < 0.3 else rng.choice(METHODS[:7])
    path = rng.choice(paths)
    if rng.random() < 0.3:
        path = path + bytes(rng.choice(b"%/+.~!$&'()*,;=:@?#-_abcXYZ019") for _ in range(rng.randint(1, 20)))
    version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x"])
    headers = []
    if rng.random() < 0.9:
        headers.append((b"Host", rng.choice(HOSTS) if rng.random() < 0.3 else b"127.0.0.1"))
    if rng.random() < 0.05:
        headers.append((b"Host", b"second.example"))
    if rng.random() < 0.3:
        headers.append((b"X-Outside-Url", rng.choice(OUTSIDE)))
    if rng.random() < 0.3:
        headers.append((b"Accept", rng.choice(ACCEPTS)))
    if rng.random() < 0.3:
        headers.append(rng.choice(AUTHS))
    for _ in range(rng.randint(0, 3)):
        headers.append(rng.choice(OTHERS))
    if rng.random() < 0.02:
        headers.append((b"X-Long", b"a" * rng.choice([16000, 17000, 40000])))
    if rng.random() < 0.02:
        headers += [(b"X-Many-%d" % i, b"1") for i in range(rng.choice([99, 101, 300]))]
    if rng.random() < 0.02:
        headers.append((b"Bad Name", b"x"))
    if rng.random() < 0.02:
        headers.append((b"NoColon", b""))
    body = b""
    framing = rng.random()
    if framing < 0.15:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing < 0.2:
        headers.append((b"Content-Length", rng.choice([b"-1", b"abc", b"1e3", b"99999999999999999999"])))
    elif framing < 0.25:
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = rng.choice([b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"5;x=\xff\r\nab\r\n0\r\n\r\n", b"-1\r\n\r\n"])
    elif framing < 0.27:
        headers.append((b"Transfer-Encoding", b"gzip, chunked"))
    elif framing < 0.29:
        headers += [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")]
        body = b"0\r\n\r\n"
    elif framing < 0.32 and method in (b"PUT", b"PATCH", b"POST"):
        body = rng.choice([b"{", b"[]", b'{"type": 1}', b"\xff\xfe", b"null", b'{"password": null}', b'"x"'])
        headers.append((b"Content-Length", str(len(body)).encode()))
        headers.append((b"Content-Type", b"application/json"))
    headers.append((b"Connection", b"keep-alive" if keepAlive else b"close"))
    line = method + b" " + path + b" " + version
    if rng.random() < 0.02:
        line = rng.choice([b"GET", b"GET  / HTTP/1.1", b"GET /\x00 HTTP/1.1", b"\xff\xfe", b"GET / HTTP/1.1 extra"])
    return line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body


def exchange(port: int, raw: bytes) -> bytes:
    """Send C{raw} on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # the server may answer (400, 413) and close before all of it is sent
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class FuzzTests(RealServerCase):
    """Malformed requests to the real server."""

    timeout = 300

    def setUp(self) -> object:
        return self.startForeground()

    async def test_thousandsOfMalformedRequests(self) -> None:
        """Thousands of malformed requests: all answered, none with a 5xx, no traceback logged."""
        root = basicAuth("root", ROOT_PASSWORD)
        response = await self.http.put(self.url + "/root/dev", json={"type": "stage", "bases": []}, headers=root)
        self.assertEqual(response.code, 200, await response.content())
        upload = uploadBody(buildWheel("six", "1.0"))
        response = await self.http.post(self.url + "/root/dev/", data=upload.body, headers={**upload.headers, **root})
        self.assertEqual(response.code, 200, await response.content())
        response = await self.http.get(self.url + "/root/dev/+simple/six/", headers={b"Accept": [b"text/html"]})
        link = re.search(rb'href="([^"#]+)', await response.content())
        assert link is not None
        filePath = os.path.normpath("/root/dev/+simple/six/" + link.group(1).decode()).encode()

        problems = await deferToThread(self.fuzz, [*PATHS, filePath])
        self.assertEqual(problems, [])
        bad = [line[:300] for line in self.server.log().splitlines()
               if any(marker in line for marker in ("Traceback (most recent call last)", "Unhandled Error",
                                                    "#critical]"))]
        self.assertEqual(bad, [])

    def fuzz(self, paths: list[bytes]) -> list[str]:
        rng = random.Random(SEED)
        problems: list[str] = []
        started = time.monotonic()
        sent = 0
        while sent < REQUESTS and time.monotonic() - started < DEADLINE:
            # One connection in ten is kept alive for two or three pipelined requests.
            count = rng.choice([2, 3]) if rng.random() < 0.1 else 1
            raws = [request(rng, i < count - 1, paths) for i in range(count)]
            sent += count
            answer = exchange(self.port, b"".join(raws))
            statuses = STATUS.findall(answer)
            if not statuses:
                problems.append(f"no answer to {raws!r}")
            elif any(status.startswith(b"5") for status in statuses):
                problems.append(f"{statuses} for {raws!r}: {answer[:500]!r}")
        self.assertGreaterEqual(sent, REQUESTS, "the fuzz did not finish in time")
        return problems[:10]
