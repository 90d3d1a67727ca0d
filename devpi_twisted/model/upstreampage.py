# -*- test-case-name: tests.test_upstreampage -*-
"""
Reading an upstream index's simple pages (PEP 503 HTML and PEP 691 JSON).

A caching mirror fetches C{<upstream>/<project>/} and needs, per file, the
facts the simple API carries: where the file is, its hashes, its
C{Requires-Python}, whether it is yanked, its size and upload time, and
whether a C{.metadata} file exists.  L{parseProjectPage} turns a response
body into an L{UpstreamProject}; L{toSimpleFile} turns one of its links into
the record our own pages are rendered from.

The project list (C{<upstream>/}) can be hundreds of megabytes, so
L{ProjectListScanner} reads it incrementally and holds only the construct
it is in the middle of; L{parseProjectList} is the one-shot form.

Upstream content is untrusted.  Every parser here either returns a result
or raises L{UpstreamPageError}; links that point anywhere but http(s), or
whose file name is not a distribution of the requested project, are
dropped rather than passed on.

Pure code: no I/O, no Twisted.
"""

import hashlib
import html
import json
import re
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from devpi_twisted.model.names import isValidProjectName
from devpi_twisted.model.simplepage import SimpleFile

__all__ = [
    "MAX_PAGE_SIZE",
    "MAX_LIST_CONSTRUCT",
    "ProjectListScanner",
    "UpstreamLink",
    "UpstreamPageError",
    "UpstreamProject",
    "parseProjectList",
    "parseProjectPage",
    "toSimpleFile",
]

# Largest project page we agree to parse.  PyPI's biggest pages are a few
# megabytes; callers should stop reading long before this.
MAX_PAGE_SIZE = 64 * 1024 * 1024

# Longest single construct (tag, comment, anchor, JSON token) the project
# list scanner will hold while waiting for the rest of it.
MAX_LIST_CONSTRUCT = 64 * 1024

_JSON_TYPES = frozenset({
    "application/vnd.pypi.simple.v1+json",
    "application/vnd.pypi.simple.latest+json",
    "application/json",
})
_HTML_TYPES = frozenset({
    "text/html",
    "application/xhtml+xml",
    "application/vnd.pypi.simple.v1+html",
    "application/vnd.pypi.simple.latest+html",
})
_PYPI_TYPE = re.compile(r"application/vnd\.pypi\.simple\.v(\d+)\+(json|html)\Z")

_KNOWN_STATUSES = frozenset({"active", "archived", "quarantined", "deprecated"})
_WHITESPACE = b" \t\r\n\f"
_BOM = b"\xef\xbb\xbf"
_HEX = re.compile(r"[0-9a-fA-F]+\Z")
_UPLOAD_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?Z\Z", re.ASCII
)
_BAD_FILENAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
_SDIST_EXTENSIONS = (".tar.gz", ".zip", ".tgz", ".tar.bz2")


class UpstreamPageError(ValueError):
    """An upstream response is not a simple page we can use."""


def _hashLengths() -> dict[str, int]:
    """Every fixed-size hashlib algorithm this Python can compute, with its hex length."""
    lengths = {}
    for name in hashlib.algorithms_guaranteed | hashlib.algorithms_available:
        try:
            size = hashlib.new(name).digest_size
        except (ValueError, TypeError):
            continue
        if size > 0:
            lengths[name.lower()] = size * 2
    return lengths


_HASH_HEX_LENGTHS = _hashLengths()


@dataclass(frozen=True)
class UpstreamLink:
    """
    One file listed on an upstream project page.

    @ivar url: absolute http(s) URL without fragment.
    @ivar sha256: lowercase hex, or L{None} when upstream gave none.
    @ivar hashes: every usable hash upstream gave, name to lowercase hex.
    @ivar yanked: L{False}, L{True} or a non-empty reason.
    @ivar uploadTime: upstream's value if it has the PEP 700 form.
    @ivar coreMetadata: L{False}; L{True} when a C{.metadata} file is
        advertised without a sha256; or that file's sha256.
    @ivar provenance: absolute http(s) URL of the PEP 740 provenance.
    @ivar version: the version in the file name, normalised, or L{None}
        when the name has no PEP 440 version (and for eggs).
    """

    filename: str
    url: str
    sha256: str | None
    hashes: dict[str, str]
    requiresPython: str | None
    yanked: bool | str
    size: int | None
    uploadTime: str | None
    coreMetadata: str | bool
    provenance: str | None
    version: str | None


@dataclass(frozen=True)
class UpstreamProject:
    """
    What an upstream project page says.

    @ivar name: the normalised project name that was asked for.
    @ivar versions: upstream's C{versions} list when it sent one, otherwise
        the versions of the links.
    @ivar status: a PEP 792 status, or L{None} when upstream gave none or
        an unknown one (both mean C{active}).
    """

    name: str
    links: tuple[UpstreamLink, ...]
    versions: tuple[str, ...]
    status: str | None
    statusReason: str | None


# -- small value checks ------------------------------------------------------


def _hexDigest(name: str, value: Any) -> str | None:
    """The lowercase hex digest if C{value} is a well-formed C{name} digest."""
    if not isinstance(value, str):
        return None
    expected = _HASH_HEX_LENGTHS.get(name)
    if expected is None or len(value) != expected or _HEX.match(value) is None:
        return None
    return value.lower()


def _cleanHashes(pairs: Any) -> dict[str, str]:
    """Keep the C{(name, hex)} pairs naming a hashlib algorithm with a valid digest."""
    hashes: dict[str, str] = {}
    for name, value in pairs:
        if not isinstance(name, str):
            continue
        name = name.strip().lower()
        digest = _hexDigest(name, value.strip() if isinstance(value, str) else value)
        if digest is not None and name not in hashes:
            hashes[name] = digest
    return hashes


def _fragmentHashes(fragment: str) -> dict[str, str]:
    """Hashes from a URL fragment such as C{sha256=...} or C{egg=x&md5=...}."""
    pairs = []
    for part in fragment.split("&"):
        name, sep, value = part.partition("=")
        if sep:
            pairs.append((name, value))
    return _cleanHashes(pairs)


def _uploadTime(value: Any) -> str | None:
    """C{value} if it is a real UTC time in the PEP 700 format."""
    if not isinstance(value, str):
        return None
    match = _UPLOAD_TIME.match(value)
    if match is None:
        return None
    try:
        datetime(*(int(group) for group in match.groups()[:6]))
    except ValueError:
        return None
    return value


def _jsonSize(value: Any) -> int | None:
    """A JSON C{size}: a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _htmlSize(value: str | None) -> int | None:
    """An HTML C{data-size}: decimal digits."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


def _requiresPython(value: Any) -> str | None:
    """A non-blank specifier string, as given."""
    if isinstance(value, str) and value.strip():
        return value
    return None


def _jsonYanked(value: Any) -> bool | str:
    """
    JSON C{yanked}: a reason string, C{true}, or not yanked.  The empty
    string means not yanked, as pip reads it; anything else truthy counts
    as yanked, because a mirror must never lose a yank.
    """
    if isinstance(value, str):
        return value if value else False
    return bool(value)


def _htmlYanked(value: str | None) -> bool | str:
    """HTML C{data-yanked}, known to be present: a bare or empty attribute is a yank without reason."""
    if value is None or not value.strip():
        return True
    return value


def _status(status: Any, reason: Any) -> tuple[str | None, str | None]:
    """A known PEP 792 status and its reason; unknown statuses mean C{active}."""
    if not isinstance(status, str):
        return None, None
    status = status.strip().lower()
    if status not in _KNOWN_STATUSES:
        return None, None
    if not isinstance(reason, str) or not reason.strip():
        reason = None
    return status, reason


def _checkMajor(version: Any, what: str) -> None:
    """Refuse an API version whose major is not 1 (PEP 629 / PEP 691)."""
    if not isinstance(version, str):
        raise UpstreamPageError(f"{what} is not a string")
    major = version.strip().partition(".")[0]
    if major != "1":
        raise UpstreamPageError(f"unsupported simple API version {version[:20]!r}")


def _resolve(base: str, href: str) -> tuple[str, str] | None:
    """
    Resolve C{href} against C{base}; return C{(url without fragment,
    fragment)} if the result is an http(s) URL with a host.
    """
    href = href.strip(" \t\n\r\f")
    try:
        url = urljoin(base, href) if base else href
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        return None
    url, _, fragment = url.partition("#")
    return url, fragment


def _filenameFromURL(url: str) -> str:
    """The percent-decoded last path segment of an absolute URL."""
    path = urlsplit(url).path
    return unquote(path.rpartition("/")[2])


def _distributionVersion(filename: str, project: str) -> tuple[bool, str | None]:
    """
    Whether C{filename} is a distribution of C{project}, and its version.

    Wheels must have a valid wheel name.  Sdists are matched by the name
    part before a C{-}; legacy sdists whose version is not PEP 440 are kept
    with no version as long as that part starts with a digit, unless the
    file name parses as another project's sdist.  Eggs are matched by
    their first C{-}-separated part and carry no version.
    """
    if not filename or filename in (".", "..") or _BAD_FILENAME_CHARS.search(filename):
        return False, None
    lower = filename.lower()
    if lower.endswith(".whl"):
        try:
            name, version, _, _ = parse_wheel_filename(filename)
        except ValueError:
            return False, None
        if name != project:
            return False, None
        return True, str(version)
    if lower.endswith(".egg"):
        parts = filename[: -len(".egg")].split("-")
        return (len(parts) >= 2 and bool(parts[1]) and canonicalize_name(parts[0]) == project), None
    for extension in _SDIST_EXTENSIONS:
        if lower.endswith(extension):
            stem = filename[: -len(extension)]
            break
    else:
        return False, None
    try:
        name, version = parse_sdist_filename(stem + ".tar.gz")
    except ValueError:
        pass
    else:
        if name == project:
            return True, str(version)
        return False, None
    for index, char in enumerate(stem):
        if char != "-" or canonicalize_name(stem[:index]) != project:
            continue
        rest = stem[index + 1:]
        try:
            return True, str(Version(rest))
        except InvalidVersion:
            if rest[:1].isdigit():
                return True, None
    return False, None


def _sortedVersions(versions: set[str]) -> tuple[str, ...]:
    """PEP 440 order, unparseable versions last."""
    def key(version: str) -> tuple:
        try:
            return (0, Version(version), version)
        except InvalidVersion:
            return (1, version)
    return tuple(sorted(versions, key=key))


def _rank(link: UpstreamLink) -> int:
    """How much a link's hashes are worth when two links share a file name."""
    if link.sha256:
        return 2
    return 1 if link.hashes else 0


def _dedupe(links: list[UpstreamLink]) -> tuple[UpstreamLink, ...]:
    """One link per file name, in first-seen order, a hashed one winning."""
    chosen: dict[str, UpstreamLink] = {}
    for link in links:
        current = chosen.get(link.filename)
        if current is None or _rank(link) > _rank(current):
            chosen[link.filename] = link
    return tuple(chosen.values())


# -- content type and body sniffing ------------------------------------------


def _text(value: Any) -> str | None:
    """Header-ish values may arrive as bytes (Twisted) or str."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return value if isinstance(value, str) else None


def _mediaType(contentType: Any) -> tuple[str | None, str | None]:
    """C{(lowercase media type, charset)} of a C{Content-Type} value."""
    text = _text(contentType)
    if text is None:
        return None, None
    mediaType, _, params = text.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').strip() or None
    return mediaType.strip().lower() or None, charset


def _classify(mediaType: str | None) -> str | None:
    """C{"json"}, C{"html"} or L{None} (no type given); raise for anything else."""
    if mediaType is None:
        return None
    if mediaType in _JSON_TYPES:
        return "json"
    if mediaType in _HTML_TYPES:
        return "html"
    match = _PYPI_TYPE.match(mediaType)
    if match is not None:
        raise UpstreamPageError(f"unsupported simple API version v{match.group(1)[:10]}")
    raise UpstreamPageError(f"unexpected content type {mediaType[:100]!r}")


def _bytes(body: Any) -> bytes:
    """The body as bytes; only bytes-like or text bodies make sense."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    raise UpstreamPageError("the page body is not bytes")


def _decode(body: bytes, charset: str | None) -> str:
    """Decode an HTML body with its declared charset, falling back to UTF-8."""
    if charset:
        try:
            return body.decode(charset, "replace")
        except (LookupError, ValueError, TypeError):
            pass
    return body.decode("utf-8", "replace")


# -- project pages -----------------------------------------------------------


def parseProjectPage(body: bytes, contentType: str | None, pageURL: str, project: str) -> UpstreamProject:
    """
    Parse an upstream project page.

    The page is JSON when C{contentType} is a PEP 691 JSON type (or plain
    C{application/json}) or when the body starts with C{{}; otherwise it is
    PEP 503 HTML, which needs an HTML content type or none.

    @param body: the response body.
    @param contentType: the response's C{Content-Type}, or L{None}.
    @param pageURL: the final URL of the response, after redirects;
        relative links are resolved against it (or against C{<base href>}).
    @param project: the project that was asked for; files of other
        projects are left out.
    @raise UpstreamPageError: if the body is not a usable simple page.
        Nothing else is raised, whatever the input.
    """
    try:
        return _parseProjectPage(body, contentType, pageURL, project)
    except UpstreamPageError:
        raise
    except RecursionError:
        raise UpstreamPageError("the page is nested too deeply") from None
    except Exception as e:
        raise UpstreamPageError(f"cannot read the page ({e.__class__.__name__})") from e


def _parseProjectPage(body: Any, contentType: Any, pageURL: Any, project: Any) -> UpstreamProject:
    body = _bytes(body)
    if len(body) > MAX_PAGE_SIZE:
        raise UpstreamPageError(f"the page is larger than {MAX_PAGE_SIZE} bytes")
    if body.startswith(_BOM):
        body = body[len(_BOM):]
    pageURL = _text(pageURL) or ""
    project = canonicalize_name(_text(project) or "")
    mediaType, charset = _mediaType(contentType)
    contentTypeError = None
    try:
        kind = _classify(mediaType)
    except UpstreamPageError as e:
        kind, contentTypeError = "other", e
    stripped = body.lstrip(_WHITESPACE)
    # A body that starts with "{" is JSON whatever its label says.
    if stripped.startswith(b"{") or kind == "json":
        return _parseJSONPage(stripped, pageURL, project)
    if contentTypeError is not None:
        raise contentTypeError
    return _parseHTMLPage(_decode(body, charset), pageURL, project)


def _parseJSONPage(body: bytes, pageURL: str, project: str) -> UpstreamProject:
    try:
        document = json.loads(body)
    except ValueError as e:
        raise UpstreamPageError(f"the page is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(document, dict):
        raise UpstreamPageError("the JSON page is not an object")
    meta = document.get("meta")
    if not isinstance(meta, dict):
        raise UpstreamPageError("the JSON page has no meta object")
    _checkMajor(meta.get("api-version"), "meta.api-version")
    files = document.get("files")
    if not isinstance(files, list):
        raise UpstreamPageError("the JSON page has no files list")

    links = []
    for entry in files:
        if isinstance(entry, dict):
            link = _jsonLink(entry, pageURL, project)
            if link is not None:
                links.append(link)
    unique = _dedupe(links)

    versions = document.get("versions")
    if isinstance(versions, list):
        versions = tuple(dict.fromkeys(v for v in versions if isinstance(v, str) and v))
    else:
        versions = _sortedVersions({link.version for link in unique if link.version})

    projectStatus = document.get("project-status")
    if not isinstance(projectStatus, dict):
        # The spec's worked example once put it under meta.
        projectStatus = meta.get("project-status")
    status, reason = (
        _status(projectStatus.get("status"), projectStatus.get("reason"))
        if isinstance(projectStatus, dict) else (None, None)
    )
    return UpstreamProject(project, unique, versions, status, reason)


def _jsonCoreMetadata(entry: dict) -> str | bool:
    """The C{core-metadata} value, or its deprecated aliases."""
    for key in ("core-metadata", "dist-info-metadata", "data-dist-info-metadata"):
        if key in entry:
            value = entry[key]
            break
    else:
        return False
    if value is True:
        return True
    if isinstance(value, dict):
        return _hexDigest("sha256", value.get("sha256")) or True
    return False


def _jsonLink(entry: dict, pageURL: str, project: str) -> UpstreamLink | None:
    filename = entry.get("filename")
    url = entry.get("url")
    if not isinstance(filename, str) or not isinstance(url, str):
        return None
    matches, version = _distributionVersion(filename, project)
    if not matches:
        return None
    resolved = _resolve(pageURL, url)
    if resolved is None:
        return None
    url, fragment = resolved
    hashes = entry.get("hashes")
    hashes = _cleanHashes(hashes.items()) if isinstance(hashes, dict) else {}
    for name, digest in _fragmentHashes(fragment).items():
        hashes.setdefault(name, digest)
    provenance = entry.get("provenance")
    provenance = _resolve(pageURL, provenance) if isinstance(provenance, str) else None
    return UpstreamLink(
        filename=filename,
        url=url,
        sha256=hashes.get("sha256"),
        hashes=hashes,
        requiresPython=_requiresPython(entry.get("requires-python")),
        yanked=_jsonYanked(entry.get("yanked")),
        size=_jsonSize(entry.get("size")),
        uploadTime=_uploadTime(entry.get("upload-time")),
        coreMetadata=_jsonCoreMetadata(entry),
        provenance=provenance[0] if provenance else None,
        version=version,
    )


_TAG_START = re.compile(r"<[!/?a-zA-Z]")


class _PageCollector(HTMLParser):
    """Collects anchors, the first C{<base href>} and the C{pypi:} meta tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[dict[str, str | None]] = []
        self.base: str | None = None
        self.meta: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("a", "base", "meta"):
            return
        attributes: dict[str, str | None] = {}
        for name, value in attrs:
            # The first occurrence of an attribute wins, as in browsers.
            attributes.setdefault(name, value)
        if tag == "a":
            if attributes.get("href") is not None:
                self.anchors.append(attributes)
        elif tag == "base":
            if self.base is None and attributes.get("href") is not None:
                self.base = attributes["href"]
        else:
            name = attributes.get("name")
            content = attributes.get("content")
            if name is not None and content is not None:
                self.meta.setdefault(name.strip().lower(), content)


def _htmlCoreMetadata(value: str | None) -> str | bool:
    """C{data-core-metadata}: C{true}, C{<hash>=<hex>}, or not advertised."""
    if value is None:
        return False
    value = value.strip()
    if value.lower() == "true":
        return True
    name, sep, digest = value.partition("=")
    name = name.strip().lower()
    digest = _hexDigest(name, digest.strip()) if sep else None
    if digest is None:
        return False
    return digest if name == "sha256" else True


def _parseHTMLPage(text: str, pageURL: str, project: str) -> UpstreamProject:
    if "\x00" in text:
        raise UpstreamPageError("the page contains NUL characters; it is not HTML")
    if _TAG_START.search(text) is None:
        raise UpstreamPageError("the page is neither HTML nor JSON")
    collector = _PageCollector()
    try:
        collector.feed(text)
        collector.close()
    except AssertionError as e:
        # html.parser reports some malformed declarations this way.
        raise UpstreamPageError(f"malformed HTML: {str(e)[:200]}") from None

    version = collector.meta.get("pypi:repository-version")
    if version is not None:
        _checkMajor(version, "pypi:repository-version")

    base = pageURL
    if collector.base is not None:
        try:
            base = urljoin(pageURL, collector.base.strip(" \t\n\r\f"))
        except ValueError:
            base = pageURL

    links = []
    for attributes in collector.anchors:
        link = _htmlLink(attributes, base, project)
        if link is not None:
            links.append(link)
    unique = _dedupe(links)
    status, reason = _status(
        collector.meta.get("pypi:project-status"),
        collector.meta.get("pypi:project-status-reason"),
    )
    versions = _sortedVersions({link.version for link in unique if link.version})
    return UpstreamProject(project, unique, versions, status, reason)


def _htmlLink(attributes: dict[str, str | None], base: str, project: str) -> UpstreamLink | None:
    resolved = _resolve(base, attributes["href"] or "")
    if resolved is None:
        return None
    url, fragment = resolved
    filename = _filenameFromURL(url)
    matches, version = _distributionVersion(filename, project)
    if not matches:
        return None
    hashes = _fragmentHashes(fragment)
    if "data-core-metadata" in attributes:
        coreMetadata = _htmlCoreMetadata(attributes["data-core-metadata"])
    else:
        coreMetadata = _htmlCoreMetadata(attributes.get("data-dist-info-metadata"))
    provenance = attributes.get("data-provenance")
    provenance = _resolve(base, provenance) if provenance else None
    return UpstreamLink(
        filename=filename,
        url=url,
        sha256=hashes.get("sha256"),
        hashes=hashes,
        requiresPython=_requiresPython(attributes.get("data-requires-python")),
        yanked=_htmlYanked(attributes["data-yanked"]) if "data-yanked" in attributes else False,
        size=_htmlSize(attributes.get("data-size")),
        uploadTime=_uploadTime(attributes.get("data-upload-time")),
        coreMetadata=coreMetadata,
        provenance=provenance[0] if provenance else None,
        version=version,
    )


def toSimpleFile(link: UpstreamLink, url: str) -> SimpleFile:
    """
    The record our own pages render for an upstream link served at C{url}.

    L{SimpleFile} has no way to say "size unknown": when upstream gave no
    size (HTML pages usually don't) the record carries C{-1}, and whoever
    renders it must leave the size out rather than print C{-1}.  A
    C{.metadata} file advertised without a sha256 is not carried over,
    because L{SimpleFile} can only advertise one it has the hash of; the
    caller must only render C{coreMetadataSha256} if it really proxies the
    C{.metadata} file.  A missing sha256 becomes the empty string, which
    the renderers treat as "no hash".
    """
    return SimpleFile(
        filename=link.filename,
        url=url,
        sha256=link.sha256 or "",
        size=link.size if link.size is not None else -1,
        uploadTime=link.uploadTime,
        requiresPython=link.requiresPython,
        yanked=link.yanked,
        coreMetadataSha256=link.coreMetadata if isinstance(link.coreMetadata, str) else None,
        provenanceURL=link.provenance,
        version=link.version,
    )


# -- the project list --------------------------------------------------------


def _validName(name: str) -> str | None:
    """C{name} stripped, if it is a valid project name (the one rule, PEP 508)."""
    name = name.strip()
    return name if isValidProjectName(name) else None


def parseProjectList(body: bytes, contentType: str | None) -> list[str]:
    """
    The project names on an upstream root page, in page order.

    JSON pages give C{projects[].name}; HTML pages give the text of each
    anchor.  Names that are not valid project names are left out.

    @raise UpstreamPageError: if the body is not a usable project list.
    """
    scanner = ProjectListScanner(contentType)
    names = scanner.feed(body)
    names.extend(scanner.close())
    return names


# Pieces of the HTML list scanner.
_COMMENT_START = b"<!--"
_COMMENT_END = b"-->"
_ANCHOR = re.compile(
    rb"<a(?:[\s/](?:[^>\"']|\"[^\"]*\"|'[^']*')*)?>(.*?)</a[\s]*>", re.I | re.S
)
_OTHER_TAG = re.compile(rb"<[^>\"']*(?:(?:\"[^\"]*\"|'[^']*')[^>\"']*)*>")
_INNER_TAG = re.compile(rb"<[^>]*>")
_ATTRIBUTE = re.compile(
    rb"([^\s\"'>/=]+)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>]+)))?"
)
_TAG_OPENER = frozenset(b"!/?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Pieces of the JSON list scanner.
_MAX_JSON_DEPTH = 64
_JSON_WS = re.compile(rb"[ \t\r\n]*")
_JS = rb"[ \t\r\n]*"
_JSTR = rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_JNUMBER = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JSON_STRING = re.compile(_JSTR)
_JSON_STRING_PREFIX = re.compile(
    rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,3})?)?\Z'
)
_JSON_NUMBER = re.compile(_JNUMBER)
_JSON_NUMBER_RUN = re.compile(rb"[0-9eE.+-]*")
_JSON_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
# A whole project object with one "name" key and other plain keys (no
# escapes) holding scalars: the common case, read in one regex match.
_JPLAIN_MEMBER = (
    rb'"(?!name")[^"\\\x00-\x1f]*"' + _JS + rb":" + _JS
    + rb"(?:" + _JSTR + rb"|" + _JNUMBER + rb"|true|false|null)" + _JS
)
_JSON_FAST_PROJECT = re.compile(
    rb"\{" + _JS + rb"(?:" + _JPLAIN_MEMBER + rb"," + _JS + rb")*"
    + rb'"name"' + _JS + rb":" + _JS + rb"(" + _JSTR + rb")" + _JS
    + rb"(?:," + _JS + _JPLAIN_MEMBER + rb")*\}"
)

# What a JSON container is, in a project list.
_ROOT, _META, _PROJECTS, _PROJECT, _OTHER = range(5)
# What a value fills: the top-level document, a slot of a container of the
# roles above, or the two scalars we read.
_SLOT_ROOT, _SLOT_META, _SLOT_PROJECTS, _SLOT_PROJECT, _SLOT_NAME, _SLOT_API_VERSION, _SLOT_OTHER = range(7)
# States of an open JSON container.
_KEY_OR_END, _KEY, _COLON, _VALUE, _VALUE_OR_END, _COMMA_OR_END = range(6)


class _Frame:
    """One open JSON object or array."""

    __slots__ = ("isObject", "state", "role", "key", "name")

    def __init__(self, isObject: bool, role: int) -> None:
        self.isObject = isObject
        self.state = _KEY_OR_END if isObject else _VALUE_OR_END
        self.role = role
        self.key: bytes | None = None
        self.name: str | None = None


def _jsonStringValue(token: bytes) -> str:
    """Decode a complete JSON string token."""
    inner = token[1:-1]
    if b"\\" not in inner:
        return inner.decode("utf-8", "replace")
    return json.loads(token.decode("utf-8", "replace"))


class ProjectListScanner:
    """
    Read a project list (PEP 503 HTML or PEP 691 JSON) as it arrives.

    Feed the body in chunks of any size; each L{feed} returns the names
    completed by that chunk and L{close} returns the rest.  The result
    does not depend on where the body is split.  Only the construct
    currently being read is held (a tag, comment, anchor or JSON token), at
    most L{MAX_LIST_CONSTRUCT} bytes; a longer one is an error, as is JSON
    nested deeper than 64 levels.

    JSON must be an object with C{meta.api-version} 1.x and a C{projects}
    array; entries that are not objects, or whose C{name} is not a string,
    are skipped.  HTML gives the text of every anchor outside comments.
    Names that are not valid project names are skipped.  After an error
    the scanner refuses further input.
    """

    def __init__(self, contentType: str | None) -> None:
        mediaType, _ = _mediaType(contentType)
        self._contentTypeError: UpstreamPageError | None = None
        try:
            self._declared = _classify(mediaType)
        except UpstreamPageError as e:
            self._declared = "other"
            self._contentTypeError = e
        self._kind: str | None = None
        self._buf = b""
        self._started = False
        self._failed: UpstreamPageError | None = None
        self._closed = False
        # HTML state
        self._sawTag = False
        # JSON state
        self._stack: list[_Frame] = []
        self._done = False
        self._sawAPIVersion = False
        self._sawProjects = False

    @property
    def buffered(self) -> int:
        """How many bytes the scanner currently holds."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[str]:
        """
        Take the next piece of the body.

        @return: the names completed by this piece.
        @raise UpstreamPageError: if the body is not a usable project list.
        """
        return self._guarded(chunk, final=False)

    def close(self) -> list[str]:
        """
        Signal the end of the body.

        @return: the names not yet returned.
        @raise UpstreamPageError: if the body was not a complete project list.
        """
        return self._guarded(b"", final=True)

    def _guarded(self, chunk: Any, final: bool) -> list[str]:
        """Run one step; any failure becomes a sticky L{UpstreamPageError}."""
        if self._failed is not None:
            raise self._failed
        if self._closed:
            error = UpstreamPageError("the scanner is already closed")
        else:
            self._closed = final
            try:
                return self._step(_bytes(chunk), final)
            except UpstreamPageError as e:
                error = e
            except RecursionError:
                error = UpstreamPageError("the list is nested too deeply")
            except Exception as e:
                error = UpstreamPageError(f"cannot read the list ({e.__class__.__name__})")
        self._failed = error
        self._buf = b""
        self._stack = []
        raise error

    def _step(self, chunk: bytes, final: bool) -> list[str]:
        buf = self._buf + chunk if self._buf else chunk
        if self._kind is None:
            buf = self._sniff(buf, final)
            if self._kind is None:
                self._buf = buf
                if final:
                    raise UpstreamPageError("the list is empty")
                return []
        self._buf = buf
        if self._kind == "json":
            return self._scanJSON(final)
        return self._scanHTML(final)

    def _sniff(self, buf: bytes, final: bool) -> bytes:
        """Skip a BOM and leading whitespace, then decide between JSON and HTML."""
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf) and not final:
                return buf
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[len(_BOM):]
        buf = buf.lstrip(_WHITESPACE)
        if not buf:
            return b""
        if buf[:1] == b"{":
            self._kind = "json"
        elif self._declared == "json":
            raise UpstreamPageError("the list is declared JSON but is not a JSON object")
        elif self._contentTypeError is not None:
            raise self._contentTypeError
        else:
            self._kind = "html"
        return buf

    # -- HTML --

    def _scanHTML(self, final: bool) -> list[str]:
        buf = self._buf
        if b"\x00" in buf:
            raise UpstreamPageError("the list contains NUL bytes; it is not HTML")
        names: list[str] = []
        size = len(buf)
        pos = 0
        while True:
            lt = buf.find(b"<", pos)
            if lt < 0:
                pos = size
                break
            if lt + 1 >= size:
                # A lone "<" at the end: we cannot tell yet what it starts.
                pos = size if final else lt
                break
            opener = buf[lt + 1]
            if opener not in _TAG_OPENER:
                pos = lt + 1
                continue
            limit = lt + MAX_LIST_CONSTRUCT
            head = buf[lt:lt + 4]
            if opener == 0x21 and _COMMENT_START.startswith(head):  # "<!", "<!-" or "<!--"
                if head != _COMMENT_START:
                    pos = size if final else lt
                    break
                end = buf.find(_COMMENT_END, lt + 4, limit)
                if end < 0:
                    if size >= limit:
                        raise UpstreamPageError("a comment in the list is too long")
                    pos = size if final else lt
                    break
                self._sawTag = True
                pos = end + len(_COMMENT_END)
                continue
            if opener in b"aA":
                if lt + 2 >= size and not final:
                    pos = lt
                    break
                if lt + 2 >= size or buf[lt + 2] in b" \t\r\n\f/>":
                    match = _ANCHOR.match(buf, lt, min(size, limit))
                    if match is None:
                        if size >= limit:
                            raise UpstreamPageError("an anchor in the list is too long")
                        pos = size if final else lt
                        break
                    self._sawTag = True
                    name = self._anchorName(match.group(1))
                    if name is not None:
                        names.append(name)
                    pos = match.end()
                    continue
            match = _OTHER_TAG.match(buf, lt, min(size, limit))
            if match is None:
                if size >= limit:
                    raise UpstreamPageError("a tag in the list is too long")
                pos = size if final else lt
                break
            self._sawTag = True
            if buf[lt + 1:lt + 5].lower() == b"meta":
                self._checkMeta(match.group())
            pos = match.end()
        self._buf = buf[pos:]
        if final and not self._sawTag:
            raise UpstreamPageError("the list is neither HTML nor JSON")
        return names

    @staticmethod
    def _anchorName(inner: bytes) -> str | None:
        """The project name an anchor's content gives, if valid."""
        text = _INNER_TAG.sub(b"", inner).decode("utf-8", "replace")
        return _validName(html.unescape(text))

    @staticmethod
    def _checkMeta(tag: bytes) -> None:
        """Refuse an HTML list whose C{pypi:repository-version} major is not 1."""
        attributes: dict[bytes, bytes] = {}
        for match in _ATTRIBUTE.finditer(tag, 5, len(tag) - 1):
            value = match.group(2) or match.group(3) or match.group(4) or b""
            attributes.setdefault(match.group(1).lower(), value)
        name = html.unescape(attributes.get(b"name", b"").decode("utf-8", "replace"))
        if name.strip().lower() == "pypi:repository-version":
            _checkMajor(
                html.unescape(attributes.get(b"content", b"").decode("utf-8", "replace")),
                "pypi:repository-version",
            )

    # -- JSON --

    def _scanJSON(self, final: bool) -> list[str]:
        buf = self._buf
        size = len(buf)
        names: list[str] = []
        stack = self._stack
        pos = 0
        while True:
            pos = _JSON_WS.match(buf, pos).end()
            if pos >= size:
                break
            if self._done:
                raise UpstreamPageError("unexpected data after the JSON document")
            frame = stack[-1] if stack else None
            limit = min(size, pos + MAX_LIST_CONSTRUCT)
            char = buf[pos]

            if char == 0x7B and frame is not None and frame.role == _PROJECTS \
                    and frame.state in (_VALUE, _VALUE_OR_END):
                fast = _JSON_FAST_PROJECT.match(buf, pos, limit)
                if fast is not None:
                    name = _validName(_jsonStringValue(fast.group(1)))
                    if name is not None:
                        names.append(name)
                    frame.state = _COMMA_OR_END
                    pos = fast.end()
                    continue

            if char == 0x22:  # '"'
                match = _JSON_STRING.match(buf, pos, limit)
                if match is None:
                    if size - pos >= MAX_LIST_CONSTRUCT:
                        raise UpstreamPageError("a string in the list is too long")
                    if not final and _JSON_STRING_PREFIX.match(buf, pos):
                        break
                    raise UpstreamPageError("invalid JSON string in the list")
                pos = match.end()
                if frame is not None and frame.isObject and frame.state in (_KEY_OR_END, _KEY):
                    key = match.group()
                    if b"\\" in key:
                        # Compare escaped keys in their plain spelling.
                        key = json.dumps(_jsonStringValue(key)).encode("ascii")
                    frame.key = key
                    frame.state = _COLON
                else:
                    self._scalar(frame, match.group(), True)
                continue
            if char == 0x7B or char == 0x5B:  # "{" "["
                self._open(frame, char == 0x7B)
                pos += 1
                continue
            if char == 0x7D or char == 0x5D:  # "}" "]"
                self._closeContainer(frame, char == 0x7D, names)
                pos += 1
                continue
            if char == 0x3A:  # ":"
                if frame is None or frame.state != _COLON:
                    raise UpstreamPageError("unexpected ':' in the JSON list")
                frame.state = _VALUE
                pos += 1
                continue
            if char == 0x2C:  # ","
                if frame is None or frame.state != _COMMA_OR_END:
                    raise UpstreamPageError("unexpected ',' in the JSON list")
                frame.state = _KEY if frame.isObject else _VALUE
                pos += 1
                continue
            if char == 0x2D or 0x30 <= char <= 0x39:  # "-" or a digit
                # The token is the whole run of number characters; if it
                # reaches the end of the buffer it may go on in the next chunk.
                run = _JSON_NUMBER_RUN.match(buf, pos, limit).end()
                if run == size and not final:
                    if size - pos >= MAX_LIST_CONSTRUCT:
                        raise UpstreamPageError("a number in the list is too long")
                    break
                match = _JSON_NUMBER.match(buf, pos, run)
                if match is None or match.end() != run:
                    raise UpstreamPageError("invalid JSON number in the list")
                pos = run
                self._scalar(frame, match.group(), False)
                continue
            literal = _JSON_LITERALS.get(char)
            if literal is not None:
                if buf.startswith(literal, pos):
                    pos += len(literal)
                    self._scalar(frame, literal, False)
                    continue
                if not final and size - pos < len(literal) and literal.startswith(buf[pos:]):
                    break
            raise UpstreamPageError("invalid JSON in the list")
        self._buf = buf[pos:]
        if final:
            if not self._done:
                raise UpstreamPageError("the JSON list is truncated")
            if not self._sawAPIVersion:
                raise UpstreamPageError("the JSON list has no meta.api-version")
            if not self._sawProjects:
                raise UpstreamPageError("the JSON list has no projects array")
        return names

    def _slot(self, frame: _Frame | None) -> int:
        """Check that a value may start here and say which slot it fills."""
        if frame is None:
            if self._done:
                raise UpstreamPageError("unexpected data after the JSON document")
            return _SLOT_ROOT
        if frame.isObject:
            if frame.state != _VALUE:
                raise UpstreamPageError("unexpected value in the JSON list")
            frame.state = _COMMA_OR_END
            key = frame.key
            if frame.role == _ROOT:
                if key == b'"meta"':
                    return _SLOT_META
                if key == b'"projects"':
                    return _SLOT_PROJECTS
            elif frame.role == _META and key == b'"api-version"':
                return _SLOT_API_VERSION
            elif frame.role == _PROJECT and key == b'"name"':
                return _SLOT_NAME
            return _SLOT_OTHER
        if frame.state not in (_VALUE, _VALUE_OR_END):
            raise UpstreamPageError("unexpected value in the JSON list")
        frame.state = _COMMA_OR_END
        return _SLOT_PROJECT if frame.role == _PROJECTS else _SLOT_OTHER

    def _open(self, frame: _Frame | None, isObject: bool) -> None:
        """Start an object or array."""
        slot = self._slot(frame)
        if len(self._stack) >= _MAX_JSON_DEPTH:
            raise UpstreamPageError("the JSON list is nested too deeply")
        if slot == _SLOT_ROOT:
            if not isObject:
                raise UpstreamPageError("the JSON list is not an object")
            role = _ROOT
        elif slot == _SLOT_META:
            if not isObject:
                raise UpstreamPageError("meta in the JSON list is not an object")
            role = _META
        elif slot == _SLOT_PROJECTS:
            if isObject:
                raise UpstreamPageError("projects in the JSON list is not an array")
            self._sawProjects = True
            role = _PROJECTS
        elif slot == _SLOT_API_VERSION:
            raise UpstreamPageError("meta.api-version in the JSON list is not a string")
        elif slot == _SLOT_PROJECT and isObject:
            role = _PROJECT
        else:
            if slot == _SLOT_NAME:
                # "name" holding a container: this entry has no usable name.
                assert frame is not None
                frame.name = None
            role = _OTHER
        self._stack.append(_Frame(isObject, role))

    def _closeContainer(self, frame: _Frame | None, isObject: bool, names: list[str]) -> None:
        """End an object or array; a project entry yields its name."""
        if frame is None or frame.isObject != isObject:
            raise UpstreamPageError("mismatched bracket in the JSON list")
        if frame.state not in (_KEY_OR_END, _VALUE_OR_END, _COMMA_OR_END):
            raise UpstreamPageError("unexpected end of a container in the JSON list")
        self._stack.pop()
        if frame.role == _PROJECT and frame.name is not None:
            names.append(frame.name)
        if not self._stack:
            self._done = True

    def _scalar(self, frame: _Frame | None, token: bytes, isString: bool) -> None:
        """Take a string, number or literal value."""
        slot = self._slot(frame)
        if slot == _SLOT_ROOT:
            raise UpstreamPageError("the JSON list is not an object")
        if slot == _SLOT_META:
            raise UpstreamPageError("meta in the JSON list is not an object")
        if slot == _SLOT_PROJECTS:
            raise UpstreamPageError("projects in the JSON list is not an array")
        if slot == _SLOT_API_VERSION:
            self._sawAPIVersion = True
            _checkMajor(_jsonStringValue(token) if isString else None, "meta.api-version")
        elif slot == _SLOT_NAME:
            assert frame is not None
            frame.name = _validName(_jsonStringValue(token)) if isString else None
