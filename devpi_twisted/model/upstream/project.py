# -*- test-case-name: tests.test_upstreampage -*-
"""
An upstream project page, JSON or HTML, read into an L{UpstreamProject}.

A caching mirror fetches C{<upstream>/<project>/} and needs, per file, the
facts the simple API carries: where the file is, its hashes, its
C{Requires-Python}, whether it is yanked, its size and upload time, and
whether a C{.metadata} file exists.  L{parseProjectPage} picks the parser
(L{devpi_twisted.model.upstream.jsonpage} or
L{devpi_twisted.model.upstream.htmlpage}) from the body and its
C{Content-Type}; L{toSimpleFile} turns one of the links into the record our
own pages are rendered from.  Links that point anywhere but http(s), or
whose file name is not a distribution of the requested project, are dropped.

Pure code: no I/O, no Twisted.
"""

from typing import Any

from packaging.utils import canonicalize_name

from devpi_twisted.model.simplepage import SimpleFile
from devpi_twisted.model.upstream.common import (
    BOM,
    WHITESPACE,
    UpstreamLink,
    UpstreamPageError,
    UpstreamProject,
    bodyBytes,
    declaredKind,
    headerText,
)
from devpi_twisted.model.upstream.htmlpage import decodeHTML, parseHTMLPage
from devpi_twisted.model.upstream.jsonpage import parseJSONPage

# Largest project page we agree to parse.  PyPI's biggest pages are a few
# megabytes; callers should stop reading long before this.
MAX_PAGE_SIZE = 64 * 1024 * 1024


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
    body = bodyBytes(body)
    if len(body) > MAX_PAGE_SIZE:
        raise UpstreamPageError(f"the page is larger than {MAX_PAGE_SIZE} bytes")
    if body.startswith(BOM):
        body = body[len(BOM):]
    pageURL = headerText(pageURL) or ""
    project = canonicalize_name(headerText(project) or "")
    kind, charset, contentTypeError = declaredKind(contentType)
    stripped = body.lstrip(WHITESPACE)
    # A body that starts with "{" is JSON whatever its label says.
    if stripped.startswith(b"{") or kind == "json":
        return parseJSONPage(stripped, pageURL, project)
    if contentTypeError is not None:
        raise contentTypeError
    return parseHTMLPage(decodeHTML(body, charset), pageURL, project)


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
