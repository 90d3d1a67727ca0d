# -*- test-case-name: tests.test_retention -*-
"""
C{POST /USER/INDEX/+retention}: run an index's retention policy now, or with
C{{"dry_run": true}} answer what a run would remove and change nothing.
The index owner or root only; an API token needs C{del_verdata} on the
index.  See L{devpi_twisted.services.retention}.
"""

from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.identity import DEL_VERDATA
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.retention import Retention
from devpi_twisted.web.context import requesterFor
from devpi_twisted.web.responses import jsonBody, readJSON


class RetentionViews:
    def __init__(self, auth: Authenticator, retention: Retention,
                 runFile: Callable[..., Any] = maybeDeferred) -> None:
        self._auth = auth
        self._retention = retention
        self._runFile = runFile

    async def run(self, request: IRequest, user: str, index: str) -> bytes:
        requester = await requesterFor(request, self._auth, DEL_VERDATA, f"{user}/{index}")
        await self._retention.checkRights(requester, user, index)
        dryRun = await self._dryRun(request)
        if dryRun:
            result = await self._retention.preview(user, index)
            verb = "would remove"
        else:
            result = await self._retention.apply(user, index)
            verb = "removed"
        return jsonBody(request, result=result.asJSON(), type="retention",
                        message=f"retention of {user}/{index} {verb} {len(result.removals)} versions")

    async def _dryRun(self, request: IRequest) -> bool:
        """C{dry_run} from a JSON object body; no body is a real run."""
        content = request.content
        content.seek(0)
        if not content.read(1):
            return False
        body = await readJSON(request, self._runFile, limit=64 * 1024)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object such as {\"dry_run\": true}")
        unknown = sorted(set(body) - {"dry_run"})
        if unknown:
            raise BadRequest(f"unknown retention options: {', '.join(unknown)}")
        dryRun = body.get("dry_run", False)
        if not isinstance(dryRun, bool):
            raise BadRequest("'dry_run' must be true or false")
        return dryRun
