"""
File entries written in one place, and web views that ask services.

Upload, push, documentation, tox results, the mirror and import record a file
through L{devpi_twisted.services.fileentries}; the views in
L{devpi_twisted.web} read what is stored through services and never name a
storage key.  The layering is checked on the source, the services on memory
storage.
"""

import ast
import base64
import hashlib
from typing import Any, Iterator

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

import devpi_twisted
from devpi_twisted.errors import Gone, NotFound
from devpi_twisted.model import keys
from devpi_twisted.storage import BlobInfo
from devpi_twisted.testing import MemoryStorage

PACKAGE = FilePath(devpi_twisted.__file__).parent()
DATA = b"wheel bytes"
SHA = hashlib.sha256(DATA).hexdigest()
WHEEL = "demo_pkg-1.0-py3-none-any.whl"


def _modules(*under: str) -> Iterator[tuple[str, ast.Module]]:
    """C{(path below the package, parsed module)} of each module in the given subpackages (and theirs)."""
    for sub in under:
        top = PACKAGE.child(sub)
        for path in sorted(p for p in top.walk() if p.basename().endswith(".py")):
            yield "/".join(path.segmentsFrom(PACKAGE)), ast.parse(path.getContent())


def _allModules() -> Iterator[tuple[str, ast.Module]]:
    subs = [child.basename() for child in PACKAGE.children() if child.isdir() and child.child("__init__.py").exists()]
    return _modules(*sorted(subs))


def _entry(rel: str = "releasefile", filename: str = WHEEL, version: str = "1.0", index: str = "dev",
           relpath: str | None = None) -> dict[str, Any]:
    """A new entry of demo-pkg on C{alice/<index>}, at C{relpath} when given."""
    from devpi_twisted.services.fileentries import newEntry

    entry = newEntry("alice", index, rel, filename, "demo-pkg", version, BlobInfo(SHA, len(DATA)), 0.0, [])
    if relpath is not None:
        entry["relpath"] = relpath
    return entry


class FileEntryWriteTests(SynchronousTestCase):
    """L{writeFileEntry} and L{removeFileEntry} on memory storage."""

    def setUp(self) -> None:
        self.storage = MemoryStorage(lambda: 0.0)

    def _read(self, function: Any) -> Any:
        return self.successResultOf(self.storage.read(function))

    def test_entryPointerAndMetadataInOneChange(self) -> None:
        """The entry, the pointer of its stable path and its METADATA are one change: one serial."""
        from devpi_twisted.services.fileentries import coreMetadata, lookupFile, writeFileEntry

        before = self.storage.currentSerial()
        entry = _entry()
        serial, _ = self.successResultOf(
            self.storage.write(lambda txn: writeFileEntry(txn, "alice", "dev", entry, b"Metadata-Version: 2.1\n")))
        self.assertEqual(serial, before + 1)
        fileKey = keys.fileKey("alice", "dev", "demo-pkg", WHEEL)
        self.assertEqual(self._read(lambda view: view.get(keys.pathKey("alice", "dev", SHA[:3], SHA[3:16], WHEEL))),
                         {"file": fileKey})
        self.assertEqual(self._read(lambda view: view.get(keys.coreMetadataKey("alice", "dev", "demo-pkg", WHEEL))),
                         {"data": base64.b64encode(b"Metadata-Version: 2.1\n").decode("ascii")})
        self.assertEqual(self._read(lambda view: lookupFile(view, "alice", "dev", f"{SHA[:3]}/{SHA[3:16]}/{WHEEL}")),
                         entry)
        self.assertEqual(self._read(lambda view: coreMetadata(view, "alice", "dev", "demo-pkg", WHEEL)),
                         b"Metadata-Version: 2.1\n")

    def test_pointerFollowsRelpath(self) -> None:
        """A tox result's pointer is in its release's directory; an unhashed mirror link's under C{nohash}."""
        from devpi_twisted.services.fileentries import lookupFile, toxresultRelpath, writeFileEntry

        release = keys.fileRelpath("alice", "dev", SHA, WHEEL)
        tox = _entry("toxresult", "r.toxresult-0", relpath=toxresultRelpath(release, "r.toxresult-0"))
        nohash = _entry(filename="demo_pkg-1.0.tar.gz",
                        relpath="alice/dev/+f/nohash/0123456789abcdef/demo_pkg-1.0.tar.gz")
        for entry in (tox, nohash):
            self.storage.write(lambda txn, entry=entry: writeFileEntry(txn, "alice", "dev", entry))
        self.assertEqual(tox["relpath"], f"alice/dev/+f/{SHA[:3]}/{SHA[3:16]}/r.toxresult-0")
        for entry in (tox, nohash):
            path = entry["relpath"].split("/+f/", 1)[1]
            self.assertEqual(self._read(lambda view: lookupFile(view, "alice", "dev", path)), entry)

    def test_removeLeavesTombstone(self) -> None:
        """A removed entry takes its pointer and METADATA with it; its path answers Gone."""
        from devpi_twisted.services.fileentries import lookupFile, removeFileEntry, writeFileEntry

        entry = _entry()
        self.storage.write(lambda txn: writeFileEntry(txn, "alice", "dev", entry, b"meta"))
        self.storage.write(lambda txn: removeFileEntry(txn, "alice", "dev", entry))
        path = f"{SHA[:3]}/{SHA[3:16]}/{WHEEL}"
        self.failureResultOf(self.storage.read(lambda view: lookupFile(view, "alice", "dev", path)), Gone)
        for key in (keys.fileKey("alice", "dev", "demo-pkg", WHEEL), keys.coreMetadataKey("alice", "dev", "demo-pkg", WHEEL),
                    keys.pathKey("alice", "dev", SHA[:3], SHA[3:16], WHEEL)):
            self.assertIsNone(self._read(lambda view, key=key: view.get(key)))


class OneWriterTests(SynchronousTestCase):
    """The layering rules of issue 12 for file entries, checked on the source."""

    def test_onlyFileEntriesWritesPointers(self) -> None:
        """Nothing but the file-entry module builds the key of a stable path's pointer."""
        users = sorted(
            name for name, module in _allModules()
            if name not in ("model/keys.py", "services/fileentries.py")
            and any(isinstance(node, ast.Attribute) and node.attr == "pathKey"
                    or isinstance(node, ast.Name) and node.id == "pathKey" for node in ast.walk(module))
        )
        self.assertEqual(users, [])

    def test_servicesImportNoPrivateNames(self) -> None:
        """A service uses other modules' public names only (push once took C{releases._removeFile})."""
        private = sorted(
            (name, alias.name) for name, module in _modules("services", "admin")
            for node in ast.walk(module)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("devpi_twisted")
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")
        )
        self.assertEqual(private, [])


class WebThroughServicesTests(SynchronousTestCase):
    """Views ask services; they never name a storage key nor read storage themselves."""

    def test_webImportsNoKeys(self) -> None:
        importers = sorted(
            name for name, module in _modules("web") for node in ast.walk(module)
            if isinstance(node, ast.ImportFrom) and (
                node.module == "devpi_twisted.model.keys"
                or node.module == "devpi_twisted.model" and any(a.name == "keys" for a in node.names))
            or isinstance(node, ast.Import) and any(a.name == "devpi_twisted.model.keys" for a in node.names)
        )
        self.assertEqual(importers, [])

    def test_webReadsNoStorage(self) -> None:
        readers = sorted(
            name for name, module in _modules("web") for node in ast.walk(module)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("read", "readAsOf")
            and (isinstance(node.func.value, ast.Attribute) and node.func.value.attr in ("_storage", "storage")
                 or isinstance(node.func.value, ast.Name) and node.func.value.id == "storage")
        )
        self.assertEqual(readers, [])


class ReadServicesTests(SynchronousTestCase):
    """The service methods the views now call, on memory storage."""

    def setUp(self) -> None:
        from devpi_twisted.services.fileentries import writeFileEntry

        self.storage = MemoryStorage(lambda: 0.0)

        def populate(txn: Any) -> None:
            txn.set(keys.userKey("alice"), {"pwhash": "hash-of-alice"})
            txn.set(keys.indexKey("alice", "dev"), {"type": "stage", "volatile": True, "bases": ["alice/base"]})
            txn.set(keys.indexKey("alice", "base"), {"type": "stage", "volatile": True, "bases": []})
            txn.set(keys.indexKey("root", "pypi"), {"type": "mirror", "mirror_url": "https://pypi.org/simple/"})
            txn.set(keys.projectKey("alice", "base", "demo-pkg"), {"name": "demo-pkg"})
            for version in ("1.0", "2.0"):
                txn.set(keys.versionKey("alice", "base", "demo-pkg", version), {"name": "demo-pkg", "version": version})
            writeFileEntry(txn, "alice", "dev", _entry(), b"meta")
            writeFileEntry(txn, "alice", "base", _entry("doczip", "demo-pkg-2.0.doc.zip", "2.0", "base"))

        self.storage.write(populate)

    def test_fileOrMirror(self) -> None:
        from devpi_twisted.services.queries import Queries

        queries = Queries(self.storage)
        path = f"{SHA[:3]}/{SHA[3:16]}/{WHEEL}"
        entry, stage = self.successResultOf(queries.fileOrMirror("alice", "dev", path))
        self.assertEqual((entry["filename"], stage), (WHEEL, None))
        entry, stage = self.successResultOf(queries.fileOrMirror("root", "pypi", path))
        self.assertIsNone(entry)
        self.assertEqual(stage.name, "root/pypi")
        self.failureResultOf(queries.fileOrMirror("alice", "base", path), NotFound)
        self.failureResultOf(queries.fileOrMirror("alice", "nope", path), NotFound)
        self.assertEqual(self.successResultOf(queries.file("alice", "dev", path))["filename"], WHEEL)

    def test_coreMetadata(self) -> None:
        from devpi_twisted.services.queries import Queries

        queries = Queries(self.storage)
        entry = _entry()
        self.assertEqual(self.successResultOf(queries.coreMetadata("alice", "dev", entry)), b"meta")
        self.assertIsNone(self.successResultOf(queries.coreMetadata("alice", "base", entry)))

    def test_findDoc(self) -> None:
        """A release's docs are found through the bases; C{latest} is the highest version there."""
        from devpi_twisted.services.releases import Documentation

        docs = Documentation(self.storage, lambda: 0.0)
        for version in ("2.0", "latest", "stable"):
            found = self.successResultOf(docs.findDoc("alice", "dev", "demo-pkg", version))
            self.assertEqual(found["filename"], "demo-pkg-2.0.doc.zip")
        self.assertIsNone(self.successResultOf(docs.findDoc("alice", "dev", "demo-pkg", "1.0")))

    def test_passwordHash(self) -> None:
        from devpi_twisted.services.users import Users

        users = Users(self.storage, None, None)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(users.passwordHash("alice")), "hash-of-alice")
        self.assertIsNone(self.successResultOf(users.passwordHash("bob")))

    def test_replicaChanges(self) -> None:
        """Replicas get fingerprints, never password hashes; other changes go as they are."""
        from devpi_twisted.services.auth import replicaUserConfig
        from devpi_twisted.services.users import replicaChanges

        changes = {keys.userKey("alice"): {"pwhash": "secret-hash"}, keys.userKey("bob"): None,
                   keys.indexKey("alice", "dev"): {"pwhash": "not a user"}}
        sent = replicaChanges(b"s", changes)
        self.assertEqual(sent[keys.userKey("alice")], replicaUserConfig(b"s", {"pwhash": "secret-hash"}))
        self.assertNotIn("secret-hash", repr(sent[keys.userKey("alice")]))
        self.assertIsNone(sent[keys.userKey("bob")])
        self.assertEqual(sent[keys.indexKey("alice", "dev")], {"pwhash": "not a user"})

    def test_altersFilePaths(self) -> None:
        from devpi_twisted.services.fileentries import altersFilePaths

        self.assertTrue(altersFilePaths([keys.fileKey("alice", "dev", "demo-pkg", WHEEL)]))
        self.assertTrue(altersFilePaths([keys.userKey("alice")]))
        self.assertTrue(altersFilePaths([keys.tombstoneKey("alice", "dev", "a", "b", WHEEL)]))
        self.assertFalse(altersFilePaths([keys.versionKey("alice", "dev", "demo-pkg", "1.0")]))
        self.assertFalse(altersFilePaths([]))
