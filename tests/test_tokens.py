"""
API tokens over the real Klein tree in memory: devpi-tokens' routes and
answers, the ways a token is sent, its restrictions and their enforcement,
revocation, and the login throttle.
"""

import base64
from typing import Any

import pymacaroons
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.model.tokens import ONE_YEAR_SECONDS, parseToken, termsOf, understood

from .distbuilder import buildWheel
from .releaseharness import START_TIME, ServerHarness, basic, combine

JSON = {b"Accept": [b"application/json"]}


def bearer(token: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Bearer " + token.encode("ascii")]}


def xdevpi(user: str, secret: str) -> dict[bytes, list[bytes]]:
    return {b"X-Devpi-Auth": [base64.b64encode(f"{user}:{secret}".encode("utf-8"))]}


def basicRaw(text: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Basic " + base64.b64encode(text.encode("utf-8"))]}


def derive(token: str, *caveats: str) -> str:
    """What C{devpi token-derive} does: more caveats, offline, no prefix."""
    macaroon = pymacaroons.Macaroon.deserialize(token.removeprefix("devpi-"))
    for caveat in caveats:
        macaroon.add_first_party_caveat(caveat)
    return macaroon.serialize()


def tokenId(token: str) -> str:
    parsed = parseToken(token)
    assert parsed is not None
    return parsed.tokenId


class TokenCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False, policy=self.policy())
        self.h.createIndex("alice", "dev")
        self.h.createIndex("alice", "prod")

    def policy(self) -> Policy:
        return Policy()

    def create(self, user: str = "alice", auth: Any = None, code: int = 200, **restrictions: Any) -> Any:
        auth = auth if auth is not None else basic(user, f"{user}pw")
        answer = self.h.request("POST", f"/{user}/+token-create", combine(auth, JSON), json=restrictions or None)
        self.assertEqual(answer.code, code, answer.body)
        return answer.json["result"]["token"] if code == 200 else answer

    def whoami(self, headers: Any) -> Any:
        return self.h.request("GET", "/+api", combine(headers, JSON))

    def upload(self, headers: Any, stage: str = "alice/dev", name: str = "demo-pkg", version: str = "1.0") -> Any:
        return self.h.upload(stage, buildWheel(name, version), headers)


class ShapeTests(TokenCase):
    """devpi-tokens' requests and answers."""

    def test_createAnswer(self) -> None:
        """token-info with a devpi- prefixed V2 macaroon named USER-ID, a one-year expiry by default."""
        answer = self.h.request("POST", "/alice/+token-create", combine(self.h.alice, JSON))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "token-info")
        token = answer.json["result"]["token"]
        self.assertTrue(token.startswith("devpi-"))
        macaroon = pymacaroons.Macaroon.deserialize(token[6:])
        self.assertEqual(macaroon.version, pymacaroons.MACAROON_V2)
        user, _, tid = macaroon.identifier.decode("ascii").rpartition("-")
        self.assertEqual(user, "alice")
        self.assertEqual(len(tid), 8)
        (caveat,) = [c.caveat_id.decode() for c in macaroon.caveats]
        self.assertEqual(caveat, f"expires={int(START_TIME + ONE_YEAR_SECONDS)}")

    def test_restrictionsAsCaveats(self) -> None:
        """Restrictions become sorted key=value caveats, lists sorted and comma-joined."""
        token = self.create(allowed=["upload", "pkg_read"], indexes=["alice/dev"], projects=["b", "a"],
                            not_before=int(START_TIME) - 5, expires=int(START_TIME) + 100)
        caveats = [c.caveat_id.decode() for c in pymacaroons.Macaroon.deserialize(token[6:]).caveats]
        self.assertEqual(caveats, [
            "allowed=pkg_read,upload", f"expires={int(START_TIME) + 100}", "indexes=alice/dev",
            f"not_before={int(START_TIME) - 5}", "projects=a,b",
        ])

    def test_createRefusals(self) -> None:
        """devpi-tokens' messages and statuses for bad restrictions."""
        cases = [
            ({"expires": "invalid"}, 400, "Invalid value 'invalid' for expiration"),
            ({"expires": 10}, 400, "Can't set expiration before current time"),
            ({"expires": int(START_TIME + ONE_YEAR_SECONDS + 100)}, 403,
             "Not allowed to set expiration to more than one year"),
            ({"expires": "never"}, 403, "Not allowed to create token with no expiration"),
            ({"not_before": "invalid"}, 400, "Invalid value 'invalid' for not before"),
            ({"indexes": ""}, 400, "The indexes restriction must be a list"),
            ({"indexes": [""]}, 400, "Empty item at position 1 in indexes list"),
            ({"indexes": [0]}, 400, "Item at position 1 is not a string in indexes list"),
            ({"colour": "red"}, 400, "Unknown restriction 'colour'."),
        ]
        for body, code, message in cases:
            answer = self.create(code=code, **body)
            self.assertEqual(answer.json["message"], message, body)
        self.assertEqual(self.h.settle(self.h.storage.read(lambda v: list(v.items(keys.TOKEN)))), [])

    def test_rootMayCreateNeverExpiring(self) -> None:
        """root may make a token that never expires, for another user; it works."""
        token = self.create(auth=self.h.root, expires="never")
        caveats = [c.caveat_id.decode() for c in pymacaroons.Macaroon.deserialize(token[6:]).caveats]
        self.assertEqual(caveats, ["expires=never"])
        self.h.clock.advance(ONE_YEAR_SECONDS * 3)
        self.assertEqual(self.whoami(bearer(token)).json["result"]["authstatus"], ["ok", "alice", []])

    def test_listAndDelete(self) -> None:
        """The listing shows id, restrictions, times and last use, never the key; delete removes it."""
        token = self.create(description="CI uploads", allowed=["upload"])
        tid = tokenId(token)
        self.assertEqual(self.whoami(bearer(token)).code, 200)
        answer = self.h.request("GET", "/alice/+tokens", combine(self.h.alice, JSON))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["type"], "tokens-info")
        info = answer.json["result"]["tokens"][tid]
        self.assertEqual(info["restrictions"], ["allowed=upload", f"expires={int(START_TIME + ONE_YEAR_SECONDS)}"])
        self.assertEqual(info["description"], "CI uploads")
        self.assertEqual(info["created"], int(START_TIME))
        self.assertEqual(info["expires"], int(START_TIME + ONE_YEAR_SECONDS))
        self.assertEqual(info["last_used"], int(START_TIME))
        self.assertNotIn("key", info)
        self.assertNotIn(b'"key"', answer.body)
        answer = self.h.request("DELETE", f"/alice/+tokens/{tid}", combine(self.h.alice, JSON))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.json["message"], f"token {tid} deleted")
        self.assertEqual(self.h.request("GET", "/alice/+tokens", combine(self.h.alice, JSON)).json["result"],
                         {"tokens": {}})
        self.assertEqual(self.h.request("DELETE", f"/alice/+tokens/{tid}", combine(self.h.alice, JSON)).code, 404)

    def test_onlySelfOrRoot(self) -> None:
        """bob and anonymous may not create, list or delete alice's tokens; root may."""
        token = self.create()
        for auth in (self.h.bob, {}):
            self.assertEqual(self.create(auth=auth, code=403).code, 403)
            self.assertEqual(self.h.request("GET", "/alice/+tokens", combine(auth, JSON)).code, 403)
            self.assertEqual(
                self.h.request("DELETE", f"/alice/+tokens/{tokenId(token)}", combine(auth, JSON)).code, 403)
        self.assertIn(tokenId(token), self.h.request("GET", "/alice/+tokens", combine(self.h.root, JSON))
                      .json["result"]["tokens"])

    def test_lastUseWrittenInBatches(self) -> None:
        """Uses are not written per request; a flush writes the last one in one change."""
        token = self.create()
        serial = self.h.storage.currentSerial()
        for _ in range(5):
            self.assertEqual(self.whoami(bearer(token)).code, 200)
            self.h.clock.advance(1)
        self.assertEqual(self.h.storage.currentSerial(), serial)
        self.h.clock.advance(60)
        self.assertEqual(self.h.storage.currentSerial(), serial + 1)
        stored = self.h.settle(self.h.storage.read(lambda v: v.get(keys.tokenUseKey("alice", tokenId(token)))))
        self.assertEqual(stored, int(START_TIME) + 4)


class SendingTests(TokenCase):
    """The ways clients send a token."""

    def test_ways(self) -> None:
        """Basic with the owner, __token__, an empty name, as the name alone; X-Devpi-Auth; Bearer."""
        token = self.create()
        ways = [
            basic("alice", token), basic("__token__", token), basicRaw(":" + token),
            basicRaw(token), basicRaw(token + ":"), xdevpi("alice", token), bearer(token),
            bearer(derive(token, "allowed=upload")),
        ]
        for headers in ways:
            answer = self.whoami(headers)
            self.assertEqual(answer.code, 200, (headers, answer.body))
            self.assertEqual(answer.json["result"]["authstatus"], ["ok", "alice", []], headers)

    def test_cachedCheck(self) -> None:
        """A token checked a moment ago is neither parsed nor read from storage again."""
        from devpi_twisted.services import auth as authModule

        token = self.create()
        self.assertEqual(self.whoami(basic("__token__", token)).code, 200)

        def boom(*args: Any) -> Any:
            raise AssertionError("checked again")

        self.patch(authModule, "parseToken", boom)
        self.patch(self.h.storage, "read", boom)
        for headers in (basic("__token__", token), bearer(token), basic("alice", token)):
            self.assertEqual(self.whoami(headers).json["result"]["authstatus"], ["ok", "alice", []])
        self.assertEqual(self.whoami(basic("bob", token)).code, 401)

    def test_uploadWithToken(self) -> None:
        """twine's way: __token__ and the token as password uploads."""
        token = self.create()
        self.assertEqual(self.upload(basic("__token__", token)).code, 200)

    def test_wrongUser(self) -> None:
        """A token sent with another user's name is refused."""
        token = self.create()
        answer = self.whoami(basic("bob", token))
        self.assertEqual(answer.code, 401)
        self.assertIn("does not belong to user 'bob'", answer.json["message"])

    def test_tokenCannotLogIn(self) -> None:
        """POST /+login with a token as the password is 401: a login token would not keep its limits."""
        token = self.create(allowed=["upload"])
        answer = self.h.request("POST", "/+login", JSON, json={"user": "alice", "password": token})
        self.assertEqual(answer.code, 401)
        self.assertIn("could not be authenticated", answer.json["message"])

    def test_passwordsStillWork(self) -> None:
        """Passwords and login tokens are unaffected, and carry no scope."""
        self.assertEqual(self.whoami(self.h.alice).json["result"]["authstatus"], ["ok", "alice", []])
        self.assertEqual(self.upload(self.h.alice).code, 200)


class ValidityTests(TokenCase):
    """Expired, not yet valid, revoked, tampered."""

    def assertRefused(self, token: str, text: str, user: str = "alice") -> None:
        for headers in (bearer(token), basic(user, token)):
            answer = self.whoami(headers)
            self.assertEqual(answer.code, 401, answer.body)
            self.assertIn(text, answer.json["message"])
            self.forgetFailures()
        answer = self.upload(basic("__token__", token))
        self.assertEqual(answer.code, 401, answer.body)
        self.forgetFailures()

    def forgetFailures(self) -> None:
        """Wrong tokens count as failed logins (ThrottleTests): let them leave the window."""
        if self.h.server.throttle.failed:
            self.h.clock.advance(self.h.server.throttle.window + 1)

    def test_expired(self) -> None:
        token = self.create(expires=int(START_TIME) + 100)
        self.assertEqual(self.whoami(bearer(token)).code, 200)
        self.h.clock.advance(100)
        self.assertRefused(token, f"expired at {int(START_TIME) + 100}")

    def test_derivedExpiry(self) -> None:
        """An earlier expiry added offline applies (the earliest wins)."""
        token = self.create()
        self.assertRefused(derive(token, "expires=10"), "expired at 10")

    def test_notYetValid(self) -> None:
        token = self.create(not_before=int(START_TIME) + 50)
        self.assertRefused(token, f"not valid before {int(START_TIME) + 50}")
        self.h.clock.advance(50)
        self.assertEqual(self.whoami(bearer(token)).code, 200)

    def test_revokedByDelete(self) -> None:
        """Deleting a token refuses it at once, its derived tokens too, even when the check was cached."""
        token = self.create()
        derived = derive(token, "allowed=upload")
        self.assertEqual(self.whoami(bearer(token)).code, 200)
        self.assertEqual(self.whoami(bearer(derived)).code, 200)
        self.h.request("DELETE", f"/alice/+tokens/{tokenId(token)}", combine(self.h.alice, JSON))
        self.assertRefused(token, "not valid")
        self.assertRefused(derived, "not valid")

    def test_revokedByPasswordChange(self) -> None:
        token = self.create()
        self.assertEqual(self.whoami(bearer(token)).code, 200)
        answer = self.h.request("PATCH", "/alice", combine(self.h.alice, JSON), json={"password": "newpw"})
        self.assertEqual(answer.code, 200, answer.body)
        self.assertRefused(token, "password of its user changed")

    def test_profileChangeKeepsToken(self) -> None:
        """Changing only the e-mail keeps the tokens valid."""
        token = self.create()
        answer = self.h.request("PATCH", "/alice", combine(self.h.alice, JSON), json={"email": "a@example.com"})
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.whoami(bearer(token)).code, 200)

    def test_revokedByUserDeletion(self) -> None:
        """Deleting the user removes their tokens; a new user of that name cannot use them."""
        token = self.create(user="bob")
        self.assertEqual(self.whoami(bearer(token)).code, 200)
        answer = self.h.request("DELETE", "/bob", combine(self.h.bob, JSON))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.h.settle(self.h.storage.read(lambda v: list(v.items(keys.tokensPrefix("bob"))))), [])
        answer = self.h.request("PUT", "/bob", JSON, json={"password": "bobpw"})
        self.assertEqual(answer.code, 201, answer.body)
        self.assertRefused(token, "not valid", user="bob")

    def test_tamperedByte(self) -> None:
        """A changed byte in the caveat or the signature is refused."""
        token = self.create(allowed=["upload"])
        raw = bytearray(base64.urlsafe_b64decode(token[6:] + "=="))
        for position in (raw.index(b"upload"), len(raw) - 1):
            changed = bytearray(raw)
            changed[position] ^= 0x01
            text = base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=").decode()
            self.assertRefused(text, "not valid")

    def test_caveatRemoved(self) -> None:
        """Dropping a caveat (to widen the token) breaks the signature."""
        token = self.create(allowed=["upload"], indexes=["alice/dev"])
        macaroon = pymacaroons.Macaroon.deserialize(token[6:])
        widened = pymacaroons.Macaroon(identifier=macaroon.identifier, version=pymacaroons.MACAROON_V2, key=b"x")
        kept = [c for c in macaroon.caveats if not c.caveat_id.startswith(b"allowed")]
        widened._caveats = kept
        widened.signature = macaroon.signature
        self.assertRefused(widened.serialize(), "not valid")

    def test_unknownCaveat(self) -> None:
        """A caveat this server does not understand makes the token invalid."""
        token = self.create()
        self.assertRefused(derive(token, "ip=10.0.0.1"), "does not know")

    def test_forgedWithoutKey(self) -> None:
        """A token made with another key for a real id is refused."""
        token = self.create()
        forged = pymacaroons.Macaroon(identifier=f"alice-{tokenId(token)}", key=b"guess" * 8,
                                      version=pymacaroons.MACAROON_V2)
        self.assertRefused(forged.serialize(), "not valid")


class ScopeTests(TokenCase):
    """What a token allows, and that deriving only narrows it."""

    def test_indexScope(self) -> None:
        """A token for alice/dev uploads there and is refused (403) on alice/prod."""
        token = self.create(indexes=["alice/dev"], allowed=["upload"])
        self.assertEqual(self.upload(basic("__token__", token)).code, 200)
        answer = self.upload(basic("__token__", token), stage="alice/prod")
        self.assertEqual(answer.code, 403, answer.body)
        self.assertIn("does not allow upload on alice/prod", answer.json["message"])

    def test_projectScope(self) -> None:
        token = self.create(projects=["Demo.Pkg"])
        self.assertEqual(self.upload(basic("__token__", token)).code, 200)
        self.assertEqual(self.upload(basic("__token__", token), name="other").code, 403)

    def test_allowedScope(self) -> None:
        """allowed=pkg_read cannot upload, delete, post tox results or modify the index."""
        self.assertEqual(self.upload(self.h.alice).code, 200)
        token = self.create(allowed=["pkg_read"])
        auth = combine(basic("__token__", token), JSON)
        self.assertEqual(self.upload(basic("__token__", token), version="2.0").code, 403)
        url = self.h.fileURL("alice/dev", "demo-pkg", "demo_pkg-1.0-py3-none-any.whl")
        checks = [
            ("POST", url, {"testenvs": {}}),
            ("DELETE", url, None),
            ("DELETE", "/alice/dev/demo-pkg/1.0", None),
            ("DELETE", "/alice/dev/demo-pkg", None),
            ("PATCH", "/alice/dev", ["volatile=False"]),
            ("PATCH", "/alice/dev/demo-pkg/1.0", {"yanked": True}),
            ("DELETE", "/alice/prod", None),
            ("PUT", "/alice/new", {}),
        ]
        for method, path, body in checks:
            answer = self.h.request(method, path, auth, json=body)
            self.assertEqual(answer.code, 403, (method, path, answer.body))
            self.assertIn("the API token used does not allow", answer.json["message"])
        self.assertEqual(len(self.h.fileEntries("alice/dev", "demo-pkg")), 1)

    def test_allowedPermissionsWork(self) -> None:
        """The permissions a token has do work: tox result, index modify, version and project deletion."""
        self.assertEqual(self.upload(self.h.alice).code, 200)
        token = self.create(allowed=["toxresult_upload", "index_modify", "del_verdata", "del_project"],
                            indexes=["alice/dev"])
        auth = combine(basic("alice", token), JSON)
        url = self.h.fileURL("alice/dev", "demo-pkg", "demo_pkg-1.0-py3-none-any.whl")
        self.assertEqual(self.h.request("POST", url, auth, json={"testenvs": {}}).code, 200)
        self.assertEqual(self.h.request("PATCH", "/alice/dev", auth, json=["title=x"]).code, 200)
        self.assertEqual(self.h.request("PATCH", "/alice/prod", auth, json=["title=x"]).code, 403)
        self.assertEqual(self.h.request("DELETE", "/alice/dev/demo-pkg/1.0", auth).code, 200)
        self.assertEqual(self.upload(self.h.alice, version="2.0").code, 200)
        self.assertEqual(self.h.request("DELETE", "/alice/dev/demo-pkg", auth).code, 200)

    def test_derivedNarrows(self) -> None:
        """A derived token is narrower; adding a list cannot widen it (lists intersect)."""
        token = self.create(allowed=["upload", "pkg_read"])
        narrower = derive(token, "indexes=alice/dev")
        self.assertEqual(self.upload(basic("__token__", narrower)).code, 200)
        self.assertEqual(self.upload(basic("__token__", narrower), stage="alice/prod").code, 403)
        wider = derive(token, "allowed=upload,index_modify,toxresult_upload")
        answer = self.h.request("PATCH", "/alice/dev", combine(bearer(wider), JSON), json=["title=x"])
        self.assertEqual(answer.code, 403, answer.body)
        disjoint = derive(token, "allowed=index_modify")
        self.assertEqual(self.upload(basic("__token__", disjoint), version="3.0").code, 403)

    def test_noUserManagement(self) -> None:
        """A token, however wide, creates no tokens, changes no password, manages no users."""
        token = self.create()
        auth = combine(bearer(token), JSON)
        for method, path, body in [
            ("POST", "/alice/+token-create", None),
            ("GET", "/alice/+tokens", None),
            ("DELETE", f"/alice/+tokens/{tokenId(token)}", None),
            ("PATCH", "/alice", {"password": "stolen"}),
            ("DELETE", "/alice", None),
            ("PUT", "/mallory", {"password": "x"}),
        ]:
            answer = self.h.request(method, path, auth, json=body)
            self.assertEqual(answer.code, 403, (method, path, answer.body))
            self.assertIn("API token cannot", answer.json["message"])
        self.assertEqual(self.whoami(self.h.alice).json["result"]["authstatus"], ["ok", "alice", []])


class RestrictModifyTests(SynchronousTestCase):
    create = TokenCase.create

    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False, policy=Policy(restrictModify=("carol",)))

    def test_restrictModifyUserMayCreateNeverExpiring(self) -> None:
        """A --restrict-modify user may use 'never'; alice may not."""
        self.create(user="carol", expires="never")
        self.assertEqual(self.create(code=403, expires="never").json["message"],
                         "Not allowed to create token with no expiration")


class ThrottleTests(TokenCase):
    """Wrong tokens count like wrong passwords; stale ones do not."""

    def test_wrongTokensCount(self) -> None:
        token = self.create()
        forged = pymacaroons.Macaroon(identifier=f"alice-{tokenId(token)}", key=b"guess" * 8,
                                      version=pymacaroons.MACAROON_V2).serialize()
        unknown = pymacaroons.Macaroon(identifier="alice-AAAAAAAA", key=b"guess" * 8,
                                       version=pymacaroons.MACAROON_V2).serialize()
        before = self.h.server.throttle.failed
        for text in (forged, unknown) * 2:
            self.assertEqual(self.whoami(bearer(text)).code, 401)
        self.assertEqual(self.h.server.throttle.failed, before + 4)
        self.assertEqual(self.whoami(bearer(forged)).code, 401)  # the fifth
        answer = self.whoami(bearer(forged))
        self.assertEqual(answer.code, 429, answer.body)
        answer = self.h.request("PUT", "/alice/x", combine(basic("alice", "wrong"), JSON), json={})
        self.assertEqual(answer.code, 429, answer.body)

    def test_expiredNotCounted(self) -> None:
        token = self.create(expires=int(START_TIME) + 10)
        self.h.clock.advance(10)
        before = self.h.server.throttle.failed
        for _ in range(10):
            self.assertEqual(self.whoami(bearer(token)).code, 401)
        self.assertEqual(self.h.server.throttle.failed, before)


class ModelTests(SynchronousTestCase):
    def test_terms(self) -> None:
        """Several caveats of a kind: the earliest expiry, latest start, intersected lists."""
        terms = termsOf(["expires=100", "expires=50", "not_before=1", "not_before=5",
                         "allowed=a,b", "allowed=b,c", "projects=Foo_Bar"])
        self.assertEqual((terms.expires, terms.notBefore), (50, 5))
        self.assertEqual(terms.allowed, frozenset({"b"}))
        self.assertEqual(terms.projects, frozenset({"foo-bar"}))
        self.assertIsNone(terms.indexes)
        self.assertIsNone(terms.refusal(10))
        self.assertIsNotNone(terms.refusal(50))
        self.assertIsNotNone(terms.refusal(4))

    def test_understood(self) -> None:
        for caveat in ("expires=never", "expires=5", "not_before=5", "allowed=upload", "indexes=a/b"):
            self.assertTrue(understood(caveat), caveat)
        for caveat in ("expires=soon", "ip=1.2.3.4", "allowed=", "nonsense", '{"version": 1}'):
            self.assertFalse(understood(caveat), caveat)

    def test_notATokenIsNone(self) -> None:
        for text in ("", "secret", "dtw1.abc.def", "devpi-", "A" * 40, "x" * 10000):
            self.assertIsNone(parseToken(text), text)
