"""
Reading an uploaded archive's own core metadata (wheel C{METADATA}, sdist
C{PKG-INFO}) and checking it against the upload form.

Everything here is pure: file objects are passed in, nothing touches the
network or the disk, so the upload view can run it in a thread and the tests
can run it on in-memory archives.
"""

from __future__ import annotations

import email.parser
import email.policy
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, TypeVar

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.distfile import archiveSuffix, oneLine

__all__ = [
    "ArchiveMetadata",
    "checkConsistency",
    "inspectArchive",
]

_T = TypeVar("_T")

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2")

# Limits against archives built to exhaust the server.
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_ARCHIVE_ENTRIES = 100_000
# Scanning a tar means decompressing it; stop once it expands beyond
# max(MIN_TAR_SCAN, ratio * compressed size).
MAX_TAR_RATIO = 100
MIN_TAR_SCAN = 512 * 1024 * 1024


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
    suffix = archiveSuffix(filename)
    if suffix == ".whl":
        return _inspectWheel(filename, fileobj)
    if suffix in _TAR_SUFFIXES:
        return _inspectTarSdist(filename, fileobj)
    if suffix == ".zip":
        return _inspectZipSdist(filename, fileobj)
    return ArchiveMetadata()


def _refusal(filename: str, what: str) -> Callable[[str], BadRequest]:
    """The error for C{filename} that is not a valid C{what}, given the reason."""
    def invalid(reason: str) -> BadRequest:
        return BadRequest(f"{filename!r} is not a valid {what}: {reason}")
    return invalid


@contextmanager
def _archiveErrors(invalid: Callable[[str], BadRequest]) -> Iterator[None]:
    """Turn whatever a broken archive makes the readers raise into C{invalid(reason)}."""
    try:
        yield
    except BadRequest:
        raise
    except _ARCHIVE_ERRORS as e:
        raise invalid(oneLine(e)) from None


@contextmanager
def _zipArchive(fileobj: BinaryIO, invalid: Callable[[str], BadRequest]
                ) -> Iterator[tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]]:
    """An open zip and its entries, at most L{MAX_ARCHIVE_ENTRIES} of them."""
    with _archiveErrors(invalid):
        fileobj.seek(0)
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_ENTRIES:
                raise invalid(f"more than {MAX_ARCHIVE_ENTRIES} entries")
            yield zf, infos


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
        raise BadRequest(f"invalid wheel filename {filename!r}: {oneLine(e)}") from None

    invalid = _refusal(filename, "wheel")

    with _zipArchive(fileobj, invalid) as (zf, infos):
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


def _choosePkgInfo(found: dict[str, _T], topLevel: set[str]) -> _T | None:
    """The top-level PKG-INFO, else the one in the only top-level directory."""
    if "" in found:
        return found[""]
    if len(topLevel) == 1:
        return found.get(next(iter(topLevel)))
    return None


def _inspectTarSdist(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    invalid = _refusal(filename, "sdist archive")

    found: dict[str, bytes] = {}
    topLevel: set[str] = set()
    with _archiveErrors(invalid):
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
    data = _choosePkgInfo(found, topLevel)
    return ArchiveMetadata() if data is None else _parseMetadata(data)


def _inspectZipSdist(filename: str, fileobj: BinaryIO) -> ArchiveMetadata:
    invalid = _refusal(filename, "sdist archive")

    with _zipArchive(fileobj, invalid) as (zf, infos):
        candidates: dict[str, zipfile.ZipInfo] = {}
        topLevel: set[str] = set()
        for info in infos:
            top = _topLevel(info.filename)
            if top is not None:
                topLevel.add(top)
            directory = _pkgInfoDirectory(info.filename)
            if directory is not None and not info.is_dir():
                candidates.setdefault(directory, info)
        chosen = _choosePkgInfo(candidates, topLevel)
        if chosen is None:
            return ArchiveMetadata()
        data = _readZipMember(zf, chosen, f"PKG-INFO in {filename!r}")
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
