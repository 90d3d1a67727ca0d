# -*- test-case-name: tests.test_fakepypi -*-
"""
A fake upstream index for mirror tests.

L{FakePyPI} serves the distributions a test registers the way PyPI does:
C{/simple/} and C{/simple/<project>/} as PEP 691 JSON or PEP 503 HTML by
C{Accept}, files under C{/files/}, and C{.metadata} files next to them.
Attributes switch on the failures a mirror must survive (down, hanging,
garbage pages, corrupt, truncated or slow files) and every request is
recorded, so a test can tell whether anything was fetched.

Use it in memory with C{treq.testing.StubTreq(fake.resource())}, or on a
real port with C{Site(fake.resource())}.  It never touches the global
reactor; slow files are paced by the clock given to the constructor.

L{buildWheel} makes real, installable wheels to serve.
"""

import base64
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from html import escape
from typing import Any, Sequence
from urllib.parse import quote

from klein import Klein
from packaging.utils import (
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.model.negotiation import JSON, TEXT_HTML, chooseSimpleFormat

__all__ = ["FakePyPI", "buildWheel"]

_API_VERSION = "1.4"
_GARBAGE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR garbage, not a simple page \xff\xfe"
_NAME = re.compile(r"([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])\Z", re.I | re.ASCII)


@dataclass
class _File:
    """A registered distribution file."""

    project: str
    filename: str
    content: bytes
    sha256: str
    requiresPython: str | None
    yanked: bool | str
    uploadTime: str | None
    coreMetadata: bytes | None
    version: str | None


@dataclass
class _Project:
    """A registered project: its display name and its files by name."""

    name: str
    files: dict[str, _File]


def _versionOf(filename: str) -> str | None:
    """The version in a wheel or sdist file name, if it has one."""
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        return str(parse_sdist_filename(filename)[1])
    except ValueError:
        return None


def _versionKey(version: str) -> tuple:
    try:
        return (0, Version(version))
    except ValueError:
        return (1, version)


def _etagMatches(header: bytes | None, etag: str) -> bool:
    """Whether an C{If-None-Match} value names C{etag} (weak comparison)."""
    if header is None:
        return False
    for candidate in header.decode("latin-1").split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


class _FileBody(Resource):
    """
    A file download: C{Content-Length} is the whole file, then the bytes in
    chunks, paced by a clock if there is one; a truncated body stops early
    and drops the connection.
    """

    isLeaf = True

    def __init__(
        self,
        content: bytes,
        clock: IReactorTime | None,
        chunkSize: int | None,
        delay: float,
        truncateAt: int | None,
    ) -> None:
        super().__init__()
        self._content = content
        self._clock = clock
        self._chunkSize = chunkSize
        self._delay = delay
        self._truncateAt = truncateAt

    def render_GET(self, request: IRequest) -> Any:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", b"%d" % len(self._content))
        if request.method == b"HEAD":
            return b""
        body = self._content if self._truncateAt is None else self._content[: self._truncateAt]
        step = self._chunkSize or len(body) or 1
        chunks = [body[i:i + step] for i in range(0, len(body), step)]
        pending: list[IDelayedCall] = []
        gone: list[bool] = []

        def disconnected(_: object) -> None:
            gone.append(True)
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addErrback(disconnected)

        def writeFrom(index: int) -> None:
            pending[:] = []
            if gone:
                return
            if index < len(chunks):
                request.write(chunks[index])
                if self._clock is not None and self._chunkSize and index + 1 < len(chunks):
                    pending.append(self._clock.callLater(self._delay, writeFrom, index + 1))
                    return
                writeFrom(index + 1)
                return
            if self._truncateAt is not None:
                request.transport.loseConnection()
            else:
                request.finish()

        writeFrom(0)
        return NOT_DONE_YET


class _Front(Resource):
    """Records every request and applies the knobs that affect all routes."""

    isLeaf = True

    def __init__(self, fake: "FakePyPI", inner: IResource) -> None:
        super().__init__()
        self._fake = fake
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        fake = self._fake
        fake.requests.append((request.method.decode("latin-1"), request.path.decode("latin-1")))
        if fake.hang:
            fake._hangOn(request)
            return NOT_DONE_YET
        if fake.down:
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"503 Service Unavailable: the fake index is down\n"
        return self._inner.render(request)


class FakePyPI:
    """
    A fake PyPI to run a mirror against.

    Knobs (plain attributes; change them at any time):

      - C{down}: every request answers 503.
      - C{hang}: every request is accepted and never answered; the
        request is dropped cleanly when the client goes away.
      - C{garbage}: simple pages answer 200 with bytes that are neither
        HTML nor JSON (under the negotiated C{Content-Type}).
      - C{serial}: the C{X-PyPI-Last-Serial} header and C{_last-serial}
        of simple pages; L{None} sends neither.
      - C{notFound}: projects whose page answers 404 even if registered.
      - C{corruptFiles}: files (and C{.metadata} files) have the right
        length but different bytes.
      - C{truncateFiles}: files announce their full C{Content-Length}, send
        half of the bytes, and drop the connection.
      - C{slowFiles}: files are written C{slowChunkSize} bytes at a time,
        C{slowChunkDelay} seconds apart on the clock (all at once when no
        clock was given).
      - C{html}: simple pages are PEP 503 HTML whatever C{Accept} says.
      - C{etags}: simple pages carry an C{ETag} and answer C{If-None-Match}
        with 304.
      - C{filesURL}: base URL of file links (default: relative links to
        this fake's C{/files/}).
      - C{statuses}: PEP 792 status per project, as C{(status, reason)};
        like PyPI, a quarantined project lists no files and is left out of
        the project list.

    @ivar requests: C{(method, path)} of every request received, in order;
        the path is as sent (percent-encoded), without the query.
    """

    app = Klein()

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock
        self.requests: list[tuple[str, str]] = []
        self.down = False
        self.hang = False
        self.garbage = False
        self.serial: int | None = None
        self.notFound: set[str] = set()
        self.corruptFiles = False
        self.truncateFiles = False
        self.slowFiles = False
        self.slowChunkSize = 1024
        self.slowChunkDelay = 1.0
        self.html = False
        self.etags = False
        self.filesURL: str | None = None
        self.statuses: dict[str, tuple[str, str | None]] = {}
        self._projects: dict[str, _Project] = {}
        self._files: dict[str, _File] = {}
        self._hanging: set[Deferred[None]] = set()

    # -- registering distributions --

    def addFile(
        self,
        project: str,
        filename: str,
        content: bytes,
        *,
        requiresPython: str | None = None,
        yanked: bool | str = False,
        uploadTime: str | None = None,
        coreMetadata: bytes | None = None,
    ) -> None:
        """
        Serve C{content} as C{filename} of C{project}, replacing a file of
        the same name.

        @param yanked: L{True}, or a reason, to list the file as yanked.
        @param uploadTime: the C{upload-time} to list
            (C{YYYY-MM-DDTHH:MM:SS[.ffffff]Z}); left out if L{None}.
        @param coreMetadata: the C{.metadata} file to serve and advertise.
        """
        if "/" in filename or not filename:
            raise ValueError(f"bad file name {filename!r}")
        key = canonicalize_name(project)
        other = self._files.get(filename)
        if other is not None and other.project != key:
            raise ValueError(f"{filename} already belongs to {other.project}")
        entry = self._projects.setdefault(key, _Project(project, {}))
        record = _File(
            project=key,
            filename=filename,
            content=bytes(content),
            sha256=hashlib.sha256(content).hexdigest(),
            requiresPython=requiresPython,
            yanked=yanked,
            uploadTime=uploadTime,
            coreMetadata=None if coreMetadata is None else bytes(coreMetadata),
            version=_versionOf(filename),
        )
        entry.files[filename] = record
        self._files[filename] = record

    def removeProject(self, project: str) -> None:
        """Forget a project and its files; its page then answers 404."""
        entry = self._projects.pop(canonicalize_name(project))
        for filename in entry.files:
            del self._files[filename]

    def removeFile(self, project: str, filename: str) -> None:
        """Stop listing and serving one file; the project stays, possibly empty."""
        del self._projects[canonicalize_name(project)].files[filename]
        del self._files[filename]

    @property
    def hanging(self) -> int:
        """How many requests are being held unanswered because of C{hang}."""
        return len(self._hanging)

    def resource(self) -> IResource:
        """The resource to serve, in memory or on a port."""
        return _Front(self, self.app.resource())

    def _hangOn(self, request: IRequest) -> None:
        d: Deferred[None] = Deferred()
        self._hanging.add(d)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(lambda f: f.trap(CancelledError))
        d.addBoth(lambda _: self._hanging.discard(d))

    # -- rendering helpers --

    def _format(self, request: IRequest) -> str:
        """The representation to answer a simple page with."""
        if self.html:
            return TEXT_HTML
        return chooseSimpleFormat(request.getHeader(b"accept")) or TEXT_HTML

    def _simple(self, request: IRequest, contentType: str, body: bytes) -> bytes:
        """Answer a simple page: serial, C{Vary}, and ETag handling."""
        request.setHeader(b"Content-Type", contentType.encode("ascii"))
        request.setHeader(b"Vary", b"Accept")
        if self.serial is not None:
            request.setHeader(b"X-PyPI-Last-Serial", b"%d" % self.serial)
        if self.garbage:
            body = _GARBAGE
        if self.etags:
            etag = '"%s"' % hashlib.sha256(contentType.encode("ascii") + b"\n" + body).hexdigest()[:32]
            request.setHeader(b"ETag", etag.encode("ascii"))
            if _etagMatches(request.getHeader(b"if-none-match"), etag):
                request.setResponseCode(304)
                return b""
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _status(self, key: str) -> tuple[str | None, str | None]:
        status = self.statuses.get(key) or self.statuses.get(self._projects[key].name)
        return status if status is not None else (None, None)

    def _fileURL(self, filename: str) -> str:
        base = self.filesURL if self.filesURL is not None else "../../files/"
        return base + quote(filename)

    def _projectJSON(self, key: str) -> bytes:
        entry = self._projects[key]
        status, reason = self._status(key)
        files = [] if status == "quarantined" else sorted(entry.files.values(), key=lambda f: f.filename)
        meta: dict[str, Any] = {"api-version": _API_VERSION}
        if self.serial is not None:
            meta["_last-serial"] = self.serial
        rendered = []
        for f in files:
            if f.yanked is True or f.yanked == "":
                yanked: bool | str = True
            else:
                yanked = f.yanked or False
            metadata: Any = (
                {"sha256": hashlib.sha256(f.coreMetadata).hexdigest()}
                if f.coreMetadata is not None else False
            )
            item: dict[str, Any] = {
                "filename": f.filename,
                "url": self._fileURL(f.filename),
                "hashes": {"sha256": f.sha256},
                "requires-python": f.requiresPython,
                "size": len(f.content),
                "yanked": yanked,
                "core-metadata": metadata,
                "data-dist-info-metadata": metadata,
                "provenance": None,
            }
            if f.uploadTime is not None:
                item["upload-time"] = f.uploadTime
            rendered.append(item)
        versions = sorted({f.version for f in files if f.version}, key=_versionKey)
        document: dict[str, Any] = {"meta": meta, "name": key, "versions": versions, "files": rendered}
        if status is not None:
            document["project-status"] = {"status": status}
            if reason:
                document["project-status"]["reason"] = reason
        return json.dumps(document).encode("utf-8")

    def _projectHTML(self, key: str) -> bytes:
        entry = self._projects[key]
        status, reason = self._status(key)
        files = [] if status == "quarantined" else sorted(entry.files.values(), key=lambda f: f.filename)
        head = [f'<meta name="pypi:repository-version" content="{_API_VERSION}">']
        if status is not None:
            head.append(f'<meta name="pypi:project-status" content="{escape(status)}">')
            if reason:
                head.append(f'<meta name="pypi:project-status-reason" content="{escape(reason)}">')
        lines = []
        for f in files:
            attributes = ""
            if f.requiresPython:
                attributes += f' data-requires-python="{escape(f.requiresPython)}"'
            if f.yanked is True or f.yanked == "":
                attributes += ' data-yanked=""'
            elif f.yanked:
                attributes += f' data-yanked="{escape(f.yanked)}"'
            if f.coreMetadata is not None:
                value = "sha256=" + hashlib.sha256(f.coreMetadata).hexdigest()
                attributes += f' data-dist-info-metadata="{value}" data-core-metadata="{value}"'
            href = escape(f"{self._fileURL(f.filename)}#sha256={f.sha256}")
            lines.append(f'    <a href="{href}"{attributes}>{escape(f.filename)}</a><br />\n')
        serial = "" if self.serial is None else f"<!--SERIAL {self.serial}-->\n"
        title = f"Links for {escape(key)}"
        page = (
            "<!DOCTYPE html>\n<html>\n  <head>\n    "
            + "\n    ".join(head)
            + f"\n    <title>{title}</title>\n  </head>\n  <body>\n    <h1>{title}</h1>\n"
            + "".join(lines)
            + f"  </body>\n</html>\n{serial}"
        )
        return page.encode("utf-8")

    def _indexBody(self, fmt: str) -> bytes:
        listed = [
            (key, entry.name) for key, entry in sorted(self._projects.items())
            if self._status(key)[0] != "quarantined"
        ]
        if fmt == JSON:
            meta: dict[str, Any] = {"api-version": _API_VERSION}
            projects: list[dict[str, Any]] = []
            for _, name in listed:
                item: dict[str, Any] = {"name": name}
                if self.serial is not None:
                    item["_last-serial"] = self.serial
                projects.append(item)
            if self.serial is not None:
                meta["_last-serial"] = self.serial
            return json.dumps({"meta": meta, "projects": projects}).encode("utf-8")
        anchors = "".join(
            f'    <a href="{quote(key)}/">{escape(name)}</a><br />\n' for key, name in listed
        )
        return (
            "<!DOCTYPE html>\n<html>\n  <head>\n"
            f'    <meta name="pypi:repository-version" content="{_API_VERSION}">\n'
            "    <title>Simple index</title>\n  </head>\n  <body>\n"
            f"{anchors}  </body>\n</html>\n"
        ).encode("utf-8")

    @staticmethod
    def _redirect(request: IRequest, location: str) -> bytes:
        request.setResponseCode(301)
        request.setHeader(b"Location", location.encode("utf-8"))
        request.setHeader(b"Content-Length", b"0")
        return b""

    @staticmethod
    def _notFound(request: IRequest) -> bytes:
        body = b"404 Not Found\n"
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    # -- routes --

    @app.route("/simple")
    def simpleNoSlash(self, request: IRequest) -> bytes:
        return self._redirect(request, "simple/")

    @app.route("/simple/")
    def simpleIndex(self, request: IRequest) -> bytes:
        fmt = self._format(request)
        return self._simple(request, fmt, self._indexBody(fmt))

    @app.route("/simple/<project>")
    def projectNoSlash(self, request: IRequest, project: str) -> bytes:
        return self._redirect(request, quote(canonicalize_name(project)) + "/")

    @app.route("/simple/<project>/")
    def projectPage(self, request: IRequest, project: str) -> bytes:
        key = canonicalize_name(project)
        if key != project:
            return self._redirect(request, f"../{quote(key)}/")
        if key not in self._projects or key in {canonicalize_name(n) for n in self.notFound}:
            return self._notFound(request)
        fmt = self._format(request)
        body = self._projectJSON(key) if fmt == JSON else self._projectHTML(key)
        return self._simple(request, fmt, body)

    @app.route("/files/<filename>")
    def file(self, request: IRequest, filename: str) -> Any:
        record = self._files.get(filename)
        content = None if record is None else record.content
        if record is None and filename.endswith(".metadata"):
            base = self._files.get(filename[: -len(".metadata")])
            if base is not None:
                content = base.coreMetadata
        if content is None:
            return self._notFound(request)
        if self.corruptFiles:
            content = bytes(b ^ 0x5A for b in content)
        return _FileBody(
            content,
            self.clock,
            self.slowChunkSize if self.slowFiles else None,
            self.slowChunkDelay,
            len(content) // 2 if self.truncateFiles else None,
        )


# -- wheels ------------------------------------------------------------------

# A fixed timestamp, so the same arguments give the same bytes.
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def _recordHash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def buildWheel(
    name: str,
    version: str,
    *,
    requiresDist: Sequence[str] = (),
    requiresPython: str | None = None,
    module: str | None = None,
) -> tuple[str, bytes, bytes]:
    """
    Build a pure-Python wheel that pip and uv can install.

    It holds one top-level module defining C{VERSION = "<version>"}, and a
    C{.dist-info} with C{METADATA}, C{WHEEL} and a C{RECORD} that lists
    every file with its sha256 and size.  The same arguments always give
    the same bytes.

    @param name: the project name (must be a valid PEP 508 name); it is
        written as given in C{Name:} and normalised in the file name.
    @param version: a PEP 440 version; it is normalised.
    @param requiresDist: C{Requires-Dist} lines.
    @param module: the module's name; by default the normalised project
        name with C{_} for C{-}.
    @return: C{(filename, wheel bytes, METADATA bytes)}; the last is what
        a C{.metadata} file must contain.
    """
    if not _NAME.match(name):
        raise ValueError(f"invalid project name {name!r}")
    version = str(Version(version))
    distribution = canonicalize_name(name).replace("-", "_")
    moduleName = module if module is not None else distribution
    if not moduleName.isidentifier():
        raise ValueError(f"invalid module name {moduleName!r}")
    filename = f"{distribution}-{version}-py3-none-any.whl"
    distInfo = f"{distribution}-{version}.dist-info"

    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {name} test distribution",
    ]
    if requiresPython is not None:
        metadata.append(f"Requires-Python: {requiresPython}")
    metadata.extend(f"Requires-Dist: {requirement}" for requirement in requiresDist)
    metadataBytes = ("\n".join(metadata) + "\n\n").encode("utf-8")
    wheelBytes = (
        "Wheel-Version: 1.0\n"
        "Generator: devpi-twisted fakepypi\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n\n"
    ).encode("ascii")
    files = [
        (f"{moduleName}.py", f'"""{name} {version}, for tests."""\n\nVERSION = "{version}"\n'.encode("utf-8")),
        (f"{distInfo}/METADATA", metadataBytes),
        (f"{distInfo}/WHEEL", wheelBytes),
    ]
    record = "".join(f"{path},{_recordHash(data)},{len(data)}\n" for path, data in files)
    record += f"{distInfo}/RECORD,,\n"
    files.append((f"{distInfo}/RECORD", record.encode("utf-8")))

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path, data in files:
            info = zipfile.ZipInfo(path, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return filename, out.getvalue(), metadataBytes
