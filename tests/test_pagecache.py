"""
The rendered-page cache: bounded by bytes whatever a client varies, and
project lists rendered once per change of the names, off the reactor,
served with ETag, 304 and gzip.
"""

import gzip
import json as jsonlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.services import simple

from devpi_twisted.services.simple import PageCache, SimplePages
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits

from .distbuilder import attestationFor, buildWheel
from .helpers import APIHarness, parseServerOptions
from .mirrorharness import MirrorHarness, rawRequest
from .releaseharness import JSON_TYPE, PIP_ACCEPT, PIP_AGENT, ServerHarness
from .test_ops import Connection

PAGE = "/alice/dev/+simple/demo-pkg/"


class _CountingRenders:
    """Counts the project lists rendered (L{simple.renderProjectList} calls)."""

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.count = 0
        real = simple.renderProjectList

        def counting(*args: Any) -> Any:
            self.count += 1
            return real(*args)

        testCase.patch(simple, "renderProjectList", counting)


class PageCacheTests(SynchronousTestCase):
    """The byte-bounded store itself."""

    def test_boundedByBytes(self) -> None:
        """Entries beyond the byte limit push out the least recently used ones."""
        cache = PageCache(1000)
        cache.put("popular", "g", "p", 300)
        for n in range(50):
            cache.put(n, "g", n, 300)
            self.assertEqual(cache.get("popular"), "p")
            self.assertLessEqual(cache.size, 1000)
        self.assertEqual(len(cache), 3)
        self.assertIsNone(cache.get(0))

    def test_tooLarge(self) -> None:
        """An entry larger than the whole cache is not kept and pushes nothing out."""
        cache = PageCache(1000)
        cache.put("a", "g", "a", 600)
        cache.put("big", "g", "big", 1001)
        self.assertIsNone(cache.get("big"))
        self.assertEqual(cache.get("a"), "a")

    def test_dropGroup(self) -> None:
        """Dropping a group forgets its entries and their bytes, and only those."""
        cache = PageCache(1000)
        cache.put("a1", "a", 1, 100)
        cache.put("a2", "a", 2, 100)
        cache.put("b1", "b", 3, 100)
        cache.dropGroup("a")
        self.assertEqual((len(cache), cache.size), (1, 100))
        self.assertEqual(cache.get("b1"), 3)


class HostVariantsTests(SynchronousTestCase):
    """Many Host values cannot grow the cache past its bytes or push out popular pages."""

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "dev", auth=self.h.alice)
        self.renders: list[Any] = []
        real = self.h.pages.projectPage

        def counting(*args: Any, **kw: Any) -> Any:
            self.renders.append(args)
            return real(*args, **kw)

        self.patch(self.h.pages, "projectPage", counting)

    def get(self, host: str, path: str = PAGE) -> Any:
        answer = self.h.get(f"http://{host}{path}", {b"Accept": [PIP_ACCEPT], b"User-Agent": [PIP_AGENT]})
        self.assertEqual(answer.code, 200, answer.body)
        return answer

    def test_relativePageOncePerHost(self) -> None:
        """A page whose links are relative is kept once, whatever Host the requests name."""
        self.h.mustUpload("alice/dev", buildWheel())
        first = self.get("devpi.test")
        for n in range(300):
            self.assertEqual(self.get(f"h{n}.example").body, first.body)
        self.assertEqual(len(self.renders), 1)
        self.assertEqual(len(self.h.pages.cache), 1)

    def test_absoluteLinksBoundedByBytes(self) -> None:
        """
        A page with absolute links (provenance) is kept per Host, but never
        past the byte limit, and a page in steady use stays cached.
        """
        limit = 64 * 1024
        self.h.pages.cache.maxBytes = limit
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel, attestations=[attestationFor(wheel)])
        self.h.mustUpload("alice/dev", buildWheel(name="popular-pkg"))
        popular = "/alice/dev/+simple/popular-pkg/"
        self.get("devpi.test", popular)
        for n in range(400):
            answer = self.get(f"h{n}.example")
            self.assertIn(f"http://h{n}.example/".encode(), answer.body)
            self.get("devpi.test", popular)
            self.assertLessEqual(self.h.pages.cache.size, limit)
        self.assertEqual(len(self.renders), 401, "the popular page was never rendered again")
        self.assertGreater(len(self.h.pages.cache), 10)


class OutsideURLTests(SynchronousTestCase):
    """X-Outside-Url is honoured only from a trusted proxy."""

    def setUp(self) -> None:
        self.api = APIHarness(self)
        request = limitedRequestFactory(1000, [], base=DevpiRequest)
        self.site = DevpiSite(self.api.resource, Clock(), SiteLimits(trustedProxies=frozenset({"127.0.0.9"})),
                              request, [])

    def login(self, peer: str) -> str:
        connection = Connection(self.site, peer=peer)
        connection.get(b"/+api", b"Accept: application/json\r\nX-Outside-Url: https://pypi.example.com/devpi/\r\n")
        ((status, _, body),) = connection.responses()
        self.assertEqual(status, 200)
        return jsonlib.loads(body)["result"]["login"]

    def test_untrustedPeer(self) -> None:
        """From a client that is not a trusted proxy the header is ignored."""
        self.assertEqual(self.login("127.0.0.3"), "http://devpi.test/+login")

    def test_trustedProxy(self) -> None:
        """From a trusted proxy the header is the base of the links."""
        self.assertEqual(self.login("127.0.0.9"), "https://pypi.example.com/devpi/+login")


class PrivateListTests(SynchronousTestCase):
    """A private index's project list: ETag, 304, gzip, a new list after a change."""

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "dev", auth=self.h.alice)
        self.h.mustUpload("alice/dev", buildWheel())
        self.renders = _CountingRenders(self)

    def listing(self, **headers: bytes) -> Any:
        sent = {b"Accept": [PIP_ACCEPT]}
        sent.update({name.replace("_", "-").encode(): [value] for name, value in headers.items()})
        return self.h.get("/alice/dev/+simple/", sent)

    def test_etagAnd304(self) -> None:
        """The list has a strong ETag; If-None-Match with it answers 304 without a body."""
        first = self.listing()
        etag = first.header("ETag")
        self.assertTrue(etag.startswith('"') and etag.endswith('"'), etag)
        again = self.listing(If_None_Match=etag.encode())
        self.assertEqual((again.code, again.body), (304, b""))
        self.assertEqual(again.header("ETag"), etag)
        self.assertEqual(self.renders.count, 1)

    def raw(self, *headers: str) -> Any:
        answer = self.h.raw(rawRequest("/alice/dev/+simple/", "Accept: text/html", *headers))
        self.assertIn(answer.code, (200, 304), answer.body)
        return answer

    def test_gzip(self) -> None:
        """With Accept-Encoding gzip the list comes compressed, and decompresses to the same list."""
        plain = self.raw()
        packed = self.raw("Accept-Encoding: gzip, deflate")
        self.assertEqual(packed.header("Content-Encoding"), "gzip")
        self.assertEqual(gzip.decompress(packed.body), plain.body)
        self.assertIn(b"demo-pkg", plain.body)
        self.assertNotEqual(packed.header("ETag"), plain.header("ETag"))
        self.assertIn("Accept-Encoding", packed.header("Vary"))
        self.assertIsNone(plain.header("Content-Encoding"))
        self.assertIsNone(self.raw("Accept-Encoding: gzip;q=0, identity").header("Content-Encoding"))
        self.assertEqual(self.raw("Accept-Encoding: *").header("Content-Encoding"), "gzip")
        notModified = self.raw("Accept-Encoding: gzip", f"If-None-Match: {packed.header('ETag')}")
        self.assertEqual((notModified.code, notModified.body), (304, b""))
        self.assertEqual(self.renders.count, 1)

    def test_newNames(self) -> None:
        """A project added to the index gives a new list with a new ETag."""
        first = self.listing()
        self.h.mustUpload("alice/dev", buildWheel(name="other-pkg"))
        second = self.listing(If_None_Match=first.header("ETag").encode())
        self.assertEqual(second.code, 200)
        self.assertNotEqual(second.header("ETag"), first.header("ETag"))
        self.assertEqual(sorted(p["name"] for p in second.json["projects"]), ["demo-pkg", "other-pkg"])

    def test_renderedInRunner(self) -> None:
        """The list is rendered by the runner (threads in the server), not on the calling thread."""
        pages, waiting = self.heldPages()
        d = Deferred.fromCoroutine(pages.indexPage("alice", "dev", JSON_TYPE))
        self.assertNoResult(d)
        self.assertEqual(self.renders.count, 0)
        waiting[0].callback(None)
        page = self.successResultOf(d)
        self.assertEqual([p["name"] for p in jsonlib.loads(page.body)["projects"]], ["demo-pkg"])

    def heldPages(self) -> tuple[SimplePages, list[Deferred[Any]]]:
        waiting: list[Deferred[Any]] = []

        class HeldRunner:
            def runFile(self, f: Any, *args: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                waiting.append(d)
                d.addCallback(lambda _: f(*args))
                return d

        return SimplePages(self.h.storage, runner=HeldRunner()), waiting  # type: ignore[arg-type]

    def projectPage(self, pages: SimplePages) -> "Deferred[Any]":
        return Deferred.fromCoroutine(pages.projectPage("alice", "dev", "demo-pkg", JSON_TYPE, "../../", True,
                                                        "http://devpi.test"))

    def test_largeProjectPageRenderedInRunner(self) -> None:
        """A project page with more files than are cheap to render is rendered by the runner."""
        self.patch(simple, "INLINE_RENDER_FILES", 0)
        pages, waiting = self.heldPages()
        d = self.projectPage(pages)
        self.assertNoResult(d)
        [held] = waiting
        held.callback(None)
        self.assertEqual([f["filename"] for f in jsonlib.loads(self.successResultOf(d).body)["files"]],
                         ["demo_pkg-1.0-py3-none-any.whl"])

    def test_smallProjectPageInline(self) -> None:
        """A small project page is rendered at once: a thread would cost more than the rendering."""
        pages, waiting = self.heldPages()
        page = self.successResultOf(self.projectPage(pages))
        self.assertEqual(waiting, [])
        self.assertEqual(len(jsonlib.loads(page.body)["files"]), 1)


class MirrorListTests(SynchronousTestCase):
    """Lists with a mirror's names are rendered once per list of names."""

    def setUp(self) -> None:
        self.h = MirrorHarness(self, expiry=1800)
        self.fake = self.h.fake
        self.names = [f"project-{n:05d}" for n in range(3000)]
        for name in self.names:
            self.fake.addFile(name, f"{name}-1.0.tar.gz", b"x")
        self.h.createIndex("alice", "dev", auth=self.h.alice, bases=["root/pypi"])
        self.h.mustUpload("alice/dev", buildWheel())
        self.renders = _CountingRenders(self)

    def tearDown(self) -> None:
        self.h.stop()
        for _ in range(10):
            self.h.pump()

    def listing(self, stage: str = "alice/dev", headers: dict[bytes, list[bytes]] | None = None) -> Any:
        answer = self.h.get(f"/{stage}/+simple/", {b"Accept": [PIP_ACCEPT], **(headers or {})})
        self.assertEqual(answer.code, 200, answer.body)
        return answer

    def test_renderedOnce(self) -> None:
        """Repeated requests for the list (and HEAD, and 304s) render it once; all names are there."""
        first = self.listing()
        self.assertEqual(sorted(p["name"] for p in first.json["projects"]), sorted(self.names + ["demo-pkg"]))
        for _ in range(5):
            self.assertEqual(self.listing().body, first.body)
        self.assertEqual(self.h.get("/alice/dev/+simple/", {b"Accept": [PIP_ACCEPT],
                                                          b"If-None-Match": [first.header("ETag").encode()]}).code,
                         304)
        self.assertEqual(self.renders.count, 1)
        self.assertEqual(self.h.upstreamPaths().count("/simple/"), 1)

    def test_revalidatedNotRendered(self) -> None:
        """After the expiry upstream's unchanged list (304) is not rendered again."""
        self.fake.etags = True
        first = self.listing()
        self.h.clock.advance(1801)
        self.assertEqual(self.listing().header("ETag"), first.header("ETag"))
        self.assertEqual(self.h.upstreamPaths().count("/simple/"), 2)
        self.assertEqual(self.renders.count, 1)

    def test_newUpstreamNames(self) -> None:
        """A list fetched anew with another name gives a new list and a new ETag."""
        first = self.listing()
        self.fake.addFile("newcomer", "newcomer-1.0.tar.gz", b"x")
        self.h.clock.advance(1801)
        second = self.listing()
        self.assertNotEqual(second.header("ETag"), first.header("ETag"))
        self.assertIn("newcomer", [p["name"] for p in second.json["projects"]])
        self.assertEqual(self.renders.count, 2)

    def test_privateNameAdded(self) -> None:
        """A private project added to a base changes the list of the index built on it."""
        first = self.listing()
        self.h.mustUpload("alice/dev", buildWheel(name="other-pkg"))
        second = self.listing()
        self.assertNotEqual(second.header("ETag"), first.header("ETag"))
        self.assertIn("other-pkg", [p["name"] for p in second.json["projects"]])

    def test_gzipMirrorList(self) -> None:
        """The mirror's own list comes gzip-compressed when asked, equal to the plain one."""
        request = ("/root/pypi/+simple/", f"Accept: {JSON_TYPE}")
        plain = self.h.raw(rawRequest(*request))
        packed = self.h.raw(rawRequest(*request, "Accept-Encoding: gzip"))
        self.assertEqual((plain.code, packed.code), (200, 200))
        self.assertEqual(packed.header("Content-Encoding"), "gzip")
        self.assertEqual(gzip.decompress(packed.body), plain.body)
        self.assertEqual(len(jsonlib.loads(plain.body)["projects"]), 3000)
        self.assertLess(len(packed.body), len(plain.body) / 4)
        self.assertEqual(packed.header("Content-Type"), JSON_TYPE)
        self.assertEqual(self.renders.count, 1)


class PageCacheOptionTests(SynchronousTestCase):
    """C{--page-cache-size}: bytes of rendered pages kept."""

    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        return parseServerOptions(self, *argv, environ=environ)

    def test_defaultAndSet(self) -> None:
        """256 MiB by default; the option sets it."""
        self.assertEqual(self.parse().toConfig().pageCacheSize, 256 * 1024 * 1024)
        self.assertEqual(self.parse("--page-cache-size", "1000").toConfig().pageCacheSize, 1000)

    def test_negative(self) -> None:
        """A negative size is refused."""
        self.assertRaises(usage.UsageError, self.parse, "--page-cache-size", "-1")
