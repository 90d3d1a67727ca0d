"""
Search: the index engines (SQLite FTS5 and PostgreSQL), the indexer that
follows the changelog, the service's ranking, ACL filtering and paging,
and C{/+search} over the real Klein tree and a real server.
"""

import io
import json
import os
import zipfile
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from devpi_twisted.model.identity import Identity
from devpi_twisted.services.releases import Documentation
from devpi_twisted.services.search import changedThings, docPages, highlight, pageText
from devpi_twisted.storage import BLOB_REF, ChangeRecord
from devpi_twisted.storage.searchindex import (
    EXACT, PREFIX, TEXT, TYPO, DocPage, ProjectDoc, makeQuery, mergeHits, nameForm, oneEditAway,
)
from devpi_twisted.storage.searchindex_sqlite import SQLiteSearchIndex
from tests.helpers import ROOT_PASSWORD, APIHarness, basicAuth


def docZip(pages: dict[str, str], top: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for path, body in pages.items():
            z.writestr(top + path, body)
    return out.getvalue()


class PureTests(SynchronousTestCase):
    def test_nameForm(self) -> None:
        self.assertEqual(nameForm("Foo_Bar"), "foo-bar")
        self.assertEqual(nameForm("  flask login "), "flask-login")
        self.assertEqual(nameForm(""), "")

    def test_oneEditAway(self) -> None:
        typos = oneEditAway("reqests")
        self.assertIn("requests", typos)
        self.assertNotIn("reqests", typos)
        self.assertEqual(oneEditAway("ab"), ())

    def test_highlight(self) -> None:
        pieces = highlight("HTTP for Humans, the requests way", ("requests",))
        self.assertEqual([(p.text, p.match) for p in pieces],
                         [("HTTP for Humans, the ", False), ("requests", True), (" way", False)])
        name = highlight("Foo_Bar", (), "foo-bar")
        self.assertEqual([(p.text, p.match) for p in name], [("Foo_Bar", True)])
        self.assertFalse(any(p.match for p in highlight("nothing here", ("zzz",))))

    def test_pageText(self) -> None:
        title, text = pageText(b"<html><head><title>The Title</title><script>var x=1;</script></head>"
                               b"<body><h1>Hello</h1><p>quokka &amp; friends</p></body></html>")
        self.assertEqual(title, "The Title")
        self.assertEqual(text, "Hello quokka & friends")

    def test_docPagesStripsOneTopDirectory(self) -> None:
        pages = docPages(io.BytesIO(docZip({"index.html": "<p>a</p>", "sub/x.html": "<p>b</p>",
                                            "style.css": "x"}, top="html/")))
        self.assertEqual(sorted(p.path for p in pages), ["index.html", "sub/x.html"])

    def test_changedThings(self) -> None:
        projects, names, dropped = changedThings([ChangeRecord(1, 0.0, {
            "version/alice/dev/foo/1.0": {}, "file/alice/dev/bar/bar-1.0.doc.zip": {},
            "file/alice/dev/baz/baz-1.0.tar.gz": {}, "mirrornames/root/pypi": {BLOB_REF: "x"},
            "index/bob/gone": None,
        })])
        self.assertEqual(projects, {("alice", "dev", "foo"), ("alice", "dev", "bar")})
        self.assertEqual(names, {"root/pypi": {BLOB_REF: "x"}})
        self.assertEqual(dropped, {"bob/gone"})


class SearchIndexContract:
    """What every ISearchIndex engine does; C{makeIndex} gives an empty one."""

    def makeIndex(self) -> Any:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.index = self.makeIndex()
        self.addCleanup(self.index.close)  # type: ignore[attr-defined]

    def fill(self) -> None:
        self.index.apply([
            ("project", ProjectDoc("alice/dev", "requests", "requests", "2.0", "HTTP for Humans",
                                   "A long description about sessions and cookies", "http web", "", "Kenneth")),
            ("project", ProjectDoc("alice/dev", "requests-toolbelt", "requests-toolbelt", "1.0", "Utilities")),
            ("project", ProjectDoc("alice/dev", "httpx", "httpx", "0.1", "A next generation HTTP client",
                                   "works with requests too")),
            ("project", ProjectDoc("alice/dev", "foo-bar", "Foo_Bar", "1.0", "foo")),
            ("docs", "alice/dev", "httpx", "0.1", "d" * 64, [DocPage("guide.html", "Guide", "the wombat protocol")]),
        ], -1, 5)
        self.index.stageNames([("requests", "requests"), ("requests-oauthlib", "requests-oauthlib"),
                               ("six", "six")])
        self.index.apply([("names", "root/pypi", "n" * 64)], 5, 6)

    def search(self, text: str, excluded: frozenset[str] = frozenset()) -> list[Any]:
        return mergeHits([self.index.search(makeQuery(text, excluded))], 1000)

    def test_position(self) -> None:
        self.assertEqual(self.index.position(), -1)
        self.fill()
        self.assertEqual(self.index.position(), 6)
        from devpi_twisted.storage.searchindex import Moved

        self.assertRaises(Moved, self.index.apply, [], 5, 7)
        self.index.clear()
        self.assertEqual(self.index.position(), -1)
        self.assertEqual(self.search("requests"), [])

    def test_ranking(self) -> None:
        self.fill()
        hits = self.search("requests")
        order = [(h.rank, h.index, h.name) for h in hits]
        self.assertEqual(order[:2], [(EXACT, "alice/dev", "requests"), (EXACT, "root/pypi", "requests")])
        self.assertEqual({o for o in order if o[0] == PREFIX},
                         {(PREFIX, "alice/dev", "requests-toolbelt"), (PREFIX, "root/pypi", "requests-oauthlib")})
        self.assertEqual(order[-1], (TEXT, "alice/dev", "httpx"))

    def test_typo(self) -> None:
        self.fill()
        hits = self.search("reqests")
        self.assertIn(("alice/dev", "requests"), [(h.index, h.name) for h in hits if h.rank == TYPO])
        self.assertIn(("root/pypi", "requests"), [(h.index, h.name) for h in hits])

    def test_normalised(self) -> None:
        self.fill()
        self.assertEqual([(h.rank, h.display) for h in self.search("foo.bar")][0], (EXACT, "Foo_Bar"))

    def test_fields(self) -> None:
        self.fill()
        self.assertEqual([h.name for h in self.search("cookies")], ["requests"])  # description
        self.assertEqual([h.name for h in self.search("kenneth")], ["requests"])  # author
        self.assertEqual([h.name for h in self.search("generation")], ["httpx"])  # summary
        self.assertEqual([h.name for h in self.search("toolbelt")], ["requests-toolbelt"])  # a word of the name

    def test_docs(self) -> None:
        self.fill()
        hits = self.search("wombat")
        self.assertEqual([(h.kind, h.name, h.docPath) for h in hits], [("doc", "httpx", "guide.html")])
        self.assertIn("wombat", self.index.texts(hits)[hits[0].key])
        self.assertEqual(self.index.docDigests([("alice/dev", "httpx"), ("alice/dev", "x")]),
                         {("alice/dev", "httpx"): "d" * 64})
        self.index.apply([("dropDocs", "alice/dev", "httpx")], 6, 7)
        self.assertEqual(self.search("wombat"), [])

    def test_excluded(self) -> None:
        self.fill()
        hits = self.search("requests", frozenset({"alice/dev"}))
        self.assertEqual({h.index for h in hits}, {"root/pypi"})

    def test_namesReplaced(self) -> None:
        self.fill()
        self.assertEqual(self.index.namesDigest("root/pypi"), "n" * 64)
        self.index.stageNames([("six", "six"), ("attrs", "attrs")])
        self.index.apply([("names", "root/pypi", "m" * 64)], 6, 7)
        self.assertEqual([h.index for h in self.search("attrs")], ["root/pypi"])
        self.assertNotIn("root/pypi", [h.index for h in self.search("requests-oauthlib")])
        self.index.apply([("dropIndex", "alice/dev"), ("dropNames", "root/pypi")], 7, 8)
        self.assertEqual(self.search("requests"), [])

    def test_dropProject(self) -> None:
        self.fill()
        self.index.apply([("dropProject", "alice/dev", "httpx")], 6, 7)
        self.assertEqual(self.search("httpx"), [])
        self.assertEqual(self.search("wombat"), [])


class SQLiteIndexTests(SearchIndexContract, SynchronousTestCase):
    def makeIndex(self) -> Any:
        return SQLiteSearchIndex(os.path.join(self.mktemp() + ".sqlite"))

    def test_memory(self) -> None:
        index = SQLiteSearchIndex(None)
        index.apply([("project", ProjectDoc("a/b", "x-y", "x-y"))], -1, 1)
        self.assertEqual([h.name for h in mergeHits([index.search(makeQuery("x_y"))], 10)], ["x-y"])
        index.close()


def postgresIndex() -> Any:
    from tests.engines import sharedPostgreSQL
    from devpi_twisted.storage.searchindex_postgres import PostgresSearchIndex

    return PostgresSearchIndex(sharedPostgreSQL().newDatabase())


class PostgresIndexTests(SearchIndexContract, SynchronousTestCase):
    def makeIndex(self) -> Any:
        return postgresIndex()

    def test_trigrams(self) -> None:
        self.assertTrue(self.index.trigrams)
        self.fill()
        # two edits away: only pg_trgm's similarity finds it
        self.assertIn("requests-toolbelt", [h.name for h in self.search("requests-tolbel")])

    def test_claim(self) -> None:
        self.assertTrue(self.index.claim("one", 100.0, 60.0))
        self.assertFalse(self.index.claim("two", 120.0, 60.0))
        self.assertTrue(self.index.claim("one", 130.0, 60.0))
        self.assertTrue(self.index.claim("two", 191.0, 60.0))  # the lease lapsed


class _Harness:
    """An APIHarness whose search indexer runs, in memory (or over another index)."""

    def __init__(self, testCase: SynchronousTestCase, index: Any = None) -> None:
        self.h = APIHarness(testCase, rootPypi=True)
        self.testCase = testCase
        self.server = self.h.server
        if index is not None:
            self.server.search.index = index
            self.server.searchIndexer._index = index
        self.indexer = self.server.searchIndexer
        self.indexer.duty = 1.0  # no rests: the clock does not move by itself
        self.indexer.startService()
        testCase.addCleanup(self.indexer.stopService)
        self.h.createUser("alice", "alicepw")
        self.h.createUser("bob", "bobpw")
        self.h.createIndex("alice", "dev", "alicepw")
        self.settle()

    def settle(self) -> None:
        """Let the indexer catch up with storage."""
        for _ in range(1000):
            self.h.clock.advance(0)
            if self.indexer.idle is None and self.server.search.index.position() == self.h.storage.currentSerial():
                return
            if self.indexer.idle is None:
                self.indexer.wake()
        self.testCase.fail("the indexer did not catch up")

    def register(self, user: str, index: str, name: str, version: str = "1.0", **metadata: Any) -> None:
        from devpi_twisted.model.names import normalizeProject

        self.h.settle(Deferred.fromCoroutine(self.server.releases.register(
            user, user, index, normalizeProject(name), name, version, {"name": name, **metadata})))
        self.settle()

    def blob(self, data: bytes) -> Any:
        writer = self.h.blobs.openWriter()
        self.h.settle(writer.write(data))
        info = self.h.settle(writer.close())
        self.h.settle(writer.commit())
        return info

    def search(self, query: str, page: int = 1, identity: Any = None) -> Any:
        return self.h.settle(Deferred.fromCoroutine(self.server.search.search(identity, query, page)))


class IndexingTests(SynchronousTestCase):
    """The indexer follows the changelog; the service ranks, filters and pages."""

    index: Any = None

    def makeHarness(self) -> _Harness:
        return _Harness(self, self.index() if self.index else None)

    def test_uploadThenDelete(self) -> None:
        t = self.makeHarness()
        self.assertEqual(t.search("quokka").total, 0)
        t.register("alice", "dev", "quokka", summary="A marsupial library")
        results = t.search("quokka")
        self.assertEqual([(h.index, h.project, h.version, h.summary) for h in results.hits],
                         [("alice/dev", "quokka", "1.0", "A marsupial library")])
        t.register("alice", "dev", "quokka", "2.0", summary="Now faster")
        self.assertEqual(t.search("quokka").hits[0].version, "2.0")
        t.h.settle(Deferred.fromCoroutine(t.server.releases.deleteProject("alice", "alice", "dev", "quokka", True)))
        t.settle()
        self.assertEqual(t.search("quokka").total, 0)

    def test_historyPrunedPastThePosition(self) -> None:
        """An indexer behind the pruned history rebuilds from the state, and finds what came meanwhile."""
        t = self.makeHarness()
        t.register("alice", "dev", "quokka", summary="A marsupial library")
        t.indexer.stopService()
        t.h.settle(Deferred.fromCoroutine(t.server.releases.register(
            "alice", "alice", "dev", "wombat", "wombat", "1.0", {"name": "wombat", "summary": "Burrows"})))
        current = t.h.storage.currentSerial()
        t.h.settle(t.h.storage.pruneHistory(current))
        t.indexer.startService()
        t.settle()
        self.assertEqual([h.project for h in t.search("wombat").hits], ["wombat"])
        self.assertEqual([h.project for h in t.search("quokka").hits], ["quokka"])

    def test_rankingAndHighlight(self) -> None:
        t = self.makeHarness()
        t.register("alice", "dev", "requests", summary="HTTP for Humans")
        t.register("alice", "dev", "requests-mock", summary="Mock out requests")
        t.register("alice", "dev", "httpie", summary="a CLI", description="built on requests, and friendly")
        results = t.search("requests")
        self.assertEqual([h.project for h in results.hits], ["requests", "requests-mock", "httpie"])
        fields = dict(results.hits[2].highlights)
        self.assertIn(("requests", True), [(p.text, p.match) for p in fields["description"]])
        self.assertEqual([(p.text, p.match) for p in dict(results.hits[0].highlights)["name"]],
                         [("requests", True)])
        self.assertEqual([h.project for h in t.search("reqests").hits][0], "requests")
        self.assertEqual([h.project for h in t.search("Requests_Mock").hits][0], "requests-mock")

    def test_keywordsClassifiersAuthor(self) -> None:
        t = self.makeHarness()
        t.register("alice", "dev", "alpha", keywords="marsupial,pouch", classifiers=["Framework :: Wombat"],
                   author="Ada Lovelace")
        for query in ("pouch", "wombat", "lovelace"):
            self.assertEqual([h.project for h in t.search(query).hits], ["alpha"], query)

    def test_paging(self) -> None:
        t = self.makeHarness()
        t.server.search.pageSize = 3
        for i in range(7):
            t.register("alice", "dev", f"pkg{i}", summary="paged thing")
        pages = [t.search("paged", page) for page in (1, 2, 3, 4)]
        self.assertEqual([p.total for p in pages], [7, 7, 7, 7])
        self.assertEqual([len(p.hits) for p in pages], [3, 3, 1, 0])
        self.assertEqual(len({h.project for p in pages for h in p.hits}), 7)

    def test_docs(self) -> None:
        t = self.makeHarness()
        t.register("alice", "dev", "docpkg")
        info = t.blob(docZip({"index.html": "<title>Start</title><p>Nothing</p>",
                              "api/wombat.html": "<title>API</title><p>The platypus interface</p>"}, "docpkg/"))
        t.h.settle(Deferred.fromCoroutine(Documentation(t.h.storage).storeDoc(
            "alice", "alice", "dev", "docpkg", "docpkg", "1.0", info)))
        t.settle()
        results = t.search("platypus")
        self.assertEqual([(h.kind, h.project, h.version, h.docPath) for h in results.hits],
                         [("doc", "docpkg", "1.0", "api/wombat.html")])
        self.assertIn(("platypus", True), [(p.text, p.match) for p in dict(results.hits[0].highlights)["text"]])

    def mirrorNames(self, t: _Harness, names: list[str]) -> None:
        info = t.blob("".join(n + "\n" for n in names).encode())
        t.h.settle(t.h.storage.write(lambda txn: txn.set("mirrornames/root/pypi",
                                                         {BLOB_REF: info.sha256, "count": len(names)})))
        t.settle()

    def test_mirrorNames(self) -> None:
        t = self.makeHarness()
        t.indexer.namesChunk = 2
        self.mirrorNames(t, ["Django", "django-rest", "flask", "zope.interface"])
        self.assertEqual([(h.index, h.project) for h in t.search("django").hits],
                         [("root/pypi", "Django"), ("root/pypi", "django-rest")])
        self.assertEqual([h.project for h in t.search("zope_interface").hits], ["zope.interface"])
        self.mirrorNames(t, ["flask"])
        self.assertEqual(t.search("django").total, 0)

    def test_readACL(self) -> None:
        t = self.makeHarness()
        t.h.createIndex("alice", "secret", "alicepw", acl_read=["alice"])
        t.register("alice", "secret", "hidden-thing", summary="classified stuff")
        t.register("alice", "dev", "hidden-public", summary="classified but public")
        for identity in (None, Identity("bob")):
            results = t.search("hidden", identity=identity)
            self.assertEqual((results.total, [h.project for h in results.hits]), (1, ["hidden-public"]))
            self.assertEqual(t.search("classified", identity=identity).total, 1)
        results = t.search("hidden", identity=Identity("alice"))
        self.assertEqual(results.total, 2)
        self.assertEqual(t.search("hidden", identity=Identity("root")).total, 2)

    def test_resumeAfterRestart(self) -> None:
        t = self.makeHarness()
        t.register("alice", "dev", "before")
        t.indexer.stopService()
        node = t.indexer._node  # a restarted node takes its own lease (another waits for it to lapse)
        t.h.settle(Deferred.fromCoroutine(t.server.releases.register("alice", "alice", "dev", "after", "after", "1.0", {})))
        self.assertEqual(t.search("after").total, 0)
        # a new indexer over the same index continues from its position
        from devpi_twisted.services.search import SearchIndexer

        rebuilt: list[Any] = []
        original = SearchIndexer.rebuildFromState

        async def recording(self: Any) -> None:
            rebuilt.append(True)
            await original(self)

        self.patch(SearchIndexer, "rebuildFromState", recording)
        t.indexer = SearchIndexer(t.h.storage, t.h.blobs, t.server.search.index, _inline, _inline,
                                  t.h.clock, node)
        t.indexer.duty = 1.0
        t.indexer.startService()
        self.addCleanup(t.indexer.stopService)
        t.settle()
        self.assertEqual(t.search("after").total, 1)
        self.assertEqual(t.search("before").total, 1)
        self.assertEqual(rebuilt, [])

    def test_rebuild(self) -> None:
        t = self.makeHarness()
        t.register("alice", "dev", "kept")
        answer = t.h.post("/+search/rebuild", headers=basicAuth("alice", "alicepw"))
        self.assertEqual(answer.code, 403)
        self.assertEqual(t.h.post("/+search/rebuild").code, 401)
        answer = t.h.post("/+search/rebuild", headers=basicAuth("root", ROOT_PASSWORD))
        self.assertEqual(answer.code, 202, answer.body)
        t.settle()
        self.assertEqual(t.search("kept").total, 1)
        self.assertEqual(t.server.search.index.position(), t.h.storage.currentSerial())

    def test_json(self) -> None:
        t = self.makeHarness()
        t.h.createIndex("alice", "secret", "alicepw", acl_read=["alice"])
        t.register("alice", "dev", "Foo_Bar", summary="the foo bar")
        t.register("alice", "secret", "foo-bar-secret")
        answer = t.h.get("/+search?query=" + quote("foo bar"))
        self.assertEqual(answer.code, 200, answer.body)
        result = answer.json["result"]
        self.assertEqual(result["total"], 1)
        hit = result["hits"][0]
        self.assertEqual((hit["index"], hit["project"], hit["version"], hit["url"]),
                         ("alice/dev", "Foo_Bar", "1.0", "/alice/dev/Foo_Bar"))
        self.assertEqual(hit["highlights"]["name"], [["Foo_Bar", True]])
        answer = t.h.get("/+search?query=foo&page=1", headers=basicAuth("alice", "alicepw"))
        self.assertEqual(answer.json["result"]["total"], 2)
        self.assertEqual(t.h.get("/+search?query=foo&page=0").code, 400)
        self.assertEqual(t.h.get("/+search?query=foo&page=x").code, 400)
        self.assertEqual(t.h.get("/+search?query=" + "x" * 300).code, 400)
        self.assertEqual(t.h.get("/+search").json["result"]["total"], 0)


def _inline(f: Any, *args: Any) -> Deferred:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args)


class PostgresIndexingTests(IndexingTests):
    """The same over the PostgreSQL index."""

    index = staticmethod(postgresIndex)


class RealServerTests(TestCase):
    """A real server: search finds what twine uploaded."""

    timeout = 300

    def setUp(self) -> Deferred:
        from tests.test_clients import _ClientCase

        self.case = type("Case", (_ClientCase,), {"runTest": lambda self: None})("runTest")
        return self.case.setUp()

    def tearDown(self) -> Any:
        return self.case._cleanups and self.case.doCleanups() or None

    async def _search(self, query: str) -> Any:
        code, content, _ = await self.case.api("GET", "/+search?query=" + quote(query), auth=None)
        self.assertEqual(code, 200, content)
        return json.loads(content)["result"]

    def test_twineUploadFound(self) -> Deferred:
        from tests.distbuilder import buildWheel
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        async def run() -> None:
            self.case.assertSucceeded(await self.case.twineUpload("alice/dev", buildWheel()))
            for _ in range(100):
                result = await self._search("demo_pkg")
                if result["total"]:
                    break
                await deferLater(reactor, 0.1, lambda: None)
            self.assertEqual([(h["index"], h["project"]) for h in result["hits"]][0], ("alice/dev", "demo-pkg"))

        return Deferred.fromCoroutine(run())
