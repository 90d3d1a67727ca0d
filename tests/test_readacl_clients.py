"""
Read ACLs with the real clients against a real C{twistd devpi}: pip and uv
install from a restricted index with the credentials in the index URL and
are refused without; devpi-client sets C{acl_read}.
"""

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred

from .distbuilder import buildWheel
from .test_clients import BIN, _ClientCase, tool
from . import test_devpi_client as _devpiClient


class RestrictedInstallTests(_ClientCase):
    """alice/dev readable by alice only, holding demo-pkg 1.0."""

    def setUp(self) -> Deferred:
        d = super().setUp()

        async def prepare(_: Any) -> None:
            self.wheel = buildWheel(version="1.0")
            self.assertSucceeded(await self.twineUpload("alice/dev", self.wheel))
            await self.mustAPI("PATCH", "/alice/dev", ["acl_read=alice"])

        return d.addCallback(lambda r: Deferred.fromCoroutine(prepare(r)))

    def url(self, credentials: str) -> str:
        return self.server.url.replace("http://", f"http://{credentials}") + "/alice/dev/+simple/"

    async def pip(self, url: str) -> Any:
        target = self.distDir(f"pip-target-{len(os.listdir(self.workdir))}")
        pip = os.path.join(BIN, "pip")
        command = [pip] if os.path.isfile(pip) else [sys.executable, "-m", "pip"]
        result = await self.runClient(*command, "install", "--index-url", url, "--no-cache-dir",
                                      "--no-input", "--target", target, "demo-pkg")
        return result, target

    async def uv(self, url: str) -> Any:
        target = self.distDir(f"uv-target-{len(os.listdir(self.workdir))}")
        result = await self.runClient(tool("uv"), "pip", "install", "--index-url", url, "--target", target,
                                      "--no-cache", "--python", sys.executable, "demo-pkg")
        return result, target

    async def test_pip(self) -> None:
        """pip installs with alice's credentials in the index URL; without them it fails and installs nothing."""
        result, target = await self.pip(self.url("alice:alicepw@"))
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")
        refused, target = await self.pip(self.url(""))
        self.assertNotEqual(refused.returncode, 0, refused.output)
        self.assertEqual(os.listdir(target), [])
        self.assertNotIn(self.wheel.filename, refused.output)

    async def test_uv(self) -> None:
        """uv likewise."""
        result, target = await self.uv(self.url("alice:alicepw@"))
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")
        refused, target = await self.uv(self.url(""))
        self.assertNotEqual(refused.returncode, 0, refused.output)
        self.assertEqual([name for name in os.listdir(target) if name != ".lock"], [])


class DevpiIndexACLTests(_ClientCase):
    """C{devpi index alice/dev acl_read=alice} through devpi-client."""

    devpiEnvironment = _devpiClient.DevpiClientTests.devpiEnvironment
    devpi = _devpiClient.DevpiClientTests.devpi
    loggedInAsAlice = _devpiClient.DevpiClientTests.loggedInAsAlice

    async def test_setAclRead(self) -> None:
        await self.loggedInAsAlice()
        await self.devpi("index", "alice/dev", "acl_read=alice")
        shown = await self.devpi("index", "alice/dev")
        self.assertIn("acl_read=alice", shown.output)
        await self.devpi("index", "alice/dev", "acl_read+=:AUTHENTICATED:")
        code, _, response = await self.api("GET", "/alice/dev", auth=None)
        self.assertEqual(code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"WWW-Authenticate"), [b'Basic realm="devpi"'])
        code, content, _ = await self.api("GET", "/alice/dev")
        self.assertEqual(code, 200, content)
        self.assertIn(b":AUTHENTICATED:", content)
