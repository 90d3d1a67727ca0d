"""
Rendering simple API pages (PEP 503 HTML and PEP 691 JSON).

The callers describe a page with L{ProjectPage} and L{SimpleFile}; this
module turns that into bytes.  Both forms carry the same facts, and the
choices made here are the ones that keep pip, uv and poetry happy at once:
C{yanked} is never the empty string, C{size} is always an integer, absent
values are left out rather than written as C{null}, and the legacy
C{dist-info-metadata} key never appears in JSON.

Pages can list hundreds of files, so documents are assembled from string
pieces with one C{join} rather than through an intermediate structure.

Pure code: no I/O, no Twisted.
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from html import escape
from json.encoder import encode_basestring_ascii as _jsonString
from typing import Iterable
from urllib.parse import quote

from packaging.utils import canonicalize_name

from devpi_twisted.model.upstream.common import sortedVersions as pep440Order, validRequiresPython

API_VERSION = "1.4"


@dataclass(frozen=True)
class SimpleFile:
    """
    One release file as the simple API shows it.

    @ivar url: where the file lives, without fragment or query; relative
        URLs are resolved by clients against the page's URL.
    @ivar uploadTime: C{YYYY-MM-DDTHH:MM:SS[.ffffff]Z} or L{None}.
    @ivar yanked: L{False}, L{True} or a reason; an empty reason means
        yanked without a reason.
    @ivar coreMetadataSha256: hash of the C{.metadata} file, only if that
        file is really served.
    @ivar version: the file's version, added to the page's versions.
    """

    filename: str
    url: str
    sha256: str
    size: int
    uploadTime: str | None
    requiresPython: str | None
    yanked: bool | str
    coreMetadataSha256: str | None = None
    provenanceURL: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ProjectPage:
    """
    Everything on one project's simple page.

    @ivar status: a PEP 792 status, or L{None} for the implicit C{active}.
    @ivar notices: plain-text messages shown on the HTML page only.
    """

    name: str
    files: tuple[SimpleFile, ...]
    versions: tuple[str, ...]
    status: str | None = None
    statusReason: str | None = None
    lastSerial: int | None = None
    notices: tuple[str, ...] = ()


# Characters that may stand as they are in a URL path (RFC 3986 unreserved
# and sub-delims, plus ":", "@", "/" and the brackets of an IPv6 host), and
# "%" when it starts an escape.  "?" and "#" are not among them: file URLs
# have no query or fragment, so those characters belong to the filename.
_NEEDS_QUOTING = re.compile(
    r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/\[\]%]|%(?![0-9A-Fa-f]{2})"
)


def _quoteChar(match: "re.Match[str]") -> str:
    """Percent-encode one character; lone surrogates come from undecodable filenames."""
    char = match.group()
    try:
        return quote(char, safe="", errors="surrogateescape")
    except UnicodeEncodeError:
        return quote(char, safe="", errors="surrogatepass")


def _requote(url: str) -> str:
    """Percent-encode what a URL cannot contain, leaving existing escapes alone."""
    if _NEEDS_QUOTING.search(url) is None:
        return url
    return _NEEDS_QUOTING.sub(_quoteChar, url)


def _yankReason(yanked: bool | str | None) -> bool | str:
    """Normalise the yanked state: L{False}, L{True} or a non-empty reason."""
    if isinstance(yanked, str):
        return yanked if yanked else True
    return bool(yanked)


@lru_cache(maxsize=128)
def _sortVersions(versions: frozenset[str]) -> tuple[str, ...]:
    """Sort once per distinct set: comparing L{Version}s is slow Python code."""
    return pep440Order(versions)


def sortedVersions(page: ProjectPage) -> tuple[str, ...]:
    """
    The page's versions plus every file's version, without duplicates,
    in PEP 440 order with unparseable versions last.
    """
    versions = set(page.versions)
    versions.update(f.version for f in page.files if f.version is not None)
    return _sortVersions(frozenset(versions))


def _jsonMeta(lastSerial: int | None) -> str:
    """The C{meta} object shared by both JSON documents."""
    if lastSerial is None:
        return f'{{"api-version":"{API_VERSION}"}}'
    return f'{{"api-version":"{API_VERSION}","_last-serial":{int(lastSerial)}}}'


def _fileJSON(f: SimpleFile) -> str:
    """One file object of a PEP 691 project page."""
    sha256 = f.sha256
    hashes = f'{{"sha256":{_jsonString(sha256.lower())}}}' if sha256 else "{}"
    requiresPython = validRequiresPython(f.requiresPython)
    requiresPython = (
        "" if requiresPython is None
        else f',"requires-python":{_jsonString(requiresPython)}'
    )
    uploadTime = f.uploadTime
    uploadTime = "" if uploadTime is None else f',"upload-time":{_jsonString(uploadTime)}'
    yanked = _yankReason(f.yanked)
    yanked = (
        _jsonString(yanked) if isinstance(yanked, str)
        else ("true" if yanked else "false")
    )
    coreMetadata = f.coreMetadataSha256
    coreMetadata = f'{{"sha256":{_jsonString(coreMetadata)}}}' if coreMetadata else "false"
    provenance = f.provenanceURL
    provenance = f',"provenance":{_jsonString(provenance)}' if provenance else ""
    return (
        f'{{"filename":{_jsonString(f.filename)},"url":{_jsonString(_requote(f.url))}'
        f',"hashes":{hashes}{requiresPython}{_jsonSize(f.size)}{uploadTime}'
        f',"yanked":{yanked},"core-metadata":{coreMetadata}{provenance}}}'
    )


def _jsonSize(size: int) -> str:
    """PEP 700's size; a mirrored link upstream gave no size for (-1) goes without."""
    return f',"size":{int(size)}' if size >= 0 else ""


def _htmlSize(size: int) -> str:
    return f' data-size="{int(size)}"' if size >= 0 else ""


def renderProjectJSON(page: ProjectPage) -> bytes:
    """Render a project page as C{application/vnd.pypi.simple.v1+json}."""
    parts = [
        '{"meta":', _jsonMeta(page.lastSerial),
        ',"name":', _jsonString(canonicalize_name(page.name)),
        ',"versions":[', ",".join(map(_jsonString, sortedVersions(page))),
        '],"files":[', ",".join(map(_fileJSON, page.files)), "]",
    ]
    if page.status is not None:
        parts += (',"project-status":{"status":', _jsonString(page.status))
        if page.statusReason:
            parts += (',"reason":', _jsonString(page.statusReason))
        parts.append("}")
    parts.append("}")
    return "".join(parts).encode("ascii")


def _encodeHTML(text: str) -> bytes:
    """UTF-8, with character references for anything UTF-8 cannot carry."""
    return text.encode("utf-8", "xmlcharrefreplace")


def _head(title: str, extra: str = "") -> str:
    """Document start up to and including the C{<h1>}."""
    title = escape(title, quote=True)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head>'
        f'<meta name="pypi:repository-version" content="{API_VERSION}">'
        f"<title>{title}</title>{extra}</head><body><h1>{title}</h1>\n"
    )


_TAIL = "</body></html>\n"


def _fileLink(f: SimpleFile) -> str:
    """One C{<a>} line of a PEP 503 project page."""
    href = _requote(f.url)
    if f.sha256:
        href = f"{href}#sha256={f.sha256.lower()}"
    requiresPython = validRequiresPython(f.requiresPython)
    requiresPython = (
        "" if requiresPython is None
        else f' data-requires-python="{escape(requiresPython, quote=True)}"'
    )
    yanked = _yankReason(f.yanked)
    if yanked is True:
        yanked = ' data-yanked=""'
    elif yanked:
        yanked = f' data-yanked="{escape(yanked, quote=True)}"'
    else:
        yanked = ""
    coreMetadata = f.coreMetadataSha256
    if coreMetadata:
        value = escape(f"sha256={coreMetadata}", quote=True)
        coreMetadata = f' data-core-metadata="{value}" data-dist-info-metadata="{value}"'
    else:
        coreMetadata = ""
    provenance = f.provenanceURL
    provenance = f' data-provenance="{escape(provenance, quote=True)}"' if provenance else ""
    uploadTime = f.uploadTime
    uploadTime = (
        "" if uploadTime is None
        else f' data-upload-time="{escape(uploadTime, quote=True)}"'
    )
    return (
        f'<a href="{escape(href, quote=True)}"{requiresPython}{yanked}{coreMetadata}'
        f'{provenance}{_htmlSize(f.size)}{uploadTime}>'
        f"{escape(f.filename, quote=True)}</a><br>\n"
    )


def renderProjectHTML(page: ProjectPage, title: str) -> bytes:
    """Render a project page as HTML (C{text/html} or the v1+html type)."""
    extra = ""
    if page.status is not None:
        extra = f'<meta name="pypi:project-status" content="{escape(page.status, quote=True)}">'
        if page.statusReason:
            extra += (
                '<meta name="pypi:project-status-reason" '
                f'content="{escape(page.statusReason, quote=True)}">'
            )
    parts = [_head(title, extra)]
    parts.extend(f"<p>{escape(notice, quote=True)}</p>\n" for notice in page.notices)
    parts.extend(map(_fileLink, page.files))
    parts.append(_TAIL)
    return _encodeHTML("".join(parts))


def renderIndexJSON(names: Iterable[str], lastSerial: int | None = None) -> bytes:
    """Render the project list as C{application/vnd.pypi.simple.v1+json}."""
    return indexHeadJSON(lastSerial) + indexEntriesJSON(names, first=True) + INDEX_TAIL_JSON


def renderIndexHTML(names: Iterable[str], title: str) -> bytes:
    """Render the project list as HTML, linking each name to its normalised page."""
    return indexHeadHTML(title) + indexEntriesHTML(names) + _TAIL.encode("ascii")


# The project list in pieces, for lists streamed without holding them whole
# (a mirror of PyPI lists hundreds of thousands of names).

INDEX_TAIL_JSON = b"]}"
INDEX_TAIL_HTML = _TAIL.encode("ascii")


def indexHeadJSON(lastSerial: int | None = None) -> bytes:
    return f'{{"meta":{_jsonMeta(lastSerial)},"projects":['.encode("ascii")


def indexEntriesJSON(names: Iterable[str], first: bool) -> bytes:
    """Entries of the JSON list; C{first}: no entry precedes these."""
    text = ",".join(f'{{"name":{_jsonString(name)}}}' for name in names)
    if text and not first:
        text = "," + text
    return text.encode("ascii")


def indexHeadHTML(title: str) -> bytes:
    return _encodeHTML(_head(title))


def indexEntriesHTML(names: Iterable[str]) -> bytes:
    parts = []
    for name in names:
        href = escape(_requote(canonicalize_name(name)), quote=True)
        parts.append(f'<a href="{href}/">{escape(name, quote=True)}</a><br>\n')
    return _encodeHTML("".join(parts))
