"""
The route table: every URL the server answers, in one place.

Each route delegates to a view object; the table holds no logic beyond
choosing the view by method and by what the client asks for.  URL segments
for users, indexes and projects are one path segment each; static segments
such as C{+api}, C{+simple} and C{+f} take precedence, and names can never
contain C{+}, so they never collide.
"""

from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import maybeDeferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from devpi_twisted.services.auth import Authenticator
from devpi_twisted.config import ServerConfig
from devpi_twisted.services.indexes import Indexes
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model.negotiation import JSON, chooseSimpleFormat, wantsJSONAPI
from devpi_twisted.model.doczip import DocLimits
from devpi_twisted.services.push import Pusher
from devpi_twisted.services.queries import Queries
from devpi_twisted.services.releases import Documentation, Releases
from devpi_twisted.services.simple import SimplePages
from devpi_twisted.services.users import Users
from devpi_twisted.web.api import APIViews
from devpi_twisted.web.changelog import ChangelogFeed
from devpi_twisted.web.errors import HANDLERS
from devpi_twisted.web.files import fileRedirects
from devpi_twisted.web.headers import DevpiHeadersResource, contentTypeOf
from devpi_twisted.web.mirrorfiles import MirrorFileAnswers
from devpi_twisted.web.pages import CachedAnswersFirst, PageViews, isInstaller
from devpi_twisted.web.projects import ProjectViews
from devpi_twisted.services.readrules import ReadRules
from devpi_twisted.web.readgate import ReadGate
from devpi_twisted.web.retention import RetentionViews
from devpi_twisted.web.storedfiles import KnownFileAnswers, KnownFiles
from devpi_twisted.web.docs import DocViews
from devpi_twisted.web.ui.views import UIViews, wantsPage
from devpi_twisted.web.tokens import TokenViews
from devpi_twisted.web.upload import UploadViews
from devpi_twisted.web.webhooks import WebhookViews
from devpi_twisted.web.uploadform import FORM_TYPES

USER = "<user>"
INDEX = "<index>"
PROJECT = "<project>"
VERSION = "<version>"
_RW = ["GET", "PUT", "PATCH", "DELETE"]
_SPECIAL = {"+api", "+login", "+status", "+metrics", "+simple", "+f", "+provenance", "+token-create", "+tokens",
            "+webhooks", "+retention", "+search", "+static"}


def _byMethod(request: IRequest, views: dict[bytes, Callable[..., Any]], *names: str) -> Any:
    """
    Call the view for the request's method.  A C{+} segment that reached a
    name route is a special route used with the wrong method (devpi's name
    segments are C{[^+/]+}).
    """
    if any(name.startswith("+") for name in names):
        raise (MethodNotAllowed() if names[-1] in _SPECIAL else NotFound())
    return views[request.method if request.method != b"HEAD" else b"GET"](request, *names)


def _wantsSimple(request: IRequest) -> bool:
    """An installer, or a client that asks for the PEP 691 JSON list, gets the simple page."""
    if isInstaller(request):
        return True
    accept = request.getHeader(b"accept")
    return bool(accept) and not wantsJSONAPI(accept) and chooseSimpleFormat(accept) == JSON


class Routes:
    """Klein routes for the whole server."""

    app = Klein()

    def __init__(self, api: APIViews, pages: PageViews, projects: ProjectViews, uploads: UploadViews,
                 docs: DocViews, changelog: ChangelogFeed | None = None, metrics: Any = None,
                 tokens: TokenViews | None = None, webhooks: WebhookViews | None = None,
                 retention: RetentionViews | None = None, search: Any = None, ui: UIViews | None = None) -> None:
        self._retention = retention
        self.search = search  # a web.search.SearchViews: /+search's JSON (and the rebuild)
        self._ui = ui  # the web interface: a browser's GET gets its pages (see _page)
        self._tokens = tokens
        self._webhooks = webhooks
        self._changelog = changelog
        self._metrics = metrics
        self._docs = docs
        self._api = api
        self._pages = pages
        self._projects = projects
        self._uploads = uploads

    for _type, _handler in HANDLERS:
        app.handle_errors(_type)(lambda self, request, failure, _h=_handler: _h(request, failure))

    def _page(self, request: IRequest) -> UIViews | None:
        """
        The web interface, when it is there and the request is a browser's.
        Either way the answer depends on who asks: a shared cache must not
        give a browser's page to devpi-client, or its JSON to a browser.
        """
        if self._ui is None:
            return None
        request.setHeader(b"Vary", b"Accept, User-Agent, Authorization, X-Devpi-Auth")
        return self._ui if wantsPage(request) else None

    # server-wide

    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> Any:
        if ui := self._page(request):
            return ui.root(request)
        return self._api.listUsers(request)

    # the web interface's own URLs (see .ui)

    def _uiViews(self) -> UIViews:
        if self._ui is None:
            raise NotFound()
        return self._ui

    @app.route("/+static/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> Any:
        return self._uiViews().static(request, name)

    @app.route("/+search", methods=["GET"])
    def search(self, request: IRequest) -> Any:
        """The web interface's page for a browser; JSON (devpi-web's URL) for the rest."""
        if self._ui is not None and not wantsJSONAPI(request.getHeader(b"accept")):
            return self._ui.searchPage(request)
        return self._searchViews().search(request)

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+d/<path:path>", methods=["GET"])
    def docFrame(self, request: IRequest, user: str, index: str, project: str, version: str, path: str) -> Any:
        return self._uiViews().docs(request, user, index, project, version, path)

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+toxresults/<filename>", methods=["GET"])
    def toxresults(self, request: IRequest, user: str, index: str, project: str, version: str,
                   filename: str) -> Any:
        return self._uiViews().toxresults(request, user, index, project, version, filename)

    @app.route("/+api", methods=["GET", "POST"])
    def rootApi(self, request: IRequest) -> Any:
        return self._api.apiconfig(request)

    @app.route("/+login", methods=["POST"])
    def login(self, request: IRequest) -> Any:
        return self._api.login(request)

    @app.route("/+status", methods=["GET", "POST"])
    def status(self, request: IRequest) -> Any:
        return self._api.status(request)

    @app.route("/+metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Any:
        if self._metrics is None:
            raise NotFound()
        return self._metrics.render(request)

    # search (see .search)

    def _searchViews(self) -> Any:
        if self.search is None:
            raise NotFound()
        return self.search

    @app.route("/+search/rebuild", methods=["POST"])
    def searchRebuild(self, request: IRequest) -> Any:
        return self._searchViews().rebuild(request)

    # webhooks (see .webhooks)

    def _hooks(self) -> WebhookViews:
        if self._webhooks is None:
            raise NotFound()
        return self._webhooks

    @app.route("/+webhooks", methods=["GET", "POST"])
    def serverWebhooks(self, request: IRequest) -> Any:
        hooks = self._hooks()
        return hooks.add(request) if request.method == b"POST" else hooks.list(request)

    @app.route("/+webhooks/<hookId>", methods=["DELETE"])
    def serverWebhook(self, request: IRequest, hookId: str) -> Any:
        return self._hooks().remove(request, hookId)

    @app.route(f"/{USER}/{INDEX}/+webhooks", methods=["GET", "POST"])
    def indexWebhooks(self, request: IRequest, user: str, index: str) -> Any:
        hooks = self._hooks()
        return hooks.add(request, user, index) if request.method == b"POST" else hooks.list(request, user, index)

    @app.route(f"/{USER}/{INDEX}/+webhooks/<hookId>", methods=["DELETE"])
    def indexWebhook(self, request: IRequest, user: str, index: str, hookId: str) -> Any:
        return self._hooks().remove(request, hookId, user, index)

    # retention policies (see .retention)

    @app.route(f"/{USER}/{INDEX}/+retention", methods=["POST"])
    def retention(self, request: IRequest, user: str, index: str) -> Any:
        if self._retention is None:
            raise NotFound()
        return self._retention.run(request, user, index)

    # replication (see .changelog)

    @app.route("/+changelog/<int:serial>-", methods=["GET"])
    def changelog(self, request: IRequest, serial: int) -> Any:
        if self._changelog is None:
            raise NotFound()
        return self._changelog.changes(request, serial)

    @app.route("/+snapshot", methods=["GET"])
    def snapshot(self, request: IRequest) -> Any:
        if self._changelog is None:
            raise NotFound()
        return self._changelog.snapshot(request)

    @app.route("/+blob/<sha256>", methods=["GET"])
    def blob(self, request: IRequest, sha256: str) -> Any:
        if self._changelog is None:
            raise NotFound()
        return self._changelog.blob(request, sha256)

    # users

    @app.route(f"/{USER}/+api", methods=["GET", "POST"])
    def userApi(self, request: IRequest, user: str) -> Any:
        return self._api.apiconfig(request)

    @app.route(f"/{USER}", methods=_RW)
    @app.route(f"/{USER}/", methods=_RW)
    def user(self, request: IRequest, user: str) -> Any:
        return _byMethod(request, {
            b"GET": self._api.getUser,
            b"PUT": self._api.createUser,
            b"PATCH": self._api.modifyUser,
            b"DELETE": self._api.deleteUser,
        }, user)

    # API tokens (devpi-tokens' routes; see .tokens)

    @app.route(f"/{USER}/+token-create", methods=["POST"])
    def tokenCreate(self, request: IRequest, user: str) -> Any:
        if self._tokens is None:
            raise NotFound()
        return self._tokens.create(request, user)

    @app.route(f"/{USER}/+tokens", methods=["GET"])
    def tokenList(self, request: IRequest, user: str) -> Any:
        if self._tokens is None:
            raise NotFound()
        return self._tokens.list(request, user)

    @app.route(f"/{USER}/+tokens/<tokenId>", methods=["DELETE"])
    def tokenDelete(self, request: IRequest, user: str, tokenId: str) -> Any:
        if self._tokens is None:
            raise NotFound()
        return self._tokens.delete(request, user, tokenId)

    # indexes

    @app.route(f"/{USER}/{INDEX}/+api", methods=["GET", "POST"])
    def indexApi(self, request: IRequest, user: str, index: str) -> Any:
        return self._api.apiconfig(request, user, index)

    @app.route(f"/{USER}/{INDEX}", methods=[*_RW, "POST", "PUSH"])
    @app.route(f"/{USER}/{INDEX}/", methods=[*_RW, "POST", "PUSH"])
    def index(self, request: IRequest, user: str, index: str) -> Any:
        if ui := self._page(request):
            return ui.index(request, user, index)
        if request.method in (b"GET", b"HEAD") and _wantsSimple(request):
            return self._pages.indexList(request, user, index, slash=True)
        return _byMethod(request, {
            b"GET": self._api.getIndex,
            b"PUT": self._api.createIndex,
            b"PATCH": self._api.modifyIndex,
            b"DELETE": self._api.deleteIndex,
            b"POST": self._post,
            b"PUSH": self._post,
        }, user, index)

    def _post(self, request: IRequest, user: str, index: str) -> Any:
        if contentTypeOf(request.getHeader(b"content-type")) in FORM_TYPES:
            return self._uploads.submit(request, user, index)
        return self._api.push(request, user, index)

    # simple pages

    @app.route(f"/{USER}/{INDEX}/+simple", methods=["GET"])
    def simpleListNoSlash(self, request: IRequest, user: str, index: str) -> Any:
        return self._pages.indexList(request, user, index, slash=False)

    @app.route(f"/{USER}/{INDEX}/+simple/", methods=["GET"])
    def simpleList(self, request: IRequest, user: str, index: str) -> Any:
        return self._pages.indexList(request, user, index, slash=True)

    @app.route(f"/{USER}/{INDEX}/+simple/{PROJECT}", methods=["GET"])
    def simpleProjectNoSlash(self, request: IRequest, user: str, index: str, project: str) -> Any:
        return self._pages.project(request, user, index, project, slash=False)

    @app.route(f"/{USER}/{INDEX}/+simple/{PROJECT}/", methods=["GET"])
    def simpleProject(self, request: IRequest, user: str, index: str, project: str) -> Any:
        return self._pages.project(request, user, index, project, slash=True)

    @app.route(f"/{USER}/{INDEX}/+simple/{PROJECT}/refresh", methods=["POST"])
    def simpleRefresh(self, request: IRequest, user: str, index: str, project: str) -> Any:
        return self._pages.refresh(request, user, index, project)

    # files

    @app.route(f"/{USER}/{INDEX}/+f/<path:relpath>", methods=["GET", "DELETE", "PATCH", "POST"])
    def file(self, request: IRequest, user: str, index: str, relpath: str) -> Any:
        return _byMethod(request, {
            b"GET": self._projects.getFile,
            b"DELETE": self._projects.deleteFile,
            b"PATCH": self._projects.patchFile,
            b"POST": self._docs.postToxresult,
        }, user, index, relpath)

    # documentation

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+doc", methods=["GET"])
    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+doc/", methods=["GET"])
    def docRoot(self, request: IRequest, user: str, index: str, project: str, version: str) -> Any:
        return self._docs.doc(request, user, index, project, version, "")

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+doc/<path:path>", methods=["GET"])
    def doc(self, request: IRequest, user: str, index: str, project: str, version: str, path: str) -> Any:
        return self._docs.doc(request, user, index, project, version, path)

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/+doczip", methods=["GET"])
    def doczip(self, request: IRequest, user: str, index: str, project: str, version: str) -> Any:
        return self._docs.doczip(request, user, index, project, version)

    @app.route(f"/{USER}/{INDEX}/+provenance/<path:relpath>", methods=["GET"])
    def provenance(self, request: IRequest, user: str, index: str, relpath: str) -> Any:
        return self._projects.getProvenance(request, user, index, relpath)

    # projects and versions

    @app.route(f"/{USER}/{INDEX}/{PROJECT}", methods=["GET", "DELETE", "PATCH"])
    @app.route(f"/{USER}/{INDEX}/{PROJECT}/", methods=["GET", "DELETE", "PATCH"])
    def project(self, request: IRequest, user: str, index: str, project: str) -> Any:
        if ui := self._page(request):
            return ui.project(request, user, index, project)
        if request.method in (b"GET", b"HEAD") and _wantsSimple(request):
            slash = request.path.endswith(b"/")
            return self._pages.project(request, user, index, project, slash=slash or isInstaller(request))
        return _byMethod(request, {
            b"GET": self._projects.getProject,
            b"DELETE": self._projects.deleteProject,
            b"PATCH": self._projects.patchProject,
        }, user, index, project)

    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}", methods=["GET", "DELETE", "PATCH"])
    @app.route(f"/{USER}/{INDEX}/{PROJECT}/{VERSION}/", methods=["GET", "DELETE", "PATCH"])
    def version(self, request: IRequest, user: str, index: str, project: str, version: str) -> Any:
        if ui := self._page(request):
            return ui.version(request, user, index, project, version)
        return _byMethod(request, {
            b"GET": self._projects.getVersion,
            b"DELETE": self._projects.deleteVersion,
            b"PATCH": self._projects.patchVersion,
        }, user, index, project, version)


def makeWebResource(
    *,
    config: ServerConfig,
    nodeinfo: dict[str, Any],
    storage: IStorage,
    blobs: IBlobStore,
    auth: Authenticator,
    users: Users,
    indexes: Indexes,
    releases: Releases,
    pages: SimplePages,
    version: str,
    mirrors: Any = None,
    mirrorFiles: Any = None,
    pushAgent: Any = None,
    changelog: ChangelogFeed | None = None,
    replication: Any = None,
    metrics: Any = None,
    runFile: Callable[..., Any] = maybeDeferred,
    readRules: ReadRules | None = None,
    webhooks: Any = None,
    downloads: Any = None,
    retention: Any = None,
    searchViews: Any = None,
    search: Any = None,
    webUI: bool = True,
) -> Resource:
    """
    The root resource of the site, with devpi's headers on every response.

    @param mirrorFiles: answers the file requests of mirrors (files not
        stored yet); by default a L{MirrorFileAnswers} of C{mirrors}.
    @param changelog: the replication feed, when this server may be followed.
    @param search: the search service the web interface's search page asks
        (see L{UIViews}); without it the page says search is not available.
    @param webUI: whether browsers get the web interface's pages.
    @param replication: what C{/+status} shows of replication (an object with
        C{statusFields()}); by default the feed's.
    @param webhooks: the L{devpi_twisted.services.webhooks.WebhookRegistry}
        behind C{+webhooks} (no such routes without it).
    @param downloads: counts file downloads
        (L{devpi_twisted.services.downloads.DownloadCounter}); none without it.
    @param retention: the L{devpi_twisted.services.retention.Retention}
        behind C{+retention} (no such route without it).
    @param runFile: runs blocking file work (documentation zips, large JSON
        bodies) off the reactor: the storage runner's C{runFile}; inline by
        default, for tests over memory storage.
    @param readRules: which indexes restrict reading (made over C{storage}
        when not given); the read gate in front of everything, fast paths
        included, enforces them.
    """
    if readRules is None:
        readRules = ReadRules(storage)
    documentation = Documentation(storage, releases.clock)
    pageViews = PageViews(pages, config.outsideURL, auth)
    knownFiles = KnownFiles(storage)
    redirects = fileRedirects(config.backend.s3Redirect, blobs)
    if mirrorFiles is None and mirrors is not None:
        mirrorFiles = MirrorFileAnswers(mirrors, redirects, downloads)
    routes = Routes(
        APIViews(config, nodeinfo, storage, auth, users, indexes, version, mirrors=mirrors,
                 pusher=Pusher(storage, blobs, mirrors, pushAgent, releases.clock),
                 replication=replication if replication is not None else changelog, metrics=metrics,
                 runFile=runFile, readRules=readRules),
        pageViews,
        ProjectViews(config, storage, blobs, auth, releases, Queries(storage), mirrors, knownFiles, mirrorFiles,
                     runFile, redirects, downloads),
        UploadViews(auth, releases, blobs, documentation,
                    DocLimits(maxEntries=config.docMaxEntries, maxTotalSize=config.docMaxSize)),
        DocViews(storage, blobs, auth, documentation, runFile),
        changelog,
        metrics,
        TokenViews(storage, auth, auth.tokens, runFile) if auth.tokens is not None else None,
        WebhookViews(auth, webhooks, runFile) if webhooks is not None else None,
        RetentionViews(auth, retention, runFile) if retention is not None else None,
        searchViews,
        UIViews(storage=storage, blobs=blobs, auth=auth, users=users, docs=documentation, version=version,
                outsideURL=config.outsideURL, mirrors=mirrors,
                replication=replication if replication is not None else changelog, search=search,
                runFile=runFile) if webUI else None,
    )
    return DevpiHeadersResource(
        ReadGate(CachedAnswersFirst(routes.app.resource(), pageViews,
                                    KnownFileAnswers(knownFiles, blobs, redirects, downloads)),
                 readRules, auth),
        storage, nodeinfo["uuid"], nodeinfo.get("primary-uuid") or nodeinfo["uuid"], version,
    )
