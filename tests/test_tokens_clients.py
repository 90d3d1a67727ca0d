"""
API tokens with real clients against a real server (C{twistd -n devpi} on
127.0.0.1): twine and C{uv publish} upload with a token scoped to
C{alice/dev} and are refused on C{alice/prod}; devpi-client with the
devpi-tokens plugin creates, lists, derives and deletes tokens and logs in
with one; pip installs with a token in the index URL.
"""

import os
import re
import subprocess
import sys
from typing import Any

from twisted.internet.defer import Deferred

from .distbuilder import buildWheel, writeDist
from .serverprocess import tool
from .test_clients import BIN, _ClientCase
from . import test_devpi_client


class TokenUploadTests(_ClientCase):
    """twine and uv publish with a token, as CI would."""

    def setUp(self) -> Deferred:
        d = super().setUp()

        async def more(_: Any) -> None:
            await self.mustAPI("PUT", "/alice/prod", {})
            answer = await self.mustAPI("POST", "/alice/+token-create",
                                        {"indexes": ["alice/dev"], "allowed": ["upload", "pkg_read"]})
            self.token = answer["result"]["token"]

        return d.addCallback(lambda _: Deferred.fromCoroutine(more(_)))

    async def publish(self, client: str, stage: str, version: str) -> subprocess.CompletedProcess:
        wheel = buildWheel(version=version)
        path = writeDist(wheel, self.distDir(f"dist-{client}-{version}"))
        url = f"{self.server.url}/{stage}/"
        if client == "twine":
            command = [tool("twine"), "upload", "--repository-url", url, "-u", "__token__", "-p", self.token,
                       "--non-interactive", "--disable-progress-bar", path]
        else:
            command = [tool("uv"), "publish", "--publish-url", url, "--token", self.token, path]
        return await self.runClient(*command)

    async def test_twine(self) -> None:
        self.assertSucceeded(await self.publish("twine", "alice/dev", "1.0"))
        refused = await self.publish("twine", "alice/prod", "1.1")
        self.assertNotEqual(refused.returncode, 0, refused.output)
        self.assertIn("403", refused.output)
        self.assertEqual(list(await self.simpleFiles("alice/dev", "demo-pkg") or {}),
                         ["demo_pkg-1.0-py3-none-any.whl"])
        self.assertIsNone(await self.simpleFiles("alice/prod", "demo-pkg"))

    async def test_uvPublish(self) -> None:
        self.assertSucceeded(await self.publish("uv", "alice/dev", "2.0"))
        refused = await self.publish("uv", "alice/prod", "2.1")
        self.assertNotEqual(refused.returncode, 0, refused.output)
        self.assertIn("403", refused.output)
        self.assertIsNone(await self.simpleFiles("alice/prod", "demo-pkg"))

    async def test_pipWithTokenInURL(self) -> None:
        """
        pip sends the token of the index URL (Basic, __token__) and installs,
        and the use shows in the listing; once deleted, the token uploads no
        more.  (Refusing reads of a restricted index is the read gate's.)
        """
        self.assertSucceeded(await self.publish("twine", "alice/dev", "3.0"))
        server = self.server.url.replace("http://", f"http://__token__:{self.token}@")
        pip = [os.path.join(BIN, "pip")] if os.path.isfile(os.path.join(BIN, "pip")) else [sys.executable, "-m", "pip"]
        target = self.distDir("pip-target")
        result = await self.runClient(*pip, "install", "--index-url", f"{server}/alice/dev/+simple/",
                                      "--no-cache-dir", "--target", target, "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "3.0")
        tokens = (await self.mustAPI("GET", "/alice/+tokens"))["result"]["tokens"]
        (tokenId,) = tokens
        self.assertIsNotNone(tokens[tokenId]["last_used"])
        await self.mustAPI("DELETE", f"/alice/+tokens/{tokenId}")
        again = await self.publish("twine", "alice/dev", "3.1")
        self.assertNotEqual(again.returncode, 0, again.output)
        self.assertIn("401", again.output)


class DevpiTokensPluginTests(_ClientCase):
    """devpi-client with the devpi-tokens plugin, unchanged."""

    _client = test_devpi_client.DevpiClientTests
    devpiEnvironment = _client.devpiEnvironment
    devpi = _client.devpi
    loggedInAsAlice = _client.loggedInAsAlice

    async def test_createListDeriveDelete(self) -> None:
        await self.loggedInAsAlice()
        help = await self.devpi("token-create", "--help", expectOK=False)
        if "invalid choice" in help.output or help.returncode != 0:
            self.skipTest("devpi-tokens is not installed next to devpi-client")
        created = await self.devpi("token-create", "-a", "upload,pkg_read", "-i", "alice/dev")
        token = created.stdout.strip().splitlines()[-1]
        self.assertTrue(token.startswith("devpi-"), created.output)
        inspected = await self.devpi("token-inspect", "--token", token)
        self.assertRegex(inspected.output, r"user\s*:\s*alice")
        tokenId = re.search(r"\bid\s*:\s*(\w+)", inspected.output).group(1)  # type: ignore[union-attr]
        listed = await self.devpi("token-list")
        self.assertIn(tokenId, listed.output)
        self.assertIn("allowed=pkg_read,upload", listed.output)
        self.assertIn("indexes=alice/dev", listed.output)
        derived = (await self.devpi("token-derive", "--token", token, "-p", "demo-pkg")).stdout.strip()
        self.assertNotEqual(derived, token)
        # a derived token logs in; with it, devpi upload is scoped
        await self.devpi("logoff")
        await self.devpi("token-login", "--token", derived)
        refused = await self.devpi("token-create", expectOK=False)
        self.assertNotEqual(refused.returncode, 0, refused.output)
        self.assertIn("403", refused.output)
        await self.devpi("logoff")
        await self.devpi("login", "alice", "--password", "alicepw")
        deleted = await self.devpi("token-delete", tokenId)
        self.assertIn(f"token {tokenId} deleted", deleted.output)
        self.assertNotIn(tokenId, (await self.devpi("token-list")).output)
        failed = await self.devpi("token-login", "--token", derived, expectOK=False)
        self.assertNotEqual(failed.returncode, 0, failed.output)
