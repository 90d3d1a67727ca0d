"""
The web interface's views: what a browser gets at devpi's URLs (the routes
ask L{wantsPage} first), the documentation frame, tox result logs, the
search page and the static files.

Data comes from the same read services as the JSON views, through the read
ACLs: an index the requester may not read is neither listed nor shown (the
read gate already refuses its URLs), and of an index's bases only those
they may read count.
"""

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import tags

from devpi_twisted.errors import BadRequest, NotFound, UpstreamError
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.model.acl import identityMayRead, isPublic
from devpi_twisted.model.inheritance import stageReader
from devpi_twisted.model.names import isValidProjectName, normalizeProject
from devpi_twisted.model.negotiation import prefersHTML
from devpi_twisted.model.redact import scrubText, scrubURL
from devpi_twisted.model.search import SearchHit, SearchResults
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.services.browse import Browse, FileInfo, ProjectInfo, VersionInfo
from devpi_twisted.services.queries import mirrorVersions
from devpi_twisted.services.releases import Documentation
from devpi_twisted.services.simple import Restricted
from devpi_twisted.services.users import Users
from devpi_twisted.web.context import identityOf, outsideURL
from devpi_twisted.web.pages import isInstaller
from devpi_twisted.web.ui.describe import renderDescription
from devpi_twisted.web.ui.static import StaticAssets
from devpi_twisted.web.ui.templates import (
    DOCS_CSP, PAGE_CSP, Page, Trusted, definitionList, humanSize, link, pager, path, renderPage, table,
)

PAGE_SIZE = 100
MAX_TOXRESULTS = 20  # per release file, on a version page
MAX_TOXRESULT_READ = 4 * 1024 * 1024

log = Logger()


def wantsPage(request: IRequest) -> bool:
    """A browser's GET: it gets a page, everything else what it gets without the interface."""
    return (request.method in (b"GET", b"HEAD") and not isInstaller(request)
            and prefersHTML(request.getHeader(b"accept")))


def _pageNumber(request: IRequest) -> int:
    raw = request.args.get(b"page", [b"1"])[0]
    try:
        page = int(raw)
    except ValueError:
        raise BadRequest("page must be a number from 1")
    if page < 1 or page > 1_000_000:
        raise BadRequest("page must be a number from 1")
    return page


def _project(name: str) -> str:
    if not isValidProjectName(name):
        raise NotFound(f"no project {name!r}")
    return normalizeProject(name)


def _userAnchor(user: str) -> str:
    """Where a user's indexes are listed: on C{/} (C{/user} stays JSON)."""
    return "/#user-" + path(user)[1:]


def _acl(values: Any) -> str:
    return ", ".join(str(v) for v in values) if values else "–"


def toxSummary(result: Any) -> list[tuple[str, bool]]:
    """C{(environment, passed)} of a devpi tox result: passed when setup and tests returned 0."""
    envs = result.get("testenvs") if isinstance(result, dict) else None
    if not isinstance(envs, dict):
        return []
    summary = []
    for name, env in sorted(envs.items()):
        passed = True
        if isinstance(env, dict):
            for phase in ("setup", "test"):
                for command in env.get(phase) or ():
                    if isinstance(command, dict) and str(command.get("retcode", "0")) != "0":
                        passed = False
        summary.append((str(name), passed))
    return summary


def _parseTox(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class UIViews:
    """
    @param search: the search service (C{async search(identity, query,
        page) -> SearchResults}), or L{None}: the search page says so.
    @param mirrors: the mirrors (their states, and a project's files).
    @param replication: what C{+status} shows of replication.
    """

    def __init__(self, *, storage: IStorage, blobs: IBlobStore, auth: Authenticator, users: Users,
                 docs: Documentation, version: str, outsideURL: str | None = None, mirrors: Any = None,
                 replication: Any = None, search: Any = None, runFile: Callable[..., Any] = maybeDeferred,
                 browse: Browse | None = None) -> None:
        self._storage = storage  # for the current serial
        self._browse = browse if browse is not None else Browse(storage)
        self._blobs = blobs
        self._auth = auth
        self._users = users
        self._docs = docs
        self._version = version
        self._outsideURL = outsideURL
        self._mirrors = mirrors
        self._replication = replication
        self._search = search
        self._runFile = runFile  # descriptions are rendered, tox results parsed, off the reactor
        self.assets = StaticAssets()

    async def _answer(self, request: IRequest, page: Page, csp: str = PAGE_CSP, status: int = 200) -> bytes:
        body = await renderPage(page, self.assets, self._version)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", csp.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Vary", b"Accept, User-Agent, Authorization, X-Devpi-Auth")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return b"" if request.method == b"HEAD" else body

    def static(self, request: IRequest, name: str) -> bytes:
        return self.assets.render(request, name)

    # /

    async def root(self, request: IRequest) -> bytes:
        users = await self._users.listAll()
        identity = None
        if any(not isPublic(c) for info in users.values() for c in info.get("indexes", {}).values()):
            identity = await identityOf(request, self._auth)
        items = []
        mirrorIndexes = set()
        for owner, info in sorted(users.items()):
            indexes = {name: c for name, c in (info.get("indexes") or {}).items()
                       if identityMayRead(identity, owner, name, c)}
            mirrorIndexes.update(f"{owner}/{name}" for name, c in indexes.items() if c.get("type") == "mirror")
            if not indexes:
                continue
            rows = []
            for name, config in sorted(indexes.items()):
                rows.append(tags.li(
                    tags.h3(link(f"{owner}/{name}", owner, name)),
                    tags.p(f"{config['title']} " if config.get("title") else "",
                           tags.span(f"({config.get('type', 'stage')})", class_="muted")),
                    tags.p(config.get("description") or "", class_="muted") if config.get("description") else "",
                ))
            items.append(tags.section(id=f"user-{owner}")(
                tags.h2(owner, " ", tags.span(info.get("title") or "", class_="muted")),
                tags.p(info["description"]) if info.get("description") else "",
                tags.ul(rows, class_="card-list"),
            ))
        content = [tags.h1("Indexes"), items or tags.p("No indexes you may read.")]
        content.append(self._status(mirrorIndexes))
        return await self._answer(request, Page("Indexes", content))

    def _status(self, mirrorIndexes: set[str]) -> Any:
        rows: list[tuple[str, Any]] = [("Serial", str(self._storage.currentSerial()))]
        fields = dict(self._replication.statusFields()) if self._replication is not None else {}
        rows.append(("Role", fields.get("role", "primary").lower()))
        if "polling_replicas" in fields:
            rows.append(("Replicas polling", str(len(fields["polling_replicas"]))))
        if "replication" in fields:
            rows.append(("Replication", str(fields["replication"].get("state", "?"))))
        states = self._mirrors.statuses() if self._mirrors is not None else {}
        for name in sorted(mirrorIndexes):
            # only mirrors the requester may read are named
            state = states.get(name)
            value = str(state.get("state", "?")) if isinstance(state, dict) else "not asked yet"
            css = {"online": "online", "offline": "offline"}.get(value.lower(), "muted")
            rows.append((f"Mirror {name}", tags.span(scrubText(value), class_=css)))
        return tags.section(tags.h2("Server status"), definitionList(rows))

    # /user/index

    async def index(self, request: IRequest, user: str, index: str) -> bytes:
        page = _pageNumber(request)
        data = await self._browse.indexPage(user, index, page, PAGE_SIZE)
        config = data.config
        isMirror = config.get("type") == "mirror"
        settings: list[tuple[str, Any]] = [("Type", config.get("type", "stage"))]
        if config.get("title"):
            settings.append(("Title", config["title"]))
        if config.get("description"):
            settings.append(("Description", config["description"]))
        bases = config.get("bases") or []
        settings.append(("Bases", [[link(b, *b.split("/", 1)), " "] for b in bases] if bases else "–"))
        if isMirror:
            settings.append(("Mirror URL", scrubURL(config.get("mirror_url")) or "–"))
        else:
            settings.append(("Volatile", "yes" if config.get("volatile", True) else "no"))
            settings.append(("Upload allowed for", _acl(config.get("acl_upload"))))
        settings.append(("Read allowed for", _acl(config.get("acl_read", [":ANONYMOUS:"]))))
        settings.append(("Simple index", tags.a(path(user, index, "+simple") + "/",
                                                href=path(user, index, "+simple") + "/")))
        rows = [[link(name, user, index, name), link(latest, user, index, name, latest) if latest else "–"]
                for name, latest in data.projects]
        heading = "Cached projects" if isMirror else "Projects"
        content = [
            tags.h1(f"{user}/{index}"),
            tags.section(tags.h2("Settings"), definitionList(settings)),
            tags.section(
                tags.h2(heading, " ", tags.span(f"({data.total})", class_="muted")),
                tags.p("Only what this mirror has cached is listed.", class_="muted") if isMirror else "",
                table(heading, ["Project", "Latest version"], rows) if rows else tags.p("None yet."),
                pager(data.page, data.pages, path(user, index)),
            ),
        ]
        return await self._answer(request, Page(f"{user}/{index}", content, [(user, _userAnchor(user)), (index, path(user, index))]))

    # projects and versions

    async def _projectInfo(self, request: IRequest, user: str, index: str, project: str) -> ProjectInfo:
        info = await self._browse.projectInfo(user, index, project)
        if isinstance(info, Restricted):
            readable = stageReader(await identityOf(request, self._auth))
            info = await self._browse.projectInfo(user, index, project, readable)
        base = outsideURL(request, self._outsideURL)
        for stage in info.mirrors:
            if self._mirrors is None:
                continue
            try:
                files = await self._mirrors.projectFiles(stage, project, base + "/")
            except UpstreamError as e:
                log.warn("project page of {project} without {mirror}: {error}",
                         project=project, mirror=stage.name, error=e.message)
                continue
            if not files:
                continue
            info.found = True
            sizes = {f.url: f for f in files}
            for version, data in mirrorVersions(project, files).items():
                if version in info.versions:
                    continue
                fileRows = []
                for linkData in data.pop("+links"):
                    simple = sizes.get(linkData["href"])
                    fileRows.append(FileInfo(
                        filename=simple.filename if simple else linkData["href"].rsplit("/", 1)[-1],
                        url=linkData["href"], stage=stage.name, sha256=linkData["hashes"].get("sha256", ""),
                        size=simple.size if simple and simple.size else None,
                        uploaded=simple.uploadTime if simple else None,
                        yanked=simple.yanked if simple else False))
                info.versions[version] = VersionInfo(version, stage.name, data, fileRows)
        if not info.found:
            raise NotFound(f"no project {project!r}")
        return info

    async def project(self, request: IRequest, user: str, index: str, name: str) -> bytes:
        info = await self._projectInfo(request, user, index, _project(name))
        ordered = info.ordered()
        return await self._release(request, user, index, info, ordered[0] if ordered else None)

    async def version(self, request: IRequest, user: str, index: str, name: str, version: str) -> bytes:
        info = await self._projectInfo(request, user, index, _project(name))
        if version not in info.versions:
            raise NotFound(f"The version {version} of project {info.project} does not exist.")
        return await self._release(request, user, index, info, info.versions[version], pinned=True)

    async def _release(self, request: IRequest, user: str, index: str, info: ProjectInfo,
                       release: VersionInfo | None, pinned: bool = False) -> bytes:
        crumbs = [(user, _userAnchor(user)), (index, path(user, index)), (info.name, path(user, index, info.project))]
        content: list[Any] = []
        status = (info.status or {}).get("status")
        if release is None:
            content = [tags.h1(info.name), tags.p("No versions.")]
            return await self._answer(request, Page(info.name, content, crumbs))
        meta = release.metadata
        if pinned:
            crumbs.append((release.version, path(user, index, info.project, release.version)))
        base = outsideURL(request, self._outsideURL)
        install = f"pip install -i {base}/{user}/{index}/+simple/ {info.name}=={release.version}"
        description = await self._runFile(renderDescription, meta.get("description"),
                                          meta.get("description_content_type"))
        yanked = [f for f in release.files if f.yanked is not False]
        content += [
            tags.h1(info.name, " ", release.version),
            tags.p(meta.get("summary") or "", class_="summary"),
        ]
        if status and status != "active":
            reason = (info.status or {}).get("reason")
            content.append(tags.p(tags.strong(f"Project status: {status}", class_=str(status)),
                                  f" – {reason}" if reason else ""))
        if release.files and len(yanked) == len(release.files):
            reason = next((f.yanked for f in yanked if isinstance(f.yanked, str) and f.yanked), "")
            content.append(tags.p(tags.strong("This release is yanked", class_="yanked"),
                                  f": {reason}" if reason else "."))
        content.append(tags.div(class_="install")(
            tags.code(install, id="install-line"),
            tags.button("Copy", type="button", hidden="hidden", **{"data-copy": "install-line"}),
        ))
        facts: list[tuple[str, Any]] = []
        if meta.get("requires_python"):
            facts.append(("Requires Python", meta["requires_python"]))
        for key, label in (("author", "Author"), ("maintainer", "Maintainer"), ("license", "License")):
            if meta.get(key) and meta[key] != "UNKNOWN":
                facts.append((label, meta[key]))
        facts.append(("From index", link(release.stage, *release.stage.split("/", 1))))
        if len(info.chain) > 1:
            facts.append(("Inheritance", " → ".join(info.chain)))
        if release.hasDocs:
            facts.append(("Documentation", link("Read the documentation", user, index, info.project,
                                                release.version, "+d", "index.html")))
        urls = self._projectURLs(meta)
        if urls:
            facts.append(("Project links", tags.ul(class_="plain")(urls)))
        content.append(tags.section(tags.h2("About"), definitionList(facts)))
        content.append(tags.section(tags.h2("Description"), tags.div(class_="description")(
            Trusted(description) if description else tags.p("No description.", class_="muted"))))
        requires = [r for r in meta.get("requires_dist") or [] if isinstance(r, str)]
        if requires:
            content.append(tags.section(tags.h2("Dependencies"),
                                        tags.ul([tags.li(tags.code(r)) for r in requires], class_="plain")))
        classifiers = [c for c in meta.get("classifiers") or [] if isinstance(c, str)]
        if classifiers:
            content.append(tags.section(tags.h2("Classifiers"),
                                        tags.ul([tags.li(c) for c in classifiers], class_="plain")))
        content.append(await self._filesSection(user, index, info, release))
        versions = [tags.li(link(v.version, user, index, info.project, v.version)(
                                **({"aria-current": "page"} if pinned and v is release else {})),
                            " (this one)" if v is release else "", " ",
                            tags.span(f"({v.stage})", class_="muted")) for v in info.ordered()]
        content.append(tags.section(tags.h2("Versions"), tags.ul(class_="plain")(versions)))
        return await self._answer(request, Page(f"{info.name} {release.version}", content, crumbs))

    def _projectURLs(self, meta: dict[str, Any]) -> list[Any]:
        found = []
        if meta.get("home_page") and meta["home_page"] != "UNKNOWN":
            found.append(("Homepage", meta["home_page"]))
        for entry in meta.get("project_urls") or []:
            if isinstance(entry, str) and "," in entry:
                label, _, url = entry.partition(",")
                found.append((label.strip(), url.strip()))
        items = []
        for label, url in found:
            # Only web links become links; anything else (javascript:) is shown as text.
            if url.lower().startswith(("https://", "http://")):
                items.append(tags.li(tags.a(label, href=url, rel="nofollow noopener")))
            else:
                items.append(tags.li(label, ": ", tags.code(url)))
        return items

    async def _filesSection(self, user: str, index: str, info: ProjectInfo, release: VersionInfo) -> Any:
        rows = []
        for f in release.files:
            tox = await self._toxCell(user, index, info, release, f)
            state = tags.span(" yanked", class_="yanked badge") if f.yanked is not False else ""
            rows.append([
                [tags.a(f.filename, href=f.url), " ", state],
                humanSize(f.size),
                f.uploaded or "–",
                f.uploader or "–",
                link(f.stage, *f.stage.split("/", 1)),
                tags.code(f.sha256 or "–", class_="hash"),
                tox,
            ])
        if not rows:
            return tags.section(tags.h2("Files"), tags.p("No files."))
        return tags.section(tags.h2("Files"), table(
            f"Files of {info.name} {release.version}",
            ["File", "Size", "Uploaded", "By", "Index", "SHA-256", "Tox results"], rows))

    async def _toxCell(self, user: str, index: str, info: ProjectInfo, release: VersionInfo, f: FileInfo) -> Any:
        if not f.toxresults:
            return "–"
        items = []
        for entry in sorted(f.toxresults, key=lambda e: e["filename"])[:MAX_TOXRESULTS]:
            result = await self._toxresult(entry)
            summary = toxSummary(result)
            href = path(user, index, info.project, release.version, "+toxresults", entry["filename"])
            envs = [[tags.span(f"{env}: {'passed' if ok else 'failed'}", class_="passed" if ok else "failed"), " "]
                    for env, ok in summary] or ["no environments"]
            items.append(tags.li(envs, tags.a("log", href=href)))
        return tags.ul(class_="plain")(items)

    async def _toxresult(self, entry: dict[str, Any]) -> Any:
        reader = await self._blobs.open(entry["sha256"])
        if reader is None:
            return None
        try:
            chunks = []
            total = 0
            while total < MAX_TOXRESULT_READ:
                chunk = await reader.read(min(65536, MAX_TOXRESULT_READ - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        finally:
            await reader.close()
        return await self._runFile(_parseTox, b"".join(chunks))

    async def toxresults(self, request: IRequest, user: str, index: str, name: str, version: str,
                         filename: str) -> bytes:
        """One tox result's log: every environment's commands and their output."""
        info = await self._projectInfo(request, user, index, _project(name))
        release = info.versions.get(version)
        entry = None
        for f in release.files if release is not None else ():
            entry = next((e for e in f.toxresults if e["filename"] == filename), entry)
        if release is None or entry is None:
            raise NotFound(f"no tox result {filename!r} of {info.project} {version}")
        result = await self._toxresult(entry)
        content: list[Any] = [tags.h1(f"Tox result of {entry['filename'].split('.toxresult-')[0]}")]
        if isinstance(result, dict):
            facts = [(k, str(result[k])) for k in ("host", "platform", "toxversion") if result.get(k)]
            if facts:
                content.append(definitionList(facts))
            for env, passed in toxSummary(result):
                envData = result["testenvs"].get(env) or {}
                commands = []
                for phase in ("setup", "test"):
                    for command in (envData.get(phase) or []) if isinstance(envData, dict) else []:
                        if not isinstance(command, dict):
                            continue
                        line = command.get("command")
                        line = " ".join(map(str, line)) if isinstance(line, list) else str(line or "")
                        commands.append(tags.div(
                            tags.h4(f"{phase}: ", tags.code(line), f" (exit {command.get('retcode', '?')})"),
                            tags.pre(str(command.get("output") or "")),
                        ))
                content.append(tags.section(
                    tags.h2(env, " ", tags.span("passed" if passed else "failed",
                                                class_="badge " + ("passed" if passed else "failed"))),
                    commands or tags.p("No commands recorded.", class_="muted")))
        else:
            content.append(tags.p("This tox result could not be read."))
        crumbs = [(user, _userAnchor(user)), (index, path(user, index)), (info.name, path(user, index, info.project)),
                  (version, path(user, index, info.project, version))]
        return await self._answer(request, Page(f"Tox result {info.name} {version}", content, crumbs))

    # documentation

    async def docs(self, request: IRequest, user: str, index: str, name: str, version: str, docPath: str) -> bytes:
        """The documentation inside the interface's frame, with a link to it alone."""
        project = _project(name)
        entry = await self._docs.findDoc(user, index, project, version, lambda: identityOf(request, self._auth))
        if entry is None:
            raise NotFound(f"no documentation for {project} {version}")
        target = path(user, index, project, version, "+doc") + "/" + "/".join(
            path(part)[1:] for part in (docPath or "index.html").split("/"))
        content = [
            tags.h1(f"Documentation of {project} {version}"),
            tags.p(tags.a("Open the documentation on its own", href=target)),
            tags.iframe(src=target, class_="docs", title=f"Documentation of {project} {version}"),
        ]
        crumbs = [(user, _userAnchor(user)), (index, path(user, index)), (project, path(user, index, project)),
                  (version, path(user, index, project, version))]
        return await self._answer(request, Page(f"Documentation {project} {version}", content, crumbs), DOCS_CSP)

    # search

    async def searchPage(self, request: IRequest) -> bytes:
        query = request.args.get(b"query", [b""])[0].decode("utf-8", "replace").strip()
        page = _pageNumber(request)
        content: list[Any] = [tags.h1("Search")]
        if self._search is None:
            content.append(tags.p("Search is not available on this server."))
            return await self._answer(request, Page("Search", content, query=query))
        if not query:
            content.append(tags.p("Type what you are looking for in the search box."))
            return await self._answer(request, Page("Search", content, query=query))
        results: SearchResults = await self._search.search(await identityOf(request, self._auth), query, page)
        content.append(tags.p(f"{results.total} results for ", tags.q(results.query), class_="muted"))
        content.append(tags.ol(class_="card-list")([self._hit(hit) for hit in results.hits]))
        pages = max(1, -(-results.total // max(1, results.pageSize)))
        content.append(pager(results.page, pages, "/+search", query=query))
        return await self._answer(request, Page(f"Search: {query}", content, query=query))

    def _hit(self, hit: SearchHit) -> Any:
        user, _, index = hit.index.partition("/")
        project = normalizeProject(hit.project) if isValidProjectName(hit.project) else hit.project
        if hit.kind == "doc" and hit.version:
            target = link(f"{hit.project} {hit.version}: {hit.docPath or 'documentation'}",
                          user, index, project, hit.version, "+d", *(hit.docPath or "index.html").split("/"))
        elif hit.version:
            target = link(f"{hit.project} {hit.version}", user, index, project, hit.version)
        else:
            target = link(hit.project, user, index, project)
        highlights = [tags.p(tags.span(f"{fieldName}: ", class_="muted"),
                             [tags.mark(piece.text) if piece.match else piece.text for piece in pieces])
                      for fieldName, pieces in hit.highlights]
        return tags.li(tags.h2(target, " ", tags.span(hit.index, class_="muted")),
                       tags.p(hit.summary) if hit.summary else "", highlights)
