"""
Release file names, archive inspection and upload form checks.

Everything here is pure: file objects are passed in, nothing touches the
network or the disk, so the upload view can run it in a thread and the tests
can run it on in-memory archives.

The default checks are devpi's (section 7 of the devpi protocol notes); the
stricter PyPI rules live in L{checkStrict} and are for indexes that opt in.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.names import normalizeVersion, projectNameProblem, versionProblem

__all__ = [
    "ARCHIVE_SUFFIXES",
    "ArchiveMetadata",
    "checkConsistency",
    "checkDigests",
    "checkFilename",
    "checkStrict",
    "fileType",
    "inspectArchive",
    "parseUploadMetadata",
    "presentMetadataKeys",
    "splitArchiveName",
]

# Longest first, so ".tar.bz2" wins over ".bz2".  devpi accepts all of these;
# the legacy ones (PEP 527) are only refused by checkStrict.
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz",
    ".tar.bz2",
    ".whl",
    ".tgz",
    ".zip",
    ".exe",
    ".egg",
    ".rpm",
    ".deb",
    ".dmg",
    ".msi",
    ".bz2",
)

_FILE_TYPES = {
    ".whl": "bdist_wheel",
    ".tar.gz": "sdist",
    ".tgz": "sdist",
    ".tar.bz2": "sdist",
    ".zip": "sdist",
    ".bz2": "sdist",
    ".egg": "bdist_egg",
    ".exe": "bdist_wininst",
    ".msi": "bdist_msi",
    ".rpm": "bdist_rpm",
    ".dmg": "bdist_dmg",
    ".deb": "bdist_deb",
}

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2")

# Limits against archives built to exhaust the server.
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_ARCHIVE_ENTRIES = 100_000
# Scanning a tar means decompressing it; stop once it expands beyond
# max(MIN_TAR_SCAN, ratio * compressed size).
MAX_TAR_RATIO = 100
MIN_TAR_SCAN = 512 * 1024 * 1024

# One path segment on every common file system (an export writes it as one).
MAX_FILENAME = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION_ESCAPE = re.compile(r"[^\w\d.]+")


def splitArchiveName(filename: str) -> tuple[str, str] | None:
    """
    Split C{filename} into stem and archive suffix (as spelt in the name).

    @return: C{None} if the name has no known archive suffix or nothing
        before it.
    """
    lowered = filename.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], filename[-len(suffix):]
    return None


def _suffix(filename: str) -> str:
    """The lower-cased archive suffix, or L{BadRequest}."""
    split = splitArchiveName(filename)
    if split is None:
        raise BadRequest(f"{filename!r} is not a valid archive name")
    return split[1].lower()


def checkFilename(filename: str, name: str | None, version: str | None) -> None:
    """
    Check that an uploaded file's name is safe and names C{name}'s release
    C{version}, as the packaging specifications define file names.

    Wheels are parsed with C{packaging}; other archives must be
    C{<name>-<version><suffix>}, where the name part normalises (PEP 503) to
    the project's and, for sdists, the version part is the release's version
    (as given, escaped with C{_} or in its PEP 440 normal form, compared
    normalised); legacy built archives (eggs, installers) may go on after
    the version with C{-} or a C{.} that does not begin another version
    part (C{demo-1.0-py3.9.egg}, C{demo-1.0.win32.exe}).  Versions are the
    same when their normal forms are (L{normalizeVersion}), so C{1} does
    not name a file of C{1.0}.

    The order is devpi's, so a name that breaks several rules gets the same
    message as from devpi: version, archive type, project name; then the
    exact match of name and version.

    @raise BadRequest: the name is unsafe or does not fit C{name}/C{version}.
    """
    if not filename:
        raise BadRequest("filename must not be empty")
    if "/" in filename or "\\" in filename or _CONTROL.search(filename):
        raise BadRequest(f"{filename!r} is not a plain file name")
    if filename.startswith("."):
        raise BadRequest(f"{filename!r} must not start with '.'")
    if len(filename.encode("utf-8")) > MAX_FILENAME:
        raise BadRequest(f"filename is longer than {MAX_FILENAME} bytes")
    spellings = _versionSpellings(version) if version is not None else set()
    if version is not None and not any(s in filename for s in spellings):
        raise BadRequest(f"filename {filename!r} does not contain version {version!r}")
    split = splitArchiveName(filename)
    if split is None:
        raise BadRequest(f"{filename!r} is not a valid archive name")
    stem, suffix = split
    suffix = suffix.lower()
    if suffix == ".whl":
        _checkWheelFilename(filename, name, version)
        return
    if name is None:
        return
    project = canonicalize_name(name)
    rests = [stem[i + 1:] for i, c in enumerate(stem) if c == "-" and canonicalize_name(stem[:i]) == project]
    if not rests:
        raise BadRequest(f"filename {filename!r} does not match project name {name!r}")
    if version is None:
        return
    exact = _FILE_TYPES[suffix] == "sdist"
    if not any(_namesVersion(rest, version, spellings, exact) for rest in rests):
        raise BadRequest(
            f"filename {filename!r} does not match version {version!r}: it names another version")


def _checkWheelFilename(filename: str, name: str | None, version: str | None) -> None:
    try:
        wheelName, wheelVersion, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename as e:
        raise BadRequest(f"invalid wheel filename {filename!r}: {_oneLine(e)}") from None
    if name is not None and wheelName != canonicalize_name(name):
        raise BadRequest(f"filename {filename!r} does not match project name {name!r}")
    if version is not None and str(wheelVersion) != normalizeVersion(version):
        raise BadRequest(
            f"wheel version {str(wheelVersion)!r} in {filename!r} does not match version {version!r}")


def _versionSpellings(version: str) -> set[str]:
    """How a file name may spell C{version}: as given, escaped, normalised."""
    spellings = {version, _VERSION_ESCAPE.sub("_", version)}
    normal = normalizeVersion(version)
    if normal is not None:
        spellings |= {normal, _VERSION_ESCAPE.sub("_", normal)}
    return spellings


def _namesVersion(rest: str, version: str, spellings: set[str], exact: bool) -> bool:
    """
    Whether C{rest}, what follows C{<name>-} in a file name's stem, is
    C{version}; unless C{exact}, C{rest} may go on after it with C{-}, or
    with C{.} and no digit (C{1.0.win32}, but not C{1} in C{1.0}).
    """
    if rest in spellings:
        return True
    normal = normalizeVersion(version)
    if exact:
        return normal is not None and normalizeVersion(rest) == normal
    for spelling in spellings:
        after = rest[len(spelling):] if rest.startswith(spelling) else None
        if after and (after[0] == "-" or (after[0] == "." and not after[1:2].isdigit())):
            return True
    return False


def fileType(filename: str) -> str:
    """
    The distutils-style file type of C{filename}, as PyPI's C{filetype}.

    @raise BadRequest: not an archive name devpi accepts.
    """
    return _FILE_TYPES[_suffix(filename)]


@dataclass(frozen=True)
class ArchiveMetadata:
    """
    What an uploaded archive says about itself.

    @ivar metadataBytes: the byte-exact C{METADATA} of a wheel (served as the
        PEP 658 C{.metadata} file) or C{PKG-INFO} of an sdist.
    @ivar fields: every header of that file, keyed by the lower-cased header
        name as spelt in the file (C{"requires-dist"}, C{"classifier"}), in
        file order; a non-empty message body is added as C{"description"}.
    """

    name: str | None = None
    version: str | None = None
    requiresPython: str | None = None
    metadataBytes: bytes | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)


def _oneLine(error: BaseException) -> str:
    """An exception's text fit for a reason phrase."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _sameVersion(a: str, b: str) -> bool:
    """
    PEP 440 equality, or string equality if either does not parse, as uv
    compares a wheel's METADATA with its file name.  (The file name itself
    must spell the release's version exactly: L{checkFilename}.)
    """
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a.strip() == b.strip()


def _parseMetadata(data: bytes) -> ArchiveMetadata:
    """Parse core metadata bytes; never fails, whatever headers it holds."""
    text = data.decode("utf-8", errors="replace")
    message = email.parser.Parser(policy=email.policy.compat32).parsestr(text)
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key.lower(), []).append(str(value))
    body = message.get_payload()
    if isinstance(body, str) and body.strip() and "description" not in fields:
        fields["description"] = [body]

    def first(key: str) -> str | None:
        values = fields.get(key)
        if not values:
            return None
        value = " ".join(values[0].split())
        return value or None

    return ArchiveMetadata(
        name=first("name"),
        version=first("version"),
        requiresPython=first("requires-python"),
        metadataBytes=data,
        fields=fields,
    )


_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    KeyError,
    UnicodeDecodeError,
)


def inspectArchive(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    """
    Read the core metadata out of an uploaded archive.

    Wheels must be sound and carry a matching C{.dist-info/METADATA} and
    C{WHEEL}; sdists may lack C{PKG-INFO} (devpi accepts that) but must be
    readable archives.  Legacy types are not opened.  Nothing is extracted
    to disk.  C{fileobj} must be seekable; it is read from its start.

    @raise BadRequest: the archive is corrupt, hostile or not a proper wheel.
    """
    suffix = _suffix(filename)
    if suffix == ".whl":
        return _inspectWheel(filename, fileobj)
    if suffix in _TAR_SUFFIXES:
        return _inspectTarSdist(filename, fileobj)
    if suffix == ".zip":
        return _inspectZipSdist(filename, fileobj)
    return ArchiveMetadata()


def _readZipMember(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> bytes:
    """Read one member, refusing anything larger than L{MAX_METADATA_SIZE}."""
    if info.file_size > MAX_METADATA_SIZE:
        raise BadRequest(f"{what} is larger than {MAX_METADATA_SIZE} bytes")
    with zf.open(info) as member:
        data = member.read(MAX_METADATA_SIZE + 1)
    if len(data) > MAX_METADATA_SIZE:
        raise BadRequest(f"{what} is larger than {MAX_METADATA_SIZE} bytes")
    return data


def _distInfoMatches(directory: str, wheelName: str, wheelVersion: Version) -> bool:
    """
    Whether C{directory} (without C{.dist-info}) names the wheel's project.

    The name part is escaped (C{-} became C{_}) but old tools did not always
    do that, so every split at a C{-} is tried.
    """
    parts = directory.split("-")
    for cut in range(1, len(parts)):
        name, version = "-".join(parts[:cut]), "-".join(parts[cut:])
        if canonicalize_name(name) != wheelName:
            continue
        try:
            if Version(version) == wheelVersion:
                return True
        except InvalidVersion:
            continue
    return False


def _inspectWheel(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    try:
        wheelName, wheelVersion, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename as e:
        raise BadRequest(f"invalid wheel filename {filename!r}: {_oneLine(e)}") from None

    def invalid(reason: str) -> BadRequest:
        return BadRequest(f"{filename!r} is not a valid wheel: {reason}")

    try:
        fileobj.seek(0)
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_ENTRIES:
                raise invalid(f"more than {MAX_ARCHIVE_ENTRIES} entries")
            metadata: list[zipfile.ZipInfo] = []
            wheelFiles: set[str] = set()
            for info in infos:
                parts = info.filename.split("/")
                if len(parts) != 2 or not parts[0].endswith(".dist-info"):
                    continue
                if not _distInfoMatches(parts[0][: -len(".dist-info")], wheelName, wheelVersion):
                    continue
                if parts[1] == "METADATA":
                    metadata.append(info)
                elif parts[1] == "WHEEL":
                    wheelFiles.add(parts[0])
            if not metadata:
                raise invalid("no .dist-info/METADATA for this name and version")
            if len(metadata) > 1:
                raise invalid("more than one .dist-info/METADATA")
            distInfo = metadata[0].filename.split("/")[0]
            if distInfo not in wheelFiles:
                raise invalid(f"{distInfo}/WHEEL is missing")
            data = _readZipMember(zf, metadata[0], f"METADATA in {filename!r}")
    except BadRequest:
        raise
    except _ARCHIVE_ERRORS as e:
        raise invalid(_oneLine(e)) from None
    return _parseMetadata(data)


def _pkgInfoDirectory(memberName: str) -> str | None:
    """
    If C{memberName} is a C{PKG-INFO} at the top or one level down, the
    directory it is in (C{""} for the top), else C{None}.
    """
    parts = [p for p in memberName.split("/") if p not in ("", ".")]
    if len(parts) == 1 and parts[0] == "PKG-INFO":
        return ""
    if len(parts) == 2 and parts[1] == "PKG-INFO":
        return parts[0]
    return None


def _topLevel(memberName: str) -> str | None:
    parts = [p for p in memberName.split("/") if p not in ("", ".")]
    return parts[0] if parts else None


def _choosePkgInfo(found: dict[str, bytes], topLevel: set[str]) -> bytes | None:
    """The top-level PKG-INFO, else the one in the only top-level directory."""
    if "" in found:
        return found[""]
    if len(topLevel) == 1:
        return found.get(next(iter(topLevel)))
    return None


def _inspectTarSdist(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    def invalid(reason: str) -> BadRequest:
        return BadRequest(f"{filename!r} is not a valid sdist archive: {reason}")

    found: dict[str, bytes] = {}
    topLevel: set[str] = set()
    try:
        compressedSize = fileobj.seek(0, 2)
        fileobj.seek(0)
        scanLimit = max(MIN_TAR_SCAN, MAX_TAR_RATIO * compressedSize)
        with tarfile.open(fileobj=fileobj, mode="r:*") as tf:
            count = 0
            while True:
                member = tf.next()
                if member is None:
                    break
                # tarfile keeps every member it has read; we need none of
                # them later, so memory stays flat however long the archive.
                tf.members.clear()
                count += 1
                if count > MAX_ARCHIVE_ENTRIES:
                    raise invalid(f"more than {MAX_ARCHIVE_ENTRIES} entries")
                # Skipping this member's data means decompressing it.
                if member.offset_data + member.size > scanLimit:
                    raise invalid(f"unpacks to more than {scanLimit} bytes")
                top = _topLevel(member.name)
                if top is not None:
                    topLevel.add(top)
                directory = _pkgInfoDirectory(member.name)
                if directory is None or directory in found:
                    continue
                if not member.isfile() or member.issparse():
                    continue
                if member.size > MAX_METADATA_SIZE:
                    raise BadRequest(
                        f"PKG-INFO in {filename!r} is larger than {MAX_METADATA_SIZE} bytes")
                extracted = tf.extractfile(member)
                if extracted is None:
                    continue
                with extracted:
                    found[directory] = extracted.read(MAX_METADATA_SIZE + 1)
    except BadRequest:
        raise
    except _ARCHIVE_ERRORS as e:
        raise invalid(_oneLine(e)) from None
    data = _choosePkgInfo(found, topLevel)
    return ArchiveMetadata() if data is None else _parseMetadata(data)


def _inspectZipSdist(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    def invalid(reason: str) -> BadRequest:
        return BadRequest(f"{filename!r} is not a valid sdist archive: {reason}")

    try:
        fileobj.seek(0)
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_ENTRIES:
                raise invalid(f"more than {MAX_ARCHIVE_ENTRIES} entries")
            candidates: dict[str, zipfile.ZipInfo] = {}
            topLevel: set[str] = set()
            for info in infos:
                top = _topLevel(info.filename)
                if top is not None:
                    topLevel.add(top)
                directory = _pkgInfoDirectory(info.filename)
                if directory is not None and not info.is_dir():
                    candidates.setdefault(directory, info)
            chosen: zipfile.ZipInfo | None
            if "" in candidates:
                chosen = candidates[""]
            elif len(topLevel) == 1:
                chosen = candidates.get(next(iter(topLevel)))
            else:
                chosen = None
            if chosen is None:
                return ArchiveMetadata()
            data = _readZipMember(zf, chosen, f"PKG-INFO in {filename!r}")
    except BadRequest:
        raise
    except _ARCHIVE_ERRORS as e:
        raise invalid(_oneLine(e)) from None
    return _parseMetadata(data)


def checkConsistency(
    filename: str, formName: str, formVersion: str, archive: ArchiveMetadata
) -> None:
    """
    Refuse an archive whose own metadata names another project or version.

    uv refuses such wheels at install time, so it is better to refuse them
    at upload.  Archives without metadata pass.

    @raise BadRequest: the archive's Name or Version disagrees with the form.
    """
    if archive.name is not None and canonicalize_name(archive.name) != canonicalize_name(formName):
        raise BadRequest(
            f"metadata name {archive.name!r} in {filename!r} "
            f"does not match the uploaded name {formName!r}")
    if archive.version is not None and not _sameVersion(archive.version, formVersion):
        raise BadRequest(
            f"metadata version {archive.version!r} in {filename!r} "
            f"does not match the uploaded version {formVersion!r}")


_DIGESTS = (
    ("md5_digest", "md5", 32),
    ("sha256_digest", "sha256", 64),
    ("blake2_256_digest", "blake2b_256", 64),
)
_HEX = re.compile(r"[0-9a-fA-F]+")


def checkDigests(form: dict[str, str], computed: dict[str, str]) -> None:
    """
    Compare the digests a client sent with those of the bytes we received.

    @param form: the upload form's single values.
    @param computed: hex digests under C{"md5"}, C{"sha256"}, C{"blake2b_256"}.
    @raise BadRequest: a digest is malformed or does not match.
    """
    supplied: list[tuple[str, str]] = []
    for formKey, computedKey, length in _DIGESTS:
        value = (form.get(formKey) or "").strip()
        if not value:
            continue
        if len(value) != length or not _HEX.fullmatch(value):
            raise BadRequest(f"{formKey} is not a valid hex digest of {length} characters")
        supplied.append((value.lower(), computedKey))
    for value, computedKey in supplied:
        if value != computed[computedKey].lower():
            raise BadRequest(
                "The digest supplied does not match a digest calculated from the uploaded file.")


def checkStrict(filename: str, name: str, version: str) -> None:
    """
    PyPI's stricter rules, for indexes that turn them on.

    Only C{.whl} and C{.tar.gz} (PEP 527 / PEP 715), no local versions, and
    sdists named exactly as PEP 625 says.

    @raise BadRequest: naming the rule that is broken.
    """
    lowered = filename.lower()
    if not (lowered.endswith(".whl") or lowered.endswith(".tar.gz")):
        raise BadRequest(
            f"invalid file extension of {filename!r}: only .whl and .tar.gz "
            "are allowed on this index (PEP 527, PEP 715)")
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise BadRequest(f"version {version!r} is not a valid PEP 440 version") from None
    if parsed.local is not None:
        raise BadRequest(f"local version {version!r} is not allowed on this index")
    if lowered.endswith(".tar.gz"):
        expected = f"{canonicalize_name(name).replace('-', '_')}-{parsed}.tar.gz"
        if filename != expected:
            raise BadRequest(
                f"sdist filename {filename!r} is not normalised, it must be {expected!r} (PEP 625)")


_SINGLE_KEYS = (
    "name", "version", "metadata_version", "summary", "home_page", "author",
    "author_email", "maintainer", "maintainer_email", "license",
    "license_expression", "description", "keywords", "download_url",
    "comment", "requires_python", "description_content_type",
)
_LIST_KEYS = (
    "platform", "classifiers", "supported_platform", "provides", "requires",
    "obsoletes", "project_urls", "provides_dist", "obsoletes_dist",
    "requires_dist", "requires_external", "provides_extras", "dynamic",
    "license_file",
)
# Form spellings that go under another key; these optional keys only appear
# in the result when the form has values for them.
_LIST_ALIASES = {
    "provides_extra": "provides_extras",
    "import_name": "import_names",
    "import_names": "import_names",
    "import_namespace": "import_namespaces",
    "import_namespaces": "import_namespaces",
}
_OPTIONAL_LIST_KEYS = ("import_names", "import_namespaces")


def presentMetadataKeys(fields: dict[str, list[str]]) -> set[str]:
    """
    The metadata keys the form actually carries (aliases resolved).

    devpi lets an upload to a registered version overwrite only these.
    """
    known = set(_SINGLE_KEYS) | set(_LIST_KEYS)
    present = {key for key in fields if key in known}
    present |= {_LIST_ALIASES[key] for key in fields if key in _LIST_ALIASES}
    return present


def parseUploadMetadata(fields: dict[str, list[str]]) -> dict[str, object]:
    """
    Build devpi's metadata dict from an upload form's fields.

    Single keys take the last value sent (as devpi's WebOb does), missing
    ones become C{""}; list keys keep every value.  C{UNKNOWN} (old
    distutils) counts as empty and empty values are dropped from lists.
    Unknown fields are ignored.

    @raise BadRequest: bad protocol version, NUL bytes, or an invalid
        name (not ASCII PEP 508) or version (not PEP 440, see
        L{devpi_twisted.model.names.versionProblem}).
    """
    for key, values in fields.items():
        for value in values:
            if "\x00" in value:
                raise BadRequest(f"form field {key!r} contains a NUL byte")
    protocol = [v for v in fields.get("protocol_version", []) if v.strip()]
    if protocol and protocol[-1].strip() != "1":
        raise BadRequest("Unknown protocol version")

    def clean(value: str) -> str:
        return "" if value == "UNKNOWN" else value

    metadata: dict[str, object] = {}
    for key in _SINGLE_KEYS:
        values = fields.get(key)
        metadata[key] = clean(values[-1]) if values else ""
    lists: dict[str, list[str]] = {key: [] for key in _LIST_KEYS + _OPTIONAL_LIST_KEYS}
    for formKey, values in fields.items():
        target = _LIST_ALIASES.get(formKey, formKey)
        if target in lists:
            lists[target].extend(v for v in map(clean, values) if v)
    for key in _LIST_KEYS:
        metadata[key] = lists[key]
    for key in _OPTIONAL_LIST_KEYS:
        if lists[key]:
            metadata[key] = lists[key]

    name = metadata["name"]
    version = metadata["version"]
    assert isinstance(name, str) and isinstance(version, str)
    if not name:
        raise BadRequest("invalid metadata: name is required")
    problem = projectNameProblem(name, "name") or versionProblem(version)
    if problem is not None:
        raise BadRequest(f"invalid metadata: {problem}")
    return metadata
