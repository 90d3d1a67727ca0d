"""
The JSON API through the real Klein resource, in memory (StubTreq).

Every answer also goes through L{tests.helpers.APIHarness.checkCommon}: devpi's
headers, the serial, C{Content-Type: application/json} and JSON error bodies.
"""

import re
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.services.auth import TOKEN_LIFETIME
from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy

from .helpers import (
    BASE,
    ROOT_PASSWORD,
    START_TIME,
    UUID,
    APIHarness,
    basicAuth,
    devpiAuth,
    merge,
)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ROOT = basicAuth("root", ROOT_PASSWORD)
FEATURE = "server-keyvalue-parsing"


class _APITestCase(SynchronousTestCase):
    """A harness with root, root/pypi and the users alice and bob."""

    policy = Policy()

    def setUp(self) -> None:
        self.api = APIHarness(self, policy=self.policy, rootPypi=True)
        self.api.createUser("alice", "alicepw", email="alice@example.com")
        self.api.createUser("bob", "bobpw")
        self.alice = basicAuth("alice", "alicepw")
        self.bob = basicAuth("bob", "bobpw")

    def authstatus(self, headers: dict[bytes, list[bytes]] | None) -> list[Any]:
        answer = self.api.get("/+api", headers=headers)
        self.assertEqual(answer.code, 200)
        return answer.json["result"]["authstatus"]

    def assertError(self, answer: Any, code: int, message: str | None = None) -> None:
        """C{answer} is an error C{code}, and its message is C{message} when given."""
        self.assertEqual(answer.code, code, answer.body)
        self.assertNotIn("result", answer.json)
        if message is not None:
            self.assertEqual(answer.json["message"], message)

    def assertWrote(self, answer: Any) -> None:
        """C{answer} is a write that committed exactly one new serial and said so."""
        self.assertEqual(answer.serial, answer.serialBefore + 1)

    def assertUnchanged(self, answer: Any) -> None:
        """C{answer} committed nothing."""
        self.assertEqual(answer.serial, answer.serialBefore)
        self.assertEqual(self.api.storage.currentSerial(), answer.serialBefore)


class RootAndApiConfigTests(_APITestCase):
    """C{GET /} and the three C{+api} routes."""

    def test_listUsers(self) -> None:
        """GET / lists every user with its indexes as list:userconfig."""
        answer = self.api.get("/")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "list:userconfig")
        result = answer.json["result"]
        self.assertEqual(sorted(result), ["alice", "bob", "root"])
        self.assertEqual(result["root"]["username"], "root")
        self.assertEqual(result["root"]["indexes"]["pypi"]["type"], "mirror")
        self.assertEqual(result["alice"]["email"], "alice@example.com")
        self.assertEqual(result["bob"]["indexes"], {})

    def test_anonymousApi(self) -> None:
        """GET /+api without credentials is noauth, with the login URL and features only."""
        answer = self.api.get("/+api")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "apiconfig")
        result = answer.json["result"]
        self.assertEqual(sorted(result), ["authstatus", "features", "login"])
        self.assertEqual(result["login"], f"{BASE}/+login")
        self.assertEqual(result["authstatus"], ["noauth", "", []])
        self.assertIn(FEATURE, result["features"])

    def test_postApi(self) -> None:
        """POST /+api answers like GET (devpi allows both)."""
        answer = self.api.post("/+api", body=b"")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["result"]["authstatus"], ["noauth", "", []])

    def test_basicPassword(self) -> None:
        """A right password in Basic auth gives authstatus ok."""
        self.assertEqual(self.authstatus(self.alice), ["ok", "alice", []])

    def test_devpiAuthPassword(self) -> None:
        """A right password in X-Devpi-Auth gives authstatus ok."""
        self.assertEqual(self.authstatus(devpiAuth("alice", "alicepw")), ["ok", "alice", []])

    def test_token(self) -> None:
        """A login token works in X-Devpi-Auth and in Basic auth."""
        token = self.api.login("alice", "alicepw")
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["ok", "alice", []])
        self.assertEqual(self.authstatus(basicAuth("alice", token)), ["ok", "alice", []])

    def test_wrongPasswordIsAnonymous(self) -> None:
        """Wrong credentials are not an error; the request is anonymous."""
        self.assertEqual(self.authstatus(basicAuth("alice", "nope")), ["noauth", "", []])
        self.assertEqual(self.authstatus(basicAuth("nobody", "nope")), ["noauth", "", []])
        self.assertEqual(self.authstatus(devpiAuth("alice", "nope")), ["noauth", "", []])

    def test_devpiAuthWinsOverBasic(self) -> None:
        """When both headers are valid, X-Devpi-Auth decides who the requester is."""
        headers = merge(devpiAuth("alice", "alicepw"), ROOT)
        self.assertEqual(self.authstatus(headers), ["ok", "alice", []])

    def test_invalidDevpiAuthIgnoresBasic(self) -> None:
        """An invalid X-Devpi-Auth makes the request anonymous; valid Basic is not consulted."""
        wrong = merge(devpiAuth("alice", "wrong"), ROOT)
        self.assertEqual(self.authstatus(wrong), ["noauth", "", []])
        garbage = merge({b"X-Devpi-Auth": [b"!!not base64!!"]}, ROOT)
        self.assertEqual(self.authstatus(garbage), ["noauth", "", []])
        noColon = merge({b"X-Devpi-Auth": [b"YWxpY2U="]}, ROOT)  # "alice"
        self.assertEqual(self.authstatus(noColon), ["noauth", "", []])

    def test_invalidDevpiAuthCannotWrite(self) -> None:
        """With an invalid X-Devpi-Auth, root's valid Basic auth does not authorise a write."""
        answer = self.api.put("/alice/dev", json={}, headers=merge(devpiAuth("root", "x"), ROOT))
        self.assertError(answer, 403)
        self.assertUnchanged(answer)

    def test_userApi(self) -> None:
        """GET /USER/+api has only login, authstatus and features."""
        answer = self.api.get("/alice/+api", headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "apiconfig")
        self.assertEqual(answer.json["result"], {
            "login": f"{BASE}/+login",
            "authstatus": ["ok", "alice", []],
            "features": answer.json["result"]["features"],
        })
        self.assertIn(FEATURE, answer.json["result"]["features"])

    def test_indexApi(self) -> None:
        """GET /USER/INDEX/+api of a stage adds index, simpleindex and pypisubmit URLs."""
        self.api.createIndex("alice", "dev", "alicepw")
        answer = self.api.get("/alice/dev/+api")
        self.assertEqual(answer.code, 200)
        result = answer.json["result"]
        self.assertEqual(result["index"], f"{BASE}/alice/dev")
        self.assertEqual(result["simpleindex"], f"{BASE}/alice/dev/+simple/")
        self.assertEqual(result["pypisubmit"], f"{BASE}/alice/dev/")
        self.assertEqual(result["login"], f"{BASE}/+login")
        self.assertEqual(result["authstatus"], ["noauth", "", []])

    def test_mirrorApiHasNoPypisubmit(self) -> None:
        """A mirror's +api leaves pypisubmit out, so devpi-client refuses to upload to it."""
        answer = self.api.get("/root/pypi/+api")
        self.assertEqual(answer.code, 200)
        result = answer.json["result"]
        self.assertEqual(result["index"], f"{BASE}/root/pypi")
        self.assertEqual(result["simpleindex"], f"{BASE}/root/pypi/+simple/")
        self.assertNotIn("pypisubmit", result)

    def test_indexApiUnknownIndex(self) -> None:
        """+api of an index that does not exist is 404."""
        self.assertError(self.api.get("/alice/nope/+api"), 404, "The stage alice/nope could not be found.")
        self.assertError(self.api.get("/nobody/dev/+api"), 404)

    def test_outsideURL(self) -> None:
        """
        An X-Outside-Url header from a client that is not a trusted proxy
        does not change the generated URLs (tests.test_pagecache covers a
        trusted proxy's).
        """
        headers = {b"X-Outside-Url": [b"https://pypi.example.com/devpi/"]}
        answer = self.api.get("/root/pypi/+api", headers=headers)
        self.assertEqual(answer.json["result"]["login"], f"{BASE}/+login")
        self.assertEqual(answer.json["result"]["index"], f"{BASE}/root/pypi")


class LoginTests(_APITestCase):
    """C{POST /+login} and the tokens it hands out."""

    def test_loginShape(self) -> None:
        """A successful login is proxyauth with a token and an expiration of 36000 s."""
        answer = self.api.post("/+login", json={"user": "alice", "password": "alicepw"})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "proxyauth")
        self.assertEqual(answer.json["message"], "login successful")
        self.assertEqual(sorted(answer.json["result"]), ["expiration", "password"])
        self.assertEqual(answer.json["result"]["expiration"], 36000)
        self.assertIsInstance(answer.json["result"]["password"], str)
        self.assertNotEqual(answer.json["result"]["password"], "alicepw")
        self.assertUnchanged(answer)

    def test_wrongPassword(self) -> None:
        """A wrong password is 401 naming the user."""
        answer = self.api.post("/+login", json={"user": "alice", "password": "nope"})
        self.assertError(answer, 401, "user 'alice' could not be authenticated")

    def test_unknownUser(self) -> None:
        """An unknown user is 401 like a wrong password."""
        answer = self.api.post("/+login", json={"user": "nobody", "password": "x"})
        self.assertError(answer, 401, "user 'nobody' could not be authenticated")

    def test_missingFields(self) -> None:
        """A body without a user or password string is 400."""
        for body in [{}, {"user": "alice"}, {"password": "alicepw"}, [], {"user": 1, "password": "x"}]:
            answer = self.api.post("/+login", json=body)
            self.assertError(answer, 400, "Bad request: no user/password specified")

    def test_badJSON(self) -> None:
        """A body that is not JSON is 400 in devpi's words."""
        for body in [b"{nope", b"", b"\xff\xfe"]:
            answer = self.api.post("/+login", body=body)
            self.assertError(answer, 400, "Bad request: could not decode json")

    def test_tokenAuthorisesWrites(self) -> None:
        """A token from login authorises a later write as that user."""
        token = self.api.login("alice", "alicepw")
        answer = self.api.put("/alice/dev", json={}, headers=devpiAuth("alice", token))
        self.assertEqual(answer.code, 200)
        self.assertWrote(answer)

    def test_tokenOfAnotherUser(self) -> None:
        """Alice's token sent under bob's name authenticates nobody."""
        token = self.api.login("alice", "alicepw")
        self.assertEqual(self.authstatus(devpiAuth("bob", token)), ["noauth", "", []])

    def test_tamperedToken(self) -> None:
        """A token with a changed character is not accepted."""
        token = self.api.login("alice", "alicepw")
        flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
        self.assertEqual(self.authstatus(devpiAuth("alice", flipped)), ["noauth", "", []])

    def test_tokenDiesWithPasswordChange(self) -> None:
        """Changing the password invalidates the tokens issued before."""
        token = self.api.login("alice", "alicepw")
        answer = self.api.patch("/alice", json={"password": "newpw"}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["noauth", "", []])

    def test_tokenDiesWithUser(self) -> None:
        """Deleting the user invalidates its tokens, even if the name is created again."""
        token = self.api.login("alice", "alicepw")
        self.assertEqual(self.api.delete("/alice", headers=ROOT).code, 200)
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["noauth", "", []])
        self.api.createUser("alice", "alicepw")
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["noauth", "", []])
        self.assertEqual(self.authstatus(self.alice), ["ok", "alice", []])

    def test_tokenExpires(self) -> None:
        """A token works until 36000 seconds have passed and not after."""
        token = self.api.login("alice", "alicepw")
        self.api.clock.advance(TOKEN_LIFETIME - 1)
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["ok", "alice", []])
        self.api.clock.advance(2)
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["noauth", "", []])
        self.assertEqual(self.authstatus(basicAuth("alice", token)), ["noauth", "", []])
        self.assertEqual(self.authstatus(self.alice), ["ok", "alice", []])

    def test_wrongMethod(self) -> None:
        """GET /+login is a 404 or 405 with a JSON message, and logs nobody in."""
        answer = self.api.get("/+login", headers=self.alice)
        self.assertIn(answer.code, (404, 405))
        self.assertNotIn("result", answer.json)


class CreateUserTests(_APITestCase):
    """C{PUT /USER}."""

    def test_createShape(self) -> None:
        """A new user is 201 userconfig with its profile, created time and no indexes."""
        answer = self.api.put("/carol", json={
            "password": "pw", "email": "c@example.com", "title": "Carol",
            "description": "d", "custom_data": {"a": 1},
        })
        self.assertEqual(answer.code, 201)
        self.assertWrote(answer)
        self.assertEqual(answer.json["type"], "userconfig")
        result = answer.json["result"]
        self.assertRegex(result.pop("created"), ISO_Z)
        self.assertEqual(result, {
            "username": "carol", "email": "c@example.com", "title": "Carol",
            "description": "d", "custom_data": {"a": 1}, "indexes": {},
        })
        self.assertEqual(self.authstatus(basicAuth("carol", "pw")), ["ok", "carol", []])

    def test_noPasswordHashShown(self) -> None:
        """Neither the password nor its hash appears in any answer about users."""
        self.api.createIndex("alice", "dev", "alicepw")
        answers = [
            self.api.put("/carol", json={"password": "sekrit"}),
            self.api.get("/carol"),
            self.api.get("/alice"),
            self.api.get("/"),
            self.api.patch("/carol", json={"email": "e@example.com"}, headers=basicAuth("carol", "sekrit")),
            self.api.patch("/carol", json={"password": "sekrit2"}, headers=basicAuth("carol", "sekrit")),
        ]
        for answer in answers:
            self.assertLess(answer.code, 300, answer.body)
            self.assertNotIn(b"pwhash", answer.body)
            self.assertNotIn(b"argon2", answer.body)
            self.assertNotIn(b"sekrit", answer.body)

    def test_existing(self) -> None:
        """Creating an existing user is 409 and changes nothing."""
        answer = self.api.put("/alice", json={"password": "other"})
        self.assertError(answer, 409, "user already exists")
        self.assertUnchanged(answer)
        self.assertEqual(self.authstatus(self.alice), ["ok", "alice", []])

    def test_unknownKey(self) -> None:
        """An unknown key is 400 naming it."""
        answer = self.api.put("/carol", json={"password": "pw", "foo": 1})
        self.assertError(answer, 400, "Unknown keys in user config: foo")
        self.assertUnchanged(answer)

    def test_profileFieldsAreText(self) -> None:
        """An e-mail, title or description that is not a string is 400 and nothing is created."""
        for key in ("email", "title", "description"):
            answer = self.api.put("/carol", json={"password": "pw", key: ["not", "text"]})
            self.assertError(answer, 400, f"{key!r} must be a string")
            self.assertUnchanged(answer)

    def test_missingPassword(self) -> None:
        """Without a password (a pwhash alone is not enough) creation is 400."""
        hashed = self.api.hashing.hash("pw")
        for body in [{}, {"email": "c@example.com"}, {"pwhash": hashed}]:
            answer = self.api.put("/carol", json=body)
            self.assertError(answer, 400, "password needs to be set")
            self.assertUnchanged(answer)

    def test_pwhashWins(self) -> None:
        """Given both, the pwhash is stored and its password logs in."""
        hashed = self.api.hashing.hash("fromhash")
        answer = self.api.put("/carol", json={"password": "ignored", "pwhash": hashed})
        self.assertEqual(answer.code, 201)
        self.assertEqual(self.authstatus(basicAuth("carol", "fromhash")), ["ok", "carol", []])
        self.assertEqual(self.authstatus(basicAuth("carol", "ignored")), ["noauth", "", []])

    def test_refusedNames(self) -> None:
        """Names with ASCII symbols other than -.@_ or spaces are 400."""
        for name in ["bo b", "a!b", "a:b", "a+b", "a,b", "a;b", "a=b", "a%b", "a\tb"]:
            answer = self.api.put("/" + quote(name, safe=""), json={"password": "pw"})
            self.assertError(answer, 400)
            self.assertIn("contains characters that aren't allowed", answer.json["message"])
            self.assertUnchanged(answer)
        answer = self.api.put("/bo%20b", json={"password": "pw"})
        self.assertEqual(
            answer.json["message"],
            "username 'bo b' contains characters that aren't allowed. "
            "Any ascii symbol besides -.@_ is blocked.",
        )

    def test_allowedNames(self) -> None:
        """Unicode names and the symbols -.@_ are accepted and can be read back."""
        for name in ["jürgen", "a.b-c_d@e", "Ωmega", "x"]:
            answer = self.api.put("/" + quote(name, safe="@"), json={"password": "pw"})
            self.assertEqual(answer.code, 201, answer.body)
            self.assertEqual(answer.json["result"]["username"], name)
            got = self.api.get("/" + quote(name, safe="@"))
            self.assertEqual(got.json["result"]["username"], name)
        self.assertEqual(self.authstatus(basicAuth("jürgen", "pw")), ["ok", "jürgen", []])

    def test_malformedJSON(self) -> None:
        """A body that is not a JSON object is 400."""
        for body in [b"{", b""]:
            self.assertError(self.api.put("/carol", body=body), 400, "Bad request: could not decode json")
        self.assertError(self.api.put("/carol", json=["password", "x"]), 400)
        self.assertError(self.api.put("/carol", json="pw"), 400)
        self.assertError(self.api.get("/carol"), 404, "no user 'carol'")

    def test_trailingSlash(self) -> None:
        """PUT /USER/ works like PUT /USER."""
        self.assertEqual(self.api.put("/carol/", json={"password": "pw"}).code, 201)
        self.assertEqual(self.api.get("/carol/").json["result"]["username"], "carol")


class RestrictModifyTests(_APITestCase):
    """C{--restrict-modify=alice}: only root and alice manage users and indexes."""

    def setUp(self) -> None:
        self.api = APIHarness(self, policy=Policy(restrictModify=("alice",)), rootPypi=True)
        for name, password in [("alice", "alicepw"), ("bob", "bobpw")]:
            answer = self.api.put(f"/{name}", json={"password": password}, headers=ROOT)
            self.assertEqual(answer.code, 201)
        self.alice = basicAuth("alice", "alicepw")
        self.bob = basicAuth("bob", "bobpw")

    def test_anonymousCannotCreateUsers(self) -> None:
        """Anonymous user creation is 403 under --restrict-modify."""
        answer = self.api.put("/carol", json={"password": "pw"})
        self.assertError(answer, 403, "no permission to create user carol")
        self.assertUnchanged(answer)

    def test_unlistedCannotCreate(self) -> None:
        """A user not on the list cannot create users or their own indexes."""
        self.assertError(self.api.put("/carol", json={"password": "pw"}, headers=self.bob), 403)
        self.assertError(self.api.put("/bob/dev", json={}, headers=self.bob), 403)
        self.assertError(self.api.patch("/bob", json={"email": "b@example.com"}, headers=self.bob), 403)

    def test_unlistedMayChangeOwnPassword(self) -> None:
        """A user not on the list may still change their own password."""
        answer = self.api.patch("/bob", json={"password": "new"}, headers=self.bob)
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.authstatus(basicAuth("bob", "new")), ["ok", "bob", []])

    def test_listedAndRootMayCreate(self) -> None:
        """Root and the listed user create users and indexes, also for others."""
        self.assertEqual(self.api.put("/carol", json={"password": "pw"}, headers=self.alice).code, 201)
        self.assertEqual(self.api.put("/dave", json={"password": "pw"}, headers=ROOT).code, 201)
        self.assertEqual(self.api.put("/bob/dev", json={}, headers=self.alice).code, 200)


class ModifyUserTests(_APITestCase):
    """C{PATCH /USER}."""

    def test_modifyProfile(self) -> None:
        """A profile change is 200 'user updated' and sets modified."""
        answer = self.api.patch("/alice", json={"email": "new@example.com", "title": "A"}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json, {"message": "user updated"})
        self.assertWrote(answer)
        result = self.api.get("/alice").json["result"]
        self.assertEqual((result["email"], result["title"]), ("new@example.com", "A"))
        self.assertRegex(result["modified"], ISO_Z)

    def test_falseyRemoves(self) -> None:
        """An empty or null value removes the key."""
        self.api.patch("/alice", json={"title": "T"}, headers=self.alice)
        answer = self.api.patch("/alice", json={"email": "", "title": None}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        result = self.api.get("/alice").json["result"]
        self.assertNotIn("email", result)
        self.assertNotIn("title", result)

    def test_passwordChange(self) -> None:
        """A password change answers userpassword with a new working token."""
        answer = self.api.patch("/alice", json={"password": "newpw"}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertWrote(answer)
        self.assertEqual(answer.json["type"], "userpassword")
        self.assertEqual(answer.json["message"], "user updated, new proxy auth")
        self.assertEqual(answer.json["result"]["expiration"], 36000)
        token = answer.json["result"]["password"]
        self.assertEqual(self.authstatus(devpiAuth("alice", token)), ["ok", "alice", []])
        self.assertEqual(self.authstatus(basicAuth("alice", "newpw")), ["ok", "alice", []])
        self.assertEqual(self.authstatus(self.alice), ["noauth", "", []])
        self.assertError(self.api.post("/+login", json={"user": "alice", "password": "alicepw"}), 401)

    def test_devpiClientWholeConfig(self) -> None:
        """devpi-client's PATCH of the whole config is accepted; read-only keys are ignored."""
        self.api.createIndex("alice", "dev", "alicepw")
        before = self.api.get("/alice").json["result"]
        body = dict(before)
        body.update({
            "email": "changed@example.com",
            "created": "1999-01-01T00:00:00Z",
            "modified": "1999-01-01T00:00:00Z",
            "username": "mallory",
            "indexes": {"evil": {"type": "stage"}},
        })
        answer = self.api.patch("/alice", json=body, headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json, {"message": "user updated"})
        after = self.api.get("/alice").json["result"]
        self.assertEqual(after["email"], "changed@example.com")
        self.assertEqual(after["created"], before["created"])
        self.assertNotEqual(after["modified"], "1999-01-01T00:00:00Z")
        self.assertEqual(after["username"], "alice")
        self.assertEqual(sorted(after["indexes"]), ["dev"])
        self.assertError(self.api.get("/mallory"), 404)

    def test_otherUserForbidden(self) -> None:
        """Bob and anonymous may not modify alice; nothing changes."""
        for headers in [self.bob, None]:
            answer = self.api.patch("/alice", json={"email": "x@example.com"}, headers=headers)
            self.assertError(answer, 403, "no permission to modify user alice")
            self.assertUnchanged(answer)
        answer = self.api.patch("/alice", json={"password": "x"}, headers=self.bob)
        self.assertError(answer, 403)
        self.assertEqual(self.authstatus(self.alice), ["ok", "alice", []])

    def test_rootModifiesAnyone(self) -> None:
        """Root may change anyone's profile and password."""
        self.assertEqual(self.api.patch("/alice", json={"email": "r@example.com"}, headers=ROOT).code, 200)
        answer = self.api.patch("/alice", json={"password": "byroot"}, headers=ROOT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.api.get("/alice").json["result"]["email"], "r@example.com")
        self.assertEqual(self.authstatus(basicAuth("alice", "byroot")), ["ok", "alice", []])

    def test_unknownUser(self) -> None:
        """Root modifying a user that does not exist gets 404."""
        self.assertError(self.api.patch("/nobody", json={"email": "x"}, headers=ROOT), 404, "no user 'nobody'")

    def test_badBody(self) -> None:
        """A PATCH body that is not a JSON object is 400."""
        self.assertError(self.api.patch("/alice", body=b"{", headers=self.alice), 400)
        self.assertError(self.api.patch("/alice", json=["email=x"], headers=self.alice), 400)
        self.assertError(self.api.patch("/alice", json={"pwhash": "plain"}, headers=self.alice), 400)


class DeleteUserTests(_APITestCase):
    """C{DELETE /USER}."""

    def test_delete(self) -> None:
        """A user deletes themselves: 200, and the user and their indexes are gone."""
        self.api.createIndex("bob", "tmp", "bobpw")
        self.api.createIndex("bob", "other", "bobpw")
        self.successResultOf(self.api.storage.write(
            lambda txn: txn.set(keys.projectsPrefix("bob", "tmp") + "pkg", {"name": "pkg"})))
        answer = self.api.delete("/bob", headers=self.bob)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json, {"message": "user 'bob' deleted"})
        self.assertWrote(answer)
        self.assertError(self.api.get("/bob"), 404, "no user 'bob'")
        self.assertError(self.api.get("/bob/tmp"), 404)
        self.assertNotIn("bob", self.api.get("/").json["result"])
        leftovers = self.successResultOf(self.api.storage.read(
            lambda view: view.items(keys.userIndexesPrefix("bob")) + view.items(keys.projectsPrefix("bob", "tmp"))))
        self.assertEqual(leftovers, [])

    def test_rootDeletesUser(self) -> None:
        """Root may delete another user."""
        self.assertEqual(self.api.delete("/bob", headers=ROOT).code, 200)
        self.assertError(self.api.get("/bob"), 404)

    def test_nonVolatileIndex(self) -> None:
        """A user owning a non-volatile index cannot be deleted."""
        self.api.createIndex("alice", "prod", "alicepw", volatile=False)
        answer = self.api.delete("/alice", headers=ROOT)
        self.assertError(answer, 403, "user 'alice' has non-volatile index: prod")
        self.assertUnchanged(answer)
        self.assertEqual(self.api.get("/alice/prod").code, 200)

    def test_root(self) -> None:
        """Root cannot be deleted, not even by root."""
        answer = self.api.delete("/root", headers=ROOT)
        self.assertError(answer, 403)
        self.assertUnchanged(answer)
        self.assertEqual(self.api.get("/root").code, 200)

    def test_unknown(self) -> None:
        """Deleting a user that does not exist is 404."""
        self.assertError(self.api.delete("/nobody", headers=ROOT), 404, "no user 'nobody'")

    def test_othersForbidden(self) -> None:
        """Bob and anonymous may not delete alice."""
        for headers in [self.bob, None]:
            answer = self.api.delete("/alice", headers=headers)
            self.assertError(answer, 403)
            self.assertUnchanged(answer)
        self.assertEqual(self.api.get("/alice").code, 200)


STAGE_DEFAULTS = {
    "type": "stage",
    "volatile": True,
    "acl_upload": ["alice"],
    "acl_toxresult_upload": [":ANONYMOUS:"],
    "bases": [],
    "mirror_whitelist": [],
    "mirror_whitelist_inheritance": "intersection",
}


class CreateIndexTests(_APITestCase):
    """C{PUT /USER/INDEX}."""

    def test_defaults(self) -> None:
        """Creating with {} is 200 indexconfig with exactly devpi's defaults."""
        answer = self.api.put("/alice/dev", json={}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertWrote(answer)
        self.assertEqual(answer.json, {"result": STAGE_DEFAULTS, "type": "indexconfig"})
        self.assertEqual(self.api.get("/alice").json["result"]["indexes"], {"dev": STAGE_DEFAULTS})

    def test_stringValues(self) -> None:
        """devpi-client's string values for booleans and lists are accepted."""
        self.api.createIndex("alice", "base", "alicepw")
        answer = self.api.put("/alice/dev", json={
            "volatile": "False", "bases": "root/pypi,alice/base", "acl_upload": "alice,:anonymous:",
            "mirror_whitelist": "Foo_Bar,baz", "title": "Dev",
        }, headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        result = answer.json["result"]
        self.assertIs(result["volatile"], False)
        self.assertEqual(result["bases"], ["root/pypi", "alice/base"])
        self.assertEqual(result["acl_upload"], ["alice", ":ANONYMOUS:"])
        self.assertEqual(result["mirror_whitelist"], ["foo-bar", "baz"])
        self.assertEqual(result["title"], "Dev")
        answer = self.api.put("/alice/dev2", json={"volatile": "True"}, headers=self.alice)
        self.assertIs(answer.json["result"]["volatile"], True)

    def test_unknownKey(self) -> None:
        """An unknown key is 400 with devpi's message."""
        answer = self.api.put("/alice/dev", json={"foo": "bar"}, headers=self.alice)
        self.assertError(answer, 400, "indexconfig got unexpected keyword arguments: foo=bar")
        self.assertUnchanged(answer)

    def test_badBool(self) -> None:
        """A value that is no boolean is 400."""
        answer = self.api.put("/alice/dev", json={"volatile": "maybe"}, headers=self.alice)
        self.assertError(answer, 400, "Unknown boolean value 'maybe'.")

    def test_missingBase(self) -> None:
        """A base that does not exist is 400 and nothing is created."""
        answer = self.api.put("/alice/dev", json={"bases": ["root/nope"]}, headers=self.alice)
        self.assertError(answer, 400, "base index 'root/nope' does not exist")
        self.assertUnchanged(answer)
        self.assertError(self.api.get("/alice/dev"), 404)

    def test_invalidBaseSpec(self) -> None:
        """A base that is not user/index is 400."""
        answer = self.api.put("/alice/dev", json={"bases": "xx"}, headers=self.alice)
        self.assertError(answer, 400, "invalid base index spec: 'xx'")

    def test_unknownType(self) -> None:
        """An unknown index type is 400."""
        answer = self.api.put("/alice/dev", json={"type": "foo"}, headers=self.alice)
        self.assertError(answer, 400, "unknown index type 'foo'")

    def test_existing(self) -> None:
        """Creating an existing index is 409 and keeps its config."""
        self.api.createIndex("alice", "dev", "alicepw", title="first")
        answer = self.api.put("/alice/dev", json={"title": "second"}, headers=self.alice)
        self.assertError(answer, 409, "index 'alice/dev' exists")
        self.assertUnchanged(answer)
        self.assertEqual(self.api.get("/alice/dev").json["result"]["title"], "first")

    def test_forbidden(self) -> None:
        """Anonymous and other users may not create an index in alice's namespace."""
        for headers in [None, self.bob]:
            answer = self.api.put("/alice/dev", json={}, headers=headers)
            self.assertError(answer, 403, "no permission to create index alice/dev")
            self.assertUnchanged(answer)

    def test_rootCreatesForUser(self) -> None:
        """Root may create an index for alice; alice owns its acl_upload."""
        answer = self.api.put("/alice/dev", json={}, headers=ROOT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["result"]["acl_upload"], ["alice"])

    def test_unknownUser(self) -> None:
        """An index for a user that does not exist is 404."""
        answer = self.api.put("/nobody/dev", json={}, headers=ROOT)
        self.assertError(answer, 404, "no user 'nobody'")
        self.assertUnchanged(answer)

    def test_badBodies(self) -> None:
        """An empty body, bad JSON or a non-object is 400."""
        self.assertError(self.api.put("/alice/dev", body=b"", headers=self.alice), 400,
                         "Bad request: could not decode json")
        self.assertError(self.api.put("/alice/dev", body=b"{x", headers=self.alice), 400)
        self.assertError(self.api.put("/alice/dev", json=["x"], headers=self.alice), 400)

    def test_badIndexName(self) -> None:
        """An index name with forbidden characters is 400."""
        answer = self.api.put("/alice/d%20v", json={}, headers=self.alice)
        self.assertError(answer, 400)
        self.assertIn("contains characters that aren't allowed", answer.json["message"])

    def test_mirrorByUserForbidden(self) -> None:
        """By default only root may create a mirror (the server fetches from it)."""
        answer = self.api.put("/alice/mirror", json={"type": "mirror", "mirror_url": "https://example.com/simple/"},
                              headers=self.alice)
        self.assertError(answer, 403)
        self.assertUnchanged(answer)

    def test_mirrorByRoot(self) -> None:
        """Root creates a mirror; stage-only keys are dropped."""
        answer = self.api.put("/alice/mirror", json={
            "type": "mirror", "mirror_url": "https://example.com/simple", "bases": "root/pypi",
            "acl_upload": "bob",
        }, headers=ROOT)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"], {
            "type": "mirror", "volatile": True, "mirror_cache_expiry": 1800,
            "mirror_url": "https://example.com/simple",
        })
        self.assertNotIn("pypisubmit", self.api.get("/alice/mirror/+api").json["result"])

    def test_badMirrorURL(self) -> None:
        """A mirror_url that is not an http(s) URL is 400."""
        for url in ["ftp://example.com/", "notaurl", "http://"]:
            answer = self.api.put("/root/m", json={"type": "mirror", "mirror_url": url}, headers=ROOT)
            self.assertError(answer, 400, "'mirror_url' option must be a URL.")
            self.assertUnchanged(answer)


class MirrorCreatorsUsersTests(_APITestCase):
    """C{--mirror-creators users}: devpi's behaviour, any user may create mirrors."""

    policy = Policy(mirrorCreators="users")

    def test_userCreatesMirror(self) -> None:
        """A user creates a mirror in their own namespace."""
        answer = self.api.put("/alice/mirror", json={"type": "mirror", "mirror_url": "https://example.com/simple/"},
                              headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"]["type"], "mirror")

    def test_stillOwnNamespaceOnly(self) -> None:
        """The policy does not let bob create a mirror for alice, nor anonymous at all."""
        body = {"type": "mirror", "mirror_url": "https://example.com/simple/"}
        self.assertError(self.api.put("/alice/mirror", json=body, headers=self.bob), 403)
        self.assertError(self.api.put("/alice/mirror", json=body), 403)


class ModifyIndexTests(_APITestCase):
    """C{PATCH /USER/INDEX}."""

    def setUp(self) -> None:
        super().setUp()
        self.api.createIndex("alice", "dev", "alicepw")

    def index(self) -> dict[str, Any]:
        return self.api.get("/alice/dev?no_projects=").json["result"]

    def test_dictPatch(self) -> None:
        """A dict merges into the config; keys not sent are kept; no projects in the answer."""
        answer = self.api.patch("/alice/dev", json={"title": "T", "volatile": "False"}, headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertWrote(answer)
        self.assertEqual(answer.json["type"], "indexconfig")
        self.assertEqual(answer.json["result"], dict(STAGE_DEFAULTS, title="T", volatile=False))
        self.assertEqual(self.index(), answer.json["result"])

    def test_getReplyUnwrapped(self) -> None:
        """An earlier GET reply (envelope and projects included) can be sent back with changes."""
        reply = self.api.get("/alice/dev").json
        reply["result"]["title"] = "from reply"
        answer = self.api.patch("/alice/dev", json=reply, headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"]["title"], "from reply")
        self.assertNotIn("projects", answer.json["result"])

    def test_listForm(self) -> None:
        """devpi-client's key+=value / key=value list is applied as devpi does."""
        answer = self.api.patch(
            "/alice/dev",
            json=["bases+=root/pypi", "mirror_whitelist+=pkga", "title=Dev Index", "acl_upload+=bob"],
            headers=self.alice,
        )
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"], dict(
            STAGE_DEFAULTS, bases=["root/pypi"], mirror_whitelist=["pkga"], title="Dev Index",
            acl_upload=["alice", "bob"],
        ))

    def test_listSetValues(self) -> None:
        """key=value in the list form goes through the same normalisation as create."""
        self.api.createIndex("alice", "base", "alicepw")
        answer = self.api.patch("/alice/dev", json=["bases=root/pypi,alice/base", "volatile=False"],
                                headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"]["bases"], ["root/pypi", "alice/base"])
        self.assertIs(answer.json["result"]["volatile"], False)

    def test_listRemove(self) -> None:
        """key-=value removes a value; key-= removes a non-default key."""
        self.api.patch("/alice/dev", json=["acl_upload+=bob", "title=T"], headers=self.alice)
        answer = self.api.patch("/alice/dev", json=["acl_upload-=alice", "title-="], headers=self.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["result"]["acl_upload"], ["bob"])
        self.assertNotIn("title", answer.json["result"])

    def test_removeMissingValue(self) -> None:
        """Removing a value that is not there is 400 and changes nothing."""
        answer = self.api.patch("/alice/dev", json=["acl_upload-=zzz"], headers=self.alice)
        self.assertError(answer, 400, "The 'acl_upload' setting doesn't have value 'zzz'")
        self.assertUnchanged(answer)

    def test_removeDefaultKey(self) -> None:
        """Removing a key that has a default is 400."""
        for edit in ["acl_upload-=", "volatile-=", "type-="]:
            answer = self.api.patch("/alice/dev", json=[edit], headers=self.alice)
            self.assertError(answer, 400, "Default values can't be removed.")
        self.assertEqual(self.index(), STAGE_DEFAULTS)

    def test_changeType(self) -> None:
        """The type of an index cannot change, in either body form."""
        for body in [{"type": "mirror", "mirror_url": "https://example.com/"}, ["type=mirror"]]:
            answer = self.api.patch("/alice/dev", json=body, headers=ROOT)
            self.assertError(answer, 400, "the 'type' of an index can't be changed")
            self.assertUnchanged(answer)

    def test_cycle(self) -> None:
        """Bases that would form a cycle (a -> b -> a) are 400."""
        self.api.createIndex("alice", "b", "alicepw", bases=["alice/dev"])
        answer = self.api.patch("/alice/dev", json=["bases+=alice/b"], headers=self.alice)
        self.assertError(answer, 400)
        self.assertIn("cycle", answer.json["message"])
        self.assertUnchanged(answer)
        self.assertEqual(self.index()["bases"], [])

    def test_selfBase(self) -> None:
        """An index cannot be its own base."""
        answer = self.api.patch("/alice/dev", json={"bases": ["alice/dev"]}, headers=self.alice)
        self.assertError(answer, 400)

    def test_missingBase(self) -> None:
        """A base that does not exist is 400."""
        answer = self.api.patch("/alice/dev", json=["bases+=root/nope"], headers=self.alice)
        self.assertError(answer, 400, "base index 'root/nope' does not exist")

    def test_errorOnNoop(self) -> None:
        """?error_on_noop, with or without a value, turns a change that changes nothing into a 400."""
        for query in ["?error_on_noop", "?error_on_noop=", "?error_on_noop=1", "?x=1&error_on_noop"]:
            answer = self.api.patch("/alice/dev" + query, json={"volatile": True}, headers=self.alice)
            self.assertError(answer, 400, "The requested modifications resulted in no changes")
            self.assertUnchanged(answer)
            answer = self.api.patch("/alice/dev" + query, json=["acl_upload+=alice"], headers=self.alice)
            self.assertError(answer, 400, "The requested modifications resulted in no changes")
        answer = self.api.patch("/alice/dev?error_on_noop", json={"volatile": False}, headers=self.alice)
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.api.patch("/alice/dev", json={"volatile": False}, headers=self.alice).code, 200)

    def test_unknownKeyAndBadValue(self) -> None:
        """Unknown keys and bad values are 400 in the dict form too."""
        self.assertError(self.api.patch("/alice/dev", json={"foo": "bar"}, headers=self.alice), 400,
                         "indexconfig got unexpected keyword arguments: foo=bar")
        self.assertError(self.api.patch("/alice/dev", json=["volatile=maybe"], headers=self.alice), 400,
                         "Unknown boolean value 'maybe'.")
        self.assertError(self.api.patch("/alice/dev", json=["nonsense"], headers=self.alice), 400)
        self.assertError(self.api.patch("/alice/dev", body=b"[", headers=self.alice), 400,
                         "Bad request: could not decode json")

    def test_forbidden(self) -> None:
        """Anonymous and other users may not modify; root may."""
        for headers in [None, self.bob]:
            answer = self.api.patch("/alice/dev", json={"title": "x"}, headers=headers)
            self.assertError(answer, 403)
            self.assertUnchanged(answer)
        self.assertEqual(self.api.patch("/alice/dev", json={"title": "r"}, headers=ROOT).code, 200)

    def test_unknownIndex(self) -> None:
        """Modifying an index that does not exist is 404."""
        self.assertError(self.api.patch("/alice/nope", json={"title": "x"}, headers=self.alice), 404)

    def test_mirrorURLNeedsRoot(self) -> None:
        """The owner of a mirror may edit its title but not point it elsewhere."""
        self.api.put("/alice/m", json={"type": "mirror", "mirror_url": "https://example.com/"}, headers=ROOT)
        self.assertEqual(self.api.patch("/alice/m", json=["title=M"], headers=self.alice).code, 200)
        answer = self.api.patch("/alice/m", json=["mirror_url=https://evil.example/"], headers=self.alice)
        self.assertError(answer, 403)
        self.assertEqual(self.api.get("/alice/m").json["result"]["mirror_url"], "https://example.com/")


class ReadAndDeleteIndexTests(_APITestCase):
    """C{GET /USER/INDEX} and C{DELETE /USER/INDEX}."""

    def setUp(self) -> None:
        super().setUp()
        self.api.createIndex("alice", "dev", "alicepw")

    def addProjects(self, *names: str) -> None:
        prefix = keys.projectsPrefix("alice", "dev")
        self.successResultOf(self.api.storage.write(
            lambda txn: [txn.set(prefix + name, {"name": name}) for name in names]))

    def test_getWithProjects(self) -> None:
        """GET lists the stage's own projects, sorted."""
        self.addProjects("zeta", "alpha")
        answer = self.api.get("/alice/dev")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "indexconfig")
        self.assertEqual(answer.json["result"], dict(STAGE_DEFAULTS, projects=["alpha", "zeta"]))
        self.assertEqual(self.api.get("/alice/dev/").json, answer.json)

    def test_getNoProjects(self) -> None:
        """?no_projects, with or without a value, leaves the projects out."""
        self.addProjects("alpha")
        for query in ["?no_projects=", "?no_projects", "?no_projects=1"]:
            answer = self.api.get("/alice/dev" + query)
            self.assertEqual(answer.json["result"], STAGE_DEFAULTS)
        self.assertEqual(self.api.get("/alice/dev?no_projectsx").json["result"]["projects"], ["alpha"])

    def test_getUnknown(self) -> None:
        """An unknown index or user is 404."""
        self.assertError(self.api.get("/alice/nope"), 404, "The stage alice/nope could not be found.")
        self.assertError(self.api.get("/nobody/dev"), 404)

    def test_delete(self) -> None:
        """DELETE answers 201, and the index and its projects are gone."""
        self.addProjects("alpha")
        answer = self.api.delete("/alice/dev", headers=self.alice)
        self.assertEqual(answer.code, 201)
        self.assertEqual(answer.json, {"message": "index alice/dev deleted"})
        self.assertWrote(answer)
        self.assertError(self.api.get("/alice/dev"), 404)
        self.assertEqual(self.api.get("/alice").json["result"]["indexes"], {})
        left = self.successResultOf(self.api.storage.read(
            lambda view: view.items(keys.projectsPrefix("alice", "dev"))))
        self.assertEqual(left, [])

    def test_deleteNonVolatile(self) -> None:
        """A non-volatile index cannot be deleted."""
        self.api.createIndex("alice", "prod", "alicepw", volatile=False)
        answer = self.api.delete("/alice/prod", headers=self.alice)
        self.assertError(answer, 403, "index alice/prod non-volatile, cannot delete")
        self.assertUnchanged(answer)
        self.assertEqual(self.api.get("/alice/prod").code, 200)

    def test_deleteForbidden(self) -> None:
        """Anonymous and other users may not delete; root may."""
        for headers in [None, self.bob]:
            answer = self.api.delete("/alice/dev", headers=headers)
            self.assertError(answer, 403)
            self.assertUnchanged(answer)
        self.assertEqual(self.api.delete("/alice/dev", headers=ROOT).code, 201)

    def test_deleteUnknown(self) -> None:
        """Deleting an index that does not exist is 404."""
        self.assertError(self.api.delete("/alice/nope", headers=self.alice), 404)


class StatusTests(_APITestCase):
    """C{GET /+status}."""

    def test_shape(self) -> None:
        """+status reports serial, uuid, role MASTER and the last commit time."""
        self.api.clock.advance(42)
        self.api.createUser("carol")
        answer = self.api.get("/+status")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "status")
        result = answer.json["result"]
        self.assertEqual(result["serial"], self.api.storage.currentSerial())
        self.assertEqual(result["serial"], answer.serial)
        self.assertEqual(result["uuid"], UUID)
        self.assertEqual(result["role"], "MASTER")
        self.assertEqual(result["last-commit-timestamp"], START_TIME + 42)
        for key in ["serverdir", "versioninfo", "event-serial", "metrics", "polling_replicas"]:
            self.assertIn(key, result)

    def test_post(self) -> None:
        """+status answers POST as well."""
        self.assertEqual(self.api.post("/+status", body=b"").json["type"], "status")


class HeadersAndErrorsTests(_APITestCase):
    """What every answer carries, and that nothing turns into an unhandled crash."""

    def test_commonHeaders(self) -> None:
        """Successes and errors alike carry devpi's headers and exactly application/json."""
        for answer in [self.api.get("/+api"), self.api.get("/nobody"), self.api.delete("/+api")]:
            self.assertEqual(answer.header("X-Devpi-Api-Version"), "2")
            self.assertEqual(answer.header("X-Devpi-Uuid"), UUID)
            self.assertEqual(answer.header("X-Devpi-Master-Uuid"), UUID)
            self.assertEqual(answer.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
            self.assertEqual(int(answer.header("X-Devpi-Serial")), self.api.storage.currentSerial())

    def test_pathNotUTF8(self) -> None:
        """A URL path whose percent-escapes are not UTF-8 is 400 with a JSON message, not a crash."""
        answer = self.api.get("/alice/dev/+simple/%ff/")
        self.assertError(answer, 400, "the URL path is not valid UTF-8")

    def test_writeAnswersNewSerial(self) -> None:
        """A write answers with the serial it committed, and later reads see it."""
        before = self.api.storage.currentSerial()
        answer = self.api.put("/carol", json={"password": "pw"})
        self.assertEqual(answer.serial, before + 1)
        self.assertEqual(self.api.get("/+api").serial, before + 1)
        answer = self.api.put("/carol/dev", json={}, headers=basicAuth("carol", "pw"))
        self.assertEqual(answer.serial, before + 2)

    def test_unknownRoutes(self) -> None:
        """Paths no route matches are 404 with a JSON message."""
        for path in ["/a/b/c/d/e", "/+nothing/x/y/z", "/alice/dev/x/y/z/w"]:
            self.assertError(self.api.get(path), 404)

    def test_wrongMethods(self) -> None:
        """Methods a route does not take are 405 with a JSON message."""
        for method, path in [("PUT", "/"), ("DELETE", "/"), ("PATCH", "/"), ("POST", "/alice"),
                             ("POST", "/alice/")]:
            self.assertError(self.api.request(method, path), 405, "Method Not Allowed")

    def test_wrongMethodsOnSpecialRoutesNeverCrash(self) -> None:
        """Wrong methods on +api, +login and +status are client errors with a JSON message."""
        for method, path in [("DELETE", "/+api"), ("GET", "/+login"), ("PUT", "/+login"),
                             ("DELETE", "/+login"), ("PATCH", "/+status"), ("DELETE", "/+status"),
                             ("PUT", "/+api"), ("PATCH", "/alice/+api"), ("DELETE", "/alice/dev/+api")]:
            for headers in [None, ROOT]:
                answer = self.api.request(method, path, headers=headers)
                self.assertGreaterEqual(answer.code, 400)
                self.assertLess(answer.code, 500)

    def test_specialSegmentsAreNotUserNames(self) -> None:
        """A wrong method on +api, +login or +status is 404 or 405, never a user operation."""
        for method, path in [("DELETE", "/+api"), ("GET", "/+login"), ("PATCH", "/+status"),
                             ("DELETE", "/+status")]:
            answer = self.api.request(method, path, headers=ROOT)
            self.assertIn(answer.code, (404, 405), (method, path, answer.body))
            self.assertNotIn("user", answer.json["message"])

    def test_unexpectedError(self) -> None:
        """An unexpected exception in a view is a logged 500 with a JSON message and no traceback."""
        def broken(*args: Any) -> Any:
            raise RuntimeError("secret internal detail")

        self.patch(self.api.users, "listAll", broken)
        self.api.allow500 = True
        answer = self.api.get("/")
        self.assertEqual(answer.code, 500)
        self.assertEqual(answer.json, {"message": "internal server error"})
        self.assertNotIn(b"secret internal detail", answer.body)
        self.assertNotIn(b"Traceback", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unexpectedStorageFailure(self) -> None:
        """A failing storage write during a request is a logged 500 and commits nothing."""
        def broken(function: Any) -> Any:
            from twisted.internet.defer import fail

            return fail(OSError("disk on fire"))

        self.patch(self.api.storage, "write", broken)
        self.api.allow500 = True
        answer = self.api.put("/carol", json={"password": "pw"})
        self.assertEqual(answer.code, 500)
        self.assertNotIn(b"disk on fire", answer.body)
        self.assertUnchanged(answer)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
