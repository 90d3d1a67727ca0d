"""
The web interface in memory, over the real Klein tree (L{ServerHarness}):
content negotiation, every page's content, escaping of hostile metadata,
read ACLs, paging, the static files and the search page over a fake search.
"""

import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model.negotiation import prefersHTML
from devpi_twisted.model.search import Highlight, SearchHit, SearchResults
from devpi_twisted.web.ui import views as uiviews

from .distbuilder import buildWheel
from .releaseharness import BROWSER_AGENT, PIP_ACCEPT, PIP_AGENT, UV_ACCEPT, UV_AGENT, ServerHarness, combine
from .test_docs_push import JSON, form, makeZip

BROWSER = {
    b"Accept": [b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"],
    b"User-Agent": [BROWSER_AGENT],
}
# what devpi-client sends for its JSON views (devpi_common/devpi's getjson)
DEVPI_CLIENT = {b"Accept": [b"application/json"], b"User-Agent": [b"devpi-client/7.3.0 (py3.11; linux)"]}
PIP = {b"Accept": [PIP_ACCEPT], b"User-Agent": [PIP_AGENT]}
UV = {b"Accept": [UV_ACCEPT], b"User-Agent": [UV_AGENT]}

HOSTILE_DESCRIPTION = "Hello\n\n<script>alert('desc')</script>\n\n[click](javascript:alert(1))\n\n**bold**"
HOSTILE_SUMMARY = "<b onmouseover=alert(1)>sum</b>"


def metadataFields(**fields: Any) -> list[tuple[str, str]]:
    out = []
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            out.append((key, item))
    return out


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = ServerHarness(self, rootPypi=True)
        self.server.createIndex("alice", "dev", title="Alice's <dev>", description="Where alice works")

    def page(self, path: str, headers: Any = None, code: int = 200) -> str:
        answer = self.server.get(path, combine(BROWSER, headers))
        self.assertEqual(answer.code, code, answer.body[:500])
        if code != 200:  # errors are devpi's JSON errors, with a message
            self.assertTrue(answer.json["message"])
            return answer.json["message"]
        self.assertTrue(answer.header("Content-Type").startswith("text/html"))
        csp = answer.header("Content-Security-Policy")
        self.assertIn("default-src 'none'", csp)
        self.assertIn("frame-ancestors 'self'", csp)
        self.assertNotIn("unsafe-inline", csp)
        return answer.body.decode("utf-8")

    def upload(self, version: str = "1.0", **fields: Any) -> None:
        defaults = {"summary": "A demo package", "description": "Demo *description*",
                    "description_content_type": "text/x-rst"}
        defaults.update(fields)
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", version, summary=defaults["summary"]),
                               extra=metadataFields(**{k: v for k, v in defaults.items() if k != "summary"}))


class NegotiationTests(_Base):
    """A browser gets pages; devpi-client, pip and uv get exactly what they got."""

    def test_prefersHTML(self) -> None:
        """Only a browser's Accept is taken for one."""
        self.assertTrue(prefersHTML(BROWSER[b"Accept"][0]))
        self.assertTrue(prefersHTML("text/html"))
        for accept in (None, b"", b"*/*", b"application/json", b"text/html, application/json", PIP_ACCEPT,
                       UV_ACCEPT, b"application/vnd.pypi.simple.v1+html, text/html",
                       b"text/html;q=0.1, application/xml", b"text/html;q=0"):
            self.assertFalse(prefersHTML(accept), accept)

    def test_browserGetsPages(self) -> None:
        """Every one of devpi's URLs that has a page answers a browser with it."""
        self.upload()
        for path in ("/", "/alice/dev", "/alice/dev/", "/alice/dev/demo-pkg", "/alice/dev/demo-pkg/1.0"):
            self.assertIn("<!DOCTYPE html>", self.page(path))

    def test_clientsUnchanged(self) -> None:
        """
        With the interface built and without it, devpi-client's JSON,
        pip's and uv's simple pages and a request without Accept are the
        same bytes.
        """
        self.upload()
        paths = ["/", "/alice/dev", "/alice/dev/", "/alice/dev/demo-pkg", "/alice/dev/demo-pkg/",
                 "/alice/dev/demo-pkg/1.0", "/alice/dev/+simple/demo-pkg/"]
        clients = [DEVPI_CLIENT, PIP, UV, {}, {b"Accept": [b"*/*"]}]
        before = {(p, i): self.server.get(p, c) for p in paths for i, c in enumerate(clients)}
        original = self.server.server.resource
        from devpi_twisted.web import routes
        self.patch(routes, "UIViews", lambda **kw: None)
        self.server.build()
        self.assertIsNot(self.server.server.resource, original)
        for (p, i), answer in before.items():
            again = self.server.get(p, clients[i])
            self.assertEqual((again.code, again.body), (answer.code, answer.body), (p, clients[i]))
            self.assertEqual(again.header("Content-Type"), answer.header("Content-Type"))
        self.assertEqual(before[("/", 0)].json["type"], "list:userconfig")
        self.assertTrue(before[("/alice/dev/demo-pkg/", 1)].header("Content-Type").startswith(
            "application/vnd.pypi.simple.v1+json"))

    def test_negotiatedAnswersVary(self) -> None:
        """A page and the JSON at the same URL both say what they depend on, for shared caches."""
        self.upload()
        for path in ("/", "/alice/dev", "/alice/dev/demo-pkg", "/alice/dev/demo-pkg/1.0"):
            for client in (DEVPI_CLIENT, BROWSER):
                self.assertIn("Accept", self.server.get(path, client).header("Vary") or "", (path, client))

    def test_simplePagesUnchanged(self) -> None:
        """A browser still gets the plain simple page under +simple/."""
        self.upload()
        answer = self.server.get("/alice/dev/+simple/demo-pkg/", BROWSER)
        self.assertNotIn(b"<header", answer.body)
        self.assertIn(b"demo_pkg-1.0-py3-none-any.whl", answer.body)


class PageTests(_Base):
    def test_root(self) -> None:
        """Users, their indexes with titles and descriptions, a search box and the server status."""
        html = self.page("/")
        self.assertIn('href="/alice/dev"', html)
        self.assertIn("&lt;dev&gt;", html)
        self.assertNotIn("<dev>", html)
        self.assertIn("Where alice works", html)
        self.assertRegex(html, r'<form[^>]*action="/\+search"[^>]*method="get"')
        self.assertRegex(html, r'<label[^>]*for="search-query"')
        self.assertIn('id="search-query"', html)
        self.assertIn("Server status", html)
        self.assertIn("Serial", html)
        self.assertIn("Mirror root/pypi", html)
        for landmark in ("<header", "<nav", "<main", "<footer", 'name="viewport"'):
            self.assertIn(landmark, html)

    def test_index(self) -> None:
        """An index's settings and its projects with their latest versions."""
        self.server.createIndex("alice", "staging", bases=["alice/dev"], acl_upload=["alice", "bob"])
        self.upload("1.0")
        self.upload("1.10")
        self.upload("1.9")
        html = self.page("/alice/dev")
        self.assertIn('href="/alice/dev/demo-pkg"', html)
        self.assertIn('href="/alice/dev/demo-pkg/1.10"', html)
        self.assertIn("Volatile", html)
        staging = self.page("/alice/staging")
        self.assertIn('href="/alice/dev"', staging)
        self.assertIn("alice, bob", staging)

    def test_mirrorIndexCredentialsHidden(self) -> None:
        """A mirror's URL is shown without its credentials, and only cached projects are listed."""
        self.server.createIndex("root", "private", auth=self.server.root, type="mirror",
                                mirror_url="https://user:s3cret@pypi.example/simple/")
        html = self.page("/root/private")
        self.assertNotIn("s3cret", html)
        self.assertNotIn("user:", html)
        self.assertIn("pypi.example/simple/", html)
        self.assertIn("Cached projects", html)

    def test_project(self) -> None:
        """A project page shows its latest version, with everything the metadata says."""
        self.upload("1.0")
        self.upload("2.0", description="# Big title\n\nSome `code`", description_content_type="text/markdown",
                    requires_python=">=3.9", requires_dist=["requests>=2", "idna"],
                    classifiers=["License :: OSI Approved :: MIT License"],
                    project_urls=["Source, https://example.org/src", "Evil, javascript:alert(1)"])
        html = self.page("/alice/dev/demo-pkg")
        self.assertIn("demo-pkg", html)
        self.assertIn("2.0", html)
        self.assertIn("<h3>Big title", html.replace('<h3 id="user-content-big-title">', "<h3>"))
        self.assertEqual(html.count("<h1"), 1)  # the description's headings are below the page's
        self.assertIn("<code>code</code>", html)
        self.assertIn("&gt;=3.9", html)
        self.assertIn("requests&gt;=2", html)
        self.assertIn("License :: OSI Approved :: MIT License", html)
        self.assertIn('href="https://example.org/src"', html)
        self.assertNotIn('href="javascript:', html)
        self.assertIn('href="/alice/dev/demo-pkg/1.0"', html)  # other versions
        self.assertRegex(html, r"<code[^>]*>pip install -i http://devpi\.test/alice/dev/\+simple/ demo-pkg==2\.0</code>")
        self.assertIn("data-copy", html)
        entry = self.server.fileEntry("alice/dev", "demo-pkg", "demo_pkg-2.0-py3-none-any.whl")
        self.assertIn(entry["hashes"]["sha256"], html)
        self.assertRegex(html, r'<a href="/alice/dev/\+f/[0-9a-f]{3}/[0-9a-f]{13}/demo_pkg-2\.0-py3-none-any\.whl">')
        self.assertIn(entry["upload-time"], html)
        self.assertIn(">alice<", html)  # the uploader

    def test_version(self) -> None:
        """A version page shows that version, reStructuredText rendered."""
        self.upload("1.0", description="Title\n=====\n\n*emphasis*")
        self.upload("2.0")
        html = self.page("/alice/dev/demo-pkg/1.0")
        self.assertIn("<em>emphasis</em>", html)
        self.assertIn('href="/alice/dev/demo-pkg/2.0"', html)
        self.page("/alice/dev/demo-pkg/9.9", code=404)

    def test_hostileMetadataEscaped(self) -> None:
        """A description with a script and a summary with HTML never reach the page as markup."""
        self.upload("1.0", summary=HOSTILE_SUMMARY, description=HOSTILE_DESCRIPTION,
                    description_content_type="text/markdown", requires_dist=["<script>x</script>"])
        for path in ("/alice/dev/demo-pkg", "/alice/dev/demo-pkg/1.0"):
            html = self.page(path)
            self.assertNotIn("<script>alert", html)
            self.assertNotIn("<b onmouseover", html)
            self.assertIn("&lt;b onmouseover=alert(1)&gt;sum&lt;/b&gt;", html)
            self.assertNotIn("javascript:", html)
            self.assertIn("<strong>bold</strong>", html)
            self.assertNotIn("<script>x", html)
            # the only scripts are ours
            self.assertEqual(re.findall(r"<script[^>]*>", html), [re.search(r"<script[^>]*>", html).group(0)])
            self.assertIn('src="/+static/copy.', html)

    def test_yankedAndStatus(self) -> None:
        """A yanked release and a PEP 792 project status are shown."""
        self.upload("1.0")
        answer = self.server.request("PATCH", "/alice/dev/demo-pkg/1.0", combine(JSON, self.server.alice),
                                     json={"yanked": "broken build"})
        self.assertEqual(answer.code, 200, answer.body)
        answer = self.server.request("PATCH", "/alice/dev/demo-pkg", combine(JSON, self.server.alice),
                                     json={"status": "archived", "reason": "moved on"})
        self.assertEqual(answer.code, 200, answer.body)
        html = self.page("/alice/dev/demo-pkg/1.0")
        self.assertIn("This release is yanked", html)
        self.assertIn("broken build", html)
        self.assertIn("Project status: archived", html)
        self.assertIn("moved on", html)

    def test_inheritance(self) -> None:
        """The index each file comes from is shown, through an inheritance chain."""
        self.upload("1.0")
        self.server.createIndex("bob", "prod", bases=["alice/dev"])
        html = self.page("/bob/prod/demo-pkg/1.0")
        self.assertIn("bob/prod → alice/dev", html)
        self.assertRegex(html, r'<td><a href="/alice/dev">alice/dev</a></td>')
        self.assertIn("pip install -i http://devpi.test/bob/prod/+simple/", html)

    def test_docsAndToxresults(self) -> None:
        """A documentation link and frame, tox results per file with their log on a page of its own."""
        self.upload("1.0")
        headers, body = form({":action": "doc_upload", "name": "demo-pkg", "version": "1.0"},
                             makeZip({"index.html": b"<h1>Docs</h1>", "api.html": b"api"}))
        self.assertEqual(self.server.request("POST", "/alice/dev/", combine(headers, self.server.alice), body).code,
                         200)
        url = self.server.fileURL("alice/dev", "demo-pkg", "demo_pkg-1.0-py3-none-any.whl")
        tox = {"host": "ci1", "platform": "linux", "testenvs": {
            "py311": {"test": [{"command": ["pytest"], "retcode": "0", "output": "5 passed <ok>"}]},
            "py312": {"setup": [{"command": ["pip", "install"], "retcode": 0, "output": ""}],
                      "test": [{"command": ["pytest"], "retcode": 1, "output": "1 failed"}]},
        }}
        answer = self.server.request("POST", url, combine(JSON, self.server.alice), json=tox)
        self.assertEqual(answer.code, 200, answer.body)
        html = self.page("/alice/dev/demo-pkg/1.0")
        self.assertIn('href="/alice/dev/demo-pkg/1.0/+d/index.html"', html)
        self.assertIn("py311: passed", html)
        self.assertIn("py312: failed", html)
        logURL = re.search(r'href="(/alice/dev/demo-pkg/1\.0/\+toxresults/[^"]+)"', html).group(1)
        log = self.page(logURL)
        self.assertIn("5 passed &lt;ok&gt;", log)
        self.assertIn("1 failed", log)
        self.assertIn("ci1", log)
        frame = self.server.get("/alice/dev/demo-pkg/1.0/+d/index.html", BROWSER)
        self.assertIn("frame-src 'self'", frame.header("Content-Security-Policy"))
        self.assertIn(b'<iframe src="/alice/dev/demo-pkg/1.0/+doc/index.html"', frame.body)
        self.page("/alice/dev/demo-pkg/2.0/+d/index.html", code=404)
        self.page("/alice/dev/demo-pkg/1.0/+toxresults/nothing", code=404)
        # the docs themselves are served as before
        docs = self.server.get("/alice/dev/demo-pkg/1.0/+doc/index.html", BROWSER)
        self.assertEqual(docs.body, b"<h1>Docs</h1>")
        self.assertIn("sandbox", docs.header("Content-Security-Policy"))


class ACLTests(_Base):
    def setUp(self) -> None:
        super().setUp()
        self.server.createIndex("bob", "secret", acl_read=["bob"], title="Bob's hidden index")
        self.server.mustUpload("bob/secret", buildWheel("hidden-pkg", "1.0"),
                               auth=self.server.bob)
        self.server.createIndex("alice", "mixed", bases=["bob/secret", "alice/dev"])

    def test_restrictedNotListed(self) -> None:
        """Anonymous and other users do not see a restricted index on /; its reader does."""
        for headers in (None, self.server.alice):
            html = self.page("/", headers)
            self.assertNotIn("bob/secret", html)
            self.assertNotIn("hidden index", html)
        self.assertIn("bob/secret", self.page("/", self.server.bob))

    def test_restrictedRefused(self) -> None:
        """Its pages are refused, and through an inheriting index its projects are not there."""
        for path in ("/bob/secret", "/bob/secret/hidden-pkg", "/bob/secret/hidden-pkg/1.0"):
            self.assertIn(self.server.get(path, BROWSER).code, (401, 403))
        self.assertEqual(self.server.get("/alice/mixed/hidden-pkg", BROWSER).code, 404)
        self.assertIn("hidden-pkg", self.page("/alice/mixed/hidden-pkg", self.server.bob))


class PagingTests(_Base):
    def test_pages(self) -> None:
        """An index lists its projects a page at a time."""
        self.patch(uiviews, "PAGE_SIZE", 2)
        for name in ("aaa", "bbb", "ccc"):
            self.server.mustUpload("alice/dev", buildWheel(name, "1.0"))
        first = self.page("/alice/dev")
        self.assertIn('href="/alice/dev/aaa"', first)
        self.assertIn('href="/alice/dev/bbb"', first)
        self.assertNotIn('href="/alice/dev/ccc"', first)
        self.assertIn("Page 1 of 2", first)
        second = self.page("/alice/dev?page=2")
        self.assertIn('href="/alice/dev/ccc"', second)
        self.assertNotIn('href="/alice/dev/aaa"', second)

    def test_badPage(self) -> None:
        """A page that is not a number is a 400 with a message."""
        for bad in ("x", "0", "-1"):
            answer = self.server.get(f"/alice/dev?page={bad}", BROWSER)
            self.assertEqual(answer.code, 400)
            self.assertIn("page", answer.json["message"])


class StaticTests(_Base):
    def test_assets(self) -> None:
        """The stylesheet and script are served with a content hash and a long cache."""
        html = self.page("/")
        css = re.search(r'href="(/\+static/ui\.[0-9a-f]{12}\.css)"', html).group(1)
        js = re.search(r'src="(/\+static/copy\.[0-9a-f]{12}\.js)"', html).group(1)
        for url, kind in ((css, "text/css"), (js, "text/javascript")):
            answer = self.server.get(url)
            self.assertEqual(answer.code, 200)
            self.assertTrue(answer.header("Content-Type").startswith(kind))
            self.assertIn("max-age=31536000", answer.header("Cache-Control"))
        self.assertEqual(self.server.get("/+static/ui.000000000000.css").code, 404)
        self.assertNotRegex(html, r'(src|href)="https?://(?!devpi\.test)')


class FakeSearch:
    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def search(self, identity: Any, query: str, page: int) -> SearchResults:
        self.asked.append((identity, query, page))
        hit = SearchHit("alice/dev", "demo-pkg", "1.0", "A <demo> package", highlights=(
            ("summary", (Highlight("A ", False), Highlight("<demo>", True), Highlight(" package", False))),))
        return SearchResults(query, page, 1, 3, (hit,))


class SearchPageTests(_Base):
    def test_pageOrJSON(self) -> None:
        """A browser gets the page (with the real search service); devpi-client and the like get JSON."""
        self.assertIn("results for", self.page("/+search?query=demo"))
        answer = self.server.get("/+search?query=demo", DEVPI_CLIENT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "search")

    def test_results(self) -> None:
        """Results link to their release, with the matched part marked and escaped, and paged."""
        fake = FakeSearch()
        original = uiviews.UIViews.__init__

        def withSearch(self: Any, **kw: Any) -> None:
            kw["search"] = fake
            original(self, **kw)

        self.patch(uiviews.UIViews, "__init__", withSearch)
        self.server.build()
        html = self.page("/+search?query=%3Cdemo%3E&page=2", self.server.alice)
        self.assertEqual([(i.user if i else None, q, p) for i, q, p in fake.asked], [("alice", "<demo>", 2)])
        self.assertIn('href="/alice/dev/demo-pkg/1.0"', html)
        self.assertIn("<mark>&lt;demo&gt;</mark>", html)
        self.assertIn('value="&lt;demo&gt;"', html)
        self.assertIn("Page 2 of 3", html)
        self.assertIn("page=3", html)


class MirrorPageTests(_Base):
    def test_mirrorProject(self) -> None:
        """A mirror's project page lists upstream's files; its index page only what is cached."""
        from devpi_twisted.testing.fakepypi import buildWheel as upstreamWheel

        filename, data, _ = upstreamWheel("upstream-pkg", "3.1")
        self.server.fake.addFile("upstream-pkg", filename, data)
        self.assertNotIn("upstream-pkg", self.page("/root/pypi"))
        html = self.page("/root/pypi/upstream-pkg")
        self.assertIn("upstream-pkg 3.1", html)
        self.assertIn(filename, html)
        self.assertIn("pip install -i http://devpi.test/root/pypi/+simple/ upstream-pkg==3.1", html)
        self.assertIn('href="/root/pypi/upstream-pkg"', self.page("/root/pypi"))  # cached now
