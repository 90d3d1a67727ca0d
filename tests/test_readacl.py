"""
Read ACLs (C{acl_read}) and the read gate, over the real Klein tree built by
the composition root, with memory fakes (L{tests.releaseharness}).
"""

import json
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from devpi_twisted.app.compose import buildServer
from devpi_twisted.storage.threads import SynchronousRunner

from devpi_twisted.model import keys
from devpi_twisted.model.acl import identityMayRead
from devpi_twisted.model.identity import PKG_READ, UPLOAD, Identity, TokenScope
from devpi_twisted.model.indexconfig import applyEdits
from devpi_twisted.web.routes import Routes

from .distbuilder import buildWheel
from .releaseharness import PIP_ACCEPT, PIP_AGENT, ServerHarness, basic, combine
from .test_export import FIXTURE, _Dirs, readState

JSON = {b"Accept": [b"application/json"]}
PIP = {b"Accept": [PIP_ACCEPT], b"User-Agent": [PIP_AGENT]}


def _concrete(rule: str, project: str, relpath: str) -> str:
    """A URL of a route template under alice/dev."""
    return (rule.replace("<user>", "alice").replace("<index>", "dev").replace("<project>", project)
            .replace("<version>", "1.0").replace("<path:relpath>", relpath).replace("<path:path>", "index.html"))


class _Restricted(SynchronousTestCase):
    """alice/dev with a release, readable by alice and bob only."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")
        self.wheel = buildWheel("secret-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.fileURL = self.h.fileURL("alice/dev", "secret-pkg", self.wheel.filename)
        self.relpath = self.fileURL.split("/+f/", 1)[1]
        self.h.modifyIndex("alice", "dev", ["acl_read=alice,bob"])

    def assertUnauthorized(self, answer: Any) -> None:
        self.assertEqual(answer.code, 401, (answer.url, answer.body))
        self.assertEqual(answer.header("WWW-Authenticate"), 'Basic realm="devpi"')

    def countReads(self) -> list[Any]:
        reads: list[Any] = []
        real = self.h.storage.read

        def counting(function: Any) -> Any:
            reads.append(function)
            return real(function)

        self.patch(self.h.storage, "read", counting)
        return reads


class GateTests(_Restricted):
    def test_everyIndexRouteIsGated(self) -> None:
        """
        Every route of the table under /USER/INDEX, with every method but
        managing the index and uploading: anonymous gets 401 with a Basic
        challenge, carol 403, and the same body whether the project exists.
        """
        checked = 0
        for rule in Routes.app.url_map.iter_rules():
            if not rule.rule.startswith("/<user>/<index>"):
                continue
            indexLevel = rule.rule.rstrip("/") == "/<user>/<index>"
            for method in sorted(rule.methods - {"OPTIONS"}):
                if indexLevel and method in ("PUT", "PATCH", "DELETE", "POST"):
                    continue  # managing the index, uploads: their own checks
                bodies = []
                for project in ("secret-pkg", "no-such-pkg"):
                    url = _concrete(rule.rule, project, self.relpath if project == "secret-pkg" else "x/y/z.whl")
                    kw: dict[str, Any] = {"json": {}} if method in ("PUT", "PATCH", "POST", "PUSH") else {}
                    anonymous = self.h.request(method, url, JSON, **kw)
                    self.assertUnauthorized(anonymous)
                    other = self.h.request(method, url, combine(JSON, self.h.carol), **kw)
                    self.assertEqual(other.code, 403, (method, url, other.body))
                    self.assertIsNone(other.header("WWW-Authenticate"))
                    bodies.append((anonymous.body, other.body))
                    checked += 1
                self.assertEqual(bodies[0], bodies[1], rule.rule)
                if method != "HEAD":
                    self.assertEqual(json.loads(bodies[0][1]), {"message": "no permission to read alice/dev"})
        self.assertGreater(checked, 30)

    def test_pushIsARead(self) -> None:
        """A push (JSON POST to the index) reads its source: gated; an upload form is not."""
        push = self.h.request("POST", "/alice/dev", combine(JSON, self.h.carol),
                              json={"name": "secret-pkg", "version": "1.0", "targetindex": "carol/x"})
        self.assertEqual(push.code, 403)
        upload = self.h.upload("alice/dev", buildWheel("other", "1.0"), auth=self.h.carol)
        self.assertNotIn(b"no permission to read", upload.body)

    def test_readersRead(self) -> None:
        """The owner, root and the listed bob read everything as before."""
        for who in (self.h.alice, self.h.bob, self.h.root):
            self.assertEqual(self.h.get("/alice/dev", combine(JSON, who)).code, 200)
            self.assertEqual(self.h.get("/alice/dev/+simple/secret-pkg/", combine(PIP, who)).code, 200)
            self.assertEqual(self.h.get("/alice/dev/+simple/", combine(PIP, who)).code, 200)
            self.assertEqual(self.h.get("/alice/dev/secret-pkg", combine(JSON, who)).code, 200)
            self.assertEqual(self.h.get("/alice/dev/secret-pkg/1.0", combine(JSON, who)).code, 200)
            answer = self.h.get(self.fileURL, who)
            self.assertEqual((answer.code, answer.body), (200, self.wheel.data))

    def test_authenticatedPrincipal(self) -> None:
        """:AUTHENTICATED: lets any logged-in user read, not anonymous."""
        self.h.modifyIndex("alice", "dev", ["acl_read=:authenticated:"])
        self.assertEqual(self.h.get(self.fileURL, self.h.carol).code, 200)
        self.assertUnauthorized(self.h.get(self.fileURL))

    def test_wrongPasswordIsForbidden(self) -> None:
        """Credentials that do not authenticate are 403, not a new challenge."""
        self.assertEqual(self.h.get(self.fileURL, basic("alice", "wrong")).code, 403)

    def test_publicIndexUnchanged(self) -> None:
        """Another index of alice stays readable by everyone; setting acl_read back opens alice/dev."""
        self.h.createIndex("alice", "pub")
        self.assertEqual(self.h.get("/alice/pub/+simple/", PIP).code, 200)
        self.h.modifyIndex("alice", "dev", ["acl_read=:ANONYMOUS:"])
        self.assertEqual(self.h.get(self.fileURL).code, 200)

    def test_anonymousNeedsNoLookup(self) -> None:
        """An anonymous request to a restricted index is refused without a storage read."""
        reads = self.countReads()
        for url in (self.fileURL, "/alice/dev/+simple/secret-pkg/", "/alice/dev/+simple/nothing/",
                    "/alice/dev/secret-pkg/1.0/+doc/index.html"):
            self.assertUnauthorized(self.h.get(url, PIP))
        self.assertEqual(reads, [])

    def test_publicCachedPageNeedsNoLookup(self) -> None:
        """A cached page of a public index is still answered without a storage read or authentication."""
        self.h.createIndex("alice", "pub")
        self.h.mustUpload("alice/pub", buildWheel("open-pkg", "1.0"))
        self.assertEqual(self.h.get("/alice/pub/+simple/open-pkg/", PIP).code, 200)
        reads = self.countReads()
        self.assertEqual(self.h.get("/alice/pub/+simple/open-pkg/", combine(PIP, self.h.carol)).code, 200)
        self.assertEqual(reads, [])

    def test_fastPathsAreGated(self) -> None:
        """
        Pages and files the owner has had (so the page cache holds them) are
        refused to others: the gate stands before the caches.  (A restricted
        index's files never enter the known-file shortcut at all:
        test_readacl_inherit.KnownFileTests.)
        """
        for _ in range(2):
            self.assertEqual(self.h.get("/alice/dev/+simple/secret-pkg/", combine(PIP, self.h.alice)).code, 200)
            self.assertEqual(self.h.get(self.fileURL, self.h.alice).code, 200)
        self.assertTrue(len(self.h.server.pages.cache), "the page cache is not warm")
        self.assertUnauthorized(self.h.get("/alice/dev/+simple/secret-pkg/", PIP))
        self.assertUnauthorized(self.h.get(self.fileURL))
        self.assertEqual(self.h.get(self.fileURL, self.h.carol).code, 403)
        self.assertEqual(self.h.get("/alice/dev/+simple/secret-pkg/", combine(PIP, self.h.carol)).code, 403)

    def test_encodedPathIsGated(self) -> None:
        """A path with encoded separators names the index as the routes will see it."""
        self.assertUnauthorized(self.h.get("/alice%2Fdev/+simple/secret-pkg/", PIP))
        self.assertUnauthorized(self.h.get("//alice//dev/+simple/secret-pkg/", PIP))
        self.assertUnauthorized(self.h.request("DELETE", "/alice%2Fdev%2Fsecret-pkg", JSON))

    def test_rulesFollowStorage(self) -> None:
        """A server built over storage with a restricted index knows it from the start."""
        self.h.build()
        self.assertUnauthorized(self.h.get(self.fileURL))
        self.assertEqual(self.h.get(self.fileURL, self.h.bob).code, 200)

    def test_restrictedMirror(self) -> None:
        """root/pypi restricted to logged-in users: anonymous 401, alice not refused; /+status omits it."""
        self.h.modifyIndex("root", "pypi", ["acl_read=:AUTHENTICATED:"], auth=self.h.root)
        self.assertUnauthorized(self.h.get("/root/pypi/+simple/", PIP))
        self.assertUnauthorized(self.h.get("/root/pypi/+simple/anything/", PIP))
        self.assertNotIn(self.h.get("/root/pypi/+simple/", combine(PIP, self.h.alice)).code, (401, 403))
        status = self.h.get("/+status", JSON).json["result"]
        self.assertNotIn("root/pypi", status["mirrors"])


class ListingTests(_Restricted):
    def test_rootListing(self) -> None:
        """GET / lists alice/dev to its readers only."""
        self.h.createIndex("alice", "pub")
        for who, expected in ((None, ["pub"]), (self.h.carol, ["pub"]), (self.h.bob, ["dev", "pub"]),
                              (self.h.root, ["dev", "pub"])):
            result = self.h.get("/", combine(JSON, who)).json["result"]
            self.assertEqual(sorted(result["alice"]["indexes"]), expected)
            self.assertIn("username", result["alice"])

    def test_userListing(self) -> None:
        """GET /alice likewise."""
        self.assertEqual(self.h.get("/alice", JSON).json["result"]["indexes"], {})
        indexes = self.h.get("/alice", combine(JSON, self.h.bob)).json["result"]["indexes"]
        self.assertEqual(indexes["dev"]["acl_read"], ["alice", "bob"])


class SettingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")

    def edit(self, edits: Any, who: Any = None) -> Any:
        return self.h.request("PATCH", "/alice/dev", combine(JSON, who or self.h.alice), json=edits)

    def aclRead(self) -> Any:
        return self.h.get("/alice/dev", combine(JSON, self.h.alice)).json["result"].get("acl_read")

    def test_absentMeansEveryone(self) -> None:
        """A new index shows devpi's defaults; adding a reader keeps :ANONYMOUS:."""
        self.assertIsNone(self.aclRead())
        self.assertEqual(self.edit(["acl_read+=carol"]).code, 200)
        self.assertEqual(self.aclRead(), [":ANONYMOUS:", "carol"])
        self.assertEqual(self.edit(["acl_read-=:anonymous:"]).code, 200)
        self.assertEqual(self.aclRead(), ["carol"])
        self.assertEqual(self.h.get("/alice/dev/+simple/", PIP).code, 401)

    def test_clientShapes(self) -> None:
        """key=value strings, +=, -=, JSON lists, and at creation."""
        self.assertEqual(self.edit(["acl_read=alice,bob"]).code, 200)
        self.assertEqual(self.aclRead(), ["alice", "bob"])
        self.assertEqual(self.edit(["acl_read-=bob"]).code, 200)
        self.assertEqual(self.aclRead(), ["alice"])
        self.assertEqual(self.edit({"acl_read": [":authenticated:", "carol"]}).code, 200)
        self.assertEqual(self.aclRead(), [":AUTHENTICATED:", "carol"])
        self.assertEqual(self.edit(["acl_read-=nobody"]).code, 400)
        self.assertEqual(self.edit({"acl_read": 3}).code, 400)
        self.h.createIndex("alice", "new", acl_read="alice")
        self.assertEqual(self.h.get("/alice/new/+simple/", PIP).code, 401)

    def test_onlyManagersChange(self) -> None:
        """bob (even a reader) and anonymous may not change acl_read."""
        self.edit(["acl_read=alice,bob"])
        self.assertEqual(self.edit(["acl_read=:ANONYMOUS:"], self.h.bob).code, 403)
        answer = self.h.request("PATCH", "/alice/dev", JSON, json=["acl_read=:ANONYMOUS:"])
        self.assertEqual(answer.code, 403)
        self.assertEqual(self.aclRead(), ["alice", "bob"])
        self.assertEqual(self.edit(["acl_read=:ANONYMOUS:"], self.h.root).code, 200)

    def test_mirrorSetting(self) -> None:
        """A mirror takes acl_read too."""
        self.h.modifyIndex("root", "pypi", {"acl_read": "root"}, auth=self.h.root)
        self.assertEqual(self.h.get("/root/pypi", combine(JSON, self.h.root)).json["result"]["acl_read"], ["root"])


class RuleTests(SynchronousTestCase):
    """The pure rules with a token's scope."""

    def test_tokenNeedsPkgRead(self) -> None:
        config = {"acl_read": ["bob"]}
        plain = Identity("bob")
        self.assertTrue(identityMayRead(plain, "alice", "dev", config))
        upload = Identity("bob", TokenScope("t", allowed=frozenset({UPLOAD})))
        self.assertFalse(identityMayRead(upload, "alice", "dev", config))
        read = Identity("bob", TokenScope("t", allowed=frozenset({PKG_READ}), indexes=frozenset({"alice/dev"})))
        self.assertTrue(identityMayRead(read, "alice", "dev", config))
        elsewhere = Identity("bob", TokenScope("t", allowed=frozenset({PKG_READ}), indexes=frozenset({"alice/x"})))
        self.assertFalse(identityMayRead(elsewhere, "alice", "dev", config))
        self.assertTrue(identityMayRead(upload, "alice", "dev", {}))  # public: anyone
        self.assertFalse(identityMayRead(None, "alice", "dev", config))

    def test_editsStartFromEveryone(self) -> None:
        current = {"type": "stage"}
        self.assertEqual(applyEdits(current, ["acl_read+=x"])["acl_read"], [":ANONYMOUS:", "x"])


class ExportTests(_Dirs, SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """acl_read is imported from an export and exported again."""
        def edit(data: dict[str, Any]) -> None:
            data["indexes"]["alice/dev"]["indexconfig"]["acl_read"] = ["alice", ":AUTHENTICATED:"]

        self.importInto("server1", self.editFixture(edit))
        config = readState(self.workdir.child("server1"), keys.INDEX)[keys.indexKey("alice", "dev")]
        self.assertEqual(config["acl_read"], ["alice", ":AUTHENTICATED:"])
        exported = json.loads(self.exportTo("server1", "export1").child("dataindex.json").getContent())
        self.assertEqual(exported["indexes"]["alice/dev"]["indexconfig"]["acl_read"], ["alice", ":AUTHENTICATED:"])
        self.assertTrue(FIXTURE.exists())


class _Primary(Resource):
    """Stands for a primary that would answer every read."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.path)
        return b"from the primary"


class ReplicaTests(SynchronousTestCase):
    """A replica built by the composition root refuses restricted reads before its proxy asks the primary."""

    def test_proxyIsGated(self) -> None:
        from dataclasses import replace

        h = ServerHarness(self)
        h.modifyIndex("root", "pypi", ["acl_read=root"], auth=h.root)
        primary = _Primary()
        agent = RequestTraversalAgent(primary)
        config = replace(h.config, primaryURL="http://primary.test")
        server = buildServer(
            config, reactor=h.clock, nodeinfo={"uuid": "r" * 32, "role": "replica", "storage": "memory"},
            storage=h.storage, blobs=h.blobs, runner=SynchronousRunner(), secret=b"k" * 48,
            upstreamAgent=agent, primaryAgent=agent, updateNodeinfo=lambda info: None, hashing=h.hashing,
        )
        server.replica.isReachable = lambda: True  # type: ignore[union-attr]
        client = StubTreq(server.resource)
        for path, headers, code in (("/root/pypi/+f/a/b/x.whl", {}, 401),
                                    ("/root/pypi/+simple/pkg/", PIP, 401),
                                    ("/root/pypi/+simple/pkg/", h.carol, 403),
                                    ("/root/pypi/+f/a/b/x.whl", h.carol, 403)):
            d = client.get("http://replica.test" + path, headers=headers)
            for _ in range(5):
                agent.flush()
                client.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, code, path)
            self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Api-Version"), [b"2"])
        self.assertEqual(primary.seen, [])


class TokenReadTests(_Restricted):
    """API tokens read a restricted index only with pkg_read on it."""

    def token(self, **restrictions: Any) -> str:
        answer = self.h.request("POST", "/alice/+token-create", combine(self.h.alice, JSON), json=restrictions)
        self.assertEqual(answer.code, 200, answer.body)
        return answer.json["result"]["token"]

    def test_pkgReadNeeded(self) -> None:
        """An upload-only token is refused (403); one with pkg_read on this index reads; one for another index is refused."""
        bearer = lambda token: {b"Authorization": [b"Bearer " + token.encode("ascii")]}  # noqa: E731
        page = "/alice/dev/+simple/secret-pkg/"
        uploadOnly = self.token(allowed=["upload"])
        self.assertEqual(self.h.get(page, combine(PIP, bearer(uploadOnly))).code, 403)
        self.assertEqual(self.h.get(self.fileURL, bearer(uploadOnly)).code, 403)
        reader = self.token(allowed=["pkg_read"], indexes=["alice/dev"])
        self.assertEqual(self.h.get(page, combine(PIP, bearer(reader))).code, 200)
        self.assertEqual(self.h.get(self.fileURL, bearer(reader)).code, 200)
        self.h.createIndex("alice", "other")
        elsewhere = self.token(allowed=["pkg_read"], indexes=["alice/other"])
        self.assertEqual(self.h.get(page, combine(PIP, bearer(elsewhere))).code, 403)
        unrestricted = self.token()
        self.assertEqual(self.h.get(page, combine(PIP, basic("__token__", unrestricted))).code, 200)
