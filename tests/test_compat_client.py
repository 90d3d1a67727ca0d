"""
What devpi-client and its own functional tests expect of a devpi server,
through the real web resource in memory (issue 11, "devpi-client
compatibility"): an empty password for root, 404 before 403 for an index of
a missing user, C{mirror_url} kept as given, a mirror's project JSON that
follows C{mirror_cache_expiry}, and a hint for C{bases=pypi}.
"""

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .mirrorharness import MirrorHarness
from .releaseharness import ServerHarness, basic, combine

JSON = {b"Accept": [b"application/json"]}


def devpiAuth(user: str, secret: str) -> dict[bytes, list[bytes]]:
    """devpi-client's own credentials header."""
    return {b"X-Devpi-Auth": [base64.b64encode(f"{user}:{secret}".encode("utf-8"))]}


class EmptyRootPasswordTests(SynchronousTestCase):
    """C{devpi user -m root password=} sets root's password to "", as devpi does."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)

    def patchUser(self, user: str, body: Any, auth: Any) -> Any:
        return self.h.request("PATCH", f"/{user}", combine(auth, JSON), json=body)

    def login(self, user: str, password: str) -> Any:
        return self.h.request("POST", "/+login", JSON, json={"user": user, "password": password})

    def test_rootSetsEmptyPassword(self) -> None:
        """The change is made and answered with a new token; the old password stops working."""
        # devpi-client sends the whole user config back, with the new password in it.
        config = self.h.get("/root", JSON).json["result"]
        config.pop("username")
        config.pop("indexes")
        config["password"] = ""
        answer = self.patchUser("root", config, self.h.root)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "userpassword")
        self.assertEqual(self.login("root", "rootpw").code, 401)
        answer = self.login("root", "")
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "proxyauth")

    def test_emptyPasswordAuthenticatesRequests(self) -> None:
        """C{root:} in X-Devpi-Auth or Basic then authenticates, as devpi-init's root does."""
        self.assertEqual(self.patchUser("root", {"password": ""}, self.h.root).code, 200)
        for auth in (devpiAuth("root", ""), basic("root", "")):
            answer = self.h.get("/+api", combine(auth, JSON))
            self.assertEqual(answer.json["result"]["authstatus"][:2], ["ok", "root"])
        answer = self.h.request("PUT", "/root/made", combine(devpiAuth("root", ""), JSON), json={})
        self.assertEqual(answer.code, 200, answer.body)

    def test_omittedPasswordKept(self) -> None:
        """A PATCH without a password (or with null) leaves the password alone."""
        for body in ({"email": "root@example.com"}, {"password": None, "title": "Admin"}):
            answer = self.patchUser("root", body, self.h.root)
            self.assertEqual(answer.code, 200, answer.body)
            self.assertEqual(self.login("root", "rootpw").code, 200)
            self.assertEqual(self.login("root", "").code, 401)


class IndexOfMissingUserTests(SynchronousTestCase):
    """Creating an index under a user that does not exist is 404, whoever asks."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)

    def test_404ForEveryone(self) -> None:
        for auth in (self.h.root, self.h.alice, {}):
            answer = self.h.request("PUT", "/nobody/dev", combine(auth, JSON), json={})
            self.assertEqual(answer.code, 404, answer.body)
            self.assertEqual(answer.json["message"], "no user 'nobody'")

    def test_existingUserStill403(self) -> None:
        """Another user's namespace stays forbidden."""
        answer = self.h.request("PUT", "/bob/dev", combine(self.h.alice, JSON), json={})
        self.assertEqual(answer.code, 403, answer.body)


class MirrorURLAsGivenTests(SynchronousTestCase):
    """C{mirror_url} is stored and shown as given; upstream is still asked at the right URLs."""

    def setUp(self) -> None:
        self.h = MirrorHarness(self, mirrorURL="http://upstream.test/simple")
        self.h.addWheel("demo", "1.0")

    def tearDown(self) -> None:
        self.h.stop()

    def config(self) -> Any:
        return self.h.get("/root/pypi?no_projects=", JSON).json["result"]

    def test_shownAsGiven(self) -> None:
        self.assertEqual(self.config()["mirror_url"], "http://upstream.test/simple")
        self.h.modifyIndex("root", "pypi", ["mirror_url=http://upstream.test/simple/"], auth=self.h.root)
        self.assertEqual(self.config()["mirror_url"], "http://upstream.test/simple/")

    def test_fetchesBelowTheURL(self) -> None:
        """Project pages and the project list are asked for below C{mirror_url}, slash or not."""
        files = self.h.mirrorFiles("demo")
        self.assertEqual(list(files), ["demo-1.0-py3-none-any.whl"])
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [b"application/vnd.pypi.simple.v1+json"]})
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo"])
        self.assertEqual(self.h.upstreamPaths(), ["/simple/demo/", "/simple/"])
        url = self.h.mirrorFileURL("demo", "demo-1.0-py3-none-any.whl")
        self.assertEqual(self.h.get(url).code, 200)


class BareBaseSuggestionTests(SynchronousTestCase):
    """C{bases=pypi} is 400 with a hint at C{root/pypi}, as the README's new user needs."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")

    def test_create(self) -> None:
        for bases in ("pypi", ["pypi"], "alice/dev,pypi"):
            answer = self.h.request("PUT", "/alice/new", combine(self.h.alice, JSON), json={"bases": bases})
            self.assertEqual(answer.code, 400, answer.body)
            self.assertIn("did you mean 'root/pypi'?", answer.json["message"])
        self.assertEqual(self.h.get("/alice/new", JSON).code, 404)

    def test_modify(self) -> None:
        """Both PATCH forms (devpi-client's key=value edits and a JSON object)."""
        for body in (["bases=pypi"], ["bases+=pypi"], {"bases": "pypi"}):
            answer = self.h.request("PATCH", "/alice/dev", combine(self.h.alice, JSON), json=body)
            self.assertEqual(answer.code, 400, answer.body)
            self.assertIn("did you mean 'root/pypi'?", answer.json["message"])

    def test_everyIndexOfThatName(self) -> None:
        """Each existing index of that name is offered; names nobody has get the plain error."""
        self.h.createIndex("bob", "dev")
        answer = self.h.request("PUT", "/carol/x", combine(self.h.carol, JSON), json={"bases": "dev"})
        self.assertEqual(answer.json["message"],
                         "invalid base index spec: 'dev', bases are USER/INDEX: "
                         "did you mean 'alice/dev' or 'bob/dev'?")
        answer = self.h.request("PUT", "/carol/x", combine(self.h.carol, JSON), json={"bases": "nope"})
        self.assertEqual((answer.code, answer.json["message"]), (400, "invalid base index spec: 'nope'"))


class MirrorProjectJSONTests(SynchronousTestCase):
    """
    C{GET /USER/MIRROR/PROJECT} (what C{devpi list} and C{getjson} read)
    serves upstream's versions and follows C{mirror_cache_expiry} as the
    simple page does.
    """

    def harness(self, expiry: int) -> MirrorHarness:
        h = MirrorHarness(self, expiry=expiry)
        self.addCleanup(h.stop)
        return h

    def projectJSON(self, h: MirrorHarness, path: str = "/root/pypi/demo") -> Any:
        return h.get(path, JSON)

    def test_versionsFromUpstream(self) -> None:
        h = self.harness(1800)
        wheel, _, _ = h.addWheel("demo", "1.0", requiresPython=">=3.8")
        h.fake.addFile("demo", "demo-1.1.tar.gz", b"sdist", yanked="broken")
        answer = self.projectJSON(h)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "projectconfig")
        result = answer.json["result"]
        self.assertEqual(sorted(result), ["1.0", "1.1"])
        self.assertEqual(result["1.0"]["requires_python"], ">=3.8")
        self.assertEqual(result["1.1"]["yanked"], "broken")
        [link] = result["1.0"]["+links"]
        self.assertEqual(link["rel"], "releasefile")
        self.assertEqual(link["href"], h.mirrorFileURL("demo", wheel))
        self.assertEqual(link["hash_spec"], "sha256=" + link["hashes"]["sha256"])
        self.assertEqual(h.get(link["href"]).code, 200)
        version = self.projectJSON(h, "/root/pypi/demo/1.1")
        self.assertEqual((version.code, version.json["type"]), (200, "versiondata"))
        self.assertEqual(version.json["result"]["name"], "demo")
        self.assertEqual(self.projectJSON(h, "/root/pypi/demo/9.9").code, 404)
        self.assertEqual(self.projectJSON(h, "/root/pypi/nope").code, 404)

    def test_expiryZeroAsksEveryTime(self) -> None:
        """With C{mirror_cache_expiry=0} a project that appears upstream later is found."""
        h = self.harness(0)
        self.assertEqual(self.projectJSON(h).code, 404)
        h.addWheel("demo", "1.0")
        answer = self.projectJSON(h)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(list(answer.json["result"]), ["1.0"])
        h.addWheel("demo", "2.0")
        self.assertEqual(sorted(self.projectJSON(h).json["result"]), ["1.0", "2.0"])
        self.assertEqual(h.upstreamPaths().count("/simple/demo/"), 3)

    def test_cachedWithinExpiry(self) -> None:
        """Within the expiry the cached links answer, as the simple page does; after it upstream is asked."""
        h = self.harness(600)
        h.addWheel("demo", "1.0")
        self.assertEqual(list(self.projectJSON(h).json["result"]), ["1.0"])
        h.addWheel("demo", "2.0")
        self.assertEqual(list(self.projectJSON(h).json["result"]), ["1.0"])
        h.clock.advance(601)
        self.assertEqual(sorted(self.projectJSON(h).json["result"]), ["1.0", "2.0"])

    def test_inheritedWithPrivateShadowing(self) -> None:
        """An index based on the mirror lists private and upstream versions; upstream down leaves the private ones."""
        from .distbuilder import buildWheel

        h = self.harness(0)
        h.addWheel("demo", "1.0")
        h.createIndex("alice", "dev", bases=["root/pypi"], mirror_whitelist=["demo"])
        h.mustUpload("alice/dev", buildWheel("demo", "2.0"))
        result = self.projectJSON(h, "/alice/dev/demo").json["result"]
        self.assertEqual(sorted(result), ["1.0", "2.0"])
        self.assertTrue(result["1.0"]["+links"][0]["href"].startswith("http://devpi.test/root/pypi/+f/"))
        h.fake.down = True
        # Upstream failing: the cached links stand in, as on the simple page ...
        self.assertEqual(sorted(self.projectJSON(h, "/alice/dev/demo").json["result"]), ["1.0", "2.0"])
        # ... without any, the private releases answer alone, and a mirror alone is 502.
        h.modifyIndex("alice", "dev", ["mirror_whitelist+=solo"])
        h.mustUpload("alice/dev", buildWheel("solo", "1.0"))
        answer = self.projectJSON(h, "/alice/dev/solo")
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(list(answer.json["result"]), ["1.0"])
        self.assertEqual(self.projectJSON(h, "/root/pypi/other").code, 502)
