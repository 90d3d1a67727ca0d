"""
One rule for project names, versions and upload file names (issue 11,
"Names, versions and file names"), through the real upload route, and
export and import that skip and report the bad records older versions let
in instead of failing.

Uploads go through the web resource over memory (L{tests.releaseharness});
export and import run in-process on real server directories, as in
L{tests.test_export}.
"""

import copy
import io
import json
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.admin.exporter import recordProblem
from devpi_twisted.model import keys
from devpi_twisted.model.names import isValidProjectName, normalizeVersion, versionProblem
from devpi_twisted.model.upstream.projectlist import parseProjectList
from devpi_twisted.services.fileentries import newEntry
from devpi_twisted.storage import BlobInfo

from .distbuilder import Dist, buildSdist, buildWheel, uploadBody
from .releaseharness import ServerHarness
from .test_export import _Dirs, fired, openStorage, readState, treeContents

# Each looks like an ASCII name, and Python's case-insensitive matching of
# [A-Z] accepts it; the Kelvin sign even lower-cases to "k".
CONFUSABLES = ("\u017fix", "\u0131dna", "\u0130dna", "\u212aombu")

BAD_VERSIONS = ("..", "+doc", "latest", "1.0\r\n", "1." + "0." * 149 + "0", "1.0/../../../../../tmp/pwn")


class NameRuleTests(SynchronousTestCase):
    """The one project-name and version rule of L{devpi_twisted.model.names}."""

    def test_confusablesRefused(self) -> None:
        """Non-ASCII look-alikes are not project names, here and on upstream lists."""
        for name in CONFUSABLES:
            self.assertFalse(isValidProjectName(name), name)
        self.assertTrue(isValidProjectName("Foo_Bar.baz-1"))
        listed = parseProjectList(
            json.dumps({"meta": {"api-version": "1.0"},
                        "projects": [{"name": n} for n in CONFUSABLES + ("six",)]}).encode(),
            "application/vnd.pypi.simple.v1+json")
        self.assertEqual(listed, ["six"])

    def test_versions(self) -> None:
        """Versions are PEP 440, without white space, at most 128 characters; normal forms compare."""
        for bad in BAD_VERSIONS + (" 1.0", "1.0 ", "1.0\t"):
            self.assertIsNotNone(versionProblem(bad), repr(bad))
        for good in ("1.0", "1.0-alpha1", "2024.1.post3.dev1+local.7", "v1.0"):
            self.assertIsNone(versionProblem(good), good)
        self.assertEqual(normalizeVersion("1.0-alpha1"), "1.0a1")
        self.assertNotEqual(normalizeVersion("1"), normalizeVersion("1.0"))


class StrictUploadTests(SynchronousTestCase):
    """Bad names, versions and file names are a 400 with a JSON message; good ones still work."""

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "dev")

    def snapshot(self) -> tuple[int, set[str]]:
        return self.h.storage.currentSerial(), set(self.h.blobs.blobs)

    def refuse(self, dist: Dist, fragment: str, **options: Any) -> str:
        """Upload C{dist}: a 400 whose JSON message contains C{fragment}; nothing stored."""
        before = self.snapshot()
        answer = self.h.upload("alice/dev", dist, **options)
        self.assertEqual(answer.code, 400, answer.body)
        message = answer.json["message"]
        self.assertIn(fragment, message)
        self.assertEqual(self.snapshot(), before)
        return message

    def test_confusableProjectNames(self) -> None:
        """C{ſix}, C{ıdna}, C{İdna} and C{Kombu} with the Kelvin sign are refused."""
        for name in CONFUSABLES:
            message = self.refuse(buildSdist(name, "1.0"), "is not a valid project name", name=name)
            self.assertIn(repr(name), message)
            self.assertIn("ASCII", message)

    def test_kelvinDoesNotMergeWithKombu(self) -> None:
        """The Kelvin-sign name would normalise to C{kombu}; it must not add to it."""
        self.h.mustUpload("alice/dev", buildSdist("kombu", "1.0"))
        self.refuse(buildSdist("kombu", "2.0"), "is not a valid project name", name="\u212aombu")
        files = [f["filename"] for f in self.h.fileEntries("alice/dev", "kombu")]
        self.assertEqual(files, ["kombu-1.0.tar.gz"])

    def test_badVersions(self) -> None:
        """Versions that are not PEP 440 (or too long, or with CRLF) are refused."""
        for version in BAD_VERSIONS:
            message = self.refuse(buildSdist("six", "1.0"), "invalid metadata: version", name="six",
                                  version=version)
            self.assertNotIn("\r", message)

    def test_otherProjectsFile(self) -> None:
        """C{sixevil-1.0.tar.gz} is not a file of C{six}, nor C{six-1.0.tar.gz} one of C{si}."""
        self.refuse(buildSdist("sixevil", "1.0"), "does not match project name 'six'", name="six")
        self.refuse(buildSdist("six", "1.0"), "does not match project name 'si'", name="si")
        self.refuse(buildWheel("sixevil", "1.0"), "does not match project name 'six'", name="six")

    def test_otherVersionsFile(self) -> None:
        """A file of C{1.0} is not one of version C{1}, though PEP 440 says 1 == 1.0."""
        self.refuse(buildSdist("six", "1.0"), "does not match version '1'", version="1")
        self.refuse(buildWheel("six", "1.0"), "does not match version '1'", version="1")
        self.refuse(buildSdist("six", "1.0", filename="six-1.0.0.tar.gz"), "does not match version '1.0'")
        self.refuse(buildSdist("six", "1.0", filename="six-1.0-evil.tar.gz"), "does not match version '1.0'")

    def test_longFilename(self) -> None:
        """A file name too long to be one path segment (of an export, say) is refused."""
        self.refuse(buildSdist("six", "1.0", filename="six" + "-" * 250 + "-1.0.tar.gz"),
                    "filename is longer than 255 bytes")

    def test_goodNamesAccepted(self) -> None:
        """Names compare normalised, versions in their PEP 440 normal form; legacy sdists still work."""
        accepted = [
            (buildSdist("foo-bar", "1.0", filename="Foo_Bar-1.0.tar.gz"), {"name": "Foo_Bar"}),
            (buildSdist("foo-bar", "1.1", filename="foo-bar-1.1.zip", zipFormat=True), {}),
            (buildSdist("foo-bar", "1.2", filename="foo.bar-1.2.tar.bz2"), {}),
            (buildSdist("foo-bar", "1.0-alpha1", filename="foo_bar-1.0a1.tar.gz"), {}),
            (buildWheel("foo-bar", "1.0-alpha1", filename="foo_bar-1.0a1-py3-none-any.whl"), {}),
            (buildSdist("foo-bar", "2.0.post1", filename="foo-bar-2.0-1.tar.gz"), {"version": "2.0-1"}),
            (buildSdist("foo-bar", "3.0", filename="foo_bar-3.0-py3.9.egg"), {}),
        ]
        for dist, options in accepted:
            answer = self.h.upload("alice/dev", dist, **options)
            self.assertEqual(answer.code, 200, (dist.filename, answer.body))
        files = sorted(f["filename"] for f in self.h.fileEntries("alice/dev", "foo-bar"))
        self.assertEqual(files, sorted(d.filename for d, _ in accepted))

    def test_docUploadVersion(self) -> None:
        """A documentation upload's version must be a PEP 440 version too."""
        self.h.mustUpload("alice/dev", buildWheel("six", "1.0"))
        before = self.snapshot()
        body = uploadBody(None, action="doc_upload", name="six", version="1.0/../../../x",
                          content=b"PK\x05\x06" + b"\x00" * 18, filename="six.zip")
        answer = self.h.post("/alice/dev/", body, self.h.alice)
        self.assertEqual(answer.code, 400, answer.body)
        self.assertIn("not a valid PEP 440 version", answer.json["message"])
        self.assertEqual(self.snapshot(), before)


def _addBadRecords(path: FilePath) -> None:
    """
    What older versions let in, written straight into storage: a release of
    C{hello-devpi} whose version is a path, and a project C{ſix}.
    """
    storage, blobs = openStorage(path)
    writer = blobs.openWriter()
    fired(writer.write(b"not really an sdist"))
    info: BlobInfo = fired(writer.commit())
    bad = [("hello-devpi", "1.0/../../../../../tmp/pwn", "hello_devpi-1.0.post9.tar.gz"),
           ("\u017fix", "1.0", "\u017fix-1.0.tar.gz")]

    def _store(txn: Any) -> None:
        for project, version, filename in bad:
            txn.set(keys.projectKey("alice", "dev", project), txn.get(keys.projectKey("alice", "dev", project))
                    or {"name": project})
            txn.set(keys.versionKey("alice", "dev", project, version), {"name": project, "version": version})
            entry = newEntry("alice", "dev", "releasefile", filename, project, version, info, 1.7e9, [])
            txn.set(keys.fileKey("alice", "dev", project, entry["filename"]), entry)

    try:
        fired(storage.write(_store))
    finally:
        fired(storage.close())


class ExportImportBadRecordTests(_Dirs, SynchronousTestCase):
    """Bad records are reported and skipped; they never stop an export or import."""

    def test_exportSkipsBadRecords(self) -> None:
        """Export completes, leaves bad records out, says so, and writes nothing outside its directory."""
        self.importInto("clean")
        clean = self.exportTo("clean", "clean-export")
        self.importInto("server")
        _addBadRecords(self.workdir.child("server"))
        self.out = io.StringIO()
        target = self.exportTo("server", "export")
        report = self.out.getvalue()
        self.assertIn("SKIPPED: alice/dev: release 'hello-devpi' '1.0/../../../../../tmp/pwn'", report)
        self.assertIn("SKIPPED: alice/dev: project '\u017fix' not exported", report)
        self.assertIn("is not a valid project name", report)
        self.assertEqual(treeContents(target), treeContents(clean))
        self.assertFalse(self.workdir.child("tmp").exists())
        self.assertEqual([p.path for p in self.workdir.parent().walk() if p.basename() == "pwn"], [])

    def _editedExport(self) -> FilePath:
        self.importInto("clean")
        source = self.exportTo("clean", "export")
        data = json.loads(source.child("dataindex.json").getContent())
        dev = data["indexes"]["alice/dev"]
        good = next(d for d in dev["files"] if d["relpath"].endswith(".tar.gz"))
        for name in ("\u017fix", "\u212aombu"):
            dev["projects"][name] = {"1.0": {"name": name, "version": "1.0"}}
            desc = copy.deepcopy(good)
            desc.update(projectname=name, version="1.0", relpath=f"alice/dev/{name}/1.0/{name}-1.0.tar.gz")
            dev["files"].append(desc)
        bad = "1.0/../../../../../tmp/pwn"
        dev["projects"]["hello-devpi"][bad] = {"name": "hello-devpi", "version": bad}
        desc = copy.deepcopy(good)
        desc.update(version=bad, relpath="alice/dev/hello-devpi/pwn/hello_devpi-1.0.tar.gz")
        dev["files"].append(desc)
        source.child("dataindex.json").setContent(json.dumps(data).encode())
        return source

    def test_importSkipsBadRecords(self) -> None:
        """Import completes, leaves bad projects, versions and files out, and says so."""
        summary = self.importInto("server", self._editedExport())
        report = self.out.getvalue()
        for fragment in ("SKIPPED: alice/dev: project '\u017fix' not imported",
                         "SKIPPED: alice/dev: project '\u212aombu' not imported",
                         "SKIPPED: alice/dev: release hello-devpi '1.0/../../../../../tmp/pwn'",
                         "SKIPPED: alice/dev: alice/dev/hello-devpi/pwn/hello_devpi-1.0.tar.gz not imported"):
            self.assertIn(fragment, report)
        self.assertEqual(len(summary.skipped), 6)
        state = readState(self.workdir.child("server"), "version/alice/dev/")
        self.assertEqual(sorted(state), [keys.versionKey("alice", "dev", "hello-devpi", v) for v in ("1.0", "1.1")])
        files = readState(self.workdir.child("server"), "file/alice/dev/")
        self.assertEqual({e["project"] for e in files.values()}, {"hello-devpi"})
        self.assertEqual(summary.indexes["alice/dev"], (1, 5))


class RecordProblemTests(SynchronousTestCase):
    """L{recordProblem}: what export and import cannot keep."""

    def test_problems(self) -> None:
        """Bad names and path-like versions or file names are problems; legacy versions are not."""
        self.assertIsNone(recordProblem("hello-devpi", "2004d", "hello-2004d.tar.gz"))
        self.assertIsNotNone(recordProblem("\u017fix"))
        self.assertIsNotNone(recordProblem("six", "1.0/../x"))
        self.assertIsNotNone(recordProblem("six", "1.0\n"))
        self.assertIsNotNone(recordProblem("six", "1.0", ".."))
        self.assertIsNotNone(recordProblem("six", "1.0", "a/b.tar.gz"))

