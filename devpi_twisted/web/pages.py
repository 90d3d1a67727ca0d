"""
Simple API views (PEP 503 HTML and PEP 691 JSON) for every index.
"""

import re
from typing import Any
from urllib.parse import quote

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from werkzeug.http import parse_accept_header

from devpi_twisted.errors import NotAcceptable, NotFound
from devpi_twisted.model.names import isValidProjectName, normalizeProject
from devpi_twisted.model.negotiation import chooseSimpleFormat
from devpi_twisted.services.simple import RenderedPage, SimplePages
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.web.context import identityOf, outsideURL
from devpi_twisted.web.files import etagMatches
from devpi_twisted.web.responses import redirect, withLength

_INSTALLER = re.compile(rb"([^ ]* )*(distribute|setuptools|pip|pex|uv)/.*")
PAGE_CACHE_CONTROL = b"max-age=0, must-revalidate"


def isInstaller(request: IRequest) -> bool:
    """devpi's test: a User-Agent naming an installer gets simple pages directly."""
    agent = request.getHeader(b"user-agent")
    return bool(agent and _INSTALLER.match(agent))


def acceptsGzip(request: IRequest) -> bool:
    """
    Whether C{Accept-Encoding} allows gzip: named (or as C{x-gzip}), else
    through C{*}, with a q-value above 0.  Werkzeug parses the header; an
    entry with a q that is not a number in 0..1 is dropped.
    """
    header = request.getHeader(b"accept-encoding")
    if not header:
        return False
    accept = parse_accept_header(header.decode("latin-1"))
    named = {coding.lower() for coding in accept.values()}
    # quality() answers for the named coding, or for * when it is not named.
    return accept.quality("x-gzip" if "x-gzip" in named and "gzip" not in named else "gzip") > 0


class CachedAnswersFirst(Resource):
    """
    Answers a request for a simple project page that is cached, or for a
    stored file path answered before (L{devpi_twisted.web.storedfiles}),
    before any routing: most requests of an index are for pages that have
    not changed and files already served, and this way a page costs a
    regular expression and a dictionary lookup.  Everything else goes on to
    the routed resource.
    """

    isLeaf = True
    _PAGE = re.compile(rb"^/([^/+%][^/%]*)/([^/+%][^/%]*)/\+simple/([^/+%][^/%]*)/$")

    def __init__(self, routed: Resource, views: "PageViews", files: Any = None) -> None:
        super().__init__()
        self._routed = routed
        self._views = views
        self._files = files

    def render(self, request: IRequest) -> Any:
        if request.method in (b"GET", b"HEAD"):
            match = self._PAGE.match(request.path)
            if match is not None:
                try:
                    user, index, project = (part.decode("utf-8") for part in match.groups())
                except UnicodeDecodeError:
                    pass
                else:
                    answer = self._views.cachedProject(request, user, index, project)
                    if answer is not None:
                        return answer
            elif self._files is not None:
                answer = self._files.answer(request, self._routed)
                if answer is not None:
                    return answer
        return self._routed.render(request)


class PageViews:
    """
    Renders simple pages from the page cache with conditional answers.

    @param auth: finds who asks, when an index's order has a restricted
        index (its pages show only the bases the requester may read);
        without it every requester is anonymous there.
    """

    def __init__(self, pages: SimplePages, outsideURL: str | None, auth: Authenticator | None = None) -> None:
        self._pages = pages
        self._outsideURL = outsideURL
        self._auth = auth

    def _identify(self, request: IRequest) -> Any:
        """Who asks, found only if a page needs it."""
        auth = self._auth
        if auth is None:
            return None
        return lambda: identityOf(request, auth)

    def cachedProject(self, request: IRequest, user: str, index: str, project: str) -> bytes | None:
        """
        A cached project page for C{.../+simple/<project>/}, or C{None} to
        take the routed way.  Only pages of public chains are found here
        (no authentication before routing); the others take the routes.
        """
        mediaType = chooseSimpleFormat(request.getHeader(b"accept"))
        if mediaType is None:
            return None
        rootPrefix = "../" * (request.path.count(b"/") - 1)
        cacheKey = (user, index, mediaType, rootPrefix, isInstaller(request),
                    outsideURL(request, self._outsideURL))
        page = self._pages.cachedProjectPage(cacheKey, project)
        return None if page is None else self._send(request, page)

    async def refresh(self, request: IRequest, user: str, index: str, name: str) -> bytes:
        """devpi's C{refresh}: drop the mirrors' cached links of a project, then show the page."""
        project = normalizeProject(name)
        await self._pages.refreshMirrors(user, index, project)
        return redirect(request, request.path.decode("latin-1").rsplit("/refresh", 1)[0] + "/")

    def _mediaType(self, request: IRequest) -> str:
        mediaType = chooseSimpleFormat(request.getHeader(b"accept"))
        if mediaType is None:
            raise NotAcceptable(
                "none of the simple API media types is acceptable "
                "(application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html, text/html)"
            )
        return mediaType

    def _send(self, request: IRequest, page: RenderedPage) -> bytes:
        """
        The page, or 304 when the client has it.  A page with a gzip copy
        (a project list) goes compressed to clients that accept it, under
        its own ETag; the other representation's ETag also answers 304.
        """
        body, etag = page.body, page.etag
        if page.gzipped is not None:
            request.setHeader(b"Vary", b"Accept, User-Agent, Accept-Encoding")
            if acceptsGzip(request):
                body, etag = page.gzipped, page.gzipETag
                request.setHeader(b"Content-Encoding", b"gzip")
        else:
            request.setHeader(b"Vary", b"Accept, User-Agent")
        request.setHeader(b"ETag", etag)
        request.setHeader(b"Cache-Control", PAGE_CACHE_CONTROL)
        request.setHeader(b"X-PyPI-Last-Serial", str(page.lastSerial).encode("ascii"))
        if etagMatches(request, page.etag) or (page.gzipped is not None and etagMatches(request, page.gzipETag)):
            request.setResponseCode(304)
            request.responseHeaders.removeHeader(b"Content-Encoding")
            return b""
        request.setHeader(b"Content-Type", page.contentType)
        return withLength(request, body)

    async def indexList(self, request: IRequest, user: str, index: str, slash: bool) -> Any:
        mediaType = self._mediaType(request)
        if not slash and not isInstaller(request) and "json" not in mediaType:
            return redirect(request, request.uri.decode("latin-1").split("?")[0] + "/", 301)
        page = await self._pages.indexPage(user, index, mediaType, self._identify(request))
        return self._send(request, page)

    async def project(self, request: IRequest, user: str, index: str, name: str, slash: bool) -> bytes:
        """
        A project's page.  File links are relative to the page's own URL
        (leading back to the server root), so they work behind a proxy that
        adds a path prefix, with or without the trailing slash.
        """
        mediaType = self._mediaType(request)
        if not isValidProjectName(name):
            raise NotFound(f"The project {name} does not exist.")
        project = normalizeProject(name)
        path = request.path.decode("latin-1")
        if project != name:
            base = path.rstrip("/").rsplit("/", 1)[0]
            return redirect(request, f"{base}/{quote(project)}/")
        if not slash and not isInstaller(request) and "json" not in mediaType:
            return redirect(request, path + "/", 301)
        rootPrefix = "../" * (path.count("/") - 1)
        page = await self._pages.projectPage(
            user, index, project, mediaType, rootPrefix, isInstaller(request),
            outsideURL(request, self._outsideURL), self._identify(request),
        )
        return self._send(request, page)
