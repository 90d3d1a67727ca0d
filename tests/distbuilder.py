"""
Real distributions built in memory, and upload bodies as the clients send them.

L{buildWheel} and L{buildSdist} produce archives that pip and uv can read
and install (a wheel has a proper C{RECORD}); their options make the
inconsistent archives that uploads must refuse.  L{uploadBody} builds the
C{multipart/form-data} body twine 7 sends (the fields of standards.md 12.2,
in twine's order, the C{content} part typed C{application/octet-stream}),
with switches for what uv publish and other clients do differently.
"""

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from packaging.utils import canonicalize_name

__all__ = [
    "Dist",
    "attestationFor",
    "UploadBody",
    "buildSdist",
    "buildWheel",
    "metadataText",
    "moduleName",
    "uploadBody",
    "writeDist",
]

# A fixed timestamp, so the same arguments always give the same bytes.
_EPOCH = (2024, 1, 1, 0, 0, 0)


def moduleName(name: str) -> str:
    """The importable module a built distribution contains."""
    return canonicalize_name(name).replace("-", "_")


def _escape(name: str) -> str:
    """The name part of wheel and sdist file names (PEP 427 / PEP 625)."""
    return canonicalize_name(name).replace("-", "_")


@dataclass(frozen=True)
class Dist:
    """
    One built distribution.

    @ivar metadata: the byte-exact C{METADATA} (wheel) or C{PKG-INFO}
        (sdist) inside the archive.
    @ivar name: the project name as the form sends it.
    """

    filename: str
    data: bytes
    name: str
    version: str
    filetype: str
    pyversion: str
    metadata: bytes
    requiresPython: str | None = None
    requiresDist: tuple[str, ...] = ()
    summary: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blake2_256(self) -> str:
        return hashlib.blake2b(self.data, digest_size=32).hexdigest()

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data, usedforsecurity=False).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def metadataText(
    name: str,
    version: str,
    requiresPython: str | None = None,
    requiresDist: Sequence[str] = (),
    summary: str = "",
    metadataVersion: str = "2.1",
) -> bytes:
    """Core metadata as a build backend writes it."""
    lines = [f"Metadata-Version: {metadataVersion}", f"Name: {name}", f"Version: {version}"]
    if summary:
        lines.append(f"Summary: {summary}")
    if requiresPython:
        lines.append(f"Requires-Python: {requiresPython}")
    lines.extend(f"Requires-Dist: {req}" for req in requiresDist)
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _recordHash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _zipWrite(zf: zipfile.ZipFile, path: str, data: bytes) -> None:
    info = zipfile.ZipInfo(path, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def buildWheel(
    name: str = "demo-pkg",
    version: str = "1.0",
    *,
    requiresPython: str | None = None,
    requiresDist: Sequence[str] = (),
    summary: str = "A demo package",
    tag: str = "py3-none-any",
    filename: str | None = None,
    metadataName: str | None = None,
    metadataVersion: str | None = None,
    distInfo: str | None = None,
    moduleSource: str | None = None,
    omit: Iterable[str] = (),
    extraFiles: dict[str, bytes] | None = None,
) -> Dist:
    """
    A wheel with C{<name>-<version>.dist-info/{METADATA,WHEEL,RECORD}} and
    one module, C{<module>/__init__.py}, that sets C{VERSION}.

    @param metadataName: the C{Name} written into METADATA, when it should
        disagree with C{name}.
    @param metadataVersion: the C{Version} written into METADATA, likewise.
    @param distInfo: the C{.dist-info} directory name without the suffix.
    @param omit: dist-info members (C{"METADATA"}, C{"WHEEL"}, C{"RECORD"})
        to leave out.
    """
    escaped = _escape(name)
    module = moduleName(name)
    filename = filename or f"{escaped}-{version}-{tag}.whl"
    distInfo = (distInfo or f"{escaped}-{version}") + ".dist-info"
    metadata = metadataText(
        metadataName or name, metadataVersion or version, requiresPython, requiresDist, summary
    )
    source = moduleSource if moduleSource is not None else f'VERSION = "{version}"\n'
    members: list[tuple[str, bytes]] = [(f"{module}/__init__.py", source.encode("utf-8"))]
    for extraPath, extraData in (extraFiles or {}).items():
        members.append((extraPath, extraData))
    wheelFile = (
        "Wheel-Version: 1.0\nGenerator: distbuilder (tests)\nRoot-Is-Purelib: true\n"
        f"Tag: {tag}\n\n"
    ).encode("ascii")
    omitted = set(omit)
    if "METADATA" not in omitted:
        members.append((f"{distInfo}/METADATA", metadata))
    if "WHEEL" not in omitted:
        members.append((f"{distInfo}/WHEEL", wheelFile))
    record = "".join(f"{path},{_recordHash(data)},{len(data)}\n" for path, data in members)
    record += f"{distInfo}/RECORD,,\n"
    if "RECORD" not in omitted:
        members.append((f"{distInfo}/RECORD", record.encode("utf-8")))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path, data in members:
            _zipWrite(zf, path, data)
    pyversion = tag.split("-", 1)[0]
    return Dist(
        filename=filename,
        data=buffer.getvalue(),
        name=name,
        version=version,
        filetype="bdist_wheel",
        pyversion=pyversion,
        metadata=metadata,
        requiresPython=requiresPython,
        requiresDist=tuple(requiresDist),
        summary=summary,
    )


def buildSdist(
    name: str = "demo-pkg",
    version: str = "1.0",
    *,
    requiresPython: str | None = None,
    summary: str = "A demo package",
    filename: str | None = None,
    metadataName: str | None = None,
    metadataVersion: str | None = None,
    withPkgInfo: bool = True,
    zipFormat: bool = False,
) -> Dist:
    """
    An sdist C{<name>-<version>.tar.gz} (or C{.zip}) with
    C{<name>-<version>/PKG-INFO}, C{pyproject.toml} and the module source.
    """
    escaped = _escape(name)
    top = f"{escaped}-{version}"
    suffix = ".zip" if zipFormat else ".tar.gz"
    filename = filename or f"{top}{suffix}"
    pkgInfo = metadataText(
        metadataName or name, metadataVersion or version, requiresPython, (), summary
    )
    members: list[tuple[str, bytes]] = []
    if withPkgInfo:
        members.append((f"{top}/PKG-INFO", pkgInfo))
    members.append((f"{top}/pyproject.toml", (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
    ).encode("utf-8")))
    members.append((f"{top}/{moduleName(name)}/__init__.py", f'VERSION = "{version}"\n'.encode()))
    buffer = io.BytesIO()
    if zipFormat:
        with zipfile.ZipFile(buffer, "w") as zf:
            for path, data in members:
                _zipWrite(zf, path, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
            for path, data in members:
                info = tarfile.TarInfo(path)
                info.size = len(data)
                info.mtime = int(time.mktime(_EPOCH + (0, 0, 0)))
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return Dist(
        filename=filename,
        data=buffer.getvalue(),
        name=name,
        version=version,
        filetype="sdist",
        pyversion="source",
        metadata=pkgInfo,
        requiresPython=requiresPython,
        summary=summary,
    )


def attestationFor(dist: Dist, filename: str | None = None, sha256: str | None = None) -> dict[str, object]:
    """
    A PEP 740 attestation object about C{dist} (or about another file name
    or digest), shaped as PyPI's publish attestations are.  The signature is
    a placeholder: servers without Sigstore trust roots cannot check it.
    """
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": filename or dist.filename, "digest": {"sha256": sha256 or dist.sha256}}],
        "predicateType": "https://docs.pypi.org/attestations/publish/v1",
        "predicate": None,
    }
    return {
        "version": 1,
        "verification_material": {"certificate": "MIIB", "transparency_entries": [{"logIndex": "1"}]},
        "envelope": {
            "statement": base64.b64encode(json.dumps(statement).encode("utf-8")).decode("ascii"),
            "signature": base64.b64encode(b"not a real signature").decode("ascii"),
        },
    }


def writeDist(dist: Dist, directory: str) -> str:
    """Write C{dist} into C{directory} under its file name; return the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, dist.filename)
    with open(path, "wb") as f:
        f.write(dist.data)
    return path


@dataclass(frozen=True)
class UploadBody:
    """A ready request body and the C{Content-Type} header that goes with it."""

    body: bytes
    contentType: bytes
    fields: list[tuple[str, str]] = field(default_factory=list)

    @property
    def headers(self) -> dict[bytes, list[bytes]]:
        return {b"Content-Type": [self.contentType]}


_OMIT = object()


def uploadBody(
    dist: Dist | None,
    *,
    action: str | None = "file_upload",
    protocolVersion: str | None = "1",
    name: object = _OMIT,
    version: object = _OMIT,
    filename: str | None = None,
    content: bytes | None = None,
    partContentType: str | None = "application/octet-stream",
    sha256: object = _OMIT,
    blake2_256: object = _OMIT,
    md5: str | None = None,
    requiresPython: object = _OMIT,
    attestations: Sequence[object] | None = None,
    withContent: bool = True,
    drop: Iterable[str] = (),
    extra: Sequence[tuple[str, str]] = (),
    boundary: str | None = None,
) -> UploadBody:
    """
    The multipart body twine 7 sends to upload C{dist}.

    Keyword arguments replace one thing twine would send; C{None} leaves a
    field out (C{drop} does so by field name as well):

    @param name: the C{name} field (twine: runs of C{[^A-Za-z0-9.]} as C{-}).
    @param filename: the C{content} part's file name instead of the dist's.
    @param content: the C{content} part's bytes instead of the dist's.
    @param partContentType: the part's C{Content-Type}; C{None} sends none,
        as uv publish does.
    @param sha256: the C{sha256_digest} value; by default the digest of the
        bytes sent (C{blake2_256} likewise).
    @param requiresPython: the C{requires_python} value; uv sends C{""}.
    @param attestations: sent as the JSON array field C{attestations}.
    @param withContent: C{False} sends no C{content} part at all.
    """
    fields: list[tuple[str, str]] = []
    if dist is not None:
        formName = name if name is not _OMIT else _twineSafeName(dist.name)
        formVersion = version if version is not _OMIT else dist.version
        fields += [
            ("metadata_version", "2.1"),
            ("name", formName),  # type: ignore[list-item]
            ("version", formVersion),  # type: ignore[list-item]
            ("summary", dist.summary),
        ]
        rp = requiresPython if requiresPython is not _OMIT else dist.requiresPython
        if rp is not None:
            fields.append(("requires_python", rp))  # type: ignore[arg-type]
        fields += [("requires_dist", req) for req in dist.requiresDist]
        fields += [("pyversion", dist.pyversion), ("filetype", dist.filetype)]
        sent = content if content is not None else dist.data
        digest = sha256 if sha256 is not _OMIT else hashlib.sha256(sent).hexdigest()
        if digest is not None:
            fields.append(("sha256_digest", digest))  # type: ignore[arg-type]
        if md5 is not None:
            fields.append(("md5_digest", md5))
        if attestations is not None:
            fields.append(("attestations", json.dumps(list(attestations))))
        b2 = (blake2_256 if blake2_256 is not _OMIT
              else hashlib.blake2b(sent, digest_size=32).hexdigest())
        if b2 is not None:
            fields.append(("blake2_256_digest", b2))  # type: ignore[arg-type]
    else:
        if name is not _OMIT and name is not None:
            fields.append(("name", name))  # type: ignore[arg-type]
        if version is not _OMIT and version is not None:
            fields.append(("version", version))  # type: ignore[arg-type]
    fields += list(extra)
    if action is not None:
        fields.append((":action", action))
    if protocolVersion is not None:
        fields.append(("protocol_version", protocolVersion))
    dropped = set(drop)
    fields = [(k, v) for k, v in fields if k not in dropped]

    boundary = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    for key, value in fields:
        out.write(f"--{boundary}\r\n".encode("ascii"))
        out.write(f'Content-Disposition: form-data; name="{key}"\r\n\r\n'.encode("utf-8"))
        out.write(value.encode("utf-8"))
        out.write(b"\r\n")
    if withContent and (dist is not None or content is not None):
        partName = filename or (dist.filename if dist is not None else "upload.bin")
        data = content if content is not None else dist.data  # type: ignore[union-attr]
        out.write(f"--{boundary}\r\n".encode("ascii"))
        out.write(
            f'Content-Disposition: form-data; name="content"; filename="{partName}"\r\n'.encode("utf-8")
        )
        if partContentType is not None:
            out.write(f"Content-Type: {partContentType}\r\n".encode("ascii"))
        out.write(b"\r\n")
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode("ascii"))
    return UploadBody(
        out.getvalue(),
        f"multipart/form-data; boundary={boundary}".encode("ascii"),
        fields,
    )


def _twineSafeName(name: str) -> str:
    """twine's C{safe_name}: runs of characters other than C{[A-Za-z0-9.]} become C{-}."""
    return re.sub("[^A-Za-z0-9.]+", "-", name)
