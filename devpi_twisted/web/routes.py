"""
The route table: every URL the server answers, in one place.

Each route delegates to a view object; the table itself holds no logic.  URL
segments for users and indexes are one path segment each; static segments
such as C{+api} and C{+login} take precedence, and a name can never contain
C{+}, so they never collide with names.
"""

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from ..auth import Authenticator
from ..config import ServerConfig
from ..indexes import Indexes
from ..interfaces import IStorage
from ..users import Users
from .api import APIViews
from .errors import HANDLERS
from .headers import DevpiHeadersResource

USER = "<user>"
INDEX = "<index>"


class Routes:
    """Klein routes for the whole server."""

    app = Klein()

    def __init__(self, api: APIViews) -> None:
        self._api = api

    for _type, _handler in HANDLERS:
        app.handle_errors(_type)(lambda self, request, failure, _h=_handler: _h(request, failure))

    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> Any:
        return self._api.listUsers(request)

    @app.route("/+api", methods=["GET", "POST"])
    def rootApi(self, request: IRequest) -> Any:
        return self._api.apiconfig(request)

    @app.route("/+login", methods=["POST"])
    def login(self, request: IRequest) -> Any:
        return self._api.login(request)

    @app.route("/+status", methods=["GET", "POST"])
    def status(self, request: IRequest) -> Any:
        return self._api.status(request)

    @app.route(f"/{USER}/+api", methods=["GET", "POST"])
    def userApi(self, request: IRequest, user: str) -> Any:
        return self._api.apiconfig(request)

    @app.route(f"/{USER}/{INDEX}/+api", methods=["GET", "POST"])
    def indexApi(self, request: IRequest, user: str, index: str) -> Any:
        return self._api.apiconfig(request, user, index)

    @app.route(f"/{USER}", methods=["GET", "PUT", "PATCH", "DELETE"])
    @app.route(f"/{USER}/", methods=["GET", "PUT", "PATCH", "DELETE"])
    def user(self, request: IRequest, user: str) -> Any:
        views = {
            b"GET": self._api.getUser,
            b"PUT": self._api.createUser,
            b"PATCH": self._api.modifyUser,
            b"DELETE": self._api.deleteUser,
        }
        return views[request.method](request, user)

    @app.route(f"/{USER}/{INDEX}", methods=["GET", "PUT", "PATCH", "DELETE"])
    @app.route(f"/{USER}/{INDEX}/", methods=["GET", "PUT", "PATCH", "DELETE"])
    def index(self, request: IRequest, user: str, index: str) -> Any:
        views = {
            b"GET": self._api.getIndex,
            b"PUT": self._api.createIndex,
            b"PATCH": self._api.modifyIndex,
            b"DELETE": self._api.deleteIndex,
        }
        return views[request.method](request, user, index)


def makeWebResource(
    *,
    config: ServerConfig,
    nodeinfo: dict[str, Any],
    storage: IStorage,
    auth: Authenticator,
    users: Users,
    indexes: Indexes,
    version: str,
) -> Resource:
    """The root resource of the site, with devpi's headers on every response."""
    api = APIViews(config, nodeinfo, storage, auth, users, indexes, version)
    routes = Routes(api)
    return DevpiHeadersResource(
        routes.app.resource(), storage, nodeinfo["uuid"], nodeinfo["uuid"], version
    )
