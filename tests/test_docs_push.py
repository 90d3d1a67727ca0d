"""
Documentation zips, tox results and push, through the real web resource over
memory storage (see L{tests.releaseharness}).
"""

import io
import json
import zipfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import BadRequest, TooLarge
from devpi_twisted.model.doczip import DocLimits, checkDocZip, findDocMember

from .distbuilder import buildWheel
from .releaseharness import ServerHarness, combine

JSON = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}


def makeZip(entries: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            z.writestr(info, data)
    return out.getvalue()


def form(fields: dict[str, str], content: bytes | None, filename: str = "docs.zip") -> tuple[dict[bytes, list[bytes]], bytes]:
    boundary = "b0undary"
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    if content is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="content"; filename="{filename}"\r\n\r\n'
                     .encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return {b"Content-Type": [f"multipart/form-data; boundary={boundary}".encode()]}, b"".join(parts)


class DocZipTests(SynchronousTestCase):
    """The checks a documentation zip passes before it is stored."""

    def test_plainZipAccepted(self) -> None:
        """An ordinary docs zip is accepted and its files counted."""
        data = makeZip({"index.html": b"<p>x</p>", "sub/page.html": b"y", "sub/": b""})
        self.assertEqual(checkDocZip(io.BytesIO(data), DocLimits()), 2)

    def test_escapingNamesRefused(self) -> None:
        """Entries with .., an absolute path, a drive or backslashes are refused."""
        for name in ("../evil.html", "/etc/passwd", "a/../../b", "C:/x.html", "a\\..\\b"):
            with self.assertRaises(BadRequest, msg=name):
                checkDocZip(io.BytesIO(makeZip({name: b"x"})), DocLimits())

    def test_symlinkRefused(self) -> None:
        """A symlink entry is refused."""
        data = makeZip({"link": b"/etc/passwd"}, modes={"link": 0o120777})
        self.assertRaises(BadRequest, checkDocZip, io.BytesIO(data), DocLimits())

    def test_bombRefused(self) -> None:
        """Too many entries, too much unpacked data or a suspicious ratio is refused as too large."""
        many = makeZip({f"f{i}.html": b"x" for i in range(30)})
        self.assertRaises(TooLarge, checkDocZip, io.BytesIO(many), DocLimits(maxEntries=20))
        big = makeZip({"big.html": b"\0" * (5 * 1024 * 1024)})
        self.assertRaises(TooLarge, checkDocZip, io.BytesIO(big), DocLimits(maxTotalSize=1024 * 1024))
        self.assertRaises(TooLarge, checkDocZip, io.BytesIO(big), DocLimits(maxRatio=10))

    def test_notAZip(self) -> None:
        """Bytes that are no zip are refused."""
        self.assertRaises(BadRequest, checkDocZip, io.BytesIO(b"not a zip"), DocLimits())

    def test_findMember(self) -> None:
        """Members are found at the top or in a single top directory, directories give index.html."""
        top = ["index.html", "api/index.html"]
        self.assertEqual(findDocMember(top, ""), "index.html")
        self.assertEqual(findDocMember(top, "api/"), "api/index.html")
        self.assertEqual(findDocMember(["html/", "html/index.html"], "index.html"), "html/index.html")
        self.assertIsNone(findDocMember(top, "../../etc/passwd"))


class DocUploadTests(SynchronousTestCase):
    """C{:action=doc_upload} and the C{+doc} and C{+doczip} routes."""

    def setUp(self) -> None:
        self.server = ServerHarness(self, rootPypi=False)
        self.server.createIndex("alice", "dev")
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0"))

    def uploadDocs(self, content: bytes, version: str | None = "1.0") -> Any:
        fields = {":action": "doc_upload", "name": "demo-pkg"}
        if version:
            fields["version"] = version
        headers, body = form(fields, content)
        return self.server.request("POST", "/alice/dev/", combine(headers, self.server.alice), body)

    def test_docsServed(self) -> None:
        """Uploaded docs are served per file, with a redirect to index.html, and as a zip."""
        data = makeZip({"index.html": b"<h1>Docs</h1>", "api.html": b"api"})
        self.assertEqual(self.uploadDocs(data).code, 200)
        self.assertEqual(self.server.get("/alice/dev/demo-pkg/1.0/+doc/api.html").body, b"api")
        answer = self.server.get("/alice/dev/demo-pkg/1.0/+doc/")
        self.assertEqual(answer.code, 302)
        self.assertTrue(answer.header("Location").endswith("/+doc/index.html"))
        page = self.server.get("/alice/dev/demo-pkg/latest/+doc/index.html")
        self.assertEqual((page.code, page.body), (200, b"<h1>Docs</h1>"))
        self.assertIn("sandbox", page.header("Content-Security-Policy"))
        self.assertEqual(self.server.get("/alice/dev/demo-pkg/1.0/+doczip").body, data)

    def test_versionDerived(self) -> None:
        """Without a version the latest release of the index is documented."""
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.2"))
        self.assertEqual(self.uploadDocs(makeZip({"index.html": b"v"}), version=None).code, 200)
        self.assertEqual(self.server.get("/alice/dev/demo-pkg/1.2/+doc/index.html").body, b"v")

    def test_unsafeDocsStoreNothing(self) -> None:
        """A zip with an escaping entry is refused with 400 and nothing is stored."""
        serial = self.server.storage.currentSerial()
        blobs = set(self.server.blobs.blobs)
        answer = self.uploadDocs(makeZip({"../../evil.html": b"x"}))
        self.assertEqual(answer.code, 400)
        self.assertIn("outside the documentation", answer.json["message"])
        self.assertEqual(self.server.storage.currentSerial(), serial)
        self.assertEqual(set(self.server.blobs.blobs), blobs)

    def test_docsListedAsLink(self) -> None:
        """The doczip shows in the version's +links with rel doczip, not on the simple page."""
        self.uploadDocs(makeZip({"index.html": b"x"}))
        links = self.server.request("GET", "/alice/dev/demo-pkg/1.0", JSON).json["result"]["+links"]
        self.assertIn("doczip", [link["rel"] for link in links])
        files = [f["filename"] for f in self.server.simpleJSON("alice/dev", "demo-pkg")["files"]]
        self.assertEqual(files, ["demo_pkg-1.0-py3-none-any.whl"])


class ToxresultTests(SynchronousTestCase):
    """Tox results posted to a release file's URL."""

    def setUp(self) -> None:
        self.server = ServerHarness(self, rootPypi=False)
        self.server.createIndex("alice", "dev")
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0"))
        self.url = self.server.fileURL("alice/dev", "demo-pkg", "demo_pkg-1.0-py3-none-any.whl")

    def test_storedAndLinked(self) -> None:
        """A tox result is stored verbatim and linked to its release file."""
        answer = self.server.request("POST", self.url, JSON, json={"testenvs": {"py": {}}})
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "toxresultpath")
        links = self.server.request("GET", "/alice/dev/demo-pkg/1.0", JSON).json["result"]["+links"]
        tox = [link for link in links if link["rel"] == "toxresult"]
        self.assertEqual(len(tox), 1)
        self.assertEqual(tox[0]["for_href"], self.url if self.url.startswith("http") else tox[0]["for_href"])
        self.assertEqual(json.loads(self.server.get(tox[0]["href"]).body), {"testenvs": {"py": {}}})

    def test_refusals(self) -> None:
        """Bad JSON is 400, an index without the right 403, an unknown file 404."""
        self.assertEqual(self.server.request("POST", self.url, JSON, body=b"{nope").code, 400)
        self.server.modifyIndex("alice", "dev", ["acl_toxresult_upload=alice"])
        self.assertEqual(self.server.request("POST", self.url, JSON, json={}).code, 403)
        self.assertEqual(self.server.request("POST", self.url, combine(JSON, self.server.alice), json={}).code, 200)
        missing = self.url.rsplit("/", 1)[0] + "/nothing-1.0.tar.gz"
        self.assertEqual(self.server.request("POST", missing, combine(JSON, self.server.alice), json={}).code, 404)


class PushTests(SynchronousTestCase):
    """Internal push between indexes of one server."""

    def setUp(self) -> None:
        self.server = ServerHarness(self, rootPypi=False)
        self.server.createIndex("alice", "dev")
        self.server.createIndex("alice", "prod", volatile=False)
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0"))

    def push(self, body: dict[str, Any], auth: Any = None) -> Any:
        return self.server.request("PUSH", "/alice/dev", combine(JSON, auth or self.server.alice), json=body)

    def test_pushCopies(self) -> None:
        """The release, its tox results and its docs land on the target; the answer is an actionlog."""
        url = self.server.fileURL("alice/dev", "demo-pkg", "demo_pkg-1.0-py3-none-any.whl")
        self.server.request("POST", url, JSON, json={"ok": True})
        headers, body = form({":action": "doc_upload", "name": "demo-pkg", "version": "1.0"},
                             makeZip({"index.html": b"d"}))
        self.server.request("POST", "/alice/dev/", combine(headers, self.server.alice), body)
        answer = self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod"})
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "actionlog")
        links = self.server.request("GET", "/alice/prod/demo-pkg/1.0", JSON).json["result"]["+links"]
        self.assertEqual(sorted(link["rel"] for link in links), ["doczip", "releasefile", "toxresult"])
        pushed = [link for link in links if link["rel"] == "releasefile"][0]
        self.assertEqual([entry["what"] for entry in pushed["log"]][-1], "push")
        self.assertEqual(self.server.get("/alice/prod/demo-pkg/1.0/+doc/index.html").body, b"d")

    def test_onlyAndNoDocs(self) -> None:
        """only_docs pushes the docs alone; no_docs leaves them out; both at once is 400."""
        headers, body = form({":action": "doc_upload", "name": "demo-pkg", "version": "1.0"},
                             makeZip({"index.html": b"d"}))
        self.server.request("POST", "/alice/dev/", combine(headers, self.server.alice), body)
        self.server.createIndex("alice", "docsonly")
        self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/docsonly", "only_docs": True})
        links = self.server.request("GET", "/alice/docsonly/demo-pkg/1.0", JSON).json["result"]["+links"]
        self.assertEqual([link["rel"] for link in links], ["doczip"])
        self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod", "no_docs": True})
        links = self.server.request("GET", "/alice/prod/demo-pkg/1.0", JSON).json["result"]["+links"]
        self.assertEqual([link["rel"] for link in links], ["releasefile"])
        both = self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod",
                          "no_docs": True, "only_docs": True})
        self.assertEqual(both.code, 400)

    def test_targetRules(self) -> None:
        """No rights on the target is 401; other bytes on a non-volatile target 409; the same bytes are fine."""
        self.server.createIndex("bob", "team")
        denied = self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "bob/team"})
        self.assertEqual(denied.code, 401)
        self.assertEqual(self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod"}).code, 200)
        self.assertEqual(self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod"}).code, 200)
        self.server.request("DELETE", "/alice/dev/demo-pkg/1.0", combine(JSON, self.server.alice))
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0", summary="other bytes"))
        conflict = self.push({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod"})
        self.assertEqual(conflict.code, 409)
        self.assertIn("File already exists", conflict.json["message"])

    def test_badRequests(self) -> None:
        """Unknown options, bad targets and missing releases are clear errors."""
        cases = [
            ({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod", "foo": 1}, 400),
            ({"name": "demo-pkg", "version": "1.0", "targetindex": "nonsense"}, 400),
            ({"name": "demo-pkg", "version": "1.0", "targetindex": "alice/nothere"}, 404),
            ({"name": "demo-pkg", "version": "9.9", "targetindex": "alice/prod"}, 400),
        ]
        for body, code in cases:
            answer = self.push(body)
            self.assertEqual(answer.code, code, (body, answer.body))
            self.assertIn("message", answer.json)
