"""
An index that inherits from a base the requester may not read serves none
of that base's projects, versions or files to them (simple pages, the
project list, devpi's project and version JSON), and the page caches never
hand a page built for one requester's visible chain to another's; a public
chain keeps its cached, unauthenticated fast path.

C{alice/private} (readable by alice only) is a base of C{alice/staging}
(public); C{acl_read} is written into the stored index config directly.
"""

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import keys
from devpi_twisted.model.identity import PKG_READ, UPLOAD, Identity, TokenScope
from devpi_twisted.model.inheritance import Stage, resolutionOrder, stageReader, visibleOrder

from .distbuilder import buildWheel
from .releaseharness import JSON_TYPE, PIP_ACCEPT, PIP_AGENT, ServerHarness, combine

SECRET = "secret-pkg"
PUBLIC = "public-pkg"
PIP = {b"Accept": [PIP_ACCEPT], b"User-Agent": [PIP_AGENT]}
JSON_API = {b"Accept": [b"application/json"]}


class _Chain:
    """The harness with alice/private (restricted) as a base of alice/staging (public)."""

    def setUp(self: Any) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "private")
        self.h.createIndex("alice", "staging", bases=["alice/private"])
        self.secret = buildWheel(SECRET, "1.0")
        self.public = buildWheel(PUBLIC, "2.0")
        self.h.mustUpload("alice/private", self.secret)
        self.h.mustUpload("alice/staging", self.public)
        self.setReaders("alice/private", ["alice"])

    def setReaders(self: Any, stage: str, readers: list[str] | None) -> None:
        """Write C{acl_read} into the stored config (C{None}: remove it, public)."""
        user, index = stage.split("/")
        key = keys.indexKey(user, index)

        def edit(txn: Any) -> None:
            config = dict(txn.get(key))
            config.pop("acl_read", None)
            if readers is not None:
                config["acl_read"] = readers
            txn.set(key, config)

        self.successResultOf(self.h.storage.write(edit))

    def page(self: Any, project: str, auth: Any = None, stage: str = "alice/staging") -> Any:
        return self.h.get(f"/{stage}/+simple/{project}/", combine(PIP, auth))

    def listing(self: Any, auth: Any = None, json: bool = True) -> Any:
        accept = {b"Accept": [PIP_ACCEPT if json else b"text/html"], b"User-Agent": [PIP_AGENT]}
        answer = self.h.get("/alice/staging/+simple/", combine(accept, auth))
        self.assertEqual(answer.code, 200, answer.body)
        return answer

    def assertHidden(self: Any, auth: Any) -> None:
        """What C{auth} (anonymous: C{None}) sees of alice/staging: nothing of alice/private."""
        page = self.page(PUBLIC, auth)
        self.assertEqual(page.code, 200, page.body)
        self.assertEqual([f["filename"] for f in page.json["files"]], [self.public.filename])
        missing = self.page(SECRET, auth)
        self.assertEqual(missing.code, 404, missing.body)
        for json in (True, False):
            body = self.listing(auth, json).body
            self.assertIn(PUBLIC.encode(), body)
            self.assertNotIn(SECRET.encode(), body)
        answers = [
            page, missing,
            self.h.get(f"/alice/staging/{SECRET}", combine(JSON_API, auth)),
            self.h.get(f"/alice/staging/{SECRET}/1.0", combine(JSON_API, auth)),
            self.h.get(f"/alice/staging/{PUBLIC}", combine(JSON_API, auth)),
            self.h.get(f"/alice/staging/{PUBLIC}/2.0", combine(JSON_API, auth)),
        ]
        self.assertEqual([a.code for a in answers[2:]], [404, 404, 200, 200])
        self.assertEqual(list(answers[4].json["result"]), ["2.0"])
        for answer in answers:
            # Neither the restricted index nor its file is named, errors included.
            self.assertNotIn(b"alice/private", answer.body)
            self.assertNotIn(self.secret.filename.encode(), answer.body)

    def assertShown(self: Any, auth: Any) -> None:
        """What alice (or anyone acl_read names) sees: both indexes' projects."""
        page = self.page(SECRET, auth)
        self.assertEqual(page.code, 200, page.body)
        self.assertEqual([f["filename"] for f in page.json["files"]], [self.secret.filename])
        self.assertIn("alice/private/+f/", page.json["files"][0]["url"])
        for json in (True, False):
            body = self.listing(auth, json).body
            self.assertIn(PUBLIC.encode(), body)
            self.assertIn(SECRET.encode(), body)
        project = self.h.get(f"/alice/staging/{SECRET}", combine(JSON_API, auth))
        self.assertEqual(project.code, 200, project.body)
        self.assertIn("alice/private/+f/", project.json["result"]["1.0"]["+links"][0]["href"])
        version = self.h.get(f"/alice/staging/{SECRET}/1.0", combine(JSON_API, auth))
        self.assertEqual(version.code, 200, version.body)


class VisibleChainTests(_Chain, SynchronousTestCase):
    def test_anonymousSeesNoneOfTheRestrictedBase(self) -> None:
        self.assertHidden(None)

    def test_otherUserSeesNoneOfTheRestrictedBase(self) -> None:
        self.assertHidden(self.h.bob)

    def test_readerSeesBoth(self) -> None:
        self.assertShown(self.h.alice)
        self.setReaders("alice/private", ["bob"])
        self.assertShown(self.h.bob)
        self.assertShown(self.h.alice)  # the owner always may

    def test_htmlPageHasNoRestrictedLinks(self) -> None:
        """The HTML page (a browser's) is filtered the same way."""
        self.setReaders("alice/private", None)
        self.h.mustUpload("alice/staging", buildWheel(SECRET, "3.0"))
        self.setReaders("alice/private", ["alice"])
        for auth, shown in ((self.h.bob, False), (self.h.alice, True), (None, False)):
            answer = self.h.get(f"/alice/staging/+simple/{SECRET}/", combine({b"Accept": [b"text/html"]}, auth))
            self.assertEqual(answer.code, 200, answer.body)
            self.assertIn(b"secret_pkg-3.0", answer.body)
            self.assertEqual(self.secret.filename.encode() in answer.body, shown)
            self.assertEqual(b"alice/private" in answer.body, shown)

    def test_baseReachedOnlyThroughRestrictedOneIsLeftOut(self) -> None:
        """alice/deep (public) is a base of alice/private only: bob does not see it; once staging names it, he does."""
        self.h.createIndex("alice", "deep")
        self.h.mustUpload("alice/deep", buildWheel("deep-pkg", "1.0"))
        self.setReaders("alice/private", None)  # the index API does not know acl_read yet
        self.h.modifyIndex("alice", "private", {"bases": ["alice/deep"]})
        self.setReaders("alice/private", ["alice"])
        self.assertEqual(self.page("deep-pkg", self.h.bob).code, 404)
        self.assertEqual(self.page("deep-pkg", self.h.alice).code, 200)
        self.assertNotIn(b"deep-pkg", self.listing(self.h.bob).body)
        self.h.modifyIndex("alice", "staging", {"bases": ["alice/private", "alice/deep"]})
        self.assertEqual(self.page("deep-pkg", self.h.bob).code, 200)
        self.assertIn(b"deep-pkg", self.listing(self.h.bob).body)


class DocTests(_Chain, SynchronousTestCase):
    """Documentation of a restricted base is not served under the inheriting index to those who may not read it."""

    def test_docsOfRestrictedBase(self) -> None:
        from .test_docs_push import form, makeZip

        self.setReaders("alice/private", None)  # uploads and docs go to alice/private itself
        headers, body = form({":action": "doc_upload", "name": SECRET, "version": "1.0"},
                             makeZip({"index.html": b"<h1>secret docs</h1>"}))
        answer = self.h.request("POST", "/alice/private/", combine(headers, self.h.alice), body)
        self.assertEqual(answer.code, 200, answer.body)
        self.setReaders("alice/private", ["alice"])
        for suffix in ("1.0/+doc/index.html", "latest/+doc/index.html", "1.0/+doczip"):
            path = f"/alice/staging/{SECRET}/{suffix}"
            self.assertEqual(self.h.get(path, self.h.alice).code, 200, path)
            for auth in (None, self.h.bob):
                answer = self.h.get(path, auth)
                self.assertEqual(answer.code, 404, path)
                self.assertNotIn(b"secret docs", answer.body)
                self.assertNotIn(b"alice/private", answer.body)


class CacheTests(_Chain, SynchronousTestCase):
    """The caches answer each requester with the page of their own visible chain."""

    def test_readerFirstThenOthers(self) -> None:
        self.assertShown(self.h.alice)
        self.assertHidden(self.h.bob)
        self.assertHidden(None)
        self.assertShown(self.h.alice)

    def test_othersFirstThenReader(self) -> None:
        self.assertHidden(None)
        self.assertHidden(self.h.bob)
        self.assertShown(self.h.alice)
        self.assertHidden(self.h.bob)

    def test_restrictedChainPageIsCachedPerChain(self) -> None:
        """A requester seeing the same chain as an earlier one gets the kept page, not a new rendering."""
        renders = []
        real = self.h.pages._buildProjectPage

        def counting(*args: Any) -> Any:
            renders.append(args)
            return real(*args)

        self.patch(self.h.pages, "_buildProjectPage", counting)
        self.assertEqual(self.page(PUBLIC, self.h.bob).code, 200)
        self.assertEqual(self.page(PUBLIC, None).code, 200)
        self.assertEqual(self.page(PUBLIC, self.h.carol).code, 200)
        self.assertEqual(self.page(PUBLIC, self.h.alice).code, 200)
        self.assertEqual(self.page(PUBLIC, self.h.alice).code, 200)
        keysKept = [key for key in self.h.pages.cache._entries if key[0] == "project"]
        self.assertEqual(sorted(len(key[7]) for key in keysKept), [1, 2], keysKept)

    def test_restrictedChainListIsCachedPerChain(self) -> None:
        """Requesters who see the same chain share one rendering of the project list."""
        from devpi_twisted.services import simple

        renders: list[Any] = []
        real = simple.renderProjectList

        def counting(*args: Any) -> Any:
            renders.append(args[0])
            return real(*args)

        self.patch(simple, "renderProjectList", counting)
        for auth in (self.h.bob, None, self.h.carol, self.h.alice, self.h.alice, self.h.bob):
            self.listing(auth)
        self.assertEqual(renders, [[PUBLIC], [PUBLIC, SECRET]])

    def test_aclChangeInvalidates(self) -> None:
        self.setReaders("alice/private", None)
        self.assertShown(self.h.bob)
        self.setReaders("alice/private", ["alice"])
        self.assertHidden(self.h.bob)
        self.assertShown(self.h.alice)
        self.setReaders("alice/private", ["bob"])
        self.assertShown(self.h.bob)
        self.assertHidden(self.h.carol)

    def test_aclChangeDuringBuildIsNotKept(self) -> None:
        """A page built while acl_read changed is sent but not kept for the next requester."""
        self.setReaders("alice/private", None)
        real = self.h.storage.read
        changed = []

        def changing(function: Any) -> Any:
            d = real(function)
            if not changed:
                changed.append(True)
                self.setReaders("alice/private", ["alice"])
            return d

        self.patch(self.h.storage, "read", changing)
        self.assertEqual(self.page(SECRET, self.h.bob).code, 200)  # read before the change
        self.assertEqual(self.page(SECRET, self.h.bob).code, 404)


class PublicFastPathTests(SynchronousTestCase):
    """A public chain: the page comes from the cache with no storage read and no authentication."""

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "private")
        self.h.createIndex("alice", "staging", bases=["alice/private"])
        self.h.mustUpload("alice/private", buildWheel(SECRET, "1.0"))
        self.reads: list[Any] = []
        self.logins: list[Any] = []
        realRead, realAuth = self.h.storage.read, self.h.auth.authenticate

        def reading(function: Any) -> Any:
            self.reads.append(function)
            return realRead(function)

        def authenticating(*args: Any, **kw: Any) -> Any:
            self.logins.append(args)
            return realAuth(*args, **kw)

        self.patch(self.h.storage, "read", reading)
        self.patch(self.h.auth, "authenticate", authenticating)

    def test_cachedWithoutReadsOrAuthentication(self) -> None:
        first = self.h.get(f"/alice/staging/+simple/{SECRET}/", combine(PIP, self.h.bob))
        self.assertEqual(first.code, 200, first.body)
        self.assertEqual(len(self.reads), 1)  # the page's one read, as before read ACLs
        del self.reads[:]
        second = self.h.get(f"/alice/staging/+simple/{SECRET}/", combine(PIP, self.h.bob))
        self.assertEqual((second.code, second.body), (200, first.body))
        self.assertEqual(self.reads, [])
        self.assertEqual(self.logins, [])

    def test_listAndJSONWithoutAuthentication(self) -> None:
        answer = self.h.get("/alice/staging/+simple/", combine(PIP, self.h.bob))
        self.assertEqual(answer.code, 200, answer.body)
        answer = self.h.get(f"/alice/staging/{SECRET}", combine(JSON_API, self.h.bob))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.logins, [])

    def test_restrictedChainNotAnsweredBeforeRouting(self) -> None:
        """Once a base is restricted, the cached-page lookup before routing finds nothing."""
        self.h.get(f"/alice/staging/+simple/{SECRET}/", combine(PIP, self.h.alice))
        cacheKey = ("alice", "staging", JSON_TYPE, "../../../../", True, "http://devpi.test")
        self.assertIsNotNone(self.h.pages.cachedProjectPage(cacheKey, SECRET))
        key = keys.indexKey("alice", "private")
        self.successResultOf(self.h.storage.write(
            lambda txn: txn.set(key, dict(txn.get(key), acl_read=["alice"]))))
        self.h.get(f"/alice/staging/+simple/{SECRET}/", combine(PIP, self.h.alice))
        self.assertIsNone(self.h.pages.cachedProjectPage(cacheKey, SECRET))
        self.assertIsNotNone(self.h.pages.cachedProjectPage(cacheKey, SECRET, ("alice/staging", "alice/private")))


class KnownFileTests(_Chain, SynchronousTestCase):
    """The known-file shortcut never answers a file of a restricted index."""

    def fileGet(self, auth: Any) -> tuple[Any, int]:
        """GET C{self.path}: the answer, and how many storage reads it took."""
        reads: list[Any] = []
        real = self.h.storage.read

        def counting(function: Any) -> Any:
            reads.append(function)
            return real(function)

        self.patch(self.h.storage, "read", counting)
        try:
            answer = self.h.get(self.path, auth)
        finally:
            self.patch(self.h.storage, "read", real)
        return answer, len(reads)

    def test_restrictedFileTakesTheRoutes(self) -> None:
        page = self.page(SECRET, self.h.alice).json
        self.path = "/" + page["files"][0]["url"].replace("../", "")
        for _ in range(2):
            answer, reads = self.fileGet(self.h.alice)
            self.assertEqual((answer.code, answer.body), (200, self.secret.data))
            self.assertGreater(reads, 0, "a restricted file was answered before routing")

    def test_publicFileStillRemembered(self) -> None:
        page = self.page(PUBLIC, None).json
        self.path = "/" + page["files"][0]["url"].replace("../", "")
        self.fileGet(None)
        answer, reads = self.fileGet(None)
        self.assertEqual((answer.code, answer.body), (200, self.public.data))
        self.assertEqual(reads, 0)

    def test_restrictedAfterRememberedIsForgotten(self) -> None:
        """A file remembered while its index was public is forgotten when acl_read restricts it."""
        self.setReaders("alice/private", None)
        page = self.page(SECRET, None).json
        self.path = "/" + page["files"][0]["url"].replace("../", "")
        self.fileGet(None)
        self.assertEqual(self.fileGet(None)[1], 0)
        self.setReaders("alice/private", ["alice"])
        self.assertGreater(self.fileGet(self.h.alice)[1], 0)
        self.assertGreater(self.fileGet(self.h.alice)[1], 0)


    def test_aclChangeDuringFileReadIsNotRemembered(self) -> None:
        """A file read while its index was public is not remembered if acl_read changed meanwhile."""
        self.setReaders("alice/private", None)
        page = self.page(SECRET, None).json
        self.path = "/" + page["files"][0]["url"].replace("../", "")
        real = self.h.storage.read

        def changing(function: Any) -> Any:
            d = real(function)
            self.patch(self.h.storage, "read", real)
            self.setReaders("alice/private", ["alice"])
            return d

        self.patch(self.h.storage, "read", changing)
        self.assertEqual(self.h.get(self.path).code, 200)  # read before the change
        self.assertGreater(self.fileGet(self.h.alice)[1], 0)


class ShadowingTests(SynchronousTestCase):
    """
    A restricted base's private project does not hide a mirror's releases
    from those who may not read it: they see the mirror's as if the base
    were not there (no sign the private project exists); a reader sees the
    private releases only, as devpi's shadowing rule has it.
    """

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=True)
        self.h.fake.addFile(SECRET, "secret_pkg-9.0-py3-none-any.whl", b"upstream wheel")
        self.h.createIndex("alice", "private")
        self.h.createIndex("alice", "staging", bases=["alice/private", "root/pypi"])
        self.h.mustUpload("alice/private", buildWheel(SECRET, "1.0"))
        key = keys.indexKey("alice", "private")
        self.successResultOf(self.h.storage.write(
            lambda txn: txn.set(key, dict(txn.get(key), acl_read=["alice"]))))

    def files(self, auth: Any, accept: Any = PIP) -> list[str]:
        answer = self.h.get(f"/alice/staging/+simple/{SECRET}/", combine(accept, auth))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertNotIn(b"mirror_whitelist", answer.body)
        return [f["filename"] for f in answer.json["files"]]

    def test_mirrorShownAsIfBaseAbsent(self) -> None:
        self.assertEqual(self.files(self.h.bob), ["secret_pkg-9.0-py3-none-any.whl"])
        self.assertEqual(self.files(self.h.alice), ["secret_pkg-1.0-py3-none-any.whl"])
        self.assertEqual(self.files(None), ["secret_pkg-9.0-py3-none-any.whl"])
        versions = self.h.get(f"/alice/staging/{SECRET}", combine(JSON_API, self.h.bob))
        self.assertEqual(list(versions.json["result"]), ["9.0"])
        versions = self.h.get(f"/alice/staging/{SECRET}", combine(JSON_API, self.h.alice))
        self.assertEqual(list(versions.json["result"]), ["1.0"])


class StageReaderTests(SynchronousTestCase):
    """Who may read a stage in a chain, with an API token's scope."""

    def stage(self, readers: list[str] | None) -> Stage:
        config: dict[str, Any] = {"type": "stage", "bases": []}
        if readers is not None:
            config["acl_read"] = readers
        return Stage("alice", "private", config)

    def test_rules(self) -> None:
        restricted, public = self.stage(["bob"]), self.stage(None)
        self.assertTrue(stageReader(None)(public))
        self.assertFalse(stageReader(None)(restricted))
        self.assertTrue(stageReader(Identity("bob"))(restricted))
        self.assertTrue(stageReader(Identity("alice"))(restricted))
        self.assertFalse(stageReader(Identity("carol"))(restricted))
        self.assertTrue(stageReader(Identity("root"))(restricted))
        self.assertTrue(stageReader(Identity("carol"))(self.stage([":AUTHENTICATED:"])))

    def test_tokenScope(self) -> None:
        """A token without pkg_read on the restricted base does not read it; public bases stay visible."""
        restricted, public = self.stage(["bob"]), self.stage(None)
        uploadOnly = Identity("bob", TokenScope("t1", allowed=frozenset({UPLOAD})))
        otherIndex = Identity("bob", TokenScope("t2", allowed=frozenset({PKG_READ}), indexes=frozenset({"bob/dev"})))
        reading = Identity("bob", TokenScope("t3", allowed=frozenset({PKG_READ}), indexes=frozenset({"alice/private"})))
        self.assertFalse(stageReader(uploadOnly)(restricted))
        self.assertFalse(stageReader(otherIndex)(restricted))
        self.assertTrue(stageReader(reading)(restricted))
        self.assertTrue(stageReader(uploadOnly)(public))

    def test_visibleOrder(self) -> None:
        configs = {
            "a/top": {"bases": ["a/hidden", "a/shared"]},
            "a/hidden": {"bases": ["a/only", "a/shared"], "acl_read": ["a"]},
            "a/only": {"bases": []},
            "a/shared": {"bases": []},
        }
        order = resolutionOrder("a", "top", lambda u, i: configs.get(f"{u}/{i}"))
        self.assertEqual([s.name for s in order], ["a/top", "a/hidden", "a/shared", "a/only"])
        self.assertEqual([s.name for s in visibleOrder(order, stageReader(Identity("b")))], ["a/top", "a/shared"])
        self.assertEqual(visibleOrder(order, stageReader(Identity("a"))), order)
