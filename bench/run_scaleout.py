#!/usr/bin/env python3
"""
Benchmark of issue 13's "Speed" targets (several nodes, PostgreSQL, S3,
--workers), in one run, with every reference measured in the same go.

- A cached private page (run_private.py's: /bench/top/+simple/benchpkg/,
  200 files through bench/top -> mid -> base, PEP 503 HTML and PEP 691 JSON)
  on a PostgreSQL + S3 node against the embedded default (SQLite + files),
  wrk at 1, 10 and 50 connections: at least 80 %.
- One 50 MB wheel uploaded to the PostgreSQL + S3 node: at least 100 MB/s
  (the upload request's wall time, MB = 10**6); the same to SQLite + files.
- Two PostgreSQL + S3 nodes on one port (--listen reuseport:PORT): at least
  1.6 times one node's page rate at 50 connections.
- --workers 2 on the embedded default: at least 1.6 times one process's
  page rate at 50 connections, and at least an eighth of nginx's (serving
  the same page bytes as a static file).

Run by hand from the repository root with the venv's Python (it imports
tests/engines.py to start a private PostgreSQL and SeaweedFS, and
run_private.py for the workload).  Only 127.0.0.1 is used; every process
started here is stopped in a finally block.  See bench/README.rst.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import run_private as rp  # noqa: E402  (the workload, servers, wrk runner and helpers)

from run_private import FORMATS, HOST, JSON_ACCEPT, PAGE_PATH, Results, log  # noqa: E402

DEFAULT_TWISTD = Path(sys.executable).parent / "twistd"
BIG_SIZE = 50 * 1000 * 1000
SERVER_OPTIONS: list[str] = []   # given to every node (--no-access-log)

# Columns of the figures (Results.figures[row][column]).
SQLITE, PG = "SQLite+files", "PG+S3"
PG1, PG2 = "PG+S3 1 node", "PG+S3 2 nodes"
PROC1, PROC2 = "SQLite 1 process", "SQLite 2 processes"
NGINX = "nginx 2 workers"

# The targets of issue 13.
TARGET_PG_PAGES = 0.8
TARGET_S3_UPLOAD = 100.0     # MB/s
TARGET_TWO = 1.6
TARGET_NGINX = 1 / 8


# --------------------------------------------------------------------------
# Processes: their trees, CPU time and CPU affinity


def processTree(pid: int) -> list[int]:
    """C{pid} and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def ownCPU(pid: int) -> float:
    """User plus system CPU seconds of C{pid} alone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def treeCPU(pid: int | None) -> float:
    """User plus system CPU seconds of C{pid} and its descendants."""
    if pid is None:
        return 0.0
    ticks = 0
    for p in processTree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpuSnapshot() -> tuple[float, dict[int, tuple[float, str]]]:
    """The machine's busy CPU seconds, and every process's CPU seconds and command."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / tick
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            stat = text.rsplit(")", 1)[1].split()
            processes[int(entry)] = ((int(stat[11]) + int(stat[12])) / tick, command.strip()[:80])
    return busy, processes


def othersNote(before: tuple[float, dict], after: tuple[float, dict], ours: set[int], wall: float) -> str:
    """How busy the machine was, and the processes not ours that used the most CPU."""
    used = []
    for pid, (cpu, command) in after[1].items():
        if pid in ours or pid == os.getpid():
            continue
        delta = cpu - before[1].get(pid, (0.0, ""))[0]
        if delta > 0.02 * wall:
            used.append((delta, command or f"pid {pid}"))
    used.sort(reverse=True)
    text = f"machine busy {(after[0] - before[0]) / wall:.2f} CPUs"
    if used:
        text += "; others: " + "; ".join(f"{cpu / wall:.2f} CPUs {command}" for cpu, command in used[:3])
    return text


def setAffinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of C{pid}'s tree to C{cpus} (threads started later inherit it)."""
    for p in processTree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def twistdCount(pid: int) -> int:
    """How many twistd processes run in C{pid}'s tree."""
    count = 0
    for p in processTree(pid):
        try:
            if b"twistd" in Path(f"/proc/{p}/cmdline").read_bytes():
                count += 1
        except OSError:
            pass
    return count


# --------------------------------------------------------------------------
# Nodes and engines


class Node(rp.IndexServer):
    """One C{twistd -n devpi} (any backend), listening on one or more endpoints."""

    def __init__(self, workdir: Path, name: str, pin: str | None, twistd: Path, env: dict[str, str],
                 serverdir: Path, listen: list[str], port: int, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        super().__init__(workdir, pin)
        self.port = port   # where the checks and wrk go
        self.argv = [str(twistd), "-n", "--pidfile=", "devpi", "--serverdir", str(serverdir),
                     "--root-passwd", "", "--no-root-pypi",
                     *[arg for endpoint in listen for arg in ("--listen", endpoint)], *extra, *SERVER_OPTIONS]
        self.env = env

    def start(self) -> None:
        t0 = time.monotonic()
        self._spawn(self.argv, env=self.env)
        assert self.process is not None
        rp.waitForHTTP(self.port, "/+api", self.process, 90, self.logfile)
        self.startup = time.monotonic() - t0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None


def reuseport(port: int) -> str:
    return f"reuseport:{port}:interface={HOST}"


def tcp(port: int) -> str:
    return f"tcp:{port}:interface={HOST}"


class Engines:
    """A private PostgreSQL and SeaweedFS (tests/engines.py), started here and destroyed in L{stop}."""

    def __init__(self) -> None:
        self.pg: Any = None
        self.s3: Any = None

    def start(self) -> None:
        from tests.engines import PostgreSQLServer, SeaweedS3

        log("starting PostgreSQL and SeaweedFS (tests/engines.py)")
        self.pg = PostgreSQLServer()
        self.pg.start()
        self.s3 = SeaweedS3()
        self.s3.start()

    def backendOptions(self) -> tuple[str, ...]:
        """Options for a node on a new database and bucket."""
        return ("--storage", "postgresql", "--pg-dsn", self.pg.newDatabase(),
                "--blobs", "s3", "--s3-endpoint", self.s3.endpoint, "--s3-bucket", self.s3.newBucket())

    def pgPid(self) -> int | None:
        try:
            return int(Path(self.pg.data, "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def s3Pid(self) -> int | None:
        process = getattr(self.s3, "process", None)
        return process.pid if process is not None else None

    def cpu(self) -> dict[str, float]:
        return {"PostgreSQL": treeCPU(self.pgPid()), "SeaweedFS": treeCPU(self.s3Pid())}

    def stop(self) -> None:
        for engine in (self.s3, self.pg):
            if engine is not None:
                try:
                    engine.destroy()
                except Exception as error:   # keep stopping the others
                    log(f"stopping {engine!r}: {error}")
        self.pg = self.s3 = None


# --------------------------------------------------------------------------
# Measurements


def populate(node: Node, work: dict, results: Results) -> None:
    """run_private.py's state: user bench, bench/base <- mid <- top, 200 small wheels in base."""
    client = rp.Client(node.port)
    try:
        node.createUser(client)
        node.createIndex(client, "base", "")
        node.createIndex(client, "mid", f"{rp.USER}/base")
        node.createIndex(client, "top", f"{rp.USER}/mid")
        seconds, failures = rp.uploadRun(client, node.uploadPath("base"), node.uploadHeaders(work["small"][0]),
                                         work["small"])
        if failures:
            raise RuntimeError(f"{node.name}: uploads failed: {failures[:3]}")
        log(f"{node.name}: {len(work['small'])} uploads in {seconds:.1f} s")
    finally:
        client.close()


def checkPages(node: rp.Server, results: Results) -> dict[str, bytes]:
    """Both pages list the 200 files; their bytes."""
    pages = {}
    for fmt in FORMATS:
        data, contentType = rp.fetchPage(node, PAGE_PATH, fmt)
        rp.checkPage(node, fmt, data, contentType, results)
        pages[fmt] = data
    return pages


def pagePaths(path: str = PAGE_PATH) -> dict[str, str]:
    return {fmt: path for fmt in FORMATS}


def wrkRows(port: int, paths: dict[str, str], column: str, concurrencies: tuple[int, ...], args,
            pin: str | None, results: Results, pids: tuple[int | None, ...] = ()) -> int:
    """
    wrk on both page formats at each concurrency (median of the runs); the
    requests made.  With C{pids}, a note of the CPU their trees and wrk used.
    """
    requests = 0
    serverBefore = sum(treeCPU(pid) for pid in pids)
    processesBefore = {p: ownCPU(p) for pid in pids if pid is not None for p in processTree(pid)}
    wrkBefore = resource.getrusage(resource.RUSAGE_CHILDREN)
    machineBefore = cpuSnapshot()
    wall = time.monotonic()
    for fmt in FORMATS:
        accept = JSON_ACCEPT if fmt == "json" else None
        for concurrency in concurrencies:
            samples = []
            for _ in range(args.runs):
                sample = rp.runWrk(f"http://{HOST}:{port}{paths[fmt]}", concurrency, args.duration, accept, pin)
                samples.append(sample)
                requests += int(sample["rps"] * args.duration)
                if sample["non2xx"] or sample["socket_errors"]:
                    results.problems.append(f"{column}: {fmt} c={concurrency}: non-2xx {sample['non2xx']}, "
                                            f"socket errors: {sample['socket_errors'] or 'none'}")
            key = f"page {fmt} c={concurrency}"
            for figure, unit in (("rps", "req/s"), ("p50", "p50 ms"), ("p99", "p99 ms")):
                values = [s[figure] for s in samples]
                results.put(f"{key} {unit}", column, rp.median(values), values)
            perRun = ", ".join(f"{s['rps']:.0f}" for s in samples)
            log(f"{column}: {key}: {results.figures[key + ' req/s'][column]:,.0f} req/s, "
                f"p99 {results.figures[key + ' p99 ms'][column]:.1f} ms (runs: {perRun})")
    if pids:
        wall = time.monotonic() - wall
        wrkAfter = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrkCPU = (wrkAfter.ru_utime + wrkAfter.ru_stime) - (wrkBefore.ru_utime + wrkBefore.ru_stime)
        serverCPU = sum(treeCPU(pid) for pid in pids) - serverBefore
        ours = {p for pid in pids if pid is not None for p in processTree(pid)} | set(args.engine_pids())
        each = [ownCPU(p) - cpu for p, cpu in processesBefore.items()]
        split = (" (" + " + ".join(f"{cpu / wall:.2f}" for cpu in each if cpu > 0.01 * wall) + ")"
                 if len(each) > 1 else "")
        results.info.append(f"{column}: over its wrk runs the server processes used {serverCPU / wall:.2f} "
                            f"CPUs{split}, wrk {wrkCPU / wall:.2f} CPUs ({serverCPU * 1e6 / requests:.0f} us of "
                            f"server CPU a request); {othersNote(machineBefore, cpuSnapshot(), ours, wall)}")
    return requests


def warmUp(port: int, paths: dict[str, str]) -> None:
    """A short wrk run so that every process behind the port has rendered the pages."""
    for fmt in FORMATS:
        rp.runWrk(f"http://{HOST}:{port}{paths[fmt]}", 10, 1, JSON_ACCEPT if fmt == "json" else None, None)


def bigUpload(node: Node, args, results: Results, column: str, payload: bytes) -> None:
    """
    One 50 MB wheel per run into a fresh index; MB/s from the request's wall
    time.  A first upload is not counted (a node's first big upload also pays
    for starting its transfer threads and, on SeaweedFS, new volumes); its
    figure goes to the notes.
    """
    client = rp.Client(node.port)
    rates = []
    try:
        for run in range(-1, args.runs):
            version = f"1.0.{run if run >= 0 else 99}"
            filename, content = rp.buildWheel(rp.BIG_PROJECT, version, payload)
            upload = rp.Upload(rp.BIG_PROJECT, version, filename, content)
            index = f"big{run if run >= 0 else 'warm'}"
            node.createIndex(client, index, "")
            seconds, failures = rp.uploadRun(client, node.uploadPath(index), node.uploadHeaders(upload), [upload])
            if failures:
                results.problems.append(f"{column}: 50 MB upload failed: {failures[0]}")
                continue
            rate = upload.size / 1e6 / seconds
            log(f"{column}: {upload.size:,} bytes in {seconds:.3f} s = {rate:.0f} MB/s"
                + (" (first, not counted)" if run < 0 else ""))
            if run < 0:
                results.info.append(f"{column}: first 50 MB upload (not counted) {rate:.0f} MB/s")
            else:
                rates.append(rate)
    finally:
        client.close()
    if rates:
        results.put("50 MB upload MB/s", column, rp.median(rates), rates)


# --------------------------------------------------------------------------
# The sessions


def singleNodes(args, work: dict, engines: Engines, results: Results, state: dict) -> None:
    """
    Phase 1, pinned as run_private.py: the node on CPU 0, wrk and the upload
    client on CPU 1.  SQLite+files, then PostgreSQL+S3; pages at c=1, 10, 50
    and the 50 MB upload.  Both nodes keep running for phase 2.
    """
    if args.wrk_pin:
        os.sched_setaffinity(0, {int(args.wrk_pin)})   # this process is the upload client
    try:
        _singleNodes(args, work, engines, results, state)
    finally:
        # Whatever this process starts later (wrk, nodes) inherits its affinity.
        os.sched_setaffinity(0, args.all_cpus)


def _singleNodes(args, work: dict, engines: Engines, results: Results, state: dict) -> None:
    serverPin, clientPin = args.server_pin, args.wrk_pin
    sqlitePort = rp.freePort()
    sqlite = Node(args.workdir, "sqlite", serverPin, args.twistd, args.env, args.workdir / "sqlite-server",
                  [reuseport(sqlitePort)], sqlitePort)
    state["sqlite"] = sqlite
    log(f"starting {sqlite.name} (SQLite + files) on :{sqlitePort}")
    sqlite.start()
    populate(sqlite, work, results)
    state["pages"] = checkPages(sqlite, results)
    wrkRows(sqlite.port, pagePaths(), SQLITE, rp.CONCURRENCIES, args, clientPin, results, (sqlite.pid,))
    bigUpload(sqlite, args, results, SQLITE, work["payload"])
    if args.skip_pg:
        return

    shared = rp.freePort()
    own = rp.freePort()
    backend = engines.backendOptions()
    state["backend"] = backend
    state["pgPort"] = shared
    pg = Node(args.workdir, "pg-node1", serverPin, args.twistd, args.env, args.workdir / "pg-node1",
              [reuseport(shared), tcp(own)], own, backend)
    state["pg1"] = pg
    log(f"starting {pg.name} (PostgreSQL + S3) on :{shared} (reuseport) and :{own}")
    pg.start()
    populate(pg, work, results)
    pages = checkPages(pg, results)
    for fmt in FORMATS:
        if pages[fmt] != state["pages"][fmt]:
            mine, theirs = pages[fmt], state["pages"][fmt]
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            results.info.append(f"the {fmt} page of the PG+S3 node differs from the SQLite node's "
                                f"({len(mine):,} against {len(theirs):,} bytes) from byte {at}: "
                                f"{mine[max(0, at - 30):at + 30]!r} against {theirs[max(0, at - 30):at + 30]!r}")
    before = engines.cpu()
    wrkRows(shared, pagePaths(), PG, rp.CONCURRENCIES, args, clientPin, results, (pg.pid,))
    after = engines.cpu()
    results.info.append("CPU of the engines during the PG+S3 node's page runs: "
                        + ", ".join(f"{name} {(after[name] - before[name]) * 1e3:.0f} ms" for name in before))
    before = engines.cpu()
    bigUpload(pg, args, results, PG, work["payload"])
    after = engines.cpu()
    results.info.append("CPU of the engines during the PG+S3 50 MB uploads: "
                        + ", ".join(f"{name} {after[name] - before[name]:.2f} s" for name in before))
    directS3(engines, args, results, work["payload"])


def directS3(engines: Engines, args, results: Results, payload: bytes) -> None:
    """
    The reference for the S3 upload: boto3 from this process straight to the
    same SeaweedFS, with the node's TransferConfig (upload_file of a spooled
    file, as the node does), and as one put_object.
    """
    import boto3
    from devpi_twisted.storage.s3 import TRANSFER, clientConfig
    from tests.engines import s3Environment

    env = s3Environment()
    client = boto3.client("s3", endpoint_url=engines.s3.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                          config=clientConfig())
    bucket = engines.s3.newBucket()
    client.put_object(Bucket=bucket, Key="warm", Body=b"x")
    spool = args.workdir / "direct-s3.bin"
    spool.write_bytes(payload)
    for label, send in (("upload_file", lambda key: client.upload_file(str(spool), bucket, key, Config=TRANSFER)),
                        ("put_object", lambda key: client.put_object(Bucket=bucket, Key=key, Body=payload))):
        rates = []
        for run in range(-1, args.runs):
            t0 = time.perf_counter()
            send(f"{label}-{run}")
            if run >= 0:   # the first is not counted, as for the nodes
                rates.append(len(payload) / 1e6 / (time.perf_counter() - t0))
        log(f"S3 direct {label}: " + ", ".join(f"{r:.0f}" for r in rates) + " MB/s")
        results.put(f"50 MB to S3 direct, boto3 {label} MB/s", PG, rp.median(rates), rates)
    spool.unlink()


def twoNodes(args, engines: Engines, results: Results, state: dict) -> None:
    """
    Phase 2a, nothing pinned: node 1 alone at c=50, then with node 2 on the
    same reuseport: port, same database and bucket.
    """
    pg1: Node = state["pg1"]
    setAffinity(pg1.pid, args.all_cpus)
    shared = state["pgPort"]
    warmUp(shared, pagePaths())
    wrkRows(shared, pagePaths(), PG1, (50,), args, None, results, (pg1.pid,))
    own = rp.freePort()
    pg2 = Node(args.workdir, "pg-node2", None, args.twistd, args.env, args.workdir / "pg-node2",
               [reuseport(shared), tcp(own)], own, state["backend"])
    log(f"starting {pg2.name} on :{shared} (reuseport) and :{own}")
    pg2.start()
    checkPages(pg2, results)
    warmUp(shared, pagePaths())
    wrkRows(shared, pagePaths(), PG2, (50,), args, None, results, (pg1.pid, pg2.pid))
    pg2.stop()
    pg1.stop()


def twoProcesses(args, results: Results, state: dict) -> None:
    """
    Phase 2b, nothing pinned: the SQLite node alone at c=50, then two
    processes: --workers 2 when the tree has it, else the main process plus
    one --requests-only worker on the same reuseport: port.
    """
    sqlite: Node = state["sqlite"]
    setAffinity(sqlite.pid, args.all_cpus)
    warmUp(sqlite.port, pagePaths())
    wrkRows(sqlite.port, pagePaths(), PROC1, (50,), args, None, results, (sqlite.pid,))
    port = sqlite.port
    mode = None
    if args.worker_mode in ("auto", "workers"):
        sqlite.stop()
        main = Node(args.workdir, "sqlite-workers2", None, args.twistd, args.env, args.workdir / "sqlite-server",
                    [tcp(port)], port, ("--workers", "2"))
        log(f"restarting the SQLite node with --workers 2 on :{port}")
        try:
            main.start()
            deadline = time.monotonic() + 20
            while main.pid and twistdCount(main.pid) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            count = twistdCount(main.pid) if main.pid else 0
        except RuntimeError as error:
            count = 0
            log(f"--workers 2 did not start: {error}")
        if count >= 2:
            mode = "--workers 2"
            time.sleep(2)   # let the child listen too
        else:
            results.info.append(f"--workers 2 ran {count} twistd process(es): not in this tree yet")
            main.stop()
            if args.worker_mode == "workers":
                raise RuntimeError("--worker-mode workers: --workers 2 did not start a second process")
            main = Node(args.workdir, "sqlite-main", None, args.twistd, args.env, args.workdir / "sqlite-server",
                        [reuseport(port)], port)
            main.start()
            state["sqlite"] = main
    else:
        main = sqlite
    worker: Node | None = None
    if mode is None:
        own = rp.freePort()
        worker = Node(args.workdir, "sqlite-worker", None, args.twistd, args.env, args.workdir / "sqlite-server",
                      [reuseport(port), tcp(own)], own, ("--requests-only",))
        log(f"starting a --requests-only worker on :{port} (reuseport) and :{own}")
        worker.start()
        checkPages(worker, results)
        mode = "main process + 1 --requests-only worker on reuseport: (what --workers 2 does)"
    results.info.append(f"2 processes: {mode}")
    state["workerMode"] = mode
    time.sleep(1)
    warmUp(port, pagePaths())
    wrkRows(port, pagePaths(), PROC2, (50,), args, None, results,
            (main.pid, worker.pid if worker is not None else None))
    for server in list(rp.STARTED):
        if isinstance(server, Node) and server.name.startswith("sqlite"):
            server.stop()


def nginxReference(args, results: Results, state: dict) -> None:
    """Phase 2c, nothing pinned: nginx with 2 worker processes serving the SQLite node's page bytes."""
    nginx = TwoWorkerNginx(args.workdir, None, state["pages"])
    log(f"starting nginx (2 workers) on :{nginx.port}")
    nginx.start()
    try:
        for fmt in FORMATS:
            data, _ = rp.fetchPage(nginx, nginx.pagePath(fmt), fmt)
            if data != state["pages"][fmt]:
                raise RuntimeError(f"nginx serves other bytes for {fmt}")
        wrkRows(nginx.port, {fmt: nginx.pagePath(fmt) for fmt in FORMATS}, NGINX, (50,), args, None, results,
                (nginx.process.pid if nginx.process else None,))
    finally:
        nginx.stop()


class TwoWorkerNginx(rp.Nginx):
    """run_private.py's nginx with as many worker processes as --workers has serving processes."""

    workers = 2


# --------------------------------------------------------------------------
# The report


def printTable(results: Results) -> None:
    figures = results.figures
    print("\n1. One node, pinned: node on CPU 0, wrk and the upload client on CPU 1")
    rows = []
    keys = [f"page {fmt} c={c} {unit}" for fmt in FORMATS for c in rp.CONCURRENCIES
            for unit in ("req/s", "p50 ms", "p99 ms")] + ["50 MB upload MB/s"] + [
        f"50 MB to S3 direct, boto3 {label} MB/s" for label in ("upload_file", "put_object")]
    for key in keys:
        row = figures.get(key, {})
        if SQLITE in row or PG in row:
            rows.append([key, rp.fmtValue(row.get(SQLITE), key), rp.fmtValue(row.get(PG), key),
                         rp.ratio(row.get(PG), row.get(SQLITE))])
    rp.printRows(["figure", SQLITE, PG, "PG/SQLite"], rows)

    print("\n2. Two processes at 50 connections, nothing pinned (servers, engines and wrk share both CPUs)")
    rows = []
    for fmt in FORMATS:
        for unit in ("req/s", "p50 ms", "p99 ms"):
            key = f"page {fmt} c=50 {unit}"
            row = figures.get(key, {})
            rows.append([key, *(rp.fmtValue(row.get(c), key) for c in (PG1, PG2)), rp.ratio(row.get(PG2), row.get(PG1)),
                         *(rp.fmtValue(row.get(c), key) for c in (PROC1, PROC2)),
                         rp.ratio(row.get(PROC2), row.get(PROC1)), rp.fmtValue(row.get(NGINX), key),
                         rp.ratio(row.get(PROC2), row.get(NGINX))])
    rp.printRows(["figure", PG1, PG2, "2/1", PROC1, PROC2, "2/1", NGINX, "2 proc/nginx"], rows)

    print("\nTargets (issue 13, Speed):")
    for line in targetLines(results):
        print("  " + line)
    if results.info:
        print("\nNotes:")
        for note in results.info:
            print("  " + note)
    print("\nProblems seen:" if results.problems else "\nProblems seen: none")
    for problem in results.problems:
        print("  " + problem)


def targetLines(results: Results) -> list[str]:
    """Each target with its figure and PASS/FAIL (or 'not measured'); records the verdicts."""
    figures = results.figures
    lines, verdicts = [], []

    def check(label: str, value: float | None, target: float, unit: str = "x") -> None:
        if value is None:
            verdicts.append(None)
            lines.append(f"{label:<58} >= {target:g}{unit}: not measured")
            return
        ok = value >= target
        verdicts.append(ok)
        lines.append(f"{label:<58} >= {target:g}{unit}: {value:.2f}{unit} {'PASS' if ok else 'FAIL'}")

    def ratioOf(key: str, a: str, b: str) -> float | None:
        row = figures.get(key, {})
        return row[a] / row[b] if row.get(a) and row.get(b) else None

    for fmt in FORMATS:
        for c in rp.CONCURRENCIES:
            key = f"page {fmt} c={c} req/s"
            check(f"PG+S3 / SQLite, cached page {fmt} c={c}", ratioOf(key, PG, SQLITE), TARGET_PG_PAGES)
    check("50 MB upload to the PG+S3 node (MB/s)", figures.get("50 MB upload MB/s", {}).get(PG),
          TARGET_S3_UPLOAD, " MB/s")
    for fmt in FORMATS:
        key = f"page {fmt} c=50 req/s"
        check(f"2 PG+S3 nodes / 1 node, page {fmt} c=50", ratioOf(key, PG2, PG1), TARGET_TWO)
    for fmt in FORMATS:
        key = f"page {fmt} c=50 req/s"
        check(f"2 processes / 1 process (SQLite), page {fmt} c=50", ratioOf(key, PROC2, PROC1), TARGET_TWO)
    for fmt in FORMATS:
        key = f"page {fmt} c=50 req/s"
        check(f"2 processes / nginx (2 workers), page {fmt} c=50", ratioOf(key, PROC2, NGINX), TARGET_NGINX)
    results.targets = verdicts   # type: ignore[attr-defined]
    results.targetLines = lines   # type: ignore[attr-defined]
    return lines


# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run of each measurement, 3 s wrk runs")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, 1 with --quick)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5, 3 with --quick)")
    parser.add_argument("--twistd", type=Path, default=DEFAULT_TWISTD,
                        help=f"twistd of the devpi-twisted venv (default {DEFAULT_TWISTD})")
    parser.add_argument("--src", type=Path, default=REPO,
                        help=f"import devpi_twisted (and its twistd plugins) from this tree (default {REPO})")
    parser.add_argument("--worker-mode", choices=("auto", "workers", "requests-only"), default="auto",
                        help="two processes with --workers 2, with a --requests-only worker, or --workers 2 "
                             "when it starts a second process, else a worker (auto, the default)")
    parser.add_argument("--skip-pg", action="store_true",
                        help="no PostgreSQL + S3 nodes (the SQLite, two-process and nginx figures only)")
    parser.add_argument("--no-access-log", action="store_true",
                        help="start every node with --no-access-log (the default logs a line a request)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything in phase 1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, server dirs)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 5)

    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)}; apt-get update && apt-get install -y nginx wrk", file=sys.stderr)
        return 2
    if not args.twistd.exists():
        print(f"no twistd at {args.twistd}; pass --twistd", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    args.all_cpus = set(range(cpus))
    pin = not args.no_pin and cpus >= 2
    args.server_pin, args.wrk_pin = ("0", "1") if pin else (None, None)
    from tests.engines import s3Environment

    args.env = {**os.environ, **s3Environment(),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(args.src), os.environ.get("PYTHONPATH")]))}
    args.workdir = Path(tempfile.mkdtemp(prefix="devpi-twisted-scaleout-"))
    if args.no_access_log:
        SERVER_OPTIONS.append("--no-access-log")

    results = Results()
    results.info += [
        f"machine: {cpus} CPUs shared by the servers, the engines and wrk; runs per figure: {args.runs} "
        f"(median), wrk {args.duration} s each (-t1 at c=1, else -t2)",
        "phase 1: " + ("each node pinned to CPU 0, wrk and the upload client to CPU 1, PostgreSQL and "
                       "SeaweedFS not pinned" if pin else "no CPU pinning"),
        "phase 2: nothing pinned, for the one-process references too, so that one and two processes "
        "get the same machine (wrk -t2 -c50 takes its share of both CPUs in either case)",
        "PostgreSQL 15 as tests/engines.py starts it: fsync=off, synchronous_commit=off, "
        "full_page_writes=off; SeaweedFS `weed mini` with its defaults; SQLite as the embedded "
        "default sets it (WAL, synchronous=FULL)",
        f"devpi-twisted: {rp.describeSource(args.src)}; {args.twistd}; access log "
        + ("off (--no-access-log)" if args.no_access_log else "on (the default), in each node's output file"),
    ]
    engines = Engines()
    args.engine_pids = lambda: [p for pid in (engines.pgPid(), engines.s3Pid()) if pid for p in processTree(pid)]
    state: dict = {}
    work: dict = {}
    started = time.monotonic()
    try:
        work["small"] = rp.smallUploads()
        work["payload"] = os.urandom(BIG_SIZE)
        if not args.skip_pg:
            engines.start()
        singleNodes(args, work, engines, results, state)
        if not args.skip_pg:
            twoNodes(args, engines, results, state)
        engines.stop()
        twoProcesses(args, results, state)
        nginxReference(args, results, state)
    except Exception as error:
        results.problems.append(f"aborted: {error!r}")
        log(f"aborted: {error!r}")
    finally:
        for server in rp.STARTED:
            server.stop()
        engines.stop()
        for server in rp.STARTED:
            if isinstance(server, Node):
                rp.scanLog(server, results)
        rp.finish(results, args, args.workdir, started, printTable)
        if args.json:
            data = json.loads(args.json.read_text())
            data["targets"] = getattr(results, "targetLines", [])
            args.json.write_text(json.dumps(data, indent=2))
    failed = any(v is False for v in getattr(results, "targets", []))
    return 1 if results.problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
