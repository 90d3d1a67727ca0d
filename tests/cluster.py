"""
Several real C{twistd devpi} nodes sharing one PostgreSQL database and one
S3 bucket (README "Scaling out"), for the integration and fault tests.

Each node has its own small server directory and port on 127.0.0.1; the
engines come from L{tests.engines}.  L{ClusterCase} gives a test the
clients of L{tests.test_clients.ClientRunning} (pip, uv, twine) on top.
"""

import os
import signal
import subprocess
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from .engines import PostgreSQLServer, SeaweedS3, s3Environment, sharedPostgreSQL, sharedS3
from .serverprocess import ROOT_PASSWORD, TWISTD, freePort, readText, waitForAnswer
from .test_clients import ClientRunning, serverEnvironment


class Node:
    """One C{twistd -n devpi} of a cluster, its output in a file of its own."""

    def __init__(self, testCase: TestCase, workdir: str, name: str, backend: list[str],
                 env: dict[str, str], *extra: str, port: int | None = None) -> None:
        self.name = name
        self.directory = os.path.join(workdir, name)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.serverdir = os.path.join(self.directory, "server")
        self.outputPath = os.path.join(self.directory, "twistd-output.txt")
        self._argv = [
            TWISTD, "-n", "--pidfile=", "devpi", "--serverdir", self.serverdir,
            "--root-passwd", ROOT_PASSWORD, "--no-root-pypi",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1", *backend, *extra,
        ]
        self._env = env
        self.process: "subprocess.Popen[bytes] | None" = None
        self.start()
        testCase.addCleanup(self.cleanup)

    def start(self) -> None:
        """Start (again, after L{kill}: same directory and port)."""
        with open(self.outputPath, "ab") as output:
            self.process = subprocess.Popen(self._argv, stdout=output, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.directory, env=self._env)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return f"--- node {self.name}:\n" + readText(self.outputPath)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the node (C{SIGKILL}: no chance to finish anything) and wait for it."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def cleanup(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class ClusterCase(ClientRunning, TestCase):
    """
    A fresh database and bucket, and nodes on them started by the test.

    With C{privatePostgreSQL} or C{privateS3} the engine is the test's own
    (a fault test stops and starts it without disturbing other tests).
    """

    timeout = 600
    privatePostgreSQL = False
    privateS3 = False

    def setUp(self) -> None:
        self.prepareClients()
        if self.privatePostgreSQL:
            self.pg = PostgreSQLServer()
            self.addCleanup(self.pg.destroy)
            self.pg.start()
        else:
            self.pg = sharedPostgreSQL()
        if self.privateS3:
            self.s3 = SeaweedS3()
            self.addCleanup(self.s3.destroy)
            self.s3.start()
        else:
            self.s3 = sharedS3()
        self.dsn = self.pg.newDatabase()
        self.bucket = self.s3.newBucket()
        self.nodes: list[Node] = []
        self.serverEnv = dict(serverEnvironment(self.workdir), **s3Environment())

    def backendOptions(self) -> list[str]:
        return ["--storage", "postgresql", "--pg-dsn", self.dsn,
                "--blobs", "s3", "--s3-endpoint", self.s3.endpoint, "--s3-bucket", self.bucket]

    @property
    def server(self) -> Any:
        """What L{ClientRunning} reports on failure: every node's output."""
        nodes = self.nodes

        class _All:
            url = nodes[0].url if nodes else ""

            @staticmethod
            def output() -> str:
                return "\n".join(node.output() for node in nodes)

        return _All()

    def sharedSecret(self) -> bytes:
        """The secret the nodes keep in the database (signs tokens and replication credentials)."""
        import base64

        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT value FROM devpi_meta WHERE name = 'secret'").fetchone()
        self.assertIsNotNone(row, "no secret in devpi_meta: has a node started?")
        return base64.b64decode(row[0])

    def sharedSecretFile(self) -> str:
        """The shared secret as a C{--secretfile} (mode 0600), for a replica; its path."""
        path = os.path.join(self.workdir, f"secret-{len(os.listdir(self.workdir))}")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(self.sharedSecret())
        return path

    def startNode(self, name: str, *extra: str, port: int | None = None,
                  backend: list[str] | None = None) -> "Deferred[Node]":
        """
        A node on the shared database and bucket (or on C{backend}, such as
        C{[]} for a replica's own embedded storage); fires with it once it
        answers.
        """
        options = self.backendOptions() if backend is None else backend
        node = Node(self, self.workdir, name, options, self.serverEnv, *extra, port=port)
        self.nodes.append(node)
        return Deferred.fromCoroutine(self.waitForNode(node))

    async def waitForNode(self, node: Node) -> Node:
        await waitForAnswer(self, self.http, node.url + "/+api", node.alive, node.output)
        return node
