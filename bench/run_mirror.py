#!/usr/bin/env python3
"""
Benchmark of the mirror path of devpi-twisted against devpi-server 6.20.3
and nginx (the practical limit), in one run.

Workloads (see bench/README.rst):

- upstream:   nginx on 127.0.0.1 serves a PEP 691 JSON page
  /simple/benchmirror/ (50 small wheels and one 100 MB wheel per run) and
  the files under /files/; both mirrors fetch from it;
- warm pages: /root/pypi/+simple/benchmirror/ fetched once (cold), then
  with wrk at concurrency 1 and 10, as HTML and PEP 691 JSON (req/s, p50,
  p99);
- cold file:  the first GET of a 100 MB wheel through the mirror: time to
  the first body byte, compared with upstream's own, and MB/s;
- warm file:  the same wheel again, sequentially and with wrk -c10 (MB/s,
  MB = 10**6 bytes).

Reuses run_private.py's helpers (servers, wrk, table).  Standard library
only; needs wrk and nginx (Debian packages) and the side venv with
devpi-server 6.20.3.  Run by hand, never part of the test suite.  Only
127.0.0.1 is used, and every server started here is stopped in a finally
block.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_private as rp  # noqa: E402  (the helpers of the private-index benchmark)

from run_private import HOST, JSON_ACCEPT, Results, log  # noqa: E402

PROJECT = "benchmirror"
NSMALL = 50
BIG_SIZE = 100 * 1000 * 1000
BIG_FIRST = 100                      # benchmirror-1.0.100-py3-none-any.whl, then 1.0.101, ...
ROOT_PASSWORD = "benchroot"
PAGE_PATH = f"/root/pypi/+simple/{PROJECT}/"
CONCURRENCIES = (1, 10)
FILE_CONCURRENCY = 10
FORMATS = rp.FORMATS
REQUEST_TIMEOUT = 10

# The targets from the issue tracker.
TARGET_PAGES = 4.0          # warm pages: devpi-twisted / devpi-server req/s at least this
TARGET_FILE_DEVPI = 1.5     # warm file MB/s: devpi-twisted / devpi-server at least this
TARGET_FILE_NGINX = 0.5     # ... and devpi-twisted / nginx at least this
TARGET_TTFB_MS = 50.0       # cold file: first byte at most this many ms after upstream's

SERVER_NAMES = rp.SERVER_NAMES


def wheelName(version: str) -> str:
    return f"{PROJECT}-{version}-py3-none-any.whl"


# --------------------------------------------------------------------------
# The upstream: nginx serving a PEP 691 page and the files from disk


class Upstream(rp.Server):
    """nginx as the upstream index of both mirrors."""

    name = "upstream"

    def __init__(self, workdir: Path, pin: str | None, runs: int) -> None:
        super().__init__(workdir, pin)
        self.root = workdir / "upstream"
        self.www = self.root / "www"
        self.files: dict[str, dict] = {}   # filename -> {"path", "size", "sha256", "version"}
        self.bigNames: list[str] = []
        self.runs = runs

    def build(self) -> None:
        files = self.www / "files"
        files.mkdir(parents=True)
        for n in range(NSMALL):
            filename, content = rp.buildWheel(PROJECT, f"1.0.{n}")
            self._add(files, filename, f"1.0.{n}", content)
        payload = os.urandom(BIG_SIZE)
        for n in range(BIG_FIRST, BIG_FIRST + self.runs):
            filename, content = rp.buildWheel(PROJECT, f"1.0.{n}", payload)
            self._add(files, filename, f"1.0.{n}", content)
            self.bigNames.append(filename)
            del content
        del payload
        base = f"http://{HOST}:{self.port}/files/"
        entries = [{
            "filename": name,
            "url": base + name,
            "hashes": {"sha256": info["sha256"]},
            "requires-python": ">=3.8",
            "size": info["size"],
            "upload-time": "2024-01-01T00:00:00.000000Z",
        } for name, info in self.files.items()]
        page = {"meta": {"api-version": "1.1"}, "name": PROJECT,
                "versions": [info["version"] for info in self.files.values()], "files": entries}
        (self.www / "simple" / PROJECT).mkdir(parents=True)
        (self.www / "simple" / PROJECT / "index.json").write_text(json.dumps(page))
        (self.www / "simple" / "index.json").write_text(json.dumps(
            {"meta": {"api-version": "1.1"}, "projects": [{"name": PROJECT}]}))
        # The worker runs as nobody when nginx starts as root: let it read.
        for path in (self.workdir, self.root, *[p for p in self.root.rglob("*")]):
            path.chmod(0o755 if path.is_dir() else 0o644)

    def _add(self, directory: Path, filename: str, version: str, content: bytes) -> None:
        path = directory / filename
        path.write_bytes(content)
        self.files[filename] = {"path": path, "size": len(content),
                                "sha256": hashlib.sha256(content).hexdigest(), "version": version}

    def start(self) -> None:
        config = self.root / "nginx.conf"
        root = self.root
        config.write_text(rp.nginxConfig(root, self.port, self.www, access=f"{root}/access.log", locations=f"""
        location /simple/ {{ types {{ }} default_type "{JSON_ACCEPT}"; index index.json; }}
        location /files/ {{ types {{ }} default_type application/octet-stream; }}"""))
        t0 = time.monotonic()
        self._spawn(["nginx", "-e", str(root / "error.log"), "-p", str(root), "-c", str(config)])
        assert self.process is not None
        rp.waitForHTTP(self.port, "/ready", self.process, 30, self.logfile)
        self.startup = time.monotonic() - t0

    def mirrorURL(self) -> str:
        return f"http://{HOST}:{self.port}/simple/"

    def requestsFor(self, path: str) -> int:
        """How many requests for C{path} upstream's access log holds."""
        try:
            text = (self.root / "access.log").read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if f'"GET {path} ' in line)


# --------------------------------------------------------------------------
# The mirrors


class MirrorMixin:
    """Point root/pypi at the upstream and read the mirrored page."""

    name: str
    port: int

    def rootHeaders(self) -> dict[str, str]:
        return {"Authorization": rp.basicAuth("root", ROOT_PASSWORD)}

    def pointAt(self, client: rp.Client, mirrorURL: str, results: Results) -> None:
        body = json.dumps({"mirror_url": mirrorURL}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.rootHeaders()}
        status, _, data = client.request("PATCH", "/root/pypi", body, headers)
        if status in (401, 403) and hasattr(self, "loginHeaders"):
            results.info.append(f"{self.name}: PATCH with Basic auth -> {status}; used /+login instead")
            headers = {"Content-Type": "application/json", "Accept": "application/json", **self.loginHeaders()}
            status, _, data = client.request("PATCH", "/root/pypi", body, headers)
        if status != 200:
            raise RuntimeError(f"{self.name}: PATCH /root/pypi -> {status}: {data[:500]!r}")
        status, _, data = client.request("GET", "/root/pypi", None, {"Accept": "application/json"})
        config = json.loads(data).get("result", {})
        if status != 200 or config.get("mirror_url") != mirrorURL or config.get("type") != "mirror":
            raise RuntimeError(f"{self.name}: root/pypi is not a mirror of {mirrorURL}: {status} {data[:500]!r}")
        results.info.append(f"{self.name}: root/pypi config after PATCH: " + ", ".join(
            f"{k}={config[k]}" for k in sorted(config) if k.startswith("mirror") or k == "type"))


class MirrorTwisted(MirrorMixin, rp.DevpiTwisted):
    def start(self) -> None:
        serverdir = self.workdir / "twisted-server"
        t0 = time.monotonic()
        self._spawn([str(self.twistd), "-n", "--pidfile=", "devpi", "--serverdir", str(serverdir),
                     "--root-passwd", ROOT_PASSWORD, "--request-timeout", str(REQUEST_TIMEOUT),
                     "--listen", f"tcp:{self.port}:interface={HOST}"], env=self._env())
        assert self.process is not None
        rp.waitForHTTP(self.port, "/+api", self.process, 60, self.logfile)
        self.startup = time.monotonic() - t0


class MirrorDevpi(MirrorMixin, rp.DevpiServer):
    def start(self) -> None:
        serverdir = self.workdir / "devpi-server"
        binDir = self.venv / "bin"
        t0 = time.monotonic()
        with open(self.logfile, "ab") as handle:
            subprocess.run([str(binDir / "devpi-init"), "--serverdir", str(serverdir),
                            "--root-passwd", ROOT_PASSWORD],
                           stdout=handle, stderr=subprocess.STDOUT, check=True)
        self._spawn([str(binDir / "devpi-server"), "--serverdir", str(serverdir),
                     "--host", HOST, "--port", str(self.port),
                     "--request-timeout", str(REQUEST_TIMEOUT)])
        assert self.process is not None
        rp.waitForHTTP(self.port, "/+api", self.process, 180, self.logfile)
        self.startup = time.monotonic() - t0

    def loginHeaders(self) -> dict[str, str]:
        """devpi-client's way: POST /+login, then X-Devpi-Auth with the token."""
        client = rp.Client(self.port)
        try:
            status, _, data = client.request(
                "POST", "/+login", json.dumps({"user": "root", "password": ROOT_PASSWORD}).encode(),
                {"Content-Type": "application/json", "Accept": "application/json"})
        finally:
            client.close()
        if status != 200:
            raise RuntimeError(f"devpi-server: login failed: {status} {data[:300]!r}")
        token = json.loads(data)["result"]["password"]
        return {"X-Devpi-Auth": base64.b64encode(f"root:{token}".encode()).decode()}


# --------------------------------------------------------------------------
# Measurements


def timedGet(port: int, path: str, headers: dict[str, str] | None = None,
             hasher=None, bufsize: int = 1 << 20) -> dict:
    """
    One GET on a new connection: seconds to the response head, to the first
    body byte and to the last, the status, headers and body size.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        tHead = time.perf_counter()
        first = response.read(1)
        tFirst = time.perf_counter()
        size = len(first)
        if hasher is not None:
            hasher.update(first)
        buffer = bytearray(bufsize)
        view = memoryview(buffer)
        while True:
            n = response.readinto(view)
            if not n:
                break
            size += n
            if hasher is not None:
                hasher.update(view[:n])
        t1 = time.perf_counter()
        return {"status": response.status, "headers": {k.lower(): v for k, v in response.getheaders()},
                "head": tHead - t0, "ttfb": tFirst - t0, "total": t1 - t0, "size": size}
    finally:
        conn.close()


class DiscardingClient:
    """
    GETs over one keep-alive connection whose bodies the kernel throws away
    (C{recv} with C{MSG_TRUNC}, which TCP sockets on Linux take as "discard"):
    the client copies no body bytes, so one sequential client measures the
    server rather than its own copying, which on loopback caps any server at
    the same figure.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.scratch = bytearray(1 << 20)
        self.pending = b""

    def get(self, path: str) -> dict:
        t0 = time.perf_counter()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = self.pending
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError(f"connection closed before the response head of {path}")
            head += data
        tHead = time.perf_counter()
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" not in headers:
            raise RuntimeError(f"{path}: no Content-Length in {headers}")
        length = int(headers["content-length"])
        size = min(len(body), length)
        self.pending = body[length:]
        tFirst = tHead if size else None
        view = memoryview(self.scratch)
        while size < length:
            n = self.sock.recv_into(view, min(len(view), length - size), socket.MSG_TRUNC)
            if not n:
                raise RuntimeError(f"{path}: connection closed after {size:,} of {length:,} bytes")
            if tFirst is None:
                tFirst = time.perf_counter()
            size += n
        t1 = time.perf_counter()
        return {"status": int(lines[0].split()[1]), "headers": headers, "head": tHead - t0,
                "ttfb": (tFirst or t1) - t0, "total": t1 - t0, "size": size}

    def close(self) -> None:
        self.sock.close()


def discardingRate(port: int, path: str, seconds: float, connections: int = 1) -> tuple[float, list[dict]]:
    """
    Bytes per second of back-to-back GETs of C{path} on C{connections}
    keep-alive connections at once (a thread each; C{recv} lets go of the
    GIL) for about C{seconds}, and every GET's figures.
    """
    samples: list[dict] = []
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        try:
            connection = DiscardingClient(port)
            try:
                mine = [connection.get(path)]
                while time.perf_counter() < deadline:
                    mine.append(connection.get(path))
            finally:
                connection.close()
            samples.extend(mine)
        except BaseException as e:  # reported below, on the main thread
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"discarding client failed: {errors[0]!r}")
    return sum(s["size"] for s in samples) / elapsed, samples


def getBody(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    client = rp.Client(port)
    try:
        return client.request("GET", path, None, headers or {})
    finally:
        client.close()


def cpuSeconds(server: rp.Server) -> float | None:
    """User plus system CPU seconds of the server process and its children (nginx's workers)."""
    if server.process is None:
        return None
    pids = [server.process.pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in children.split()]
    except OSError:
        pass
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpuPer100MB(cpu: float, size: float) -> float:
    return cpu * 1e3 / (size / 1e8)


_BINARY = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def runWrkFile(url: str, concurrency: int, duration: int, pin: str | None) -> dict:
    """wrk on a big file: bytes/s from Transfer/sec (wrk's units are binary)."""
    argv = ["wrk", "-t2", f"-c{concurrency}", f"-d{duration}s", "--timeout", "60s", url]
    if pin:
        argv = ["taskset", "-c", pin] + argv
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}{completed.stdout}")
    output = completed.stdout
    transfer = re.search(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)", output, re.M)
    count = re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read", output)
    if not transfer or not count:
        raise RuntimeError("could not parse wrk output:\n" + output)
    result = {"bps": float(transfer.group(1)) * _BINARY[transfer.group(2)], "requests": int(count.group(1)),
              "bytes": float(count.group(2)) * _BINARY[count.group(3)], "non2xx": 0, "socket_errors": ""}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        result["non2xx"] = int(non2xx.group(1))
    errors = re.search(r"Socket errors:\s+(.*)", output)
    if errors:
        result["socket_errors"] = errors.group(1).strip()
    return result


def measurePages(server: rp.Server, paths: dict[str, str], args, results: Results) -> None:
    for fmt in FORMATS:
        accept = JSON_ACCEPT if fmt == "json" else None
        for concurrency in CONCURRENCIES:
            samples = []
            for _ in range(args.runs):
                sample = rp.runWrk(server.url(paths[fmt]), concurrency, args.duration, accept, args.wrk_pin)
                samples.append(sample)
                if sample["non2xx"] or sample["socket_errors"]:
                    results.problems.append(
                        f"{server.name}: warm page {fmt} c={concurrency}: non-2xx {sample['non2xx']}, "
                        f"socket errors: {sample['socket_errors'] or 'none'}")
            key = f"warm page {fmt} c={concurrency}"
            rps = rp.median([s["rps"] for s in samples])
            p50 = rp.median([s["p50"] for s in samples])
            p99 = rp.median([s["p99"] for s in samples])
            results.put(f"{key} req/s", server.name, rps, [s["rps"] for s in samples])
            results.put(f"{key} p50 ms", server.name, p50, [s["p50"] for s in samples])
            results.put(f"{key} p99 ms", server.name, p99, [s["p99"] for s in samples])
            log(f"{server.name}: {key}: {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                f"(runs: {', '.join('%.0f' % s['rps'] for s in samples)})")


def checkFile(server: rp.Server, what: str, sample: dict, expected: int, results: Results) -> bool:
    if sample["status"] != 200 or sample["size"] != expected:
        results.problems.append(f"{server.name}: {what}: status {sample['status']}, {sample['size']:,} bytes "
                                f"(expected 200 and {expected:,})")
        return False
    return True


def measureWarmFile(server: rp.Server, path: str, expected: int, args, results: Results) -> None:
    for connections in (1, FILE_CONCURRENCY):
        key = "sequential" if connections == 1 else f"c={connections}"
        rates, ttfbs, cpus = [], [], []
        for _ in range(args.runs):
            before = cpuSeconds(server)
            rate, samples = discardingRate(server.port, path, args.duration, connections)
            after = cpuSeconds(server)
            for sample in samples:
                if not checkFile(server, f"warm file {key}", sample, expected, results):
                    break
            rates.append(rate / 1e6)
            ttfbs.append(rp.median([s["ttfb"] * 1e3 for s in samples]))
            if before is not None and after is not None:
                cpus.append(cpuPer100MB(after - before, sum(s["size"] for s in samples)))
        results.put(f"warm file MB/s {key}", server.name, rp.median(rates), rates)
        if connections == 1:
            results.put("warm file TTFB ms", server.name, rp.median(ttfbs), ttfbs)
        if cpus:
            results.put(f"warm file {key} server CPU ms per 100 MB", server.name, rp.median(cpus), cpus)
        log(f"{server.name}: warm file {key}: {rp.median(rates):,.0f} MB/s, TTFB {rp.median(ttfbs):.2f} ms "
            f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
    # wrk copies every byte it receives, 8 KB at a time: on one core that
    # caps any server near the same figure, so it is shown, not judged.
    wrkSamples = []
    for _ in range(args.runs):
        sample = runWrkFile(server.url(path), FILE_CONCURRENCY, args.duration, args.wrk_pin)
        wrkSamples.append(sample)
        if sample["non2xx"] or sample["socket_errors"]:
            results.problems.append(
                f"{server.name}: warm file wrk c={FILE_CONCURRENCY}: non-2xx {sample['non2xx']}, "
                f"socket errors: {sample['socket_errors'] or 'none'}")
    rates = [s["bps"] / 1e6 for s in wrkSamples]
    results.put(f"warm file MB/s wrk c={FILE_CONCURRENCY}", server.name, rp.median(rates), rates)
    runs = ", ".join(f"{sample['bps'] / 1e6:.0f} ({sample['requests']} req)" for sample in wrkSamples)
    log(f"{server.name}: warm file wrk c={FILE_CONCURRENCY}: {rp.median(rates):,.0f} MB/s (runs: {runs})")


def settle(server: rp.Server, upstream: Upstream, path: str, name: str, results: Results) -> None:
    """Wait until a GET of the file is served without asking upstream: the warm runs are warm."""
    deadline = time.monotonic() + 20
    while True:
        time.sleep(0.5)
        before = upstream.requestsFor(f"/files/{name}")
        timedGet(server.port, path)
        if upstream.requestsFor(f"/files/{name}") == before:
            return
        if time.monotonic() > deadline:
            results.problems.append(f"{server.name}: {name} still fetched upstream on every GET; "
                                    f"the warm file figures are not warm")
            return


def measureUpstream(upstream: Upstream, results: Results) -> float:
    """Upstream's own first byte and MB/s, straight from nginx; also warms its page cache."""
    for name in upstream.bigNames:
        timedGet(upstream.port, f"/files/{name}")
    samples = [timedGet(upstream.port, f"/files/{upstream.bigNames[0]}") for _ in range(5)]
    for sample in samples:
        checkFile(upstream, "direct file", sample, upstream.files[upstream.bigNames[0]]["size"], results)
    ttfbs = [s["ttfb"] * 1e3 for s in samples]
    rates = [s["size"] / 1e6 / s["total"] for s in samples]
    ttfb = rp.median(ttfbs)
    results.put("cold file TTFB ms", "nginx", ttfb, ttfbs)
    results.put("cold file MB/s", "nginx", rp.median(rates), rates)
    page = [timedGet(upstream.port, f"/simple/{PROJECT}/", {"Accept": JSON_ACCEPT}) for _ in range(5)]
    results.put("cold page ms", "nginx", rp.median([s["total"] * 1e3 for s in page]))
    log(f"upstream direct: file TTFB {ttfb:.2f} ms, {rp.median(rates):,.0f} MB/s; "
        f"page {rp.median([s['total'] * 1e3 for s in page]):.2f} ms")
    return ttfb / 1e3


def fileLinks(pageURL: str, data: bytes) -> dict[str, str]:
    """filename -> path on the mirror, from a PEP 691 page."""
    links = {}
    for entry in json.loads(data).get("files", []):
        url = urllib.parse.urljoin(pageURL, entry["url"])
        parts = urllib.parse.urlsplit(url)
        links[entry["filename"]] = parts.path + (f"?{parts.query}" if parts.query else "")
    return links


def checkPage(server: rp.Server, fmt: str, data: bytes, contentType: str, upstream: Upstream,
              results: Results) -> None:
    if fmt == "json":
        count = len(json.loads(data).get("files", []))
        if not contentType.startswith(JSON_ACCEPT):
            results.problems.append(f"{server.name}: JSON page has Content-Type {contentType!r}")
    else:
        count = len(set(re.findall(rb'href="[^"]*?(benchmirror-1\.0\.\d+-py3-none-any\.whl)', data)))
    results.info.append(f"{server.name}: {fmt} page {len(data):,} bytes, {count} files, Content-Type {contentType}")
    if count != len(upstream.files):
        raise RuntimeError(f"{server.name}: {fmt} page lists {count} files, not {len(upstream.files)}:\n"
                           + data[:1000].decode(errors="replace"))


# --------------------------------------------------------------------------
# One mirror's session


def runMirror(server, upstream: Upstream, upstreamTTFB: float, args, work: dict, results: Results) -> None:
    log(f"starting {server.name} on {HOST}:{server.port}")
    client = rp.Client(server.port)
    try:
        server.start()
        log(f"{server.name}: first 200 after {server.startup:.1f} s")
        results.put("start to first 200 (s)", server.name, server.startup)
        server.noteRSS("start")
        server.pointAt(client, upstream.mirrorURL(), results)
        client.close()   # not left idle until the server's --idle-timeout

        # The cold page, then both formats (warm) for the checks and for nginx.
        cold = timedGet(server.port, PAGE_PATH, {"Accept": JSON_ACCEPT})
        if cold["status"] != 200:
            raise RuntimeError(f"{server.name}: cold page -> {cold['status']}")
        results.put("cold page ms", server.name, cold["total"] * 1e3, [cold["total"] * 1e3])
        log(f"{server.name}: cold page {cold['total'] * 1e3:.1f} ms")
        links: dict[str, str] = {}
        for fmt in FORMATS:
            status, headers, data = getBody(server.port, PAGE_PATH, {"Accept": JSON_ACCEPT} if fmt == "json" else {})
            if status != 200:
                raise RuntimeError(f"{server.name}: {fmt} page -> {status}: {data[:300]!r}")
            checkPage(server, fmt, data, headers.get("content-type", ""), upstream, results)
            if fmt == "json":
                links = fileLinks(server.url(PAGE_PATH), data)
            if server.name == "devpi-twisted":
                work.setdefault("pages", {})[fmt] = data
        measurePages(server, {fmt: PAGE_PATH for fmt in FORMATS}, args, results)
        server.noteRSS("after pages")

        # Cold files: each run fetches another 100 MB wheel for the first time.
        ttfbs, overs, rates, cpus = [], [], [], []
        for name in upstream.bigNames:
            info = upstream.files[name]
            before = upstream.requestsFor(f"/files/{name}")
            cpuBefore = cpuSeconds(server)
            sample = timedGet(server.port, links[name])
            cpuAfter = cpuSeconds(server)
            if cpuBefore is not None and cpuAfter is not None:
                cpus.append(cpuPer100MB(cpuAfter - cpuBefore, sample["size"]))
            if not checkFile(server, f"cold file {name}", sample, info["size"], results):
                continue
            fetched = upstream.requestsFor(f"/files/{name}") - before
            if fetched != 1:
                results.problems.append(f"{server.name}: cold {name}: upstream saw {fetched} requests for it")
            ttfbs.append(sample["ttfb"] * 1e3)
            overs.append((sample["ttfb"] - upstreamTTFB) * 1e3)
            rates.append(sample["size"] / 1e6 / sample["total"])
            log(f"{server.name}: cold {name}: head {sample['head'] * 1e3:.2f} ms, first byte "
                f"{sample['ttfb'] * 1e3:.2f} ms ({overs[-1]:+.2f} ms over upstream), "
                f"{rates[-1]:,.0f} MB/s; response headers: "
                + ", ".join(f"{k}: {v}" for k, v in sample["headers"].items()
                            if k in ("content-length", "transfer-encoding", "location")))
            # Verified once, untimed: the bytes the mirror has now are upstream's.
            hasher = hashlib.sha256()
            again = timedGet(server.port, links[name], hasher=hasher)
            if again["status"] != 200 or hasher.hexdigest() != info["sha256"]:
                results.problems.append(f"{server.name}: {name} served again: status {again['status']}, "
                                        f"sha256 {hasher.hexdigest()[:16]}... (upstream {info['sha256'][:16]}...)")
            refetched = upstream.requestsFor(f"/files/{name}") - before - 1
            if refetched:
                message = (f"{server.name}: the GET of {name} right after the cold one fetched it upstream "
                           f"again ({refetched} more upstream request(s))")
                if server.name == "devpi-twisted":
                    results.problems.append(message)
                else:
                    results.info.append(message)
        if ttfbs:
            results.put("cold file TTFB ms", server.name, rp.median(ttfbs), ttfbs)
            results.put("cold file TTFB over upstream ms", server.name, rp.median(overs), overs)
            results.put("cold file MB/s", server.name, rp.median(rates), rates)
        if cpus:
            results.put("cold file server CPU ms per 100 MB", server.name, rp.median(cpus), cpus)
        server.noteRSS("after cold files")

        big = upstream.bigNames[0]
        settle(server, upstream, links[big], big, results)
        measureWarmFile(server, links[big], upstream.files[big]["size"], args, results)
        server.noteRSS("end")
    finally:
        client.close()
        if args.profile and server.name == "devpi-twisted":
            stopProfile(args, results)
        server.stop()
        rp.scanLog(server, results)
        if server.rss:
            results.info.append(f"{server.name}: RSS MB " + ", ".join(
                f"{k} {v:.0f}" for k, v in server.rss.items() if v is not None))


def runNginx(server: rp.Nginx, upstream: Upstream, args, work: dict, results: Results) -> None:
    log(f"starting nginx on {HOST}:{server.port}")
    try:
        server.start()
        www = server.workdir / "nginx" / "www"
        big = upstream.bigNames[0]
        os.link(upstream.files[big]["path"], www / big)
        paths = {fmt: server.pagePath(fmt) for fmt in FORMATS}
        for fmt in FORMATS:
            status, headers, data = getBody(server.port, paths[fmt])
            if status != 200 or data != work["pages"][fmt]:
                raise RuntimeError(f"nginx serves other bytes for {fmt}")
            results.info.append(f"nginx: {fmt} page {len(data):,} bytes, "
                                f"Content-Type {headers.get('content-type')}")
        measurePages(server, paths, args, results)
        measureWarmFile(server, f"/{big}", upstream.files[big]["size"], args, results)
    finally:
        server.stop()
        errors = rp.tail(server.workdir / "nginx" / "error.log")
        if "[error]" in errors or "[crit]" in errors or "[emerg]" in errors:
            results.problems.append("nginx error log: " + errors[-500:])


# --------------------------------------------------------------------------
# Optional py-spy profile of devpi-twisted


def startProfile(args, server, results: Results) -> None:
    out = Path(args.profile)
    argv = [str(args.py_spy), "record", "--pid", str(server.process.pid), "--rate", "200",
            "--format", "speedscope" if out.suffix == ".json" else "flamegraph", "-o", str(out)]
    args._profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results.info.append(f"devpi-twisted: py-spy profile of its whole session in {out}")


def stopProfile(args, results: Results) -> None:
    profiler = getattr(args, "_profiler", None)
    if profiler is None or profiler.poll() is not None:
        return
    profiler.send_signal(2)   # SIGINT: py-spy writes the profile and exits
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(5)
        results.problems.append("py-spy did not stop; no profile")


# --------------------------------------------------------------------------
# The table


ROWS = ["cold page ms"]
for _fmt in FORMATS:
    for _c in CONCURRENCIES:
        ROWS += [f"warm page {_fmt} c={_c} req/s", f"warm page {_fmt} c={_c} p50 ms",
                 f"warm page {_fmt} c={_c} p99 ms"]
ROWS += ["cold file TTFB ms", "cold file TTFB over upstream ms", "cold file MB/s",
         "cold file server CPU ms per 100 MB", "warm file TTFB ms", "warm file MB/s sequential",
         "warm file sequential server CPU ms per 100 MB", f"warm file MB/s c={FILE_CONCURRENCY}",
         f"warm file c={FILE_CONCURRENCY} server CPU ms per 100 MB", f"warm file MB/s wrk c={FILE_CONCURRENCY}",
         "start to first 200 (s)"]


def printTable(results: Results) -> None:
    header = ["workload / figure", *SERVER_NAMES, "tw/devpi", "tw/nginx"]
    rows = []
    for key in ROWS:
        figures = results.figures.get(key)
        if not figures:
            continue
        tw, dv, ng = (figures.get(n) for n in SERVER_NAMES)
        relative = key.endswith("over upstream ms")
        rows.append([key, rp.fmtValue(tw, key), rp.fmtValue(dv, key), rp.fmtValue(ng, key),
                     "-" if relative else rp.ratio(tw, dv), "-" if relative else rp.ratio(tw, ng)])
    rp.printRows(header, rows)
    print("nginx rows: cold page and cold file = the upstream nginx itself, asked directly; warm pages = "
          "devpi-twisted's bytes from disk; warm file = the same 100 MB wheel from disk.")

    print("\nTargets:")
    checks = []
    for fmt in FORMATS:
        for c in CONCURRENCIES:
            checks.append((f"warm page {fmt} c={c} req/s", "devpi-server", TARGET_PAGES))
    for key in ("warm file MB/s sequential", f"warm file MB/s c={FILE_CONCURRENCY}"):
        checks.append((key, "devpi-server", TARGET_FILE_DEVPI))
        checks.append((key, "nginx", TARGET_FILE_NGINX))
    for key, against, target in checks:
        figures = results.figures.get(key, {})
        tw, other = figures.get("devpi-twisted"), figures.get(against)
        if tw is None or other is None:
            status = "not measured"
        else:
            status = f"{tw / other:.2f}x -> " + ("met" if tw / other >= target else "NOT MET")
        print(f"  {key:<34} >= {target:>3.1f}x {against:<12} : {status}")
    over = results.figures.get("cold file TTFB over upstream ms", {}).get("devpi-twisted")
    status = "not measured" if over is None else (
        f"{over:+.2f} ms -> " + ("met" if over <= TARGET_TTFB_MS else "NOT MET"))
    print(f"  {'cold file first byte over upstream':<34} <= {TARGET_TTFB_MS:.0f} ms{'':<11} : {status}")

    if results.info:
        print("\nNotes:")
        for note in results.info:
            print("  " + note)
    print("\nProblems seen:" if results.problems else "\nProblems seen: none")
    for problem in results.problems:
        print("  " + problem)


# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-devpi", action="store_true", help="do not run devpi-server")
    parser.add_argument("--skip-nginx", action="store_true", help="do not run the nginx reference")
    parser.add_argument("--quick", action="store_true", help="1 run of each measurement, 3 s wrk runs")
    rp.addCommonOptions(parser)
    parser.add_argument("--profile", type=Path,
                        help="record devpi-twisted's session with py-spy into this file "
                             "(.svg flame graph, or .json for speedscope)")
    parser.add_argument("--py-spy", type=Path,
                        default=Path.home() / ".cache" / "devpi-twisted-bench" / "tools" / "bin" / "py-spy",
                        help="py-spy for --profile")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 5)

    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)}; install with: apt-get update && apt-get install -y nginx wrk",
              file=sys.stderr)
        return 2
    if not args.twistd.exists():
        print(f"no twistd at {args.twistd}; pass --twistd", file=sys.stderr)
        return 2
    if args.profile and not args.py_spy.exists():
        print(f"no py-spy at {args.py_spy}; pass --py-spy", file=sys.stderr)
        return 2

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    serverPin = "0" if pin else None
    args.wrk_pin = "1" if pin else None
    if pin:
        os.sched_setaffinity(0, {1})   # this process is the GET client
    if not args.skip_devpi:
        rp.ensureDevpiVenv(args.devpi_venv)

    results = Results()
    results.info.append(
        f"runs per figure: {args.runs} (median), wrk {args.duration} s each; "
        + ("mirrors and the reference nginx pinned to CPU 0; wrk, the GET client and the upstream nginx "
           "to CPU 1" if pin else "no CPU pinning"))
    results.info.append(f"devpi-twisted: {rp.describeSource(args.src)}; {args.twistd}")
    workdir = Path(tempfile.mkdtemp(prefix="devpi-twisted-bench-mirror-"))
    started = time.monotonic()
    work: dict = {}
    try:
        upstream = Upstream(workdir, args.wrk_pin, args.runs)
        log(f"writing the upstream's files (work dir {workdir})")
        upstream.build()
        sizes = [upstream.files[n]["size"] for n in upstream.bigNames]
        results.info.append(
            f"upstream: nginx serving a PEP 691 page of {len(upstream.files)} files: {NSMALL} small wheels "
            f"and {len(sizes)} of {sizes[0]:,} bytes ({', '.join(upstream.bigNames)}; one random "
            f"{BIG_SIZE:,}-byte STORED member; one per cold run, the first for the warm runs); MB = 10**6 bytes")
        log(f"starting the upstream nginx on {HOST}:{upstream.port}")
        upstream.start()
        upstreamTTFB = measureUpstream(upstream, results)

        servers: list = [MirrorTwisted(workdir, serverPin, args.twistd, args.src)]
        if not args.skip_devpi:
            servers.append(MirrorDevpi(workdir, serverPin, args.devpi_venv))
        for server in servers:
            try:
                if args.profile and server.name == "devpi-twisted":
                    original = server.start

                    def startAndProfile(server=server, original=original) -> None:
                        original()
                        startProfile(args, server, results)
                    server.start = startAndProfile
                runMirror(server, upstream, upstreamTTFB, args, work, results)
            except Exception as error:
                results.problems.append(f"{server.name}: aborted: {error}")
                log(f"{server.name}: aborted: {error}")
                if server.name == "devpi-twisted":
                    raise
        if not args.skip_nginx:
            runNginx(rp.Nginx(workdir, serverPin, work.get("pages", {})), upstream, args, work, results)
    finally:
        stopProfile(args, results)
        for server in rp.STARTED:
            server.stop()
        errors = rp.tail(workdir / "upstream" / "error.log")
        if "[error]" in errors or "[crit]" in errors or "[emerg]" in errors:
            results.problems.append("upstream nginx error log: " + errors[-500:])
        rp.finish(results, args, workdir, started, printTable)
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
