"""
devpi-tokens' HTTP API, so its client commands (C{devpi token-create},
C{token-list}, C{token-delete}) work against this server unchanged:

  - C{POST /USER/+token-create}, a JSON object of restrictions (or no
    body) -> C{{"type": "token-info", "result": {"token": "devpi-..."}}};
  - C{GET /USER/+tokens} -> C{{"type": "tokens-info", "result": {"tokens":
    {id: {"restrictions": [...], ...}}}}};
  - C{DELETE /USER/+tokens/ID} -> C{{"message": "token ID deleted"}}.

Only the user themself or root, authenticated by a password or login
token, may use them: an API token never manages tokens (403).
"""

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest

from devpi_twisted.interfaces import IStorage
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.tokens import Tokens
from devpi_twisted.web.context import accountRequester
from devpi_twisted.web.headers import setSerial
from devpi_twisted.web.responses import jsonBody, readJSON


class TokenViews:
    """The token routes' views."""

    def __init__(self, storage: IStorage, auth: Authenticator, tokens: Tokens,
                 runFile: Callable[..., Any] = maybeDeferred) -> None:
        self._storage = storage
        self._auth = auth
        self._tokens = tokens
        self._runFile = runFile

    async def create(self, request: IRequest, user: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        request.content.seek(0, 2)
        hasBody = request.content.tell() > 0
        request.content.seek(0)
        body = await readJSON(request, self._runFile) if hasBody else {}
        token = await self._tokens.create(requester, user, body)
        setSerial(request, self._storage.currentSerial())
        return jsonBody(request, result={"token": token}, type="token-info")

    async def list(self, request: IRequest, user: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        tokens = await self._tokens.list(requester, user)
        return jsonBody(request, result={"tokens": tokens}, type="tokens-info")

    async def delete(self, request: IRequest, user: str, tokenId: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        await self._tokens.delete(requester, user, tokenId)
        setSerial(request, self._storage.currentSerial())
        return jsonBody(request, message=f"token {tokenId} deleted")
