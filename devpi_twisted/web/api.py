"""
The devpi JSON API: users, indexes, login, C{+api} and C{+status}.

Views take a request, ask the domain objects, and return devpi's JSON
envelope.  Errors are raised, never rendered here (see L{.errors}).
"""

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest

from devpi_twisted.services.auth import Authenticator, TOKEN_LIFETIME
from devpi_twisted.config import ServerConfig
from devpi_twisted.errors import BadRequest, Unauthorized
from devpi_twisted.services.indexes import Indexes
from devpi_twisted.interfaces import IStorage
from devpi_twisted.model.redact import scrubText, scrubURL
from devpi_twisted.services.users import Users
from devpi_twisted.model.acl import identityMayRead, isPublic
from devpi_twisted.model.identity import INDEX_CREATE, INDEX_DELETE, INDEX_MODIFY, PKG_READ, UPLOAD
from devpi_twisted.model.names import isValidProjectName, normalizeProject
from devpi_twisted.web.context import (
    accountRequester, clientAddress, hasQueryFlag, identityOf, outsideURL, requesterFor, requesterOf,
)
from devpi_twisted.web.headers import setSerial
from devpi_twisted.web.responses import jsonBody, readJSON

FEATURES = ["push-no-docs", "push-only-docs", "push-register-project", "server-keyvalue-parsing"]


def _scrubbed(statuses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mirror states with no credentials in their error texts."""
    return {name: {k: scrubText(v) if isinstance(v, str) else v for k, v in status.items()}
            for name, status in statuses.items()}


class APIViews:
    """The JSON API views, with their collaborators injected."""

    def __init__(
        self,
        config: ServerConfig,
        nodeinfo: dict[str, Any],
        storage: IStorage,
        auth: Authenticator,
        users: Users,
        indexes: Indexes,
        version: str,
        clock: Any = time,
        mirrors: Any = None,
        pusher: Any = None,
        replication: Any = None,
        metrics: Any = None,
        runFile: Callable[..., Any] = maybeDeferred,
        readRules: Any = None,
    ) -> None:
        self._readRules = readRules  # which indexes restrict reading (services.readrules.ReadRules)
        self._runFile = runFile  # large JSON bodies are decoded off the reactor
        self._metrics = metrics  # statusList(): devpi's [name, type, value] list
        self._replication = replication  # statusFields(): the feed's, or a replica's
        self._mirrors = mirrors
        self._pusher = pusher
        self._config = config
        self._nodeinfo = nodeinfo
        self._storage = storage
        self._auth = auth
        self._users = users
        self._indexes = indexes
        self._version = version
        self._startedAt = clock.time()

    def _written(self, request: IRequest) -> None:
        setSerial(request, self._storage.currentSerial())

    async def apiconfig(self, request: IRequest, user: str | None = None, index: str | None = None) -> bytes:
        requester = await requesterOf(request, self._auth)
        base = outsideURL(request, self._config.outsideURL)
        result: dict[str, Any] = {
            "login": f"{base}/+login",
            "authstatus": ["ok", requester, []] if requester else ["noauth", "", []],
            "features": FEATURES,
        }
        if index is not None:
            assert user is not None
            config = await self._indexes.get(user, index, withProjects=False)
            result["index"] = f"{base}/{user}/{index}"
            result["simpleindex"] = f"{base}/{user}/{index}/+simple/"
            if config["type"] != "mirror":
                result["pypisubmit"] = f"{base}/{user}/{index}/"
        return jsonBody(request, result=result, type="apiconfig")

    async def login(self, request: IRequest) -> bytes:
        body = await readJSON(request, self._runFile)
        if not isinstance(body, dict) or not isinstance(body.get("user"), str) \
                or not isinstance(body.get("password"), str):
            raise BadRequest("Bad request: no user/password specified")
        user = body["user"]
        if await self._auth.authenticate(user, body["password"], address=clientAddress(request)) is None:
            raise Unauthorized(f"user {user!r} could not be authenticated")
        token = self._auth.makeToken(user, await self._users.passwordHash(user))
        return jsonBody(
            request,
            result={"password": token, "expiration": TOKEN_LIFETIME},
            type="proxyauth",
            message="login successful",
        )

    async def status(self, request: IRequest) -> bytes:
        serial = self._storage.currentSerial()
        lastCommit = self._storage.lastCommitTime()
        host = request.getHost()
        result = {
            "serverdir": self._config.serverdir.path,
            "uuid": self._nodeinfo["uuid"],
            "versioninfo": {"devpi-twisted": self._version},
            "server-code": __import__("devpi_twisted").__path__[0],
            "host": getattr(host, "host", None),
            "port": getattr(host, "port", None),
            "outside-url": scrubURL(self._config.outsideURL),
            "serial": serial,
            "last-commit-timestamp": lastCommit,
            "event-serial": serial,
            "event-serial-timestamp": lastCommit,
            "event-serial-in-sync-at": lastCommit,
            "metrics": self._metrics.statusList() if self._metrics is not None else [],
            "role": "MASTER",
            "polling_replicas": {},
            "mirrors": self._publicOnly(_scrubbed(self._mirrors.statuses())) if self._mirrors is not None else {},
            "started-at": self._startedAt,
        }
        if self._replication is not None:
            # role, replication (the sync machine), polling_replicas, and metrics to add
            extra = dict(self._replication.statusFields())
            result["metrics"] = list(result["metrics"]) + list(extra.pop("metrics", []))
            result.update(extra)
        return jsonBody(request, result=result, type="status")

    # users

    def _publicOnly(self, statuses: dict[str, Any]) -> dict[str, Any]:
        """Mirror states of indexes everyone may read: C{/+status} names no restricted index."""
        restricted = getattr(self._readRules, "restricted", None) or {}
        return {name: status for name, status in statuses.items()
                if tuple(name.split("/", 1)) not in restricted}

    async def _readableOnly(self, request: IRequest, users: dict[str, dict[str, Any]]) -> None:
        """
        Drop from C{users} the indexes the requester may not read.  The
        requester is only authenticated when some index is restricted.
        """
        if not any(not isPublic(config) for info in users.values() for config in info.get("indexes", {}).values()):
            return
        identity = await identityOf(request, self._auth)
        for owner, info in users.items():
            indexes = info.get("indexes")
            if indexes:
                info["indexes"] = {name: config for name, config in indexes.items()
                                   if identityMayRead(identity, owner, name, config)}

    async def listUsers(self, request: IRequest) -> bytes:
        users = await self._users.listAll()
        await self._readableOnly(request, users)
        return jsonBody(request, result=users, type="list:userconfig")

    async def getUser(self, request: IRequest, user: str) -> bytes:
        config = await self._users.get(user)
        await self._readableOnly(request, {user: config})
        return jsonBody(request, result=config, type="userconfig")

    async def createUser(self, request: IRequest, user: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        result = await self._users.create(requester, user, await readJSON(request, self._runFile))
        self._written(request)
        return jsonBody(request, 201, result=result, type="userconfig")

    async def modifyUser(self, request: IRequest, user: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        token = await self._users.modify(requester, user, await readJSON(request, self._runFile))
        self._written(request)
        if token is not None:
            return jsonBody(
                request,
                result={"password": token, "expiration": TOKEN_LIFETIME},
                type="userpassword",
                message="user updated, new proxy auth",
            )
        return jsonBody(request, message="user updated")

    async def deleteUser(self, request: IRequest, user: str) -> bytes:
        requester = await accountRequester(request, self._auth)
        await self._users.delete(requester, user)
        self._written(request)
        return jsonBody(request, message=f"user {user!r} deleted")

    # indexes

    async def getIndex(self, request: IRequest, user: str, index: str) -> bytes:
        withProjects = not hasQueryFlag(request, b"no_projects")
        result = await self._indexes.get(user, index, withProjects=withProjects)
        return jsonBody(request, result=result, type="indexconfig")

    async def createIndex(self, request: IRequest, user: str, index: str) -> bytes:
        requester = await requesterFor(request, self._auth, INDEX_CREATE, f"{user}/{index}")
        result = await self._indexes.create(requester, user, index, await readJSON(request, self._runFile))
        self._written(request)
        return jsonBody(request, result=result, type="indexconfig")

    async def modifyIndex(self, request: IRequest, user: str, index: str) -> bytes:
        requester = await requesterFor(request, self._auth, INDEX_MODIFY, f"{user}/{index}")
        result = await self._indexes.modify(
            requester, user, index, await readJSON(request, self._runFile), errorOnNoop=hasQueryFlag(request, b"error_on_noop")
        )
        self._written(request)
        return jsonBody(request, result=result, type="indexconfig")

    async def deleteIndex(self, request: IRequest, user: str, index: str) -> bytes:
        requester = await requesterFor(request, self._auth, INDEX_DELETE, f"{user}/{index}")
        await self._indexes.delete(requester, user, index)
        self._written(request)
        return jsonBody(request, 201, message=f"index {user}/{index} deleted")

    async def push(self, request: IRequest, user: str, index: str) -> bytes:
        """devpi-client's C{push}: a release to another index here, or to an upload URL elsewhere."""
        if self._pusher is None:
            raise BadRequest("push is not enabled")
        body = await readJSON(request, self._runFile)
        name = body.get("name") if isinstance(body, dict) else None
        project = normalizeProject(name) if isinstance(name, str) and isValidProjectName(name) else None
        requester = await requesterFor(request, self._auth, PKG_READ, f"{user}/{index}", project)
        target = body.get("targetindex") if isinstance(body, dict) else None
        if isinstance(target, str):
            # an API token must allow the upload where the release goes, too
            await requesterFor(request, self._auth, UPLOAD, target.strip("/"), project)
        status, actions = await self._pusher.push(requester, user, index, body)
        self._written(request)
        return jsonBody(request, status, result=actions, type="actionlog")
