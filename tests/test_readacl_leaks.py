"""
The leak test of read ACLs (issue 14): every route, walked by an anonymous
client and by a user who may not read, against a restricted index and an
index that inherits from it, names nothing of what the restricted index
holds - not in a page, a listing, a search result, an error message or a
header.

Where a request names the restricted project itself (the requester typed
it), the answer must be the one a project that never existed gets, with the
name swapped: that echoes the requester's own words and tells nothing.
"""

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.web.routes import Routes

from .distbuilder import buildWheel
from .releaseharness import PIP_ACCEPT, ServerHarness, combine

SECRET = "topsecret-pkg"  # only in alice/private
UNKNOWN = "nonexist1-pkg"  # nowhere; as long as SECRET, so bodies compare
PUBLIC = "open-pkg"  # in alice/staging (public, bases alice/private)
JSON_ACCEPT = {b"Accept": [b"application/json"]}
PIP = {b"Accept": [PIP_ACCEPT]}
HTML = {b"Accept": [b"text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"]}
READS = ("GET", "HEAD")


class LeakTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ServerHarness(self, rootPypi=False)
        self.h.createIndex("alice", "private")
        self.secretWheel = buildWheel(SECRET, "1.0")
        self.h.mustUpload("alice/private", self.secretWheel)
        self.h.createIndex("alice", "staging", bases=["alice/private"])
        self.publicWheel = buildWheel(PUBLIC, "2.0")
        self.h.mustUpload("alice/staging", self.publicWheel)
        secretURL = self.h.fileURL("alice/private", SECRET, self.secretWheel.filename)
        self.secretRelpath = secretURL.split("/+f/", 1)[1]
        publicURL = self.h.fileURL("alice/staging", PUBLIC, self.publicWheel.filename)
        self.publicRelpath = publicURL.split("/+f/", 1)[1]
        self.h.modifyIndex("alice", "private", ["acl_read=alice"])
        # What must never show: the project's name (any spelling), its file and digest.
        self.secrets = [SECRET, SECRET.replace("-", "_"), self.secretWheel.filename,
                        self.secretWheel.sha256, self.secretRelpath.split("/")[0] + "/" + self.secretRelpath.split("/")[1]]
        self.requesters = {"anonymous": {}, "bob": self.h.bob}

    def leaked(self, answer: Any, allowed: str | None = None) -> list[str]:
        """The secrets found in the answer's body or headers (C{allowed}: the name the request itself gave)."""
        text = answer.body.decode("utf-8", "replace")
        for name, values in answer.headers.getAllRawHeaders():
            text += "\n" + name.decode("latin-1") + ": " + " ".join(v.decode("latin-1") for v in values)
        if allowed is not None:
            text = text.replace(allowed, "").replace(allowed.replace("-", "_"), "")
        return [s for s in self.secrets if s.lower() in text.lower()]

    def concrete(self, rule: str, index: str, project: str, relpath: str) -> str:
        return (rule.replace("<user>", "alice").replace("<index>", index).replace("<project>", project)
                .replace("<version>", "1.0").replace("<path:relpath>", relpath).replace("<path:path>", "index.html"))

    def test_everyRouteNamesNothing(self) -> None:
        """
        Every GET/HEAD route of the table, for both indexes, with three Accept
        headers, as anonymous and as bob: nothing of alice/private shows, and
        asking for it by name answers as for a name that never existed.
        """
        checked = 0
        for rule in Routes.app.url_map.iter_rules():
            methods = sorted(set(rule.methods or ()) & set(READS))
            for method in methods:
                for index in ("private", "staging"):
                    if "<index>" not in rule.rule and index == "staging":
                        continue
                    for who, auth in self.requesters.items():
                        for accept in (JSON_ACCEPT, PIP, HTML):
                            headers = combine(accept, auth)
                            secret = self.h.request(method, self.concrete(rule.rule, index, SECRET, self.secretRelpath),
                                                    headers)
                            self.assertEqual(self.leaked(secret, allowed=SECRET), [],
                                             (who, method, rule.rule, index, secret.code, secret.body[:300]))
                            if "<project>" in rule.rule or "<path:relpath>" in rule.rule:
                                unknownRelpath = "/".join(
                                    [*self.secretRelpath.split("/")[:2], self.secretWheel.filename.replace(
                                        SECRET.replace("-", "_"), UNKNOWN.replace("-", "_"))])
                                unknown = self.h.request(
                                    method, self.concrete(rule.rule, index, UNKNOWN, unknownRelpath), headers)
                                self.assertEqual(
                                    (secret.code, secret.body.replace(SECRET.encode(), UNKNOWN.encode())
                                     .replace(SECRET.replace("-", "_").encode(), UNKNOWN.replace("-", "_").encode())),
                                    (unknown.code, unknown.body),
                                    (who, method, rule.rule, index))
                            checked += 1
        self.assertGreater(checked, 100)

    def test_listingsAndPublicPages(self) -> None:
        """/, /alice, /+api, /+status, the inheriting index's pages and project list, and search."""
        paths = ["/", "/alice", "/+api", "/+status", "/alice/staging", "/alice/staging/+simple/",
                 f"/alice/staging/+simple/{PUBLIC}/", f"/alice/staging/{PUBLIC}", f"/alice/staging/{PUBLIC}/2.0",
                 f"/alice/staging/+f/{self.publicRelpath}", "/+search?query=topsecret", "/+search?query=pkg",
                 "/alice/staging/+api"]
        for who, auth in self.requesters.items():
            for path in paths:
                for accept in (JSON_ACCEPT, PIP, HTML):
                    answer = self.h.get(path, combine(accept, auth))
                    self.assertEqual(self.leaked(answer), [], (who, path, answer.code, answer.body[:300]))
        # and the owner does see it, so the test would notice a leak
        owner = self.h.get("/alice/staging/+simple/", combine(PIP, self.h.alice))
        self.assertIn(SECRET, owner.body.decode())
        listing = self.h.get("/alice", combine(JSON_ACCEPT, self.h.alice)).json
        self.assertIn("private", listing["result"]["indexes"])
        self.assertNotIn("private", self.h.get("/alice", JSON_ACCEPT).json["result"]["indexes"])

    def test_writesNameNothing(self) -> None:
        """Writes a stranger may try (delete, yank, push from it) answer without naming it either."""
        attempts = [
            ("DELETE", f"/alice/staging/{SECRET}", None),
            ("DELETE", f"/alice/staging/{SECRET}/1.0", None),
            ("PATCH", f"/alice/staging/{SECRET}/1.0", {"yanked": "x"}),
            ("POST", "/alice/staging", {"name": SECRET, "version": "1.0", "targetindex": "bob/x"}),
            ("POST", "/alice/private", {"name": SECRET, "version": "1.0", "targetindex": "bob/x"}),
        ]
        for who, auth in self.requesters.items():
            for method, path, body in attempts:
                secret = self.h.request(method, path, combine(JSON_ACCEPT, auth), json=body)
                self.assertEqual(self.leaked(secret, allowed=SECRET), [], (who, method, path, secret.body))
                unknown = self.h.request(method, path.replace(SECRET, UNKNOWN), combine(JSON_ACCEPT, auth),
                                         json=json.loads(json.dumps(body).replace(SECRET, UNKNOWN)) if body else None)
                self.assertEqual((secret.code, secret.body.replace(SECRET.encode(), UNKNOWN.encode())),
                                 (unknown.code, unknown.body), (who, method, path))
