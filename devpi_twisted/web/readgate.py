# -*- test-case-name: tests.test_readacl -*-
"""
The read gate: nothing under C{/USER/INDEX} of an index with C{acl_read}
answers a requester who may not read it.

L{ReadGate} sits in front of everything that answers for an index - the
rendered-page cache, the known-file shortcut, the routes, a replica's proxy
to its primary - and decides before any project or file is looked up:
anonymous requests to a restricted index get 401 with a Basic challenge (so
pip and uv retry with the credentials of the index URL, netrc or keyring)
without touching storage; requests with credentials that may not read it
get 403.  The answer is the same whether what was asked for exists or not.

Which indexes are restricted is kept in memory by
L{devpi_twisted.services.readrules.ReadRules}: a request for a public index
costs a dictionary lookup (none at all while no index is restricted).
"""

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.errors import DevpiError, Forbidden
from devpi_twisted.model.acl import identityMayRead
from devpi_twisted.model.identity import PKG_READ
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.readrules import ReadRules
from devpi_twisted.web.context import hasCredentials, identityOf, requesterFor
from devpi_twisted.web.errors import renderDevpiError, renderUnexpected
from devpi_twisted.web.headers import contentTypeOf
from devpi_twisted.web.responses import jsonBody
from devpi_twisted.web.uploadform import FORM_TYPES

log = Logger()

CHALLENGE = b'Basic realm="devpi"'
_INDEX_WRITES = (b"PUT", b"PATCH", b"DELETE")


def _segments(request: IRequest) -> list[str] | None:
    """The path's segments as the routes see them (decoded, empty ones merged)."""
    try:
        return [s for s in b"/".join(request.postpath).decode("utf-8").split("/") if s]
    except UnicodeDecodeError:
        return None  # answered 400 by the headers resource


def indexOf(request: IRequest) -> tuple[str, str] | None:
    """The C{(user, index)} a request's path is under, or C{None}."""
    segments = _segments(request)
    if segments is None or len(segments) < 2 or segments[0].startswith("+") or segments[1].startswith("+"):
        return None
    return segments[0], segments[1]


def _needsRead(request: IRequest) -> bool:
    """
    Whether a request under a restricted index needs read access: all do,
    but managing the index itself (C{PUT}, C{PATCH}, C{DELETE} of
    C{/USER/INDEX}, checked by whoever may manage it) and uploads (form
    C{POST}s to it, checked against C{acl_upload}).  A push reads its
    source, so it is gated.
    """
    if len(_segments(request) or ()) != 2:
        return True
    if request.method in _INDEX_WRITES:
        return False
    if request.method in (b"POST", b"PUSH"):
        return contentTypeOf(request.getHeader(b"content-type")) not in FORM_TYPES
    return True


class ReadGate(Resource):
    """
    Answers 401 or 403 for requests that may not read the index they are
    under, and hands everything else to C{wrapped}.

    @param stamp: sets devpi's headers on a refusal when C{wrapped} is not
        inside a L{devpi_twisted.web.headers.DevpiHeadersResource} (a replica's
        proxy).
    """

    isLeaf = True

    def __init__(self, wrapped: Resource, rules: ReadRules, auth: Authenticator,
                 stamp: Callable[[IRequest], None] | None = None) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._rules = rules
        self._auth = auth
        self._stamp = stamp

    def render(self, request: IRequest) -> Any:
        rules = self._rules
        if rules.loaded and not rules.restricted:
            return self._wrapped.render(request)
        target = indexOf(request)
        if target is None:
            return self._wrapped.render(request)
        if rules.loaded:
            if not rules.isRestricted(*target) or not _needsRead(request):
                return self._wrapped.render(request)
            if not hasCredentials(request):
                return self._unauthorized(request, target)
        d = Deferred.fromCoroutine(self._check(request, target))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _check(self, request: IRequest, target: tuple[str, str]) -> None:
        if not self._rules.loaded:
            await self._rules.load()
        user, index = target
        config = self._rules.restricted.get(target)
        if config is not None and _needsRead(request):
            if not hasCredentials(request):
                self._finish(request, self._unauthorized(request, target))
                return
            try:
                await requesterFor(request, self._auth, PKG_READ, f"{user}/{index}")
                identity = await identityOf(request, self._auth)
            except Forbidden:  # an API token without pkg_read there
                identity = None
            if not identityMayRead(identity, user, index, config):
                self._finish(request, self._forbidden(request, target))
                return
        if _gone(request):
            return
        self._finish(request, self._wrapped.render(request))

    def _unauthorized(self, request: IRequest, target: tuple[str, str]) -> bytes:
        if self._stamp is not None:
            self._stamp(request)
        request.setHeader(b"WWW-Authenticate", CHALLENGE)
        return jsonBody(request, 401, message=f"authentication required to read {target[0]}/{target[1]}")

    def _forbidden(self, request: IRequest, target: tuple[str, str]) -> bytes:
        if self._stamp is not None:
            self._stamp(request)
        return jsonBody(request, 403, message=f"no permission to read {target[0]}/{target[1]}")

    def _finish(self, request: IRequest, body: Any) -> None:
        if body is NOT_DONE_YET or _gone(request):
            return
        if body:
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: IRequest) -> None:
        if _gone(request):
            return
        if self._stamp is not None:
            self._stamp(request)
        if failure.check(DevpiError):
            body = renderDevpiError(request, failure)
        else:
            body = renderUnexpected(request, failure)
        self._finish(request, body)


def _gone(request: IRequest) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))
