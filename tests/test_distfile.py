"""
Tests for L{devpi_twisted.model.distfile} and L{devpi_twisted.model.archive}.

Archives are built in memory with C{zipfile} and C{tarfile}, so each test
shows exactly which archive shape it is about.
"""

import hashlib
import io
import tarfile
import zipfile

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import BadRequest
from devpi_twisted.model import archive
from devpi_twisted.model.archive import ArchiveMetadata, checkConsistency, inspectArchive
from devpi_twisted.model.distfile import (
    ARCHIVE_SUFFIXES,
    checkDigests,
    checkFilename,
    checkStrict,
    fileType,
    parseUploadMetadata,
    presentMetadataKeys,
)

METADATA = (
    b"Metadata-Version: 2.4\n"
    b"Name: demo-pkg\n"
    b"Version: 1.0\n"
    b"Summary: A demo \xc3\xa9\n"
    b"Requires-Python: >=3.9\n"
    b"Requires-Dist: attrs\n"
    b"Requires-Dist: twisted>=24\n"
    b"X-Custom-Header: anything goes\n"
    b"\n"
    b"The long description.\n"
)


def makeZip(members: dict[str, bytes]) -> io.BytesIO:
    """A zip archive holding C{members}."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def makeWheel(metadata: bytes = METADATA, distInfo: str = "demo_pkg-1.0.dist-info",
              extra: dict[str, bytes] | None = None, wheel: bool = True) -> io.BytesIO:
    """A small but complete wheel."""
    members = {
        "demo_pkg/__init__.py": b"",
        f"{distInfo}/METADATA": metadata,
        f"{distInfo}/RECORD": b"",
    }
    if wheel:
        members[f"{distInfo}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
    members.update(extra or {})
    return makeZip(members)


def makeTar(members: dict[str, bytes], mode: str = "w:gz",
            symlinks: dict[str, str] | None = None) -> io.BytesIO:
    """A compressed tar archive holding C{members} and C{symlinks}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


WHEEL_NAME = "demo_pkg-1.0-py3-none-any.whl"


class CheckFilenameTests(SynchronousTestCase):
    """Tests for L{checkFilename}."""

    def test_valid(self) -> None:
        """Ordinary wheel and sdist names of the project pass."""
        checkFilename(WHEEL_NAME, "demo-pkg", "1.0")
        checkFilename("Demo.Pkg-1.0.tar.gz", "demo_pkg", "1.0")
        checkFilename("demo_pkg-1.0.ZIP", "Demo-Pkg", None)
        checkFilename("demo_pkg-1.0.tar.bz2", None, None)

    def test_allSuffixesAccepted(self) -> None:
        """Every archive suffix devpi knows is accepted, in any case."""
        for suffix in ARCHIVE_SUFFIXES:
            if suffix != ".whl":
                checkFilename(f"demo-1.0{suffix.upper()}", "demo", "1.0")

    def test_unsafe(self) -> None:
        """Paths, control characters, empty and dot names are refused."""
        for bad in ("", "../demo-1.0.tar.gz", "a/demo-1.0.tar.gz", "a\\demo-1.0.tar.gz",
                    "demo-1.0\n.tar.gz", "demo-1.0\x00.tar.gz", ".demo-1.0.tar.gz"):
            self.assertRaises(BadRequest, checkFilename, bad, None, None)

    def test_notArchive(self) -> None:
        """A name without an archive suffix is refused with devpi's wording."""
        error = self.assertRaises(BadRequest, checkFilename, "demo-1.0.txt", "demo", "1.0")
        self.assertEqual(error.message, "'demo-1.0.txt' is not a valid archive name")
        self.assertRaises(BadRequest, checkFilename, "demo-1.0.gz", None, None)

    def test_version(self) -> None:
        """The version must be in the name literally or with PEP 427 escaping."""
        error = self.assertRaises(BadRequest, checkFilename, "demo-1.0.tar.gz", "demo", "2.0")
        self.assertEqual(error.message, "filename 'demo-1.0.tar.gz' does not contain version '2.0'")
        checkFilename("demo-1.0_dev1.tar.gz", "demo", "1.0-dev1")

    def test_projectName(self) -> None:
        """The normalised name must start with the normalised project name."""
        error = self.assertRaises(BadRequest, checkFilename, "demo-1.0.tar.gz", "other", "1.0")
        self.assertEqual(
            error.message, "filename 'demo-1.0.tar.gz' does not match project name 'other'")

    def test_invalidWheelName(self) -> None:
        """A wheel name packaging cannot parse is refused with packaging's reason."""
        error = self.assertRaises(BadRequest, checkFilename, "demo-1.0.whl", "demo", "1.0")
        self.assertTrue(error.message.startswith("invalid wheel filename 'demo-1.0.whl': "))

    def test_wheelNameAndVersion(self) -> None:
        """A wheel's parsed name and version must equal the project's exactly."""
        self.assertRaises(
            BadRequest, checkFilename, "demo_pkg_extra-1.0-py3-none-any.whl", "demo-pkg", "1.0")
        error = self.assertRaises(
            BadRequest, checkFilename, "demo_pkg-1.0.1-py3-none-any.whl", "demo-pkg", "1.0")
        self.assertIn("does not match version '1.0'", error.message)
        # PEP 440 says 1 == 1.0, but the file names another release.
        self.assertRaises(BadRequest, checkFilename, "demo_pkg-1.0-py3-none-any.whl", "demo-pkg", "1")
        checkFilename("demo_pkg-1.0a1-py3-none-any.whl", "demo-pkg", "1.0-alpha1")


class FileTypeTests(SynchronousTestCase):
    """Tests for L{fileType}."""

    def test_types(self) -> None:
        """Wheels, sdists and eggs get PyPI's filetype names."""
        self.assertEqual(fileType(WHEEL_NAME), "bdist_wheel")
        for name in ("a-1.tar.gz", "a-1.TGZ", "a-1.tar.bz2", "a-1.zip"):
            self.assertEqual(fileType(name), "sdist")
        self.assertEqual(fileType("a-1-py3.9.egg"), "bdist_egg")
        self.assertEqual(fileType("a-1.win32.exe"), "bdist_wininst")

    def test_unknown(self) -> None:
        """A name without an archive suffix has no type."""
        self.assertRaises(BadRequest, fileType, "a-1.txt")


class InspectWheelTests(SynchronousTestCase):
    """Tests for L{inspectArchive} on wheels."""

    def test_metadata(self) -> None:
        """The byte-exact METADATA and its Name, Version and Requires-Python come back."""
        result = inspectArchive(WHEEL_NAME, makeWheel())
        self.assertEqual(result.metadataBytes, METADATA)
        self.assertEqual(
            (result.name, result.version, result.requiresPython), ("demo-pkg", "1.0", ">=3.9"))
        self.assertEqual(result.fields["requires-dist"], ["attrs", "twisted>=24"])
        self.assertEqual(result.fields["summary"], ["A demo \u00e9"])
        self.assertEqual(result.fields["x-custom-header"], ["anything goes"])
        self.assertEqual(result.fields["description"], ["The long description.\n"])

    def test_readsFromStart(self) -> None:
        """A file object positioned at its end (just written) is read from the start."""
        wheel = makeWheel()
        wheel.seek(0, 2)
        self.assertEqual(inspectArchive(WHEEL_NAME, wheel).name, "demo-pkg")

    def test_unescapedDistInfo(self) -> None:
        """A dist-info directory spelt with the unnormalised name still matches."""
        wheel = makeWheel(distInfo="Demo.Pkg-1.0.dist-info")
        self.assertEqual(inspectArchive(WHEEL_NAME, wheel).version, "1.0")

    def test_otherDistInfoIgnored(self) -> None:
        """A vendored dist-info of another project does not count."""
        wheel = makeWheel(extra={"vendored-2.0.dist-info/METADATA": b"Name: vendored\n"})
        self.assertEqual(inspectArchive(WHEEL_NAME, wheel).name, "demo-pkg")

    def test_notZip(self) -> None:
        """Bytes that are not a zip archive are refused."""
        error = self.assertRaises(
            BadRequest, inspectArchive, WHEEL_NAME, io.BytesIO(b"not a zip at all"))
        self.assertTrue(error.message.startswith(f"'{WHEEL_NAME}' is not a valid wheel: "))

    def test_truncated(self) -> None:
        """A wheel cut short is refused."""
        data = makeWheel().getvalue()
        self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME, io.BytesIO(data[:len(data) // 2]))

    def test_noMetadata(self) -> None:
        """A wheel whose dist-info is for another name or version is refused."""
        for distInfo in ("other-1.0.dist-info", "demo_pkg-2.0.dist-info"):
            error = self.assertRaises(
                BadRequest, inspectArchive, WHEEL_NAME, makeWheel(distInfo=distInfo))
            self.assertIn("METADATA", error.message)

    def test_twoMetadata(self) -> None:
        """Two matching dist-info directories are refused."""
        wheel = makeWheel(extra={"demo-pkg-1.0.dist-info/METADATA": METADATA,
                                 "demo-pkg-1.0.dist-info/WHEEL": b""})
        error = self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME, wheel)
        self.assertIn("more than one", error.message)

    def test_noWheelFile(self) -> None:
        """A wheel without a dist-info WHEEL file is refused."""
        error = self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME, makeWheel(wheel=False))
        self.assertIn("WHEEL", error.message)

    def test_hugeMetadata(self) -> None:
        """A METADATA larger than the limit is refused without reading it all."""
        self.patch(archive, "MAX_METADATA_SIZE", 100)
        error = self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME,
                                  makeWheel(metadata=METADATA + b"x" * 200))
        self.assertIn("larger than 100 bytes", error.message)

    def test_lyingSize(self) -> None:
        """A METADATA bigger than its header claims is refused (reads stop there, CRC fails)."""
        self.patch(archive, "MAX_METADATA_SIZE", 100)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("demo_pkg-1.0.dist-info/WHEEL", b"")
            zf.writestr("demo_pkg-1.0.dist-info/METADATA", b"x" * 1000)
        data = buf.getvalue().replace((1000).to_bytes(4, "little"), (50).to_bytes(4, "little"))
        self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME, io.BytesIO(data))

    def test_tooManyEntries(self) -> None:
        """A wheel with more entries than the limit is refused."""
        self.patch(archive, "MAX_ARCHIVE_ENTRIES", 3)
        error = self.assertRaises(BadRequest, inspectArchive, WHEEL_NAME, makeWheel())
        self.assertIn("entries", error.message)


class InspectSdistTests(SynchronousTestCase):
    """Tests for L{inspectArchive} on sdists and legacy files."""

    def test_topDirectory(self) -> None:
        """PKG-INFO in the single top-level directory is found, also after other files."""
        sdist = makeTar({"demo_pkg-1.0/setup.py": b"", "demo_pkg-1.0/PKG-INFO": METADATA})
        result = inspectArchive("demo_pkg-1.0.tar.gz", sdist)
        self.assertEqual((result.name, result.version), ("demo-pkg", "1.0"))
        self.assertEqual(result.metadataBytes, METADATA)

    def test_topLevel(self) -> None:
        """PKG-INFO at the top of an archive without a directory is found, with bzip2 too."""
        sdist = makeTar({"./PKG-INFO": METADATA, "setup.py": b""}, mode="w:bz2")
        self.assertEqual(inspectArchive("demo_pkg-1.0.tar.bz2", sdist).name, "demo-pkg")

    def test_nestedIgnored(self) -> None:
        """A PKG-INFO deeper down (an egg-info) is not the sdist's."""
        sdist = makeTar({"demo-1.0/src/demo.egg-info/PKG-INFO": METADATA})
        self.assertEqual(inspectArchive("demo-1.0.tgz", sdist), ArchiveMetadata())

    def test_ambiguousTopDirectories(self) -> None:
        """With several top-level directories no PKG-INFO is trusted."""
        sdist = makeTar({"a/PKG-INFO": METADATA, "b/PKG-INFO": METADATA})
        self.assertEqual(inspectArchive("demo-1.0.tar.gz", sdist).metadataBytes, None)

    def test_withoutPkgInfo(self) -> None:
        """An sdist without PKG-INFO is accepted with empty metadata, as devpi does."""
        result = inspectArchive("demo-1.0.tar.gz", makeTar({"demo-1.0/setup.py": b""}))
        self.assertEqual(result, ArchiveMetadata(None, None, None, None, {}))

    def test_symlinkSkipped(self) -> None:
        """A PKG-INFO that is a symlink is not followed."""
        sdist = makeTar({"demo-1.0/setup.py": b""}, symlinks={"demo-1.0/PKG-INFO": "/etc/passwd"})
        self.assertEqual(inspectArchive("demo-1.0.tar.gz", sdist).metadataBytes, None)

    def test_corrupt(self) -> None:
        """Garbage and truncated tarballs are refused with the sdist wording."""
        whole = makeTar({"demo-1.0/PKG-INFO": METADATA, "demo-1.0/big": b"x" * 100000}).getvalue()
        for data in (b"garbage" * 100, whole[:len(whole) // 2]):
            error = self.assertRaises(
                BadRequest, inspectArchive, "demo-1.0.tar.gz", io.BytesIO(data))
            self.assertTrue(
                error.message.startswith("'demo-1.0.tar.gz' is not a valid sdist archive: "),
                error.message)

    def test_tarBomb(self) -> None:
        """A tarball that unpacks far beyond the scan limit is refused."""
        self.patch(archive, "MIN_TAR_SCAN", 10000)
        sdist = makeTar({"demo-1.0/zeros": b"\x00" * 1_000_000, "demo-1.0/PKG-INFO": METADATA})
        error = self.assertRaises(BadRequest, inspectArchive, "demo-1.0.tar.gz", sdist)
        self.assertIn("unpacks to more than", error.message)

    def test_zipSdist(self) -> None:
        """A zip sdist's PKG-INFO is read; a corrupt zip sdist is refused."""
        sdist = makeZip({"demo_pkg-1.0/PKG-INFO": METADATA, "demo_pkg-1.0/setup.py": b""})
        self.assertEqual(inspectArchive("demo_pkg-1.0.zip", sdist).version, "1.0")
        self.assertRaises(BadRequest, inspectArchive, "demo_pkg-1.0.zip", io.BytesIO(b"PK junk"))

    def test_legacyNotOpened(self) -> None:
        """Legacy types are not opened, so any content gives empty metadata."""
        self.assertEqual(
            inspectArchive("demo-1.0.win32.exe", io.BytesIO(b"MZ...")), ArchiveMetadata())


class CheckConsistencyTests(SynchronousTestCase):
    """Tests for L{checkConsistency}."""

    def test_matching(self) -> None:
        """Names equal after normalisation and equal versions pass, as does no metadata."""
        checkConsistency(WHEEL_NAME, "Demo_Pkg", "1.0.0", inspectArchive(WHEEL_NAME, makeWheel()))
        checkConsistency("x-1.tar.gz", "x", "1", ArchiveMetadata())

    def test_otherName(self) -> None:
        """A wheel whose METADATA names another project is refused."""
        archive = inspectArchive(WHEEL_NAME, makeWheel(metadata=b"Name: other\nVersion: 1.0\n"))
        error = self.assertRaises(BadRequest, checkConsistency, WHEEL_NAME, "demo-pkg", "1.0",
                                  archive)
        self.assertEqual(
            error.message,
            f"metadata name 'other' in '{WHEEL_NAME}' does not match the uploaded name 'demo-pkg'")

    def test_otherVersion(self) -> None:
        """A wheel whose METADATA carries another version is refused."""
        archive = inspectArchive(WHEEL_NAME, makeWheel(metadata=b"Name: demo-pkg\nVersion: 2.0\n"))
        error = self.assertRaises(BadRequest, checkConsistency, WHEEL_NAME, "demo-pkg", "1.0",
                                  archive)
        self.assertIn("metadata version '2.0'", error.message)

    def test_unparseableVersion(self) -> None:
        """Versions that are not PEP 440 are compared as strings."""
        archive = ArchiveMetadata(name="x", version="weird-ver")
        checkConsistency("x.tar.gz", "x", "weird-ver", archive)
        self.assertRaises(BadRequest, checkConsistency, "x.tar.gz", "x", "other", archive)


class CheckDigestsTests(SynchronousTestCase):
    """Tests for L{checkDigests}."""

    data = b"file content"
    computed = {
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "blake2b_256": hashlib.blake2b(data, digest_size=32).hexdigest(),
    }

    def test_matching(self) -> None:
        """Matching digests in any case pass, and absent or empty ones are not checked."""
        checkDigests({"sha256_digest": self.computed["sha256"].upper(),
                      "blake2_256_digest": self.computed["blake2b_256"],
                      "md5_digest": ""}, self.computed)
        checkDigests({}, self.computed)

    def test_mismatch(self) -> None:
        """Any supplied digest that differs is refused with Warehouse's wording."""
        for key, computedKey in (("md5_digest", "md5"), ("sha256_digest", "sha256"),
                                 ("blake2_256_digest", "blake2b_256")):
            wrong = "0" * len(self.computed[computedKey])
            error = self.assertRaises(BadRequest, checkDigests, {key: wrong}, self.computed)
            self.assertEqual(
                error.message,
                "The digest supplied does not match a digest calculated from the uploaded file.")

    def test_malformed(self) -> None:
        """A digest that is not hex of the right length is refused, naming the field."""
        for value in ("xyz", "0" * 63, "g" * 64):
            error = self.assertRaises(
                BadRequest, checkDigests, {"sha256_digest": value}, self.computed)
            self.assertIn("sha256_digest", error.message)


class CheckStrictTests(SynchronousTestCase):
    """Tests for L{checkStrict}."""

    def test_valid(self) -> None:
        """A wheel and PEP 625 sdists (normalised version) pass."""
        checkStrict(WHEEL_NAME, "Demo.Pkg", "1.0")
        checkStrict("demo_pkg-1.0.tar.gz", "Demo.Pkg", "1.0")
        checkStrict("demo_pkg-1.0a1.tar.gz", "demo-pkg", "1.0-alpha1")

    def test_extension(self) -> None:
        """Zip sdists and legacy types are refused."""
        for name in ("demo_pkg-1.0.zip", "demo_pkg-1.0.tar.bz2", "demo_pkg-1.0-py3.9.egg"):
            error = self.assertRaises(BadRequest, checkStrict, name, "demo-pkg", "1.0")
            self.assertIn("PEP 527", error.message)

    def test_localVersion(self) -> None:
        """Local versions are refused."""
        error = self.assertRaises(BadRequest, checkStrict, "demo_pkg-1.0+cpu-py3-none-any.whl",
                                  "demo-pkg", "1.0+cpu")
        self.assertIn("local version", error.message)

    def test_sdistName(self) -> None:
        """An sdist name that is not normalised is refused, naming the expected one."""
        for name, version in (("Demo.Pkg-1.0.tar.gz", "1.0"), ("demo-pkg-1.0.tar.gz", "1.0"),
                              ("demo_pkg-1.0.0-alpha1.tar.gz", "1.0.0-alpha1")):
            error = self.assertRaises(BadRequest, checkStrict, name, "demo-pkg", version)
            self.assertIn("PEP 625", error.message)

    def test_invalidVersion(self) -> None:
        """A version that is not PEP 440 is refused."""
        self.assertRaises(BadRequest, checkStrict, "demo_pkg-1 1.tar.gz", "demo-pkg", "1 1")


class ParseUploadMetadataTests(SynchronousTestCase):
    """Tests for L{parseUploadMetadata} and L{presentMetadataKeys}."""

    def test_fields(self) -> None:
        """Single and list keys are filled, defaults added, unknown fields ignored."""
        result = parseUploadMetadata({
            "name": ["Demo.Pkg"], "version": ["1.0"], "summary": ["UNKNOWN"],
            "classifiers": ["A", "", "B"], "platform": ["UNKNOWN"],
            "provides_extra": ["test"], "provides_extras": ["doc"],
            "import_name": ["demo"], "pyversion": ["py3"], ":action": ["file_upload"],
        })
        self.assertEqual(result["name"], "Demo.Pkg")
        self.assertEqual(result["summary"], "")
        self.assertEqual(result["author"], "")
        self.assertEqual(result["classifiers"], ["A", "B"])
        self.assertEqual(result["platform"], [])
        self.assertEqual(result["requires_dist"], [])
        self.assertEqual(sorted(result["provides_extras"]), ["doc", "test"])  # type: ignore
        self.assertEqual(result["import_names"], ["demo"])
        self.assertNotIn("import_namespaces", result)
        self.assertNotIn("pyversion", result)

    def test_lastValueWins(self) -> None:
        """A single key sent twice takes the last value, as devpi's form parsing does."""
        result = parseUploadMetadata({"name": ["demo"], "version": ["1.0", "2.0"]})
        self.assertEqual(result["version"], "2.0")

    def test_invalidName(self) -> None:
        """Missing names and names outside the PEP 508 pattern are refused."""
        error = self.assertRaises(BadRequest, parseUploadMetadata, {"version": ["1"]})
        self.assertTrue(error.message.startswith("invalid metadata: "))
        for bad in ("-demo", "de mo", "demo\n", "de<mo"):
            error = self.assertRaises(
                BadRequest, parseUploadMetadata, {"name": [bad], "version": ["1"]})
            self.assertIn("is not a valid project name", error.message)

    def test_invalidVersion(self) -> None:
        """Empty, blank and versions that are not PEP 440 are refused."""
        for bad in ([], [""], ["  "], ["1<2"], ['1"'], ["1%"], ["1 1"]):
            error = self.assertRaises(
                BadRequest, parseUploadMetadata, {"name": ["demo"], "version": bad})
            self.assertTrue(error.message.startswith("invalid metadata: "))
        self.assertEqual(
            parseUploadMetadata({"name": ["demo"], "version": ["1.0-alpha1"]})["version"], "1.0-alpha1")

    def test_protocolVersion(self) -> None:
        """Protocol version 1, or none, is accepted; any other is refused."""
        parseUploadMetadata({"name": ["d"], "version": ["1"], "protocol_version": ["1"]})
        parseUploadMetadata({"name": ["d"], "version": ["1"], "protocol_version": [""]})
        error = self.assertRaises(BadRequest, parseUploadMetadata,
                                  {"name": ["d"], "version": ["1"], "protocol_version": ["2"]})
        self.assertEqual(error.message, "Unknown protocol version")

    def test_nul(self) -> None:
        """A NUL byte in any value is refused."""
        error = self.assertRaises(BadRequest, parseUploadMetadata,
                                  {"name": ["d"], "version": ["1"], "summary": ["a\x00b"]})
        self.assertIn("'summary'", error.message)

    def test_presentKeys(self) -> None:
        """Only metadata keys the form carries are reported, aliases resolved."""
        self.assertEqual(
            presentMetadataKeys({"name": ["d"], "provides_extra": ["x"], ":action": ["a"],
                                 "import_namespace": ["n"]}),
            {"name", "provides_extras", "import_namespaces"})
