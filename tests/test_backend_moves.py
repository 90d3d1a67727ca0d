"""
Moving a whole server between backends with export and import (README
"Scaling out"): SQLite + files to PostgreSQL + S3 and back, byte for byte,
through the admin command as a user runs it, on real engines.
"""

import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from devpi_twisted.admin import cli
from devpi_twisted.config import BackendSettings
from devpi_twisted.model import keys
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.threads import ThreadRunner

from .engines import s3Environment, sharedPostgreSQL, sharedS3
from .test_export import FIXTURE, addExtras, treeContents


class MoveBetweenBackendsTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.workdir = FilePath(self.mktemp())
        self.workdir.makedirs()
        for name, value in s3Environment().items():
            self.patchEnvironment(name, value)
        self.s3 = sharedS3()
        self.settings = BackendSettings(
            storage="postgresql", pgDSN=sharedPostgreSQL().newDatabase(),
            blobs="s3", s3Endpoint=self.s3.endpoint, s3Bucket=self.s3.newBucket(), s3Prefix="devpi/",
        )

    def patchEnvironment(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self.addCleanup(lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old))

    def backendArgs(self) -> list[str]:
        s = self.settings
        assert s.pgDSN is not None and s.s3Endpoint is not None and s.s3Bucket is not None
        return ["--storage", "postgresql", "--pg-dsn", s.pgDSN, "--blobs", "s3",
                "--s3-endpoint", s.s3Endpoint, "--s3-bucket", s.s3Bucket, "--s3-prefix", "devpi"]

    async def command(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        status = await cli.run(reactor, list(argv), out, err)
        self.assertEqual(status, 0, err.getvalue())
        return out.getvalue() + err.getvalue()

    async def state(self, serverdir: FilePath, settings: BackendSettings) -> dict[str, Any]:
        runner = ThreadRunner(reactor)
        runner.start()
        try:
            storage, blobs = openBackends(settings, serverdir, runner)
            try:
                return await storage.read(lambda view: dict(view.items("")))
            finally:
                await storage.close()
        finally:
            runner.stopService()

    async def test_sqliteToPostgresAndS3AndBack(self) -> None:
        """
        A server with releases, docs, tox results and what devpi has no
        place for (yanking, project status, attestations) goes to PostgreSQL
        + S3 and back: every export along the way is byte-identical, and so
        is the state.
        """
        w = self.workdir.path
        await self.command("import", "--serverdir", f"{w}/embedded", "--root-passwd", "pw", FIXTURE.path)
        addExtras(self.workdir.child("embedded"))
        await self.command("export", "--serverdir", f"{w}/embedded", f"{w}/export1")

        await self.command("import", "--serverdir", f"{w}/node", *self.backendArgs(), f"{w}/export1")
        keysInBucket = [o["Key"] for o in self.s3.client().list_objects_v2(
            Bucket=self.settings.s3Bucket).get("Contents", ())]
        self.assertTrue(keysInBucket)
        self.assertTrue(all(k.startswith("devpi/") for k in keysInBucket), keysInBucket)
        self.assertFalse(self.workdir.child("node").child("db.sqlite").exists())
        self.assertFalse(self.workdir.child("node").child("+files").exists())
        await self.command("export", "--serverdir", f"{w}/node", *self.backendArgs(), f"{w}/export2")
        self.assertEqual(treeContents(self.workdir.child("export1")), treeContents(self.workdir.child("export2")))

        await self.command("import", "--serverdir", f"{w}/back", f"{w}/export2")
        await self.command("export", "--serverdir", f"{w}/back", f"{w}/export3")
        self.assertEqual(treeContents(self.workdir.child("export1")), treeContents(self.workdir.child("export3")))

        original = await self.state(self.workdir.child("embedded"), BackendSettings())
        moved = await self.state(self.workdir.child("node"), self.settings)
        self.assertEqual(
            {k: v for k, v in moved.items() if k.startswith(keys.USER) and k != keys.userKey("root")},
            {k: v for k, v in original.items() if k.startswith(keys.USER) and k != keys.userKey("root")},
        )
        self.assertEqual({k: v for k, v in moved.items() if k.startswith("file/")},
                         {k: v for k, v in original.items() if k.startswith("file/")})

    async def test_importRefusesAStateInUse(self) -> None:
        """An import into a database that holds a server's state already is refused, and changes nothing."""
        w = self.workdir.path
        await self.command("init", "--serverdir", f"{w}/first", "--root-passwd", "pw", *self.backendArgs())
        out, err = io.StringIO(), io.StringIO()
        status = await cli.run(reactor, ["import", "--serverdir", f"{w}/second", *self.backendArgs(), FIXTURE.path],
                               out, err)
        self.assertEqual(status, 1)
        self.assertIn("already holds a server's state", err.getvalue())
        self.assertFalse(self.workdir.child("second").exists())
        state = await self.state(self.workdir.child("first"), self.settings)
        self.assertEqual(sorted(state), [keys.indexKey("root", "pypi"), keys.userKey("root")])

    async def test_initJoinsAndOptionsMustMatch(self) -> None:
        """
        A second init on the same database joins it (root keeps its
        password); a directory made for one backend is refused with others,
        in one line that names them.
        """
        w = self.workdir.path
        first = await self.command("init", "--serverdir", f"{w}/a", "--root-passwd", "pw", *self.backendArgs())
        self.assertIn("initialised", first)
        second = await self.command("init", "--serverdir", f"{w}/b", *self.backendArgs())
        self.assertIn("joined the existing state", second)
        self.assertNotIn("generated password", second)
        out, err = io.StringIO(), io.StringIO()
        status = await cli.run(reactor, ["export", "--serverdir", f"{w}/a", f"{w}/export"], out, err)
        self.assertEqual(status, 1)
        self.assertIn("--storage postgresql --blobs s3", err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
