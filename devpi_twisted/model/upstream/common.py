# -*- test-case-name: tests.test_upstreampage -*-
"""
What the upstream page parsers share: the result types, the one error they
raise, the checks of single values upstream sends (hashes, times, statuses,
URLs, file names) and the reading of a C{Content-Type}.

Upstream content is untrusted: every parser in L{devpi_twisted.model.upstream}
either returns a result or raises L{UpstreamPageError}.

Pure code: no I/O, no Twisted.
"""

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable
from urllib.parse import urljoin, urlsplit

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

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
WHITESPACE = b" \t\r\n\f"
BOM = b"\xef\xbb\xbf"
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


def validDigest(name: str, value: Any) -> str | None:
    """The lowercase hex digest if C{value} is a well-formed C{name} digest."""
    if not isinstance(value, str):
        return None
    expected = _HASH_HEX_LENGTHS.get(name)
    if expected is None or len(value) != expected or _HEX.match(value) is None:
        return None
    return value.lower()


def validHashes(pairs: Any) -> dict[str, str]:
    """Keep the C{(name, hex)} pairs naming a hashlib algorithm with a valid digest."""
    hashes: dict[str, str] = {}
    for name, value in pairs:
        if not isinstance(name, str):
            continue
        name = name.strip().lower()
        digest = validDigest(name, value.strip() if isinstance(value, str) else value)
        if digest is not None and name not in hashes:
            hashes[name] = digest
    return hashes


def fragmentHashes(fragment: str) -> dict[str, str]:
    """Hashes from a URL fragment such as C{sha256=...} or C{egg=x&md5=...}."""
    pairs = []
    for part in fragment.split("&"):
        name, sep, value = part.partition("=")
        if sep:
            pairs.append((name, value))
    return validHashes(pairs)


def validUploadTime(value: Any) -> str | None:
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


def validRequiresPython(value: Any) -> str | None:
    """A non-blank specifier string, as given: an empty one restricts nothing."""
    if isinstance(value, str) and value.strip():
        return value
    return None


def validStatus(status: Any, reason: Any) -> tuple[str | None, str | None]:
    """A known PEP 792 status and its reason; unknown statuses mean C{active}."""
    if not isinstance(status, str):
        return None, None
    status = status.strip().lower()
    if status not in _KNOWN_STATUSES:
        return None, None
    if not isinstance(reason, str) or not reason.strip():
        reason = None
    return status, reason


def checkMajor(version: Any, what: str) -> None:
    """Refuse an API version whose major is not 1 (PEP 629 / PEP 691)."""
    if not isinstance(version, str):
        raise UpstreamPageError(f"{what} is not a string")
    major = version.strip().partition(".")[0]
    if major != "1":
        raise UpstreamPageError(f"unsupported simple API version {version[:20]!r}")


def resolveHTTP(base: str, href: str) -> tuple[str, str] | None:
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


def distributionVersion(filename: str, project: str) -> tuple[bool, str | None]:
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


@lru_cache(maxsize=4096)
def versionKey(version: str) -> tuple:
    """Sort key: PEP 440 versions in order, then the unparseable ones by text."""
    try:
        return (0, Version(version), version)
    except InvalidVersion:
        return (1, version)


def sortedVersions(versions: Iterable[str]) -> tuple[str, ...]:
    """PEP 440 order, unparseable versions last."""
    return tuple(sorted(versions, key=versionKey))


def linkOf(filename: str, url: str, base: str, hashes: dict[str, str], version: str | None, *,
           requiresPython: Any, yanked: bool | str, size: int | None, uploadTime: Any,
           coreMetadata: str | bool, provenance: Any) -> UpstreamLink:
    """
    The link both page formats describe, once their own spellings are
    read: the values both formats spell alike are checked here.
    """
    resolved = resolveHTTP(base, provenance) if isinstance(provenance, str) and provenance else None
    return UpstreamLink(
        filename=filename,
        url=url,
        sha256=hashes.get("sha256"),
        hashes=hashes,
        requiresPython=validRequiresPython(requiresPython),
        yanked=yanked,
        size=size,
        uploadTime=validUploadTime(uploadTime),
        coreMetadata=coreMetadata,
        provenance=resolved[0] if resolved else None,
        version=version,
    )


def _rank(link: UpstreamLink) -> int:
    """How much a link's hashes are worth when two links share a file name."""
    if link.sha256:
        return 2
    return 1 if link.hashes else 0


def uniqueLinks(links: list[UpstreamLink]) -> tuple[UpstreamLink, ...]:
    """One link per file name, in first-seen order, a hashed one winning."""
    chosen: dict[str, UpstreamLink] = {}
    for link in links:
        current = chosen.get(link.filename)
        if current is None or _rank(link) > _rank(current):
            chosen[link.filename] = link
    return tuple(chosen.values())


# -- content type and body sniffing ------------------------------------------


def headerText(value: Any) -> str | None:
    """Header-ish values may arrive as bytes (Twisted) or str."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return value if isinstance(value, str) else None


def parseContentType(contentType: Any) -> tuple[str | None, str | None]:
    """C{(lowercase media type, charset)} of a C{Content-Type} value."""
    text = headerText(contentType)
    if text is None:
        return None, None
    mediaType, _, params = text.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').strip() or None
    return mediaType.strip().lower() or None, charset


def classifyMediaType(mediaType: str | None) -> str | None:
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


def declaredKind(contentType: Any) -> tuple[str | None, str | None, UpstreamPageError | None]:
    """
    C{(kind, charset, error)} of a C{Content-Type}: kind C{"json"},
    C{"html"}, L{None} when no type is given, or C{"other"} with the error
    to raise unless the body turns out to be JSON.
    """
    mediaType, charset = parseContentType(contentType)
    try:
        return classifyMediaType(mediaType), charset, None
    except UpstreamPageError as e:
        return "other", charset, e


def bodyBytes(body: Any) -> bytes:
    """The body as bytes; only bytes-like or text bodies make sense."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    raise UpstreamPageError("the page body is not bytes")
