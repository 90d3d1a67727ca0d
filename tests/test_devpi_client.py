"""
devpi-client 7.x, unchanged, against a real server: every subcommand a devpi
user runs, checked by its exit code and by the state it leaves (read back
through the JSON API, the simple pages and pip).

The C{devpi} command is the one installed next to the test's Python (tox
installs devpi-client there); its client directory, C{HOME} (for
C{.pypirc}) and caches live in the test's directory.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from typing import Any

from twisted.internet.threads import deferToThread

from .distbuilder import buildWheel, writeDist
from .test_clients import BIN, ROOT_PASSWORD, _ClientCase, tool

BACKEND = '''
"""A PEP 517 backend with no requirements, so tox needs nothing from an index to build."""
import base64, hashlib, os, zipfile

NAME, VERSION = "tdemo", "{version}"
DIST = f"{{NAME}}-{{VERSION}}.dist-info"
METADATA = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    directory = metadata_directory
    os.makedirs(os.path.join(directory, DIST))
    with open(os.path.join(directory, DIST, "METADATA"), "w") as f:
        f.write(METADATA)
    return DIST

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    directory = wheel_directory
    name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    files = {{"tdemo.py": open("tdemo.py", "rb").read(), f"{{DIST}}/METADATA": METADATA.encode(),
             f"{{DIST}}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}}
    record = "".join(
        f"{{path}},sha256={{base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}},{{len(data)}}\\n"
        for path, data in files.items()) + f"{{DIST}}/RECORD,,\\n"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{{DIST}}/RECORD", record)
    return name
'''


def toxSdist(directory: str, version: str = "0.1") -> str:
    """An sdist whose tox.ini imports the package, buildable without any download."""
    base = f"tdemo-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: tdemo\nVersion: {version}\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
                          '[project]\nname = "tdemo"\nversion = "' + version + '"\n',
        "backend.py": BACKEND.format(version=version),
        "tdemo.py": f'VERSION = "{version}"\n',
        "tox.ini": "[tox]\nenvlist = py\n[testenv]\n"
                   "commands = python -c \"import tdemo; assert tdemo.VERSION == '" + version + "'\"\n",
    }
    path = os.path.join(directory, f"{base}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def docZip(directory: str, name: str, version: str) -> str:
    path = os.path.join(directory, f"{name}-{version}.doc.zip")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("index.html", f"<h1>{name} {version} docs</h1>")
        z.writestr("api/module.html", "<p>api</p>")
    return path


class DevpiClientTests(_ClientCase):
    """Each test drives the real C{devpi} command against a fresh server."""

    def devpiEnvironment(self) -> dict[str, str]:
        home = self.distDir("home")
        return dict(self.env, DEVPI_CLIENTDIR=os.path.join(self.workdir, "devpi-client"), HOME=home,
                    PATH=BIN + os.pathsep + self.env.get("PATH", ""))

    async def devpi(self, *args: str, input: str | None = None, expectOK: bool = True) -> Any:
        """Run C{devpi ARGS}; by default assert it succeeded."""
        command = [tool("devpi"), *args]
        result = await deferToThread(
            subprocess.run, command, capture_output=True, text=True, timeout=300,
            env=self.devpiEnvironment(), cwd=self.workdir,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
        result.output = result.stdout + result.stderr
        if expectOK:
            self.assertEqual(result.returncode, 0,
                             f"devpi {' '.join(args)} failed:\n{result.output}\n--- server:\n{self.server.output()}")
        return result

    async def loggedInAsAlice(self) -> None:
        await self.devpi("use", self.server.url)
        await self.devpi("login", "alice", "--password", "alicepw")
        await self.devpi("use", "alice/dev")

    async def test_usersAndLogin(self) -> None:
        """use, login, user -c/-m/-l, passwd, logoff and user --delete change what the server holds."""
        await self.devpi("use", self.server.url)
        result = await self.devpi("login", "root", "--password", ROOT_PASSWORD)
        self.assertIn("credentials valid for 10.00 hours", result.output)
        await self.devpi("user", "-c", "carol", "password=carolpw", "email=carol@example.com")
        self.assertEqual((await self.mustAPI("GET", "/carol"))["result"]["email"], "carol@example.com")
        listed = await self.devpi("user", "-l")
        self.assertEqual(sorted(listed.stdout.split()), ["alice", "carol", "root"])
        await self.devpi("user", "-m", "carol", "email=new@example.com")
        self.assertEqual((await self.mustAPI("GET", "/carol"))["result"]["email"], "new@example.com")
        await self.devpi("login", "carol", "--password", "carolpw")
        await self.devpi("passwd", input="changedpw\nchangedpw\n")
        await self.devpi("logoff")
        failed = await self.devpi("login", "carol", "--password", "carolpw", expectOK=False)
        self.assertNotEqual(failed.returncode, 0)
        await self.devpi("login", "carol", "--password", "changedpw")
        await self.devpi("login", "root", "--password", ROOT_PASSWORD)
        await self.devpi("user", "--delete", "-y", "carol")
        code, _, _ = await self.api("GET", "/carol", auth=None)
        self.assertEqual(code, 404)

    async def test_rootEmptyPasswordAndMirrorURL(self) -> None:
        """
        C{user -m root password=} empties root's password, as devpi-client's
        own tests do to reset root, and root logs in with it; a mirror's
        C{mirror_url} is shown as given.
        """
        await self.devpi("use", self.server.url)
        await self.devpi("login", "root", "--password", ROOT_PASSWORD)
        await self.devpi("index", "-c", "up", "type=mirror", "mirror_url=http://127.0.0.1:9/simple")
        shown = await self.devpi("getjson", "/root/up?no_projects=")
        self.assertEqual(json.loads(shown.stdout)["result"]["mirror_url"], "http://127.0.0.1:9/simple")
        await self.devpi("user", "-m", "root", "password=")
        await self.devpi("logoff")
        failed = await self.devpi("login", "root", "--password", ROOT_PASSWORD, expectOK=False)
        self.assertNotEqual(failed.returncode, 0)
        await self.devpi("login", "root", "--password", "")
        await self.devpi("index", "-c", "made")
        code, _, _ = await self.api("GET", "/root/made", auth=None)
        self.assertEqual(code, 200)

    async def test_indexes(self) -> None:
        """index -c/-m/-l/--delete with key=value and bases+= edits."""
        await self.loggedInAsAlice()
        await self.devpi("index", "-c", "prod", "volatile=False", "title=Production")
        config = (await self.mustAPI("GET", "/alice/prod?no_projects="))["result"]
        self.assertEqual((config["volatile"], config["title"]), (False, "Production"))
        await self.devpi("index", "alice/prod", "bases+=alice/dev", "mirror_whitelist+=Some_Pkg")
        config = (await self.mustAPI("GET", "/alice/prod?no_projects="))["result"]
        self.assertEqual((config["bases"], config["mirror_whitelist"]), (["alice/dev"], ["some-pkg"]))
        await self.devpi("index", "alice/prod", "bases-=alice/dev")
        self.assertEqual((await self.mustAPI("GET", "/alice/prod?no_projects="))["result"]["bases"], [])
        listed = await self.devpi("index", "-l")
        self.assertEqual(sorted(listed.stdout.split()), ["alice/dev", "alice/prod", "alice/staging"])
        await self.devpi("index", "-c", "scratch")
        await self.devpi("index", "--delete", "-y", "alice/scratch")
        code, _, _ = await self.api("GET", "/alice/scratch")
        self.assertEqual(code, 404)

    async def test_uploadListRemoveGetjson(self) -> None:
        """upload (files, --from-dir, --only-docs), list with its views, getjson and remove."""
        await self.loggedInAsAlice()
        dist = self.distDir("dist")
        wheel = writeDist(buildWheel("demo-pkg", "1.0"), dist)
        await self.devpi("upload", wheel)
        fromDir = self.distDir("fromdir")
        writeDist(buildWheel("demo-pkg", "1.1"), fromDir)
        docZip(fromDir, "demo-pkg", "1.1")
        await self.devpi("upload", "--from-dir", fromDir)
        files = await self.simpleFiles("alice/dev", "demo-pkg")
        self.assertEqual(sorted(files), ["demo_pkg-1.0-py3-none-any.whl", "demo_pkg-1.1-py3-none-any.whl"])
        await self.devpi("upload", "--only-docs", docZip(self.distDir("docs"), "demo-pkg", "1.0"))
        code, body, _ = await self.api("GET", "/alice/dev/demo-pkg/1.0/+doc/index.html", auth=None,
                                       headers={b"Accept": [b"text/html"]})
        self.assertEqual((code, body), (200, b"<h1>demo-pkg 1.0 docs</h1>"))
        listing = await self.devpi("list")
        self.assertIn("demo-pkg", listing.stdout)
        versions = await self.devpi("list", "demo-pkg")
        self.assertIn("demo_pkg-1.1-py3-none-any.whl", versions.stdout)
        self.assertIn("demo_pkg-1.0-py3-none-any.whl", versions.stdout)
        got = await self.devpi("getjson", "/alice/dev/demo-pkg")
        self.assertEqual(sorted(json.loads(got.stdout)["result"]), ["1.0", "1.1"])
        await self.devpi("remove", "-y", "demo-pkg==1.0")
        self.assertEqual(sorted(await self.simpleFiles("alice/dev", "demo-pkg")), ["demo_pkg-1.1-py3-none-any.whl"])

    async def test_pushInternalAndExternal(self) -> None:
        """push to another index here, and to an upload URL named in .pypirc."""
        await self.loggedInAsAlice()
        await self.devpi("index", "-c", "prod", "volatile=False")
        await self.devpi("index", "-c", "elsewhere")
        await self.devpi("upload", writeDist(buildWheel("demo-pkg", "2.0"), self.distDir("dist")))
        await self.devpi("upload", "--only-docs", docZip(self.distDir("docs"), "demo-pkg", "2.0"))
        result = await self.devpi("push", "demo-pkg==2.0", "alice/prod")
        self.assertIn("store_releasefile", result.output)
        self.assertEqual(sorted(await self.simpleFiles("alice/prod", "demo-pkg")),
                         ["demo_pkg-2.0-py3-none-any.whl"])
        code, _, _ = await self.api("GET", "/alice/prod/demo-pkg/2.0/+doc/index.html", auth=None)
        self.assertEqual(code, 200)
        home = self.distDir("home")
        with open(os.path.join(home, ".pypirc"), "w") as f:
            f.write("[distutils]\nindex-servers = testrepo\n"
                    f"[testrepo]\nrepository = {self.server.url}/alice/elsewhere/\n"
                    "username = alice\npassword = alicepw\n")
        await self.devpi("push", "demo-pkg==2.0", "pypi:testrepo")
        self.assertEqual(sorted(await self.simpleFiles("alice/elsewhere", "demo-pkg")),
                         ["demo_pkg-2.0-py3-none-any.whl"])

    async def test_installAndTest(self) -> None:
        """devpi install puts the package in a venv; devpi test runs tox and attaches the result."""
        await self.loggedInAsAlice()
        sdist = toxSdist(self.distDir("dist"))
        await self.devpi("upload", sdist)
        venv = os.path.join(self.workdir, "venv")
        made = await deferToThread(subprocess.run, [sys.executable, "-m", "venv", venv],
                                   capture_output=True, timeout=120)
        self.assertEqual(made.returncode, 0, made.stderr)
        await self.devpi("install", "--venv", venv, "tdemo")
        check = await deferToThread(subprocess.run, [os.path.join(venv, "bin", "python"), "-c",
                                                     "import tdemo; print(tdemo.VERSION)"],
                                    capture_output=True, text=True, timeout=60)
        self.assertEqual(check.stdout.strip(), "0.1", check.stderr)
        if not os.path.isfile(os.path.join(BIN, "tox")):
            self.skipTest(f"tox is not installed next to {sys.executable}")
        await self.devpi("test", "tdemo")
        links = (await self.mustAPI("GET", "/alice/dev/tdemo/0.1"))["result"]["+links"]
        results = [link for link in links if link["rel"] == "toxresult"]
        self.assertEqual(len(results), 1, links)
        self.assertTrue(results[0]["for_href"].endswith("/tdemo-0.1.tar.gz"))
        shown = await self.devpi("list", "-t", "tdemo")
        self.assertIn("tests passed", shown.stdout)

    async def test_pushFromMirror(self) -> None:
        """push of an upstream release from a mirror index fetches its files and stores them in the target."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        from devpi_twisted.testing.fakepypi import FakePyPI, buildWheel as upstreamWheel

        fake = FakePyPI()
        filename, content, metadata = upstreamWheel("upstream-pkg", "3.0")
        fake.addFile("upstream-pkg", filename, content, coreMetadata=metadata)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(fake.resource()))
        self.addCleanup(port.stopListening)
        mirrorURL = f"http://127.0.0.1:{port.getHost().port}/simple/"
        await self.mustAPI("PUT", "/root/fake", {"type": "mirror", "mirror_url": mirrorURL},
                           auth=("root", ROOT_PASSWORD))
        await self.devpi("use", self.server.url)
        await self.devpi("login", "alice", "--password", "alicepw")
        await self.devpi("use", "root/fake")
        result = await self.devpi("push", "upstream-pkg==3.0", "alice/dev")
        self.assertIn("store_releasefile", result.output)
        files = await self.simpleFiles("alice/dev", "upstream-pkg")
        self.assertEqual(list(files), [filename])
        self.assertIn(("GET", f"/files/{filename}"), fake.requests)
