# -*- test-case-name: tests.test_search -*-
"""
C{GET /+search?query=TEXT&page=N} (devpi-web's URL) and the root-only
C{POST /+search/rebuild}.

The JSON answer; a browser gets the web interface's page instead (the
route decides: L{devpi_twisted.web.routes.Routes.search}).
"""

from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest

from devpi_twisted.errors import BadRequest, Forbidden, Unauthorized
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.search import Search, resultsAsJSON
from devpi_twisted.web.context import identityOf, requesterOf
from devpi_twisted.web.responses import jsonBody

def _argument(request: IRequest, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name.decode()} is not UTF-8")


class SearchViews:
    """
    @param wake: called after a rebuild was asked for (the indexer's C{wake}).
    """

    def __init__(self, search: Search, auth: Authenticator, runFile: Callable[..., Any] = maybeDeferred,
                 wake: Callable[[], None] | None = None) -> None:
        self._search = search
        self._auth = auth
        self._runFile = runFile
        self.wake = wake

    async def search(self, request: IRequest) -> Any:
        query = _argument(request, b"query")
        if query is None:
            query = _argument(request, b"q") or ""
        pageText = _argument(request, b"page") or "1"
        if not pageText.isdigit() or len(pageText) > 6 or int(pageText) < 1:
            raise BadRequest("page must be a number from 1")
        identity = await identityOf(request, self._auth)
        results = await self._search.search(identity, query, int(pageText))
        return jsonBody(request, result=resultsAsJSON(results), type="search")

    async def rebuild(self, request: IRequest) -> bytes:
        requester = await requesterOf(request, self._auth)
        if requester is None:
            raise Unauthorized("rebuilding the search index needs root to log in")
        if requester != "root":
            raise Forbidden("only root may rebuild the search index")
        await self._search.rebuild(self._runFile)
        if self.wake is not None:
            self.wake()
        return jsonBody(request, 202, message="search index cleared; it is being built again from the state")
