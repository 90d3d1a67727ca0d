"""
C{devpi-twisted export} and C{import}: devpi's export layout, read and
written, with a real export made by devpi-server 6.20.3
(C{tests/fixtures/devpi-6.20.3-export}, see C{tests/fixtures/README.rst}).

Most tests run the exporter and importer in-process on real server
directories (SQLite and files, synchronous).  L{InstallFromImportTests}
starts a real C{twistd devpi} on 127.0.0.1 on an imported directory and
installs from it with pip; L{DevpiReadsOurExportTests} runs devpi-server's
own C{devpi-import} on our export when a devpi-server venv is at hand.
"""

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from devpi_twisted.admin import cli
from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.errors import Gone, ServerDirError
from devpi_twisted.admin.exporter import EXTRA, ExportError, exportServerDir
from devpi_twisted.admin.importer import ImportFailed, importServerDir
from devpi_twisted.admin.initstate import createServerDir
from devpi_twisted.model import keys
from devpi_twisted.services.fileentries import lookupFile, removeFileEntry
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.config import BackendSettings
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.threads import SynchronousRunner, ThreadRunner

from .distbuilder import buildWheel

FIXTURE = FilePath(os.path.dirname(os.path.abspath(__file__))).child("fixtures").child("devpi-6.20.3-export")
DEVPI_VENV = os.path.expanduser(os.environ.get("DEVPI_SERVER_VENV", "~/.cache/devpi-twisted-bench/venv"))


def fixtureData() -> dict[str, Any]:
    return json.loads(FIXTURE.child("dataindex.json").getContent())


def fired(answer: Any) -> Any:
    """
    The result of a Deferred (or coroutine) that has fired already, as one
    does on storage opened with a L{SynchronousRunner}; its failure raised.
    """
    results: list[Any] = []
    ensureDeferred(answer).addBoth(results.append)
    assert results, "not fired: is the storage on a SynchronousRunner?"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def openStorage(path: FilePath) -> tuple[Any, Any]:
    return openBackends(BackendSettings(), path, SynchronousRunner())


def readState(path: FilePath, prefix: str = "") -> dict[str, Any]:
    storage, _ = openStorage(path)
    try:
        return fired(storage.read(lambda view: dict(view.items(prefix))))
    finally:
        fired(storage.close())


def treeContents(path: FilePath) -> dict[str, bytes]:
    """Every file below C{path}, by relative path."""
    result = {}
    for child in path.walk():
        if child.isfile():
            result["/".join(child.segmentsFrom(path))] = child.getContent()
    return result


def addExtras(path: FilePath) -> dict[str, Any]:
    """What devpi has no place for: yanking, project status, attestations, microseconds, blake2b."""
    storage, _ = openStorage(path)
    wheelKey = keys.fileKey("alice", "dev", "hello-devpi", "hello_devpi-1.1-py3-none-any.whl")
    content = FIXTURE.preauthChild("alice/dev/hello-devpi/1.1/hello_devpi-1.1-py3-none-any.whl").getContent()

    def _edit(txn: Any) -> dict[str, Any]:
        entry = txn.get(wheelKey)
        entry["yanked"] = "broken on Windows"
        entry["upload_time"] = "2024-05-06T07:08:09.123456Z"
        entry["attestations"] = [{"version": 1, "envelope": {"statement": "e30=", "signature": "c2ln"}}]
        entry["hashes"]["blake2b_256"] = hashlib.blake2b(content, digest_size=32).hexdigest()
        entry["hashes"]["md5"] = hashlib.md5(content).hexdigest()
        txn.set(wheelKey, entry)
        txn.set(keys.projectKey("alice", "dev", "hello-devpi"),
                {"name": "Hello-Devpi", "status": {"status": "deprecated", "reason": "use hello2"}})
        return entry

    try:
        _, entry = fired(storage.write(_edit))
    finally:
        fired(storage.close())
    return entry


class _Dirs:
    def setUp(self) -> None:
        self.workdir = FilePath(self.mktemp())  # type: ignore[attr-defined]
        self.workdir.makedirs()
        self.out = io.StringIO()

    def importInto(self, name: str, source: FilePath = FIXTURE, **kw: Any) -> Any:
        return fired(importServerDir(self.workdir.child(name), source, out=self.out, **kw))

    def exportTo(self, serverdir: str, name: str, **kw: Any) -> FilePath:
        target = self.workdir.child(name)
        fired(exportServerDir(self.workdir.child(serverdir), target, out=self.out, **kw))
        return target

    def copyFixture(self, name: str = "edited") -> FilePath:
        target = self.workdir.child(name)
        shutil.copytree(FIXTURE.path, target.path)
        return target

    def editFixture(self, edit: Any, name: str = "edited") -> FilePath:
        target = self.copyFixture(name)
        data = json.loads(target.child("dataindex.json").getContent())
        edit(data)
        target.child("dataindex.json").setContent(json.dumps(data).encode())
        return target


class ImportDevpiExportTests(_Dirs, SynchronousTestCase):
    """Importing the export devpi-server 6.20.3 wrote."""

    def test_summary(self) -> None:
        """The import reports the users, indexes, projects and files it brought over, all checked by hash."""
        summary = self.importInto("server")
        self.assertEqual(summary.users, ["alice", "root"])
        self.assertEqual(summary.indexes, {"alice/dev": (1, 5), "alice/staging": (1, 1)})
        self.assertEqual(summary.configOnly, ["root/pypi"])
        self.assertEqual(summary.files, {"releasefile": 4, "doczip": 1, "toxresult": 1})
        self.assertEqual(summary.unverified, 0)
        self.assertEqual(summary.warnings, [])
        text = self.out.getvalue()
        self.assertIn("devpi-server 6.20.3 export", text)
        self.assertIn("6 verified against the export's hashes", text)
        self.assertTrue(ServerDir(self.workdir.child("server")).isInitialised())

    def test_usersKeepPasswordHashes(self) -> None:
        """Users keep devpi's argon2id password hashes, which verify with the passwords set on devpi."""
        self.importInto("server")
        state = readState(self.workdir.child("server"), keys.USER)
        exported = fixtureData()["users"]
        alice = state[keys.userKey("alice")]
        self.assertEqual(alice["pwhash"], exported["alice"]["pwhash"])
        self.assertTrue(alice["pwhash"].startswith("$argon2id$v=19$m=65536,t=3,p=4$"))
        self.assertEqual(alice["email"], "alice@example.com")
        self.assertEqual(alice["created"], exported["alice"]["created"])
        self.assertNotIn("username", alice)
        hashing = PasswordHashing()
        self.assertTrue(hashing.verify(alice["pwhash"], "alicepw"))
        self.assertFalse(hashing.verify(alice["pwhash"], "wrong"))
        self.assertTrue(hashing.verify(state[keys.userKey("root")]["pwhash"], ""))

    def test_rootPassword(self) -> None:
        """--root-passwd gives root a new password instead of the exported one."""
        self.importInto("server", rootPassword="newroot")
        root = readState(self.workdir.child("server"), keys.userKey("root"))[keys.userKey("root")]
        self.assertTrue(PasswordHashing().verify(root["pwhash"], "newroot"))
        self.assertFalse(PasswordHashing().verify(root["pwhash"], ""))

    def test_indexConfigs(self) -> None:
        """Index configurations arrive as devpi had them; root/pypi stays a mirror with the default expiry."""
        self.importInto("server")
        state = readState(self.workdir.child("server"), keys.INDEX)
        exported = fixtureData()["indexes"]
        self.assertEqual(state[keys.indexKey("alice", "dev")], exported["alice/dev"]["indexconfig"])
        self.assertEqual(state[keys.indexKey("alice", "staging")], exported["alice/staging"]["indexconfig"])
        self.assertEqual(state[keys.indexKey("root", "pypi")],
                         dict(exported["root/pypi"]["indexconfig"], mirror_cache_expiry=1800))

    def test_exportWithoutRoot(self) -> None:
        """An export without root gets a root with a generated password, printed once."""
        def edit(data: dict[str, Any]) -> None:
            del data["users"]["root"]
            del data["indexes"]["root/pypi"]

        self.importInto("server", self.editFixture(edit), rootPypi=False)
        password = self.out.getvalue().split("generated password\n", 1)[1].split()[0]
        root = readState(self.workdir.child("server"), keys.userKey("root"))[keys.userKey("root")]
        self.assertTrue(PasswordHashing().verify(root["pwhash"], password))

    def test_noRootPypi(self) -> None:
        """--no-root-pypi leaves the exported root/pypi out."""
        self.importInto("server", rootPypi=False)
        self.assertNotIn(keys.indexKey("root", "pypi"), readState(self.workdir.child("server"), keys.INDEX))

    def test_files(self) -> None:
        """File entries get content-addressed URLs, devpi's logs and times, and the tox result its release."""
        self.importInto("server")
        state = readState(self.workdir.child("server"), "file/alice/dev/hello-devpi/")
        entries = {e["filename"]: e for e in state.values()}
        files = {d["relpath"].rsplit("/", 1)[-1]: d for d in fixtureData()["indexes"]["alice/dev"]["files"]}
        [toxName] = [name for name, desc in files.items() if desc["type"] == "toxresult"]
        self.assertTrue(toxName.startswith("hello_devpi-1.0-py3-none-any.whl.toxresult-"), toxName)
        self.assertEqual(sorted(entries), sorted([
            "hello-devpi-1.0.doc.zip", "hello_devpi-1.0-py3-none-any.whl", toxName,
            "hello_devpi-1.0.tar.gz", "hello_devpi-1.1-py3-none-any.whl"]))
        for filename, entry in entries.items():
            desc = files[filename]
            content = FIXTURE.preauthChild(desc["relpath"]).getContent()
            sha = hashlib.sha256(content).hexdigest()
            self.assertEqual(entry["sha256"], sha)
            self.assertEqual(entry["size"], len(content))
            self.assertEqual(entry["log"], desc["log"])
            self.assertEqual(entry["last_modified"], desc["entrymapping"]["last_modified"])
            when = desc["log"][0]["when"]
            self.assertEqual(entry["upload_time"], "%04d-%02d-%02dT%02d:%02d:%02d.000000Z" % tuple(when))
            self.assertFalse(entry["yanked"])
        wheel = entries["hello_devpi-1.0-py3-none-any.whl"]
        self.assertEqual(wheel["relpath"], keys.fileRelpath("alice", "dev", wheel["sha256"], wheel["filename"]))
        self.assertEqual(wheel["requires_python"], ">=3.8")
        tox = entries[toxName]
        self.assertEqual(tox["rel"], "toxresult")
        self.assertEqual(tox["for_relpath"], wheel["relpath"])
        self.assertEqual(tox["relpath"], wheel["relpath"].rsplit("/", 1)[0] + "/" + tox["filename"])
        self.assertEqual(entries["hello-devpi-1.0.doc.zip"]["rel"], "doczip")

    def test_wheelMetadataExtracted(self) -> None:
        """Each wheel's METADATA is stored for PEP 658, byte for byte as in the wheel."""
        self.importInto("server")
        state = readState(self.workdir.child("server"))
        for desc in fixtureData()["indexes"]["alice/dev"]["files"]:
            filename = desc["relpath"].rsplit("/", 1)[-1]
            key = keys.coreMetadataKey("alice", "dev", "hello-devpi", filename)
            if not filename.endswith(".whl"):
                self.assertNotIn(key, state)
                continue
            with zipfile.ZipFile(FIXTURE.preauthChild(desc["relpath"]).path) as zf:
                version = desc["version"]
                metadata = zf.read(f"hello_devpi-{version}.dist-info/METADATA")
            self.assertEqual(base64.b64decode(state[key]["data"]), metadata)
            entry = state[keys.fileKey("alice", "dev", "hello-devpi", filename)]
            self.assertEqual(entry["core_metadata_sha256"], hashlib.sha256(metadata).hexdigest())

    def test_versionsAndProjects(self) -> None:
        """Release metadata is kept whole and the project keeps its display name."""
        self.importInto("server")
        state = readState(self.workdir.child("server"))
        exported = fixtureData()["indexes"]["alice/dev"]["projects"]["hello-devpi"]
        for version, metadata in exported.items():
            self.assertEqual(state[keys.versionKey("alice", "dev", "hello-devpi", version)], metadata)
        self.assertEqual(state[keys.projectKey("alice", "dev", "hello-devpi")], {"name": "Hello-Devpi"})

    def test_hashMismatch(self) -> None:
        """A file whose content does not match the export's hash fails the import and leaves no directory."""
        source = self.copyFixture()
        wheel = source.preauthChild("alice/dev/hello-devpi/1.0/hello_devpi-1.0-py3-none-any.whl")
        wheel.setContent(wheel.getContent() + b"tampered")
        error = self.assertRaises(ImportFailed, self.importInto, "server", source)
        self.assertIn("sha256 mismatch", str(error))
        self.assertIn("hello_devpi-1.0-py3-none-any.whl", str(error))
        self.assertFalse(self.workdir.child("server").exists())
        self.assertEqual([c for c in self.workdir.listdir() if c.startswith(".")], [])

    def test_missingFile(self) -> None:
        """A file the export lists but does not hold fails the import."""
        source = self.copyFixture()
        source.preauthChild("alice/dev/hello-devpi/1.0/hello_devpi-1.0.tar.gz").remove()
        error = self.assertRaises(ImportFailed, self.importInto, "server", source)
        self.assertIn("is missing", str(error))
        self.assertFalse(self.workdir.child("server").exists())

    def test_pathOutsideExport(self) -> None:
        """A file path that leaves the export directory is refused."""
        def edit(data: dict[str, Any]) -> None:
            data["indexes"]["alice/dev"]["files"][0]["relpath"] = "../../etc/passwd"

        error = self.assertRaises(ImportFailed, self.importInto, "server", self.editFixture(edit))
        self.assertIn("leaves the export directory", str(error))

    def test_targetMustBeEmpty(self) -> None:
        """Importing into an initialised server directory is refused and changes nothing."""
        createServerDir(self.workdir.child("server"), BackendSettings(), "pw", rootPypi=False, out=io.StringIO())
        before = treeContents(self.workdir.child("server"))
        self.assertRaises(ServerDirError, self.importInto, "server")
        self.assertEqual(treeContents(self.workdir.child("server")), before)

    def test_dumpversion1Migrations(self) -> None:
        """Old exports are migrated: versions from file names, md5 and hash_spec folded, pypi_whitelist renamed."""
        def edit(data: dict[str, Any]) -> None:
            data["dumpversion"] = "1"
            dev = data["indexes"]["alice/dev"]
            config = dev["indexconfig"]
            config["pypi_whitelist"] = config.pop("mirror_whitelist") + ["Hello_Devpi"]
            config["uploadtrigger_jenkins"] = None
            for desc in dev["files"]:
                desc.pop("version")
                mapping = desc["entrymapping"]
                mapping.pop("hashes")
                if desc["type"] == "releasefile":
                    content = FIXTURE.preauthChild(desc["relpath"]).getContent()
                    mapping["md5"] = hashlib.md5(content).hexdigest()

        summary = self.importInto("server", self.editFixture(edit))
        self.assertEqual(summary.files, {"releasefile": 4, "doczip": 1, "toxresult": 1})
        state = readState(self.workdir.child("server"))
        self.assertEqual(state[keys.indexKey("alice", "dev")]["mirror_whitelist"], ["hello-devpi"])
        self.assertNotIn("uploadtrigger_jenkins", state[keys.indexKey("alice", "dev")])
        sdist = state[keys.fileKey("alice", "dev", "hello-devpi", "hello_devpi-1.0.tar.gz")]
        self.assertEqual(sdist["version"], "1.0")
        self.assertEqual(set(sdist["hashes"]), {"sha256", "md5"})
        self.assertEqual(state[keys.fileKey("alice", "dev", "hello-devpi", "hello-devpi-1.0.doc.zip")]["version"],
                         "1.0")

    def test_md5Mismatch(self) -> None:
        """Every hash the export gives is checked, not only sha256."""
        def edit(data: dict[str, Any]) -> None:
            data["indexes"]["alice/dev"]["files"][0]["entrymapping"]["hashes"]["md5"] = "0" * 32

        error = self.assertRaises(ImportFailed, self.importInto, "server", self.editFixture(edit))
        self.assertIn("md5 mismatch", str(error))

    def test_toxresultHashBug(self) -> None:
        """A tox result recorded with its release file's hash (devpi 6.5 to 6.9) still imports."""
        def edit(data: dict[str, Any]) -> None:
            for desc in data["indexes"]["alice/dev"]["files"]:
                if desc["type"] == "toxresult":
                    release = desc["relpath"].split("/")[3][len("sha256="):]
                    desc["entrymapping"]["hashes"] = {"sha256": release}
                    desc["entrymapping"]["hash_spec"] = f"sha256={release}"

        summary = self.importInto("server", self.editFixture(edit))
        self.assertEqual(summary.files["toxresult"], 1)
        self.assertEqual(summary.unverified, 1)

    def test_pluginKeysDropped(self) -> None:
        """Index and user keys of devpi plugins are dropped with a warning; the rest imports."""
        def edit(data: dict[str, Any]) -> None:
            data["indexes"]["alice/dev"]["indexconfig"]["uploadtrigger_jenkins"] = "http://ci/{pkgname}"
            data["indexes"]["alice/dev"]["indexconfig"]["constraints"] = ["x<2"]
            data["users"]["alice"]["ldap_groups"] = ["dev"]

        summary = self.importInto("server", self.editFixture(edit))
        self.assertEqual(summary.warnings, [
            "user alice: dropped keys devpi-twisted does not know: ldap_groups",
            "index alice/dev: dropped keys devpi-twisted does not know: constraints, uploadtrigger_jenkins",
        ])
        self.assertIn("WARNING: index alice/dev: dropped keys", self.out.getvalue())
        config = readState(self.workdir.child("server"), keys.INDEX)[keys.indexKey("alice", "dev")]
        self.assertNotIn("constraints", config)

    def test_unknownIndexType(self) -> None:
        """An index of a type devpi-twisted lacks aborts the import unless that type is skipped."""
        def edit(data: dict[str, Any]) -> None:
            data["indexes"]["alice/staging"]["indexconfig"]["type"] = "constrained"

        source = self.editFixture(edit)
        error = self.assertRaises(ImportFailed, self.importInto, "server", source)
        self.assertIn("--skip-import-type constrained", str(error))
        summary = self.importInto("server", source, skipTypes=("constrained",))
        self.assertNotIn("alice/staging", summary.indexes)
        self.assertIn("index alice/staging was not imported, nor its 1 files", summary.warnings)

    def test_badDumpversion(self) -> None:
        """An export of an unknown dumpversion is refused."""
        def edit(data: dict[str, Any]) -> None:
            data["dumpversion"] = "3"

        error = self.assertRaises(ImportFailed, self.importInto, "server", self.editFixture(edit))
        self.assertIn("dumpversion", str(error))


class RoundTripTests(_Dirs, SynchronousTestCase):
    """export, import, export: the same data."""

    def test_roundTrip(self) -> None:
        """Exporting an imported export gives byte-identical files and dataindex.json, no normalising."""
        self.importInto("server1")
        first = self.exportTo("server1", "export1")
        self.importInto("server2", first)
        second = self.exportTo("server2", "export2")
        self.assertEqual(treeContents(first), treeContents(second))
        self.assertEqual(readState(self.workdir.child("server1"), keys.USER),
                         readState(self.workdir.child("server2"), keys.USER))

    def test_devpiFieldsKept(self) -> None:
        """Our export of a devpi import holds every field devpi exported, unchanged."""
        self.importInto("server")
        ours = json.loads(self.exportTo("server", "export").child("dataindex.json").getContent())
        theirs = fixtureData()
        self.assertEqual(ours["dumpversion"], "2")
        self.assertEqual(ours["users"], theirs["users"])
        for name, index in theirs["indexes"].items():
            expected = dict(index["indexconfig"])
            if name == "root/pypi":
                expected["mirror_cache_expiry"] = 1800
            self.assertEqual(ours["indexes"][name]["indexconfig"], expected)
            self.assertEqual(ours["indexes"][name].get("projects"), index.get("projects"))
            ourFiles = {d["relpath"]: d for d in ours["indexes"][name].get("files", [])}
            self.assertEqual(sorted(ourFiles), sorted(d["relpath"] for d in index.get("files", [])))
            for desc in index.get("files", []):
                mine = {k: v for k, v in ourFiles[desc["relpath"]].items() if k != EXTRA}
                self.assertEqual(mine, desc)
        self.assertEqual(treeContents(FIXTURE).keys() - {"dataindex.json"},
                         treeContents(self.workdir.child("export")).keys() - {"dataindex.json"})

    def test_extrasSurvive(self) -> None:
        """Yanked status, project status, attestations, exact upload times and extra hashes survive a round trip."""
        self.importInto("server1")
        edited = addExtras(self.workdir.child("server1"))
        first = self.exportTo("server1", "export1")
        self.importInto("server2", first)
        state = readState(self.workdir.child("server2"))
        entry = state[keys.fileKey("alice", "dev", "hello-devpi", "hello_devpi-1.1-py3-none-any.whl")]
        for key in ("yanked", "upload_time", "attestations", "hashes", "relpath", "log", "last_modified"):
            self.assertEqual(entry[key], edited[key], key)
        self.assertEqual(state[keys.projectKey("alice", "dev", "hello-devpi")]["status"],
                         {"status": "deprecated", "reason": "use hello2"})
        second = self.exportTo("server2", "export2")
        self.assertEqual(treeContents(first), treeContents(second))
        # devpi's part of the export stays readable by devpi: only hashes hashlib knows by name.
        data = json.loads(first.child("dataindex.json").getContent())
        wheel = next(d for d in data["indexes"]["alice/dev"]["files"] if d["relpath"].endswith("1.1-py3-none-any.whl"))
        self.assertEqual(set(wheel["entrymapping"]["hashes"]), {"sha256", "md5"})
        self.assertEqual(wheel[EXTRA]["yanked"], "broken on Windows")

    def test_deletedFilesStayGone(self) -> None:
        """A file deleted before the export answers 410 after the import, as it did before."""
        self.importInto("server1")
        storage, _ = openStorage(self.workdir.child("server1"))
        wheelKey = keys.fileKey("alice", "dev", "hello-devpi", "hello_devpi-1.1-py3-none-any.whl")
        try:
            entry = fired(storage.read(lambda view: view.get(wheelKey)))
            fired(storage.write(lambda txn: removeFileEntry(txn, "alice", "dev", entry)))
        finally:
            fired(storage.close())
        relpath = entry["relpath"].split("/+f/", 1)[1]
        first = self.exportTo("server1", "export1")
        data = json.loads(first.child("dataindex.json").getContent())
        self.assertEqual(data["indexes"]["alice/dev"][EXTRA]["deleted"], [{"path": relpath, "project": "hello-devpi"}])
        self.importInto("server2", first)
        storage, _ = openStorage(self.workdir.child("server2"))
        try:
            with self.assertRaises(Gone):
                fired(storage.read(lambda view: lookupFile(view, "alice", "dev", relpath)))
        finally:
            fired(storage.close())
        self.assertEqual(treeContents(first), treeContents(self.exportTo("server2", "export2")))

    def test_badDeletedList(self) -> None:
        self.importInto("server1")
        first = self.exportTo("server1", "export1")
        data = json.loads(first.child("dataindex.json").getContent())
        data["indexes"]["alice/dev"].setdefault(EXTRA, {})["deleted"] = [{"path": "../../etc/passwd"}]
        first.child("dataindex.json").setContent(json.dumps(data).encode())
        with self.assertRaises(ImportFailed) as caught:
            self.importInto("server2", first)
        self.assertIn("cannot be stored", str(caught.exception))
        self.assertFalse(self.workdir.child("server2").exists() and self.workdir.child("server2").listdir())

    def _addMirrorFile(self, path: FilePath) -> dict[str, Any]:
        storage, blobs = openStorage(path)
        dist = buildWheel("mirrored", "2.0")
        writer = blobs.openWriter()
        fired(writer.write(dist.data))
        info = fired(writer.commit())
        entry = {
            "rel": "releasefile", "filename": dist.filename, "project": "mirrored", "version": "2.0",
            "sha256": info.sha256, "hashes": {"sha256": info.sha256}, "size": info.size, "+blob": info.sha256,
            "relpath": keys.fileRelpath("root", "pypi", info.sha256, dist.filename),
            "upload_time": "2024-01-02T03:04:05.000000Z", "last_modified": "Tue, 02 Jan 2024 03:04:05 GMT",
            "requires_python": ">=3.9", "yanked": False, "url": f"https://files.example/{dist.filename}",
            "log": [{"what": "mirror", "who": None, "when": [2024, 1, 2, 3, 4, 5], "dst": "root/pypi"}],
        }

        def _store(txn: Any) -> None:
            fileKey = keys.fileKey("root", "pypi", "mirrored", dist.filename)
            txn.set(fileKey, entry)
            sha = info.sha256
            txn.set(keys.pathKey("root", "pypi", sha[:3], sha[3:16], dist.filename), {"file": fileKey})

        try:
            fired(storage.write(_store))
        finally:
            fired(storage.close())
        return entry

    def test_mirroredFiles(self) -> None:
        """Mirrors' cached files are exported only when asked, and then come back on import."""
        self.importInto("server1")
        entry = self._addMirrorFile(self.workdir.child("server1"))
        plain = json.loads(self.exportTo("server1", "plain").child("dataindex.json").getContent())
        self.assertEqual(plain["indexes"]["root/pypi"].keys(), {"indexconfig"})
        full = self.exportTo("server1", "full", includeMirrored=True)
        data = json.loads(full.child("dataindex.json").getContent())
        [desc] = data["indexes"]["root/pypi"]["files"]
        self.assertEqual(desc["relpath"], f"root/pypi/mirrored/2.0/{entry['filename']}")
        self.assertEqual(desc["entrymapping"]["url"], entry["url"])
        self.assertEqual(data["indexes"]["root/pypi"]["projects"], {"mirrored": {"2.0": {"name": "mirrored",
                                                                                          "version": "2.0"}}})
        self.importInto("server2", full)
        state = readState(self.workdir.child("server2"), "file/root/pypi/")
        [imported] = state.values()
        self.assertEqual({k: imported[k] for k in entry}, entry)
        self.assertEqual(treeContents(full), treeContents(self.exportTo("server2", "full2", includeMirrored=True)))


class LockAndCLITests(_Dirs, SynchronousTestCase):
    """The commands on the command line, and the server directory's lock."""

    def test_exportRefusesRunningServer(self) -> None:
        """Export refuses a directory a running server (or a requests-only worker) holds, and writes nothing."""
        self.importInto("server")
        running = ServerDir(self.workdir.child("server"))
        running.lock()
        try:
            self.assertRaises(ServerDirError, self.exportTo, "server", "export")
        finally:
            running.unlock()
        worker = ServerDir(self.workdir.child("server"))
        worker.lockAsWorker()
        try:
            error = self.assertRaises(ServerDirError, self.exportTo, "server", "export")
            self.assertIn("--requests-only workers", str(error))
        finally:
            worker.unlock()
        self.assertFalse(self.workdir.child("export").exists())
        self.exportTo("server", "export")

    def test_exportFailureLeavesNothing(self) -> None:
        """An export that cannot find a file's content fails and leaves no export directory behind."""
        self.importInto("server")
        blobs = self.workdir.child("server").child("+files")
        victim = next(p for p in blobs.walk() if p.isfile())
        victim.remove()
        error = self.assertRaises(ExportError, self.exportTo, "server", "export")
        self.assertIn("is missing", str(error))
        self.assertFalse(self.workdir.child("export").exists())
        self.assertEqual([c for c in self.workdir.listdir() if c.startswith(".")], [])


class OnTheReactorTests(_Dirs, TestCase):
    """Export and import as the console script runs them: on the reactor, the storage on real threads."""

    async def test_cli(self) -> None:
        """devpi-twisted import and export run from the command line and print their summaries."""
        out, err = io.StringIO(), io.StringIO()
        server = self.workdir.child("server").path
        status = await cli.run(reactor, ["import", "--serverdir", server, "--root-passwd", "pw", FIXTURE.path],
                               out, err)
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn("files: 6 (1 doczip, 4 releasefile, 1 toxresult)", out.getvalue())
        target = self.workdir.child("export").path
        status = await cli.run(reactor, ["export", "--serverdir", server, target], out, err)
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn(f"exported {server} to {target}", out.getvalue())
        self.assertTrue(os.path.isfile(os.path.join(target, "dataindex.json")))
        status = await cli.run(reactor, ["export", "--serverdir", server, target], out, err)
        self.assertEqual(status, 1)
        self.assertIn("must not exist or be empty", err.getvalue())
        status = await cli.run(reactor, ["import", "--serverdir", server, FIXTURE.path], out, err)
        self.assertEqual(status, 1)
        self.assertIn("already initialised", err.getvalue())

    async def test_threadedRoundTrip(self) -> None:
        """On a real thread pool (answers that fire later), import and export give what they give inline."""
        runner = ThreadRunner(reactor)
        runner.start()
        self.addCleanup(runner.stopService)
        await importServerDir(self.workdir.child("threaded"), FIXTURE, out=self.out, runner=runner)
        self.importInto("inline")
        self.assertEqual(readState(self.workdir.child("threaded"), "file/"),
                         readState(self.workdir.child("inline"), "file/"))
        threaded = self.workdir.child("threaded-export")
        await exportServerDir(self.workdir.child("threaded"), threaded, out=self.out, runner=runner)
        self.assertEqual(treeContents(threaded), treeContents(self.exportTo("inline", "inline-export")))

    async def test_consoleScript(self) -> None:
        """The console script runs export with task.react and exits with the command's status."""
        self.importInto("server")
        target = self.workdir.child("export").path
        script = "import sys; from devpi_twisted.admin.cli import main; sys.exit(main())"
        command = [sys.executable, "-c", script, "export", "--serverdir", self.workdir.child("server").path, target]
        # This tree's package, not an installed one.
        tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))))
        env = dict(os.environ, PYTHONPATH=tree)
        for status, expected in ((0, "exported"), (1, "must not exist or be empty")):
            result = await deferToThread(subprocess.run, command, capture_output=True, text=True, timeout=120,
                                         env=env, stdin=subprocess.DEVNULL)
            self.assertEqual(result.returncode, status, result.stdout + result.stderr)
            self.assertIn(expected, result.stdout + result.stderr)
        self.assertTrue(os.path.isfile(os.path.join(target, "dataindex.json")))


# A real server on the imported directory


def _serverHarness() -> Any:
    from . import test_clients

    return test_clients


class InstallFromImportTests(TestCase):
    """A real server on a directory imported from devpi-server 6.20.3, used by pip."""

    timeout = 300

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        harness = _serverHarness()
        harness.tool("twistd")
        self.harness = harness
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        await importServerDir(FilePath(os.path.join(self.workdir, "server")), FIXTURE, out=io.StringIO())
        self.env = harness.clientEnvironment(self.workdir)
        self.server = harness.ServerProcess(self, self.workdir, "--offline-mode")
        await self.waitForServer()

    async def waitForServer(self) -> None:
        import http.client

        def ping() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=5)
            try:
                conn.request("GET", "/+api")
                return conn.getresponse().status
            finally:
                conn.close()

        deadline = time.monotonic() + 60
        while True:
            if self.server.process.poll() is not None:
                self.fail(f"the server exited:\n{self.server.output()}")
            try:
                if await deferToThread(ping) == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail(f"the server did not answer:\n{self.server.output()}")
            await deferLater(reactor, 0.1, lambda: None)

    async def runCommand(self, *command: str) -> subprocess.CompletedProcess:
        result = await deferToThread(subprocess.run, list(command), capture_output=True, text=True,
                                     timeout=240, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0,
                         f"{command} failed:\n{result.stdout}{result.stderr}\n--- server:\n{self.server.output()}")
        return result

    async def pipInstall(self, stage: str, *requirements: str) -> str:
        target = os.path.join(self.workdir, f"target-{len(os.listdir(self.workdir))}")
        await self.runCommand(sys.executable, "-m", "pip", "install", "--index-url", f"{self.server.url}/{stage}/+simple/",
                       "--no-cache-dir", "--target", target, *requirements)
        return target

    async def importedVersion(self, target: str, module: str) -> str:
        env = dict(self.env, PYTHONPATH=target)
        result = await deferToThread(subprocess.run, [sys.executable, "-c", f"import {module}; print({module}.VERSION)"],
                                     capture_output=True, text=True, timeout=60, env=env, cwd=self.workdir)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    async def request(self, method: str, path: str, body: Any = None, auth: tuple[str, str] | None = None) -> Any:
        import http.client

        def send() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
            headers = {"Accept": "application/json", "Content-Type": "application/json"}
            if auth is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
            try:
                conn.request(method, path, None if body is None else json.dumps(body), headers)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        return await deferToThread(send)

    async def test_pipInstallsImportedPackages(self) -> None:
        """pip installs the imported releases, through the imported inheritance from alice/staging to alice/dev."""
        target = await self.pipInstall("alice/staging", "other-pkg")
        self.assertEqual(await self.importedVersion(target, "other_pkg"), "0.1")
        self.assertEqual(await self.importedVersion(target, "hello_devpi"), "1.1")
        target = await self.pipInstall("alice/dev", "hello-devpi==1.0")
        self.assertEqual(await self.importedVersion(target, "hello_devpi"), "1.0")

    async def test_passwordsWork(self) -> None:
        """alice logs in with the password she had on devpi-server, and uses it to change her index."""
        status, body = await self.request("POST", "/+login", {"user": "alice", "password": "alicepw"})
        self.assertEqual(status, 200, body)
        status, body = await self.request("POST", "/+login", {"user": "alice", "password": "wrong"})
        self.assertEqual(status, 401, body)
        status, body = await self.request("PATCH", "/alice/dev", {"title": "moved"}, auth=("alice", "alicepw"))
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["result"]["title"], "moved")

    async def test_docsAndToxresults(self) -> None:
        """The imported documentation is served and the tox result is listed with its release."""
        status, body = await self.request("GET", "/alice/dev/hello-devpi/1.0/+doc/index.html")
        self.assertEqual(status, 200)
        self.assertIn(b"Hello-Devpi 1.0", body)
        status, body = await self.request("GET", "/alice/dev/hello-devpi/1.0")
        self.assertEqual(status, 200)
        links = json.loads(body)["result"]["+links"]
        self.assertEqual(sorted(link["rel"] for link in links), ["doczip", "releasefile", "releasefile", "toxresult"])


class DevpiReadsOurExportTests(_Dirs, TestCase):
    """devpi-server 6.20.3's own devpi-import reads what we export (when a devpi-server venv is at hand)."""

    timeout = 300

    async def test_devpiImport(self) -> None:
        """devpi-import takes our export, extras and all, and devpi-export gives back devpi's part of it."""
        devpiImport = os.path.join(DEVPI_VENV, "bin", "devpi-import")
        devpiExport = os.path.join(DEVPI_VENV, "bin", "devpi-export")
        if not (os.access(devpiImport, os.X_OK) and os.access(devpiExport, os.X_OK)):
            raise SkipTest(f"no devpi-server venv at {DEVPI_VENV} (set DEVPI_SERVER_VENV)")
        self.importInto("server")
        addExtras(self.workdir.child("server"))
        ours = self.exportTo("server", "ours")
        devpiServer = self.workdir.child("devpi-server").path
        again = self.workdir.child("again").path
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVPI_")}
        for command in ([devpiImport, "--serverdir", devpiServer, "--no-events", ours.path],
                        [devpiExport, "--serverdir", devpiServer, again]):
            result = await deferToThread(subprocess.run, command, capture_output=True, text=True, timeout=240,
                                         env=env, stdin=subprocess.DEVNULL)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        mine = json.loads(ours.child("dataindex.json").getContent())
        theirs = json.loads(FilePath(again).child("dataindex.json").getContent())
        self.assertEqual(theirs["users"], mine["users"])
        for name, index in mine["indexes"].items():
            self.assertEqual(theirs["indexes"][name]["indexconfig"], index["indexconfig"])
            self.assertEqual(theirs["indexes"][name].get("projects"), index.get("projects"))
            theirFiles = {d["relpath"]: d for d in theirs["indexes"][name].get("files", [])}
            for desc in index.get("files", []):
                expected = {k: v for k, v in desc.items() if k != EXTRA}
                self.assertEqual(theirFiles[desc["relpath"]], expected)
