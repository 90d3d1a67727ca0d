# -*- test-case-name: tests.test_upstreampage -*-
"""
PEP 503 HTML project pages.

Pure code: no I/O, no Twisted.
"""

import re
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from devpi_twisted.model.upstream.common import (
    UpstreamLink,
    UpstreamPageError,
    UpstreamProject,
    checkMajor,
    distributionVersion,
    fragmentHashes,
    linkOf,
    resolveHTTP,
    sortedVersions,
    uniqueLinks,
    validDigest,
    validStatus,
)


def decodeHTML(body: bytes, charset: str | None) -> str:
    """Decode an HTML body with its declared charset, falling back to UTF-8."""
    if charset:
        try:
            return body.decode(charset, "replace")
        except (LookupError, ValueError, TypeError):
            pass
    return body.decode("utf-8", "replace")



def _htmlSize(value: str | None) -> int | None:
    """An HTML C{data-size}: decimal digits."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None



def _htmlYanked(value: str | None) -> bool | str:
    """HTML C{data-yanked}, known to be present: a bare or empty attribute is a yank without reason."""
    if value is None or not value.strip():
        return True
    return value



def _filenameFromURL(url: str) -> str:
    """The percent-decoded last path segment of an absolute URL."""
    path = urlsplit(url).path
    return unquote(path.rpartition("/")[2])



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
    digest = validDigest(name, digest.strip()) if sep else None
    if digest is None:
        return False
    return digest if name == "sha256" else True


def parseHTMLPage(text: str, pageURL: str, project: str) -> UpstreamProject:
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
        checkMajor(version, "pypi:repository-version")

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
    unique = uniqueLinks(links)
    status, reason = validStatus(
        collector.meta.get("pypi:project-status"),
        collector.meta.get("pypi:project-status-reason"),
    )
    versions = sortedVersions({link.version for link in unique if link.version})
    return UpstreamProject(project, unique, versions, status, reason)


def _htmlLink(attributes: dict[str, str | None], base: str, project: str) -> UpstreamLink | None:
    resolved = resolveHTTP(base, attributes["href"] or "")
    if resolved is None:
        return None
    url, fragment = resolved
    filename = _filenameFromURL(url)
    matches, version = distributionVersion(filename, project)
    if not matches:
        return None
    hashes = fragmentHashes(fragment)
    if "data-core-metadata" in attributes:
        coreMetadata = _htmlCoreMetadata(attributes["data-core-metadata"])
    else:
        coreMetadata = _htmlCoreMetadata(attributes.get("data-dist-info-metadata"))
    return linkOf(
        filename, url, base, hashes, version,
        requiresPython=attributes.get("data-requires-python"),
        yanked=_htmlYanked(attributes["data-yanked"]) if "data-yanked" in attributes else False,
        size=_htmlSize(attributes.get("data-size")),
        uploadTime=attributes.get("data-upload-time"),
        coreMetadata=coreMetadata,
        provenance=attributes.get("data-provenance"),
    )
