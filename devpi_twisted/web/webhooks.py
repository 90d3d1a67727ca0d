"""
The webhook routes: C{/USER/INDEX/+webhooks} (the index's owner or root)
and C{/+webhooks} (server-wide, root only).  Registering answers the id;
listing never shows a secret.  See L{devpi_twisted.services.webhooks}.
"""

from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest

from devpi_twisted.errors import Forbidden, Unauthorized
from devpi_twisted.model.identity import INDEX_MODIFY
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.webhooks import SERVER, WebhookRegistry, scopeOf
from devpi_twisted.web.context import requesterFor
from devpi_twisted.web.responses import jsonBody, readJSON


class WebhookViews:
    def __init__(self, auth: Authenticator, registry: WebhookRegistry,
                 runFile: Callable[..., Any] = maybeDeferred) -> None:
        self._auth = auth
        self._registry = registry
        self._runFile = runFile

    async def _scope(self, request: IRequest, user: str | None, index: str | None) -> str:
        scope = scopeOf(user, index)
        requester = await requesterFor(request, self._auth, INDEX_MODIFY, None if scope == SERVER else scope)
        if requester is None:
            raise Unauthorized("webhooks need the index owner or root to log in")
        if requester != "root" and requester != user:
            raise Forbidden(f"only {'root' if user is None else f'{user} or root'} may manage these webhooks")
        return scope

    async def add(self, request: IRequest, user: str | None = None, index: str | None = None) -> bytes:
        scope = await self._scope(request, user, index)
        hookId = await self._registry.add(scope, await readJSON(request, self._runFile, limit=64 * 1024))
        return jsonBody(request, 201, result={"id": hookId}, message=f"webhook {hookId} added")

    async def list(self, request: IRequest, user: str | None = None, index: str | None = None) -> bytes:
        scope = await self._scope(request, user, index)
        return jsonBody(request, result=await self._registry.list(scope), type="webhooks")

    async def remove(self, request: IRequest, hookId: str, user: str | None = None, index: str | None = None) -> bytes:
        scope = await self._scope(request, user, index)
        await self._registry.remove(scope, hookId)
        return jsonBody(request, message=f"webhook {hookId} removed")
