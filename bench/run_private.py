#!/usr/bin/env python3
"""
Benchmark of the private-index paths of devpi-twisted against devpi-server
6.20.3 and nginx (the practical limit), in one run.

Workloads (see bench/README.rst):

- uploads: 200 small wheels uploaded one after the other, with HTTP Basic
  auth on every request, exactly as twine sends them (uploads/s);
- pages:   /bench/top/+simple/benchpkg/ (200 files, inherited through a
  3-level chain bench/top -> bench/mid -> bench/base) as PEP 503 HTML and
  PEP 691 JSON, with wrk at concurrency 1, 10 and 50 (req/s, p50, p99);
- big:     5 wheels of 50 MB each (one random STORED member) (MB/s,
  MB = 10**6 bytes).

Standard library only; needs wrk and nginx (Debian packages) and builds a
side venv with devpi-server 6.20.3 on first use.  Run by hand, never part of
the test suite.  Only 127.0.0.1 is used, and every server started here is
stopped in a finally block.
"""

import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TWISTD = REPO / ".venv" / "bin" / "twistd"
DEFAULT_DEVPI_VENV = Path.home() / ".cache" / "devpi-twisted-bench" / "venv"
DEVPI_VERSION = "6.20.3"

HOST = "127.0.0.1"
USER, PASSWORD = "bench", "benchpw"
PROJECT = "benchpkg"
NFILES = 200
BIG_PROJECT = "benchbig"
BIG_COUNT = 5
BIG_SIZE = 50 * 1000 * 1000
PAGE_PATH = f"/{USER}/top/+simple/{PROJECT}/"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
CONCURRENCIES = (1, 10, 50)
FORMATS = ("html", "json")

# The targets from the issue tracker: devpi-twisted / devpi-server at least this.
TARGET_PAGES = 20.0
TARGET_UPLOADS = 10.0
TARGET_BIG = 3.0

SERVER_NAMES = ("devpi-twisted", "devpi-server", "nginx")
STARTED: list = []   # every server spawned, stopped again in main's finally


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Wheels and twine-style upload bodies


def _recordHash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def buildWheel(name: str, version: str, payload: bytes | None = None) -> tuple[str, bytes]:
    """A small valid wheel (or one with a big random STORED member)."""
    distInfo = f"{name}-{version}.dist-info"
    members: list[tuple[str, bytes, int]] = [
        (f"{name}/__init__.py", f'__version__ = "{version}"\n'.encode(), zipfile.ZIP_DEFLATED),
    ]
    if payload is not None:
        members.append((f"{name}/payload.bin", payload, zipfile.ZIP_STORED))
    members += [
        (f"{distInfo}/METADATA",
         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
         f"Summary: devpi-twisted benchmark package\nRequires-Python: >=3.8\n".encode(),
         zipfile.ZIP_DEFLATED),
        (f"{distInfo}/WHEEL",
         b"Wheel-Version: 1.0\nGenerator: devpi-twisted-bench\nRoot-Is-Purelib: true\n"
         b"Tag: py3-none-any\n",
         zipfile.ZIP_DEFLATED),
    ]
    record = "".join(f"{path},{_recordHash(data)},{len(data)}\n" for path, data, _ in members)
    record += f"{distInfo}/RECORD,,\n"
    members.append((f"{distInfo}/RECORD", record.encode(), zipfile.ZIP_DEFLATED))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data, compression in members:
            info = zipfile.ZipInfo(path, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return f"{name}-{version}-py3-none-any.whl", buffer.getvalue()


BOUNDARY = "b7e1a2c40f6d4e1f9a2b3c4d5e6f7a8b"


def twineBody(name: str, version: str, filename: str, content: bytes) -> bytes:
    """
    The multipart body twine 7 (requests-toolbelt) sends for one file: its
    digests are sha256 and blake2_256 only (twine stopped sending md5).
    """
    fields = [
        ("name", name),
        ("version", version),
        ("filetype", "bdist_wheel"),
        ("pyversion", "py3"),
        ("metadata_version", "2.1"),
        ("summary", "devpi-twisted benchmark package"),
        ("requires_python", ">=3.8"),
        ("sha256_digest", hashlib.sha256(content).hexdigest()),
        ("blake2_256_digest", hashlib.blake2b(content, digest_size=32).hexdigest()),
        (":action", "file_upload"),
        ("protocol_version", "1"),
    ]
    parts = []
    for key, value in fields:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="content"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode())
    parts.append(content)
    parts.append(f"\r\n--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


def basicAuth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class Upload:
    def __init__(self, name: str, version: str, filename: str, content: bytes) -> None:
        self.name, self.version, self.filename = name, version, filename
        self.size = len(content)
        self.body = twineBody(name, version, filename, content)


def smallUploads() -> list[Upload]:
    uploads = []
    for n in range(NFILES):
        version = f"1.0.{n}"
        filename, content = buildWheel(PROJECT, version)
        uploads.append(Upload(PROJECT, version, filename, content))
    return uploads


def bigUploads() -> list[Upload]:
    payload = os.urandom(BIG_SIZE)
    uploads = []
    for n in range(BIG_COUNT):
        version = f"1.0.{n}"
        filename, content = buildWheel(BIG_PROJECT, version, payload)
        uploads.append(Upload(BIG_PROJECT, version, filename, content))
    return uploads


# --------------------------------------------------------------------------
# HTTP helpers


class Client:
    """A keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=300)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def freePort() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def waitForHTTP(port: int, path: str, process: subprocess.Popen, timeout: float, logfile: Path) -> float:
    """Seconds until C{path} answered 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {logfile}:\n"
                               + tail(logfile))
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no 200 from :{port}{path} within {timeout} s; see {logfile}:\n" + tail(logfile))


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rssMB(pid: int) -> float | None:
    """Resident memory of the process and its children, in MB."""
    total = 0
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in children.split()]
    except OSError:
        pass
    found = False
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    found = True
        except OSError:
            pass
    return total / 1024 if found else None


# --------------------------------------------------------------------------
# Servers


class Server:
    name = "?"

    def __init__(self, workdir: Path, pin: str | None) -> None:
        self.workdir = workdir
        self.pin = pin
        self.port = freePort()
        self.process: subprocess.Popen | None = None
        self.logfile = workdir / f"{self.name}.log"
        self.startup: float | None = None
        self.rss: dict[str, float | None] = {}

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        STARTED.append(self)
        if self.pin:
            argv = ["taskset", "-c", self.pin] + argv
        self._logHandle = open(self.logfile, "ab")
        self.process = subprocess.Popen(
            argv, stdout=self._logHandle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(5)
        self._logHandle.close()

    def noteRSS(self, when: str) -> None:
        if self.process is not None:
            self.rss[when] = rssMB(self.process.pid)

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


class IndexServer(Server):
    """What devpi-twisted and devpi-server have in common: devpi's JSON API."""

    authHeader: str

    def api(self, client: Client, method: str, path: str, body: object, auth: bool = True) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers.update(self.authHeaders())
        status, _, data = client.request(method, path, json.dumps(body).encode(), headers)
        if status not in (200, 201):
            raise RuntimeError(f"{self.name}: {method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data) if data else {}

    def authHeaders(self) -> dict[str, str]:
        return {"Authorization": basicAuth(USER, PASSWORD)}

    def createUser(self, client: Client) -> None:
        self.api(client, "PUT", f"/{USER}", {"password": PASSWORD, "email": "bench@example.invalid"},
                 auth=False)

    def createIndex(self, client: Client, index: str, bases: str) -> None:
        self.api(client, "PUT", f"/{USER}/{index}", {"type": "stage", "bases": bases, "volatile": True})

    def uploadHeaders(self, upload: Upload) -> dict[str, str]:
        # Basic auth on every request, as twine sends it.
        return {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Authorization": basicAuth(USER, PASSWORD),
            "User-Agent": "twine/6.1.0 CPython/3.11.7",
            "Accept": "*/*",
        }

    def uploadPath(self, index: str) -> str:
        return f"/{USER}/{index}/"


class DevpiTwisted(IndexServer):
    name = "devpi-twisted"

    def __init__(self, workdir: Path, pin: str | None, twistd: Path, src: Path | None = None) -> None:
        super().__init__(workdir, pin)
        self.twistd = twistd
        self.src = src

    def start(self) -> None:
        serverdir = self.workdir / "twisted-server"
        t0 = time.monotonic()
        self._spawn([str(self.twistd), "-n", "--pidfile=", "devpi", "--serverdir", str(serverdir),
                     "--root-passwd", "", "--no-root-pypi",
                     "--listen", f"tcp:{self.port}:interface={HOST}"], env=self._env())
        assert self.process is not None
        waitForHTTP(self.port, "/+api", self.process, 60, self.logfile)
        self.startup = time.monotonic() - t0


    def _env(self) -> dict[str, str] | None:
        """With --src, import devpi_twisted (and its twisted plugin) from there."""
        if self.src is None:
            return None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.src), env.get("PYTHONPATH")]))
        return env


class DevpiServer(IndexServer):
    name = "devpi-server"

    def __init__(self, workdir: Path, pin: str | None, venv: Path) -> None:
        super().__init__(workdir, pin)
        self.venv = venv
        self.token: str | None = None

    def start(self) -> None:
        serverdir = self.workdir / "devpi-server"
        binDir = self.venv / "bin"
        t0 = time.monotonic()
        with open(self.logfile, "ab") as handle:
            subprocess.run([str(binDir / "devpi-init"), "--serverdir", str(serverdir),
                            "--root-passwd", "", "--no-root-pypi"],
                           stdout=handle, stderr=subprocess.STDOUT, check=True)
        self._spawn([str(binDir / "devpi-server"), "--serverdir", str(serverdir),
                     "--host", HOST, "--port", str(self.port)])
        assert self.process is not None
        waitForHTTP(self.port, "/+api", self.process, 180, self.logfile)
        self.startup = time.monotonic() - t0


def ensureDevpiVenv(venv: Path) -> None:
    if (venv / "bin" / "devpi-server").exists():
        version = subprocess.run([str(venv / "bin" / "devpi-server"), "--version"],
                                 capture_output=True, text=True).stdout.strip()
        if version == DEVPI_VERSION:
            return
        log(f"{venv} has devpi-server {version!r}; reinstalling {DEVPI_VERSION}")
    log(f"creating {venv} with devpi-server=={DEVPI_VERSION} (about a minute)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"devpi-server=={DEVPI_VERSION}"],
                   check=True)


def nginxConfig(root: Path, port: int, www: Path, access: str, locations: str, workers: int = 1) -> str:
    """C{workers} nginx workers serving C{www} on C{port} with sendfile, their state under C{root}, plus C{locations}."""
    return f"""
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {access};
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {HOST}:{port};
        root {www};{locations}
        location = /ready {{ return 200; }}
    }}
}}
"""


class Nginx(Server):
    name = "nginx"
    workers = 1   # worker processes

    def __init__(self, workdir: Path, pin: str | None, pages: dict[str, bytes], file: bytes | None = None) -> None:
        super().__init__(workdir, pin)
        self.pages = pages
        self.file = file

    def start(self) -> None:
        root = self.workdir / "nginx"
        www = root / "www"
        www.mkdir(parents=True)
        # The worker runs as nobody when nginx starts as root: let it read.
        for path in (self.workdir, root, www):
            path.chmod(0o755)
        files = {f"page.{fmt}": data for fmt, data in self.pages.items()}
        if self.file is not None:
            files["file.whl"] = self.file
        for name, data in files.items():
            (www / name).write_bytes(data)
            (www / name).chmod(0o644)
        config = root / "nginx.conf"
        config.write_text(nginxConfig(root, self.port, www, access="off", locations=f"""
        location = /page.html {{ types {{ }} default_type "text/html; charset=utf-8"; }}
        location = /page.json {{ types {{ }} default_type "{JSON_ACCEPT}"; }}
        # The "upload" limit: read the body and discard it.
        location = /upload/ {{ client_max_body_size 0; return 200; }}""", workers=self.workers))
        t0 = time.monotonic()
        self._spawn(["nginx", "-e", str(root / "error.log"), "-p", str(root), "-c", str(config)])
        assert self.process is not None
        waitForHTTP(self.port, "/ready", self.process, 30, self.logfile)
        self.startup = time.monotonic() - t0

    def pagePath(self, fmt: str) -> str:
        return f"/page.{fmt}"


# --------------------------------------------------------------------------
# Measurements


def uploadRun(client: Client, path: str, headers: dict[str, str], uploads: list[Upload]) -> tuple[float, list[str]]:
    """Upload every file one after the other; seconds and the failures."""
    failures = []
    t0 = time.perf_counter()
    for upload in uploads:
        status, _, data = client.request("POST", path, upload.body, headers)
        if status != 200:
            failures.append(f"{upload.filename}: {status} {data[:200]!r}")
    return time.perf_counter() - t0, failures


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parseWrk(output: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and p50 and p99):
        raise RuntimeError("could not parse wrk output:\n" + output)
    result = {"rps": float(rps.group(1)), "p50": _ms(p50.group(1)), "p99": _ms(p99.group(1)),
              "non2xx": 0, "socket_errors": ""}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        result["non2xx"] = int(non2xx.group(1))
    errors = re.search(r"Socket errors:\s+(.*)", output)
    if errors:
        result["socket_errors"] = errors.group(1).strip()
    return result


def runWrk(url: str, concurrency: int, duration: int, accept: str | None, pin: str | None) -> dict:
    threads = 1 if concurrency == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "--latency"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    argv.append(url)
    if pin:
        argv = ["taskset", "-c", pin] + argv
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}{completed.stdout}")
    return parseWrk(completed.stdout)


def median(values: list[float]) -> float:
    return statistics.median(values)


class Results:
    """figures[workload][server] = value; notes collected along the way."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}
        self.raw: dict[str, dict[str, list]] = {}
        self.problems: list[str] = []
        self.info: list[str] = []

    def put(self, workload: str, server: str, value: float, raw: list | None = None) -> None:
        self.figures.setdefault(workload, {})[server] = value
        if raw is not None:
            self.raw.setdefault(workload, {})[server] = raw


def measureUploads(server: IndexServer | Nginx, client: Client, uploads: list[Upload], runs: int,
                   results: Results, prepare) -> None:
    rates = []
    for run in range(runs):
        path, headers = prepare(run)
        seconds, failures = uploadRun(client, path, headers, uploads)
        rates.append(len(uploads) / seconds)
        log(f"{server.name}: {len(uploads)} uploads in {seconds:.2f} s = {rates[-1]:.1f}/s")
        if failures:
            results.problems.append(f"{server.name}: {len(failures)} uploads failed, first: {failures[0]}")
    results.put("uploads/s (200 small, Basic auth)", server.name, median(rates), rates)


def measureBig(server: Server, client: Client, uploads: list[Upload], runs: int,
               results: Results, prepare) -> None:
    rates = []
    total = sum(u.size for u in uploads)
    for run in range(runs):
        path, headers = prepare(run)
        seconds, failures = uploadRun(client, path, headers, uploads)
        rates.append(total / 1e6 / seconds)
        log(f"{server.name}: {len(uploads)} x {BIG_SIZE / 1e6:.0f} MB in {seconds:.2f} s "
            f"= {rates[-1]:.0f} MB/s")
        if failures:
            results.problems.append(f"{server.name}: {len(failures)} big uploads failed, first: {failures[0]}")
    results.put("big uploads MB/s (5 x 50 MB)", server.name, median(rates), rates)


def measureGets(server: Server, label: str, path: str, accept: str | None, runs: int, duration: int,
                wrkPin: str | None, results: Results) -> None:
    """wrk on one path at each concurrency: the rows C{<label> c=N req/s}, p50 and p99."""
    for concurrency in CONCURRENCIES:
        samples = []
        for _ in range(runs):
            sample = runWrk(server.url(path), concurrency, duration, accept, wrkPin)
            samples.append(sample)
            if sample["non2xx"] or (sample["socket_errors"] and concurrency <= 1000):
                results.problems.append(
                    f"{server.name}: {label} c={concurrency}: non-2xx {sample['non2xx']}, "
                    f"socket errors: {sample['socket_errors'] or 'none'}")
        key = f"{label} c={concurrency}"
        rps = median([s["rps"] for s in samples])
        p50 = median([s["p50"] for s in samples])
        p99 = median([s["p99"] for s in samples])
        results.put(f"{key} req/s", server.name, rps, [s["rps"] for s in samples])
        results.put(f"{key} p50 ms", server.name, p50, [s["p50"] for s in samples])
        results.put(f"{key} p99 ms", server.name, p99, [s["p99"] for s in samples])
        perRun = ", ".join(f"{sample['rps']:.0f}" for sample in samples)
        log(f"{server.name}: {key}: {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms (runs: {perRun})")


def measurePages(server: Server, paths: dict[str, str], runs: int, duration: int, wrkPin: str | None,
                 results: Results) -> None:
    for fmt in FORMATS:
        measureGets(server, f"page {fmt}", paths[fmt], JSON_ACCEPT if fmt == "json" else None, runs, duration,
                    wrkPin, results)


def firstFile(server: Server, page: bytes) -> tuple[str, bytes]:
    """The path of the first file a JSON page lists, and its bytes (checked against the page's sha256)."""
    entry = json.loads(page)["files"][0]
    url = urllib.parse.urljoin(server.url(PAGE_PATH), entry["url"])
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{server.name}: {entry['filename']} does not match its sha256")
    parts = urllib.parse.urlsplit(url)
    return parts.path, data


def fetchPage(server: Server, path: str, fmt: str) -> tuple[bytes, str]:
    headers = {"Accept": JSON_ACCEPT} if fmt == "json" else {}
    request = urllib.request.Request(server.url(path), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), response.headers.get("Content-Type", "")


def checkPage(server: Server, fmt: str, data: bytes, contentType: str, results: Results) -> None:
    """The page must list all 200 files, inherited through the chain."""
    if fmt == "json":
        count = len(json.loads(data).get("files", []))
        if not contentType.startswith(JSON_ACCEPT):
            results.problems.append(f"{server.name}: JSON page has Content-Type {contentType!r}")
    else:
        count = len(set(re.findall(rb'href="[^"]*?(benchpkg-1\.0\.\d+-py3-none-any\.whl)', data)))
    results.info.append(f"{server.name}: {fmt} page {len(data):,} bytes, {count} files, "
                        f"Content-Type {contentType}")
    if count != NFILES:
        raise RuntimeError(f"{server.name}: {fmt} page lists {count} files, not {NFILES}:\n"
                           + data[:1000].decode(errors="replace"))


def scanLog(server: Server, results: Results) -> None:
    try:
        lines = server.logfile.read_text(errors="replace").splitlines()
    except OSError:
        return
    pattern = re.compile(r"Traceback|Unhandled|CRITICAL|\bERROR\b|Exception|\" 5\d\d |\b5\d\d Internal")
    bad = [line for line in lines if pattern.search(line)]
    if bad:
        results.problems.append(f"{server.name}: {len(bad)} suspicious log lines in {server.logfile}, "
                                f"first: {bad[0][:300]}")


# --------------------------------------------------------------------------
# One server's session


def runIndexServer(server: IndexServer, args, work: dict, results: Results) -> None:
    only = args.only
    runs, duration = args.runs, args.duration
    log(f"starting {server.name} on {HOST}:{server.port}")
    client = Client(server.port)
    try:
        server.start()
        log(f"{server.name}: first 200 after {server.startup:.1f} s")
        results.put("start to first 200 (s)", server.name, server.startup)
        server.noteRSS("start")
        server.createUser(client)
        if only in (None, "uploads", "pages"):
            server.createIndex(client, "base", "")
            server.createIndex(client, "mid", f"{USER}/base")
            server.createIndex(client, "top", f"{USER}/mid")

            def prepare(run: int) -> tuple[str, dict]:
                index = "base" if run == 0 else f"up{run}"
                if run:
                    server.createIndex(client, index, "")
                return server.uploadPath(index), server.uploadHeaders(work["small"][0])

            if only == "pages":
                seconds, failures = uploadRun(client, server.uploadPath("base"),
                                              server.uploadHeaders(work["small"][0]), work["small"])
                if failures:
                    raise RuntimeError(f"{server.name}: uploads failed: {failures[:3]}")
            else:
                measureUploads(server, client, work["small"], runs, results, prepare)
            server.noteRSS("after uploads")
        if only in (None, "pages"):
            paths = {}
            for fmt in FORMATS:
                data, contentType = fetchPage(server, PAGE_PATH, fmt)
                checkPage(server, fmt, data, contentType, results)
                paths[fmt] = PAGE_PATH
                if server.name == "devpi-twisted":
                    work.setdefault("pages", {})[fmt] = data
            measurePages(server, paths, runs, duration, args.wrk_pin, results)
            filePath, fileData = firstFile(server, fetchPage(server, PAGE_PATH, "json")[0])
            if server.name == "devpi-twisted":
                work["file"] = fileData
            measureGets(server, "small file", filePath, None, runs, duration, args.wrk_pin, results)
            server.noteRSS("after pages")
        if only in (None, "big"):
            def prepareBig(run: int) -> tuple[str, dict]:
                index = f"big{run}"
                server.createIndex(client, index, "")
                return server.uploadPath(index), server.uploadHeaders(work["big"][0])
            measureBig(server, client, work["big"], runs, results, prepareBig)
            server.noteRSS("end")
    finally:
        client.close()
        server.stop()
        scanLog(server, results)
        if server.rss:
            results.info.append(f"{server.name}: RSS MB " + ", ".join(
                f"{k} {v:.0f}" for k, v in server.rss.items() if v is not None))


def runNginx(server: Nginx, args, work: dict, results: Results) -> None:
    only = args.only
    log(f"starting nginx on {HOST}:{server.port}")
    client = Client(server.port)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
               "Authorization": basicAuth(USER, PASSWORD)}
    try:
        server.start()
        if only in (None, "uploads"):
            measureUploads(server, client, work["small"], args.runs, results,
                           lambda run: ("/upload/", headers))
        if only in (None, "pages") and work.get("pages"):
            paths = {fmt: server.pagePath(fmt) for fmt in FORMATS}
            for fmt in FORMATS:
                data, contentType = fetchPage(server, paths[fmt], fmt)
                if data != work["pages"][fmt]:
                    raise RuntimeError(f"nginx serves other bytes for {fmt}")
                results.info.append(f"nginx: {fmt} page {len(data):,} bytes, Content-Type {contentType}")
            measurePages(server, paths, args.runs, args.duration, args.wrk_pin, results)
            if work.get("file"):
                measureGets(server, "small file", "/file.whl", None, args.runs, args.duration, args.wrk_pin,
                            results)
        if only in (None, "big"):
            measureBig(server, client, work["big"], args.runs, results,
                       lambda run: ("/upload/", headers))
    finally:
        client.close()
        server.stop()
        errors = tail(server.workdir / "nginx" / "error.log")
        if "[error]" in errors or "[crit]" in errors or "[emerg]" in errors:
            results.problems.append("nginx error log: " + errors[-500:])


# --------------------------------------------------------------------------
# The table


def fmtValue(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("ms"):
        return f"{value:.2f}"
    if metric.endswith("(s)"):
        return f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 1 else f"{r:.3f}x")


def printTable(results: Results) -> None:
    order = ["uploads/s (200 small, Basic auth)"]
    for fmt in FORMATS:
        for c in CONCURRENCIES:
            order += [f"page {fmt} c={c} req/s", f"page {fmt} c={c} p50 ms", f"page {fmt} c={c} p99 ms"]
    for c in CONCURRENCIES:
        order += [f"small file c={c} req/s", f"small file c={c} p50 ms", f"small file c={c} p99 ms"]
    order += ["big uploads MB/s (5 x 50 MB)", "start to first 200 (s)"]
    header = ["workload / figure", *SERVER_NAMES, "tw/devpi", "tw/nginx"]
    rows = []
    for key in order:
        figures = results.figures.get(key)
        if not figures:
            continue
        tw, dv, ng = (figures.get(n) for n in SERVER_NAMES)
        rows.append([key, fmtValue(tw, key), fmtValue(dv, key), fmtValue(ng, key), ratio(tw, dv), ratio(tw, ng)])
    printRows(header, rows)
    print("nginx rows: uploads and big uploads = body read and discarded (return 200); "
          "pages and the small file = devpi-twisted's bytes from disk.")

    print("\nTargets (devpi-twisted / devpi-server):")
    checks = [(f"page {fmt} c={c} req/s", TARGET_PAGES) for fmt in FORMATS for c in CONCURRENCIES]
    checks += [("uploads/s (200 small, Basic auth)", TARGET_UPLOADS), ("big uploads MB/s (5 x 50 MB)", TARGET_BIG)]
    for key, target in checks:
        figures = results.figures.get(key, {})
        tw, dv = figures.get("devpi-twisted"), figures.get("devpi-server")
        if tw is None or dv is None:
            status = "not measured"
        else:
            status = "met" if tw / dv >= target else "NOT MET"
            status = f"{tw / dv:.1f}x -> {status}"
        print(f"  {key:<40} >= {target:>4.0f}x : {status}")

    if results.info:
        print("\nNotes:")
        for note in results.info:
            print("  " + note)
    print("\nProblems seen:" if results.problems else "\nProblems seen: none")
    for problem in results.problems:
        print("  " + problem)


# --------------------------------------------------------------------------


def describeSource(src: Path | None) -> str:
    """Which devpi_twisted was measured (read-only git queries)."""
    tree = src or REPO
    where = f"source {tree}"
    try:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            where += f" at {commit.stdout.strip()}" + (" plus uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return where


def printRows(header: list[str], rows: list[list[Any]]) -> None:
    """A table: the first column left-aligned, the figures right-aligned, ruled above and below."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                        for i, c in enumerate(row)))
    print(line)


def addCommonOptions(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks take (runs, durations, where the servers come from, pinning, output)."""
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, 1 with --quick)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5, 3 with --quick)")
    parser.add_argument("--twistd", type=Path, default=DEFAULT_TWISTD,
                        help=f"twistd of the devpi-twisted venv (default {DEFAULT_TWISTD})")
    parser.add_argument("--src", type=Path,
                        help="import devpi_twisted from this source tree instead of the venv's "
                             "(e.g. a 'git archive COMMIT | tar -x -C DIR' snapshot)")
    parser.add_argument("--devpi-venv", type=Path, default=DEFAULT_DEVPI_VENV,
                        help=f"venv with devpi-server {DEVPI_VERSION}, created if missing "
                             f"(default {DEFAULT_DEVPI_VENV})")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers to CPU 0 and the clients (and an upstream) to CPU 1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, server dirs)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def finish(results: Results, args: Any, workdir: Path, started: float,
           printTable: Callable[[Results], None]) -> None:
    """Print the table and timing, write the JSON if asked, and remove the work directory."""
    printTable(results)
    print(f"\ntotal time {time.monotonic() - started:.0f} s; "
          + (f"work dir kept: {workdir}" if args.keep else "work dir removed"))
    if args.json:
        args.json.write_text(json.dumps({"figures": results.figures, "raw": results.raw,
                                         "info": results.info, "problems": results.problems},
                                        indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-devpi", action="store_true", help="do not run devpi-server")
    parser.add_argument("--skip-nginx", action="store_true", help="do not run nginx")
    parser.add_argument("--quick", action="store_true", help="1 run of each measurement, 3 s wrk runs")
    parser.add_argument("--only", choices=("pages", "uploads", "big"), help="run one workload only")
    addCommonOptions(parser)
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 5)

    missing = [tool for tool in ("wrk",) + (() if args.skip_nginx else ("nginx",)) if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)}; install with: apt-get update && apt-get install -y nginx wrk",
              file=sys.stderr)
        return 2
    if not args.twistd.exists():
        print(f"no twistd at {args.twistd}; pass --twistd", file=sys.stderr)
        return 2

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    serverPin = "0" if pin else None
    args.wrk_pin = "1" if pin else None
    if pin:
        os.sched_setaffinity(0, {1})   # this process is the upload client
    if not args.skip_devpi:
        ensureDevpiVenv(args.devpi_venv)

    results = Results()
    results.info.append(
        f"runs per figure: {args.runs} (median), wrk {args.duration} s each; "
        + ("servers pinned to CPU 0, wrk and the upload client to CPU 1" if pin else "no CPU pinning"))
    results.info.append(f"devpi-twisted: {describeSource(args.src)}; {args.twistd}")
    workdir = Path(tempfile.mkdtemp(prefix="devpi-twisted-bench-"))
    started = time.monotonic()
    work: dict = {}
    try:
        log(f"building wheels in memory (work dir {workdir})")
        if args.only in (None, "uploads", "pages"):
            work["small"] = smallUploads()
            results.info.append(f"small wheels: {NFILES} files, "
                                f"{sum(u.size for u in work['small']) / NFILES:.0f} bytes each on average")
        if args.only in (None, "big"):
            work["big"] = bigUploads()
            results.info.append(f"big wheels: {BIG_COUNT} files of {work['big'][0].size:,} bytes "
                                f"(one random {BIG_SIZE:,}-byte STORED member); MB = 10**6 bytes")
        servers: list = [("twisted", DevpiTwisted(workdir, serverPin, args.twistd, args.src))]
        if not args.skip_devpi:
            servers.append(("index", DevpiServer(workdir, serverPin, args.devpi_venv)))
        for kind, server in servers:
            try:
                runIndexServer(server, args, work, results)
            except Exception as error:
                results.problems.append(f"{server.name}: aborted: {error}")
                log(f"{server.name}: aborted: {error}")
                if server.name == "devpi-twisted":
                    raise
        if not args.skip_nginx:
            server = Nginx(workdir, serverPin, work.get("pages", {}), work.get("file"))
            runNginx(server, args, work, results)
    finally:
        for server in STARTED:
            server.stop()
        finish(results, args, workdir, started, printTable)
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
