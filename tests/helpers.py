"""
Helpers for driving the real web resource in memory.

L{buildTestServer} builds the server with the factory C{makeService} uses
(L{devpi_twisted.app.compose.buildServer}), limits and all, over fakes:
time is a L{Clock}, storage is given (memory), blocking work runs inline
(L{SynchronousRunner}), password checks use a cheap argon2 hasher, and
upstream is a L{FakePyPI} reached in memory, so no socket is ever opened.

L{APIHarness} is that server with an empty upstream; requests go through
L{StubTreq}, so routing, error handling and headers are the real thing.
Every response is checked for what devpi promises on all responses (see
L{APIHarness.checkCommon}), so individual tests only assert what is
specific to them.
"""

import base64
import os
import json as jsonlib
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent

from devpi_twisted.admin.initstate import PYPI_URL, rootPypiConfig
from devpi_twisted.app.compose import Server, buildServer
from devpi_twisted.config import ServerConfig
from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.storage.threads import Runner, SynchronousRunner
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage
from devpi_twisted.testing.fakepypi import FakePyPI

BASE = "http://devpi.test"
UUID = "0123456789abcdef0123456789abcdef"
ROOT_PASSWORD = "rootpw"
VERSION = "0.1.0-test"
START_TIME = 1_700_000_000.0

_NOTHING = object()


def fastHashing() -> PasswordHashing:
    """argon2id with the cheapest parameters, so tests stay fast."""
    return PasswordHashing(PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def buildTestServer(config: ServerConfig, *, clock: Clock, storage: Any, blobs: Any, upstreamAgent: IAgent,
                    secret: bytes, hashing: PasswordHashing, nodeinfo: dict[str, Any], version: str,
                    runner: Runner | None = None, filesElsewhere: Any = None) -> Server:
    """
    The server as C{makeService} builds it, over the test's fakes: blocking
    work runs inline (unless another C{runner} is given) and the push
    client's agent is C{upstreamAgent} too, so nothing reaches the network.
    """
    from devpi_twisted.services.push import PushClient

    return buildServer(
        config, reactor=clock, nodeinfo=nodeinfo, storage=storage, blobs=blobs,
        runner=runner if runner is not None else SynchronousRunner(),
        secret=secret, upstreamAgent=upstreamAgent, pushAgent=PushClient(upstreamAgent, clock),
        hashing=hashing, version=version, filesElsewhere=filesElsewhere,
    )


def basicAuth(user: str, secret: str) -> dict[bytes, list[bytes]]:
    """The C{Authorization: Basic} header for C{user:secret}."""
    value = base64.b64encode(f"{user}:{secret}".encode("utf-8"))
    return {b"Authorization": [b"Basic " + value]}


def devpiAuth(user: str, secret: str) -> dict[bytes, list[bytes]]:
    """devpi-client's C{X-Devpi-Auth} header for C{user:secret}."""
    return {b"X-Devpi-Auth": [base64.b64encode(f"{user}:{secret}".encode("utf-8"))]}


def merge(*headerDicts: dict[bytes, list[bytes]]) -> dict[bytes, list[bytes]]:
    """Several header dicts as one."""
    result: dict[bytes, list[bytes]] = {}
    for headers in headerDicts:
        for name, values in headers.items():
            result.setdefault(name, []).extend(values)
    return result


@dataclass
class Answer:
    """One response, read completely."""

    code: int
    headers: Any
    body: bytes
    serialBefore: int

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return None if not values else values[0].decode("latin-1")

    @property
    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def serial(self) -> int:
        return int(self.header("X-Devpi-Serial"))  # type: ignore[arg-type]


class APIHarness:
    """
    The whole JSON API in memory.

    @param testCase: the test that owns it; used for C{successResultOf} and
        its assertions.
    @param policy: the server's permission settings.
    @param rootPypi: whether to create the C{root/pypi} mirror as init does.
    @param settings: more L{ServerConfig} fields (limits, modes).
    """

    def __init__(
        self,
        testCase: SynchronousTestCase,
        policy: Policy = Policy(),
        rootPypi: bool = False,
        outsideURL: str | None = None,
        **settings: Any,
    ) -> None:
        self.testCase = testCase
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.storage = MemoryStorage(clock=self.clock.seconds)
        self.blobs = MemoryBlobStore()
        self.hashing = fastHashing()
        self.secret = b"s" * 48
        self.config = ServerConfig(
            serverdir=FilePath("/nonexistent/serverdir"),
            listen=("tcp:0:interface=127.0.0.1",),
            outsideURL=outsideURL,
            policy=policy,
            **settings,
        )
        self.nodeinfo = {"uuid": UUID, "role": "standalone", "storage": "memory"}
        self.upstream = FakePyPI(self.clock)  # root/pypi's upstream: no projects
        self.upstreamAgent = RequestTraversalAgent(self.upstream.resource())
        self.server = buildTestServer(
            self.config, clock=self.clock, secret=self.secret, hashing=self.hashing,
            nodeinfo=self.nodeinfo, version=VERSION, **self.collaborators(),
        )
        self.auth = self.server.auth
        self.users = self.server.users
        self.indexes = self.server.indexes
        self.resource = self.server.resource
        self.treq = StubTreq(self.resource)
        self.allow500 = False
        rootHash = self.hashing.hash(ROOT_PASSWORD)

        def initial(txn: Any) -> None:
            txn.set(keys.userKey("root"), {"pwhash": rootHash, "created": "2020-01-01T00:00:00Z"})
            if rootPypi:
                txn.set(keys.indexKey("root", "pypi"), rootPypiConfig(PYPI_URL, 1800))

        testCase.successResultOf(self.storage.write(initial))

    def collaborators(self) -> dict[str, Any]:
        """
        What the server is built over: C{storage}, C{blobs}, C{runner},
        C{upstreamAgent}.  A subclass may wrap or replace them (recording
        fakes).
        """
        return {"storage": self.storage, "blobs": self.blobs, "runner": SynchronousRunner(),
                "upstreamAgent": self.upstreamAgent}

    def settle(self, d: "Deferred[Any]") -> Any:
        """
        The result of C{d}, pumping due calls on the clock and the in-memory
        connections (upstream's, then ours) until it has one.
        """
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(10_000):
            if box:
                break
            self.clock.advance(0)
            self.upstreamAgent.flush()
            self.treq.flush()
        if not box:
            self.testCase.fail("the request never finished")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    # requests

    def request(
        self,
        method: str,
        path: str,
        json: Any = _NOTHING,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> Answer:
        """
        Send one request and read the whole answer, then check what every
        answer must have (L{checkCommon}).

        @param json: a value to send as a JSON body.
        @param body: raw bytes to send instead.
        """
        sendHeaders = {b"Accept": [b"application/json"]}
        sendHeaders.update(headers or {})
        data = body
        if json is not _NOTHING:
            data = jsonlib.dumps(json).encode("utf-8")
            sendHeaders[b"Content-Type"] = [b"application/json"]
        serialBefore = self.storage.currentSerial()
        response = self.settle(self.treq.request(method, BASE + path, headers=sendHeaders, data=data))
        content = self.settle(response.content())
        answer = Answer(response.code, response.headers, content, serialBefore)
        self.checkCommon(answer)
        return answer

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def put(self, path: str, json: Any = _NOTHING, **kw: Any) -> Answer:
        return self.request("PUT", path, json=json, **kw)

    def patch(self, path: str, json: Any = _NOTHING, **kw: Any) -> Answer:
        return self.request("PATCH", path, json=json, **kw)

    def post(self, path: str, json: Any = _NOTHING, **kw: Any) -> Answer:
        return self.request("POST", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Answer:
        return self.request("DELETE", path, **kw)

    # the checks every answer gets

    def checkCommon(self, answer: Answer) -> None:
        """
        devpi's headers on every response, JSON bodies typed exactly
        C{application/json}, and every error a JSON object with a message.

        C{X-Devpi-Serial} must be the server's serial after the request: for
        a read that is the serial it saw, for a write the one it committed.
        """
        t = self.testCase
        t.assertEqual(answer.header("X-Devpi-Api-Version"), "2")
        t.assertEqual(answer.header("X-Devpi-Uuid"), UUID)
        t.assertEqual(answer.header("X-Devpi-Primary-Uuid"), UUID)
        t.assertEqual(answer.header("X-Devpi-Server-Version"), VERSION)
        t.assertEqual(answer.serial, self.storage.currentSerial())
        if not self.allow500:
            t.assertNotEqual(answer.code, 500, answer.body)
        if answer.body:
            t.assertEqual(answer.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
            parsed = answer.json
            t.assertIsInstance(parsed, dict)
        if answer.code >= 400:
            t.assertIsInstance(answer.json.get("message"), str)
            t.assertTrue(answer.json["message"])
            t.assertNotIn(b"Traceback", answer.body)

    # conveniences

    def createUser(self, name: str, password: str = "secret", **extra: Any) -> Answer:
        """Create a user as anonymous (devpi's default policy allows it)."""
        answer = self.put(f"/{name}", json={"password": password, **extra})
        self.testCase.assertEqual(answer.code, 201, answer.body)
        return answer

    def login(self, user: str, password: str) -> str:
        """Log in and return the token."""
        answer = self.post("/+login", json={"user": user, "password": password})
        self.testCase.assertEqual(answer.code, 200, answer.body)
        return answer.json["result"]["password"]

    def createIndex(self, user: str, index: str, password: str = "secret", **config: Any) -> Answer:
        answer = self.put(f"/{user}/{index}", json=config, headers=basicAuth(user, password))
        self.testCase.assertEqual(answer.code, 200, answer.body)
        return answer


def parseServerOptions(testCase: SynchronousTestCase, *argv: str,
                       environ: dict[str, str] | None = None) -> Any:
    """C{twistd devpi}'s options from C{argv}, with C{environ} as the whole environment."""
    from devpi_twisted.app.options import Options

    testCase.patch(os, "environ", dict(environ or {}))
    options = Options()
    options.parseOptions(list(argv))
    return options
