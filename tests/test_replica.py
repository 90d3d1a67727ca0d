"""
Replication: the primary's changelog feed, the replica's sync machine,
follower, file fetcher and write-forwarding proxy, the options, and real
primary and replica processes on 127.0.0.1.
"""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet import task
from twisted.internet.task import Clock, Cooperator
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.app import tap
from devpi_twisted.services.auth import (
    Authenticator,
    makeReplicationToken,
    passwordFingerprint,
    replicaUserConfig,
    replicationKey,
)
from devpi_twisted.model import keys
from devpi_twisted.replica.client import LineReader, PrimaryClient, ReplicationError, checkPrimaryURL, parseRecord
from devpi_twisted.replica.files import BlobFetcher, HashMismatch
from devpi_twisted.web.replicaproxy import ReplicaProxyResource, mirrorTarget
from devpi_twisted.replica.service import ReplicaService, waitForSerial
from devpi_twisted.replica.sync import SyncCore, makeReplicaSync
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.storage import BLOB_REF, ChangeRecord
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage

from .helpers import APIHarness, basicAuth, devpiAuth, fastHashing, parseServerOptions, ROOT_PASSWORD
from .serverprocess import environment, waitForAnswer
from .test_tap import ThreadedMemoryReactor, readState

PRIMARY = "http://primary.test"
REPLICA_UUID = "feedfacefeedfacefeedfacefeedface"


def bearer(secret: bytes, now: float) -> dict[bytes, list[bytes]]:
    """The replication credential header made with C{secret} at C{now}."""
    token = makeReplicationToken(replicationKey(secret), now)
    return {b"Authorization": [b"Bearer " + token.encode("ascii")]}


def settle(stub: Any, d: Deferred[Any], *others: Any, clock: Clock | None = None) -> Deferred[Any]:
    """
    Pump the in-memory connections (C{others}, then C{stub}) and the
    cooperator's turns on C{clock} until C{d} fires; C{d}.
    """
    done: list[Any] = []
    d.addBoth(lambda result: done.append(True) or result)
    for _ in range(1000):
        if done:
            break
        if clock is not None:
            clock.advance(0)
        for each in (*others, stub):
            each.flush()
    return d


def patchCooperator(testCase: SynchronousTestCase, clock: Clock) -> None:
    """Run the global cooperator (file producers use it) on C{clock}."""
    testCase.patch(task, "_theCooperator", Cooperator(scheduler=lambda step: clock.callLater(0, step)))


def storeBlob(blobs: Any, data: bytes) -> str:
    """Put C{data} in a memory blob store; its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    blobs.blobs[digest] = data
    return digest


class Primary:
    """
    A primary in memory: the real web resource over an L{APIHarness}, with
    the replication feed, served to clients through L{StubTreq}.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.harness = APIHarness(testCase)
        self.clock = self.harness.clock
        self.storage = self.harness.storage
        self.blobs = self.harness.blobs
        self.secret = self.harness.secret
        self.feed = self.harness.server.feed
        self.resource = self.harness.resource
        self.treq = self.harness.treq
        patchCooperator(testCase, self.clock)

    def credential(self) -> dict[bytes, list[bytes]]:
        return bearer(self.secret, self.clock.seconds())


class FeedTests(SynchronousTestCase):
    """C{GET /+changelog/<serial>-} and C{GET /+blob/<sha256>} on a primary."""

    def setUp(self) -> None:
        self.primary = Primary(self)
        self.primary.harness.createUser("alice", "alicepw", email="a@example.com")

    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[Any, bytes]:
        stub, clock = self.primary.treq, self.primary.clock
        response = self.successResultOf(settle(stub, stub.get(PRIMARY + path, headers=headers), clock=clock))
        body = self.successResultOf(settle(stub, response.content(), clock=clock))
        return response, body

    def lines(self, body: bytes) -> list[dict[str, Any]]:
        return [json.loads(line) for line in body.splitlines()]

    def test_credentialRequired(self) -> None:
        """Without a credential, with another secret's, or with an old one, the feed and blobs are 403."""
        now = self.primary.clock.seconds()
        digest = storeBlob(self.primary.blobs, b"content")
        for headers in (None, {b"Authorization": [b"Basic cm9vdDpyb290cHc="]},
                        bearer(b"x" * 48, now), bearer(self.primary.secret, now - 61),
                        {b"Authorization": [b"Bearer 123.abc"]}):
            for path in ("/+changelog/0-", f"/+blob/{digest}"):
                response, body = self.get(path, headers)
                self.assertEqual(response.code, 403, (path, headers))
                self.assertIn("replication credential", json.loads(body)["message"])
        response, _ = self.get("/+changelog/0-", bearer(self.primary.secret, now - 59))
        self.assertEqual(response.code, 200)

    def test_streamsRecords(self) -> None:
        """Every record from the serial on, one JSON line each, as the changelog holds them."""
        response, body = self.get("/+changelog/0-", self.primary.credential())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/x-ndjson"])
        serial = self.primary.storage.currentSerial()
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Serial"), [str(serial).encode()])
        records = self.lines(body)
        self.assertEqual([r["serial"] for r in records], list(range(serial + 1)))
        stored = self.successResultOf(self.primary.storage.changesSince(-1, 100))
        self.assertEqual([r["time"] for r in records], [r.time for r in stored])
        self.assertEqual(records[1]["changes"]["user/alice"]["email"], "a@example.com")
        response, body = self.get(f"/+changelog/{serial}-", self.primary.credential())
        self.assertEqual([r["serial"] for r in self.lines(body)], [serial])

    def test_noPasswordHashes(self) -> None:
        """User records carry the keyed fingerprint tokens need, never the password hash."""
        _, body = self.get("/+changelog/0-", self.primary.credential())
        self.assertNotIn(b"pwhash", body)
        self.assertNotIn(b"$argon2", body)
        pwhash = self.successResultOf(self.primary.storage.read(lambda v: v.get("user/alice")))["pwhash"]
        alice = self.lines(body)[1]["changes"]["user/alice"]
        self.assertEqual(alice["pwfingerprint"], passwordFingerprint(self.primary.secret, pwhash))
        self.assertNotIn(pwhash[-20:], body.decode())

    def test_bounded(self) -> None:
        """One answer carries at most maxRecords records; the next request continues."""
        self.primary.feed.maxRecords = 1
        _, body = self.get("/+changelog/0-", self.primary.credential())
        self.assertEqual([r["serial"] for r in self.lines(body)], [0])
        _, body = self.get("/+changelog/1-", self.primary.credential())
        self.assertEqual([r["serial"] for r in self.lines(body)], [1])

    def test_longPollWakesOnCommit(self) -> None:
        """A request for the next serial waits, and is answered by the commit that makes it."""
        serial = self.primary.storage.currentSerial()
        delayed = len(self.primary.clock.getDelayedCalls())
        d = self.primary.treq.get(PRIMARY + f"/+changelog/{serial + 1}-", headers=self.primary.credential())
        self.primary.treq.flush()
        self.assertNoResult(d)
        self.primary.clock.advance(10)
        self.primary.treq.flush()
        self.assertNoResult(d)
        self.successResultOf(self.primary.storage.write(lambda txn: txn.set("k", {"v": 1})))
        self.primary.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        records = self.lines(self.successResultOf(response.content()))
        self.assertEqual([(r["serial"], r["changes"]) for r in records], [(serial + 1, {"k": {"v": 1}})])
        self.assertEqual(len(self.primary.clock.getDelayedCalls()), delayed)

    def test_longPollTimeout(self) -> None:
        """Without a commit the long poll ends after ?timeout seconds with no records."""
        serial = self.primary.storage.currentSerial()
        d = self.primary.treq.get(PRIMARY + f"/+changelog/{serial + 1}-?timeout=5",
                                  headers=self.primary.credential())
        self.primary.treq.flush()
        self.primary.clock.advance(4.9)
        self.primary.treq.flush()
        self.assertNoResult(d)
        self.primary.clock.advance(0.1)
        self.primary.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual((response.code, self.successResultOf(response.content())), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Serial"), [str(serial).encode()])

    def test_stopWaitingAnswersLongPolls(self) -> None:
        """When the server stops, waiting long polls are answered at once, and new ones do not wait."""
        serial = self.primary.storage.currentSerial()
        d = self.primary.treq.get(PRIMARY + f"/+changelog/{serial + 1}-", headers=self.primary.credential())
        self.primary.treq.flush()
        self.assertNoResult(d)
        self.primary.feed.stopWaiting()
        self.primary.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        response, body = self.get(f"/+changelog/{serial + 1}-", self.primary.credential())
        self.assertEqual((response.code, body), (200, b""))

    def test_disconnectedPollCleansUp(self) -> None:
        """A long poll whose replica goes away leaves no subscriber and no timer behind."""
        serial = self.primary.storage.currentSerial()
        subscribers = len(self.primary.storage._subscribers)
        delayed = len(self.primary.clock.getDelayedCalls())
        d = self.primary.treq.get(PRIMARY + f"/+changelog/{serial + 1}-", headers=self.primary.credential())
        self.primary.treq.flush()
        self.assertEqual(len(self.primary.storage._subscribers), subscribers + 1)
        d.cancel()
        self.failureResultOf(d)
        self.primary.treq.flush()
        self.assertEqual(len(self.primary.storage._subscribers), subscribers)
        self.assertEqual(len(self.primary.clock.getDelayedCalls()), delayed)

    def test_aheadRefused(self) -> None:
        """A replica that is ahead of the primary is told so (409), not made to wait."""
        serial = self.primary.storage.currentSerial()
        response, body = self.get(f"/+changelog/{serial + 2}-", self.primary.credential())
        self.assertEqual(response.code, 409)
        self.assertIn("ahead", json.loads(body)["message"])

    def test_blob(self) -> None:
        """A stored blob is served by sha256 to a replica; unknown or malformed digests are 404."""
        digest = storeBlob(self.primary.blobs, b"the bytes of a wheel")
        response, body = self.get(f"/+blob/{digest}", self.primary.credential())
        self.assertEqual((response.code, body), (200, b"the bytes of a wheel"))
        self.assertEqual((response.headers.getRawHeaders(b"Content-Encoding") or [b""])[0], b"")
        response, _ = self.get(f"/+blob/{'0' * 64}", self.primary.credential())
        self.assertEqual(response.code, 404)
        response, _ = self.get("/+blob/..%2f.secret", self.primary.credential())
        self.assertEqual(response.code, 404)

    def test_pollersInStatus(self) -> None:
        """The primary's /+status lists the replicas that polled it."""
        headers = {**self.primary.credential(), b"X-Devpi-Replica-Uuid": [REPLICA_UUID.encode()]}
        self.get("/+changelog/0-", headers)
        _, body = self.get("/+status", {b"Accept": [b"application/json"]})
        result = json.loads(body)["result"]
        pollers = result["polling_replicas"]
        self.assertEqual(list(pollers), [REPLICA_UUID])
        self.assertEqual(pollers[REPLICA_UUID]["in-request"], False)
        self.assertEqual(result["role"], "MASTER")


class TokenTests(SynchronousTestCase):
    """Login tokens made by a primary work on a replica, which cannot check passwords."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.secret = b"k" * 48
        self.hashing = fastHashing()
        self.primary = MemoryStorage(clock=self.clock.seconds)
        self.replica = MemoryStorage(clock=self.clock.seconds)
        self.primaryAuth = Authenticator(self.primary, lambda f, *a: succeed(f(*a)), self.secret, self.clock,
                                         hashing=self.hashing)
        self.replicaAuth = Authenticator(self.replica, lambda f, *a: succeed(f(*a)), self.secret, self.clock,
                                         hashing=self.hashing)

    def setPassword(self, password: str) -> str:
        pwhash = self.hashing.hash(password)
        config = {"pwhash": pwhash, "created": "2024-01-01T00:00:00Z"}
        self.successResultOf(self.primary.write(lambda txn: txn.set("user/alice", config)))
        serial = self.replica.currentSerial() + 1
        self.successResultOf(self.replica.applyChange(
            ChangeRecord(serial, 1.0, {"user/alice": replicaUserConfig(self.secret, config)})))
        return pwhash

    def authenticate(self, auth: Authenticator, secret: str) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(auth.authenticate("alice", secret)))

    def test_primaryTokenValidOnReplica(self) -> None:
        """A token the primary issued authenticates on the replica."""
        pwhash = self.setPassword("alicepw")
        token = self.primaryAuth.makeToken("alice", pwhash)
        self.assertEqual(self.authenticate(self.replicaAuth, token), "alice")
        self.assertEqual(self.authenticate(self.primaryAuth, token), "alice")

    def test_replicaCannotCheckPasswords(self) -> None:
        """The replica has no hash: the right password does not authenticate there (logins are forwarded)."""
        self.setPassword("alicepw")
        self.assertEqual(self.authenticate(self.primaryAuth, "alicepw"), "alice")
        self.assertIsNone(self.authenticate(self.replicaAuth, "alicepw"))
        stored = self.successResultOf(self.replica.read(lambda v: v.get("user/alice")))
        self.assertNotIn("pwhash", stored)

    def test_passwordChangeRevokesOnReplica(self) -> None:
        """After a password change on the primary replicates, old tokens fail on the replica too."""
        token = self.primaryAuth.makeToken("alice", self.setPassword("old"))
        self.setPassword("new")
        self.assertIsNone(self.authenticate(self.replicaAuth, token))

    def test_otherSecretRejected(self) -> None:
        """A replica with another secret accepts none of the primary's tokens."""
        pwhash = self.setPassword("alicepw")
        other = Authenticator(self.replica, lambda f, *a: succeed(f(*a)), b"o" * 48, self.clock)
        self.assertIsNone(self.authenticate(other, self.primaryAuth.makeToken("alice", pwhash)))


class SyncMachineTests(SynchronousTestCase):
    """The replica's sync status machine, driven with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.local = -1
        self.core = SyncCore(PRIMARY, self.clock, lambda: self.local, firstDelay=1.0, maxDelay=8.0)
        self.sync = makeReplicaSync(self.core)

    def state(self) -> str:
        return self.sync.describe()["state"]

    def test_initialUntilCaughtUp(self) -> None:
        """A new replica is initial while it copies, following once it has everything."""
        self.assertEqual(self.state(), "initial")
        self.sync.progress(10, 990.0)
        self.local = 4
        self.assertEqual(self.state(), "initial")
        figures = self.sync.describe()
        self.assertEqual((figures["lag-serials"], figures["lag-seconds"]), (6, 10.0))
        self.local = 10
        self.sync.progress(10, None)
        figures = self.sync.describe()
        self.assertEqual((figures["state"], figures["lag-serials"], figures["lag-seconds"]), ("following", 0, 0.0))
        self.assertEqual(figures["in-sync-at"], 1000.0)

    def test_behindAndBack(self) -> None:
        """A new change on the primary makes a following replica behind until it is applied."""
        self.local = 3
        self.sync.progress(3, None)
        self.sync.progress(4, None)
        self.assertEqual(self.state(), "behind")
        self.assertTrue(self.sync.isReachable())
        self.local = 4
        self.sync.progress(4, None)
        self.assertEqual(self.state(), "following")

    def test_unreachableBacksOff(self) -> None:
        """Failures hold polls back for a delay that doubles up to the maximum, and reset on success."""
        self.sync.failed("connection refused")
        self.assertEqual(self.state(), "unreachable")
        self.assertFalse(self.sync.isReachable())
        delays = []
        for _ in range(5):
            poll = self.sync.nextPoll()
            self.assertNoResult(poll)
            delays.append(self.sync.describe()["retry-delay"])
            self.clock.advance(delays[-1])
            self.successResultOf(poll)
            self.sync.failed("still refused")
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0])
        figures = self.sync.describe()
        self.assertEqual((figures["consecutive-failures"], figures["last-error"]), (6, "still refused"))
        self.clock.advance(8.0)
        self.sync.progress(-1, None)
        self.assertEqual(self.state(), "following")
        self.assertEqual(self.sync.describe()["consecutive-failures"], 0)
        self.successResultOf(self.sync.nextPoll())
        self.sync.failed("again")
        self.assertEqual(self.sync.describe()["retry-delay"], 1.0)
        self.sync.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probeBackToBehindOrInitial(self) -> None:
        """After an outage the replica is behind if it had caught up before, else still initial."""
        self.sync.failed("down")
        self.clock.advance(1)
        self.sync.progress(5, None)
        self.assertEqual(self.state(), "initial")
        self.local = 5
        self.sync.progress(5, None)
        self.sync.failed("down again")
        self.clock.advance(1)
        self.sync.progress(9, None)
        self.assertEqual(self.state(), "behind")
        self.assertEqual(self.sync.describe()["last-contact"], self.clock.seconds())

    def test_reachabilityListeners(self) -> None:
        """Listeners hear when the primary becomes unreachable and reachable again, not of lag."""
        heard: list[bool] = []
        self.core.reachabilityListeners.append(heard.append)
        self.sync.progress(5, None)
        self.local = 5
        self.sync.progress(5, None)
        self.sync.progress(9, None)  # behind: still reachable
        self.sync.failed("down")
        self.sync.failed("still down")
        self.clock.advance(60)  # probing
        self.sync.failed("down again")
        self.clock.advance(60)
        self.sync.progress(5, None)
        self.assertEqual(heard, [False, True])

    def test_primaryAnsweredRetriesNow(self) -> None:
        """When a forwarded request reaches the primary, a replica waiting to retry retries at once."""
        self.sync.failed("down")
        self.sync.failed("still down")
        poll = self.sync.nextPoll()
        self.sync.primaryAnswered()
        self.assertNoResult(poll)  # not from inside the transition
        self.clock.advance(0)
        self.successResultOf(poll)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.sync.primaryAnswered()
        self.sync.progress(-1, None)
        self.assertEqual(self.state(), "following")

    def test_stopCancelsWaitingPolls(self) -> None:
        """Stopping cancels the retry timer and the polls waiting for it; later polls fail at once."""
        self.sync.failed("down")
        poll = self.sync.nextPoll()
        self.sync.stop()
        self.failureResultOf(poll)
        self.failureResultOf(self.sync.nextPoll())
        self.assertEqual(self.state(), "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.sync.progress(3, None)
        self.sync.failed("ignored")
        self.assertEqual(self.state(), "stopped")


class Follower:
    """A replica in memory following a L{Primary} through StubTreq."""

    def __init__(self, testCase: SynchronousTestCase, primary: Primary, secret: bytes | None = None,
                 primaryUUID: str | None = None) -> None:
        self.primary = primary
        self.storage = MemoryStorage(clock=primary.clock.seconds)
        self.blobs = MemoryBlobStore()
        self.client = PrimaryClient(primary.treq, PRIMARY, secret or primary.secret, primary.clock, REPLICA_UUID)
        self.remembered: list[str] = []
        self.service = ReplicaService(self.storage, self.blobs, self.client, primary.clock, pollTimeout=5,
                                      primaryUUID=primaryUUID, rememberPrimaryUUID=self.remembered.append)
        self.testCase = testCase

    def poll(self) -> int:
        d = Deferred.fromCoroutine(self.service.pollOnce())
        return self.testCase.successResultOf(settle(self.primary.treq, d, clock=self.primary.clock))

    def state(self, view: Any) -> dict[str, Any]:
        return dict(view.items(""))


class FollowerTests(SynchronousTestCase):
    """The follower copies the primary's changes and files, verified, resuming from its own serial."""

    def setUp(self) -> None:
        self.primary = Primary(self)
        self.primary.harness.createUser("alice", "alicepw")
        self.wheel = b"PK\x03\x04 a wheel" * 1000
        self.digest = storeBlob(self.primary.blobs, self.wheel)
        entry = {"filename": "a-1.0-py3-none-any.whl", BLOB_REF: self.digest, "size": len(self.wheel)}
        self.successResultOf(self.primary.storage.write(lambda txn: txn.set("file/alice/dev/a/a.whl", entry)))

    def test_copiesEverything(self) -> None:
        """One poll brings the replica to the primary's serial, state and files; hashes never travel."""
        follower = Follower(self, self.primary)
        applied = follower.poll()
        self.assertEqual(applied, self.primary.storage.currentSerial() + 1)
        self.assertEqual(follower.storage.currentSerial(), self.primary.storage.currentSerial())
        primaryState = self.successResultOf(self.primary.storage.read(follower.state))
        replicaState = self.successResultOf(follower.storage.read(follower.state))
        self.assertEqual(set(replicaState), set(primaryState))
        for key, value in primaryState.items():
            if key.startswith("user/"):
                self.assertEqual(replicaState[key], replicaUserConfig(self.primary.secret, value))
            else:
                self.assertEqual(replicaState[key], value)
        self.assertEqual(follower.blobs.blobs[self.digest], self.wheel)
        self.assertEqual(follower.storage.lastCommitTime(), self.primary.storage.lastCommitTime())
        figures = follower.service.sync.describe()
        self.assertEqual((figures["state"], figures["lag-serials"]), ("following", 0))
        self.assertEqual(follower.remembered, [self.primary.harness.nodeinfo["uuid"]])
        self.assertEqual(follower.service.fetcher.fetched, 1)

    def test_resumesFromOwnSerial(self) -> None:
        """Bounded answers and later changes are picked up from the replica's own serial."""
        self.primary.feed.maxRecords = 1
        follower = Follower(self, self.primary)
        self.assertEqual(follower.poll(), 1)
        self.assertEqual(follower.service.sync.describe()["state"], "initial")
        while follower.storage.currentSerial() < self.primary.storage.currentSerial():
            self.assertEqual(follower.poll(), 1)
        self.assertEqual(follower.service.sync.describe()["state"], "following")
        self.primary.harness.createUser("bob", "bobpw")
        self.assertEqual(follower.poll(), 1)
        bob = self.successResultOf(follower.storage.read(lambda v: v.get("user/bob")))
        self.assertIn("pwfingerprint", bob)

    def test_missingBlobSkipped(self) -> None:
        """A file the primary no longer has (collected after a later change) does not stop replication."""
        del self.primary.blobs.blobs[self.digest]
        follower = Follower(self, self.primary)
        follower.poll()
        self.assertEqual(follower.storage.currentSerial(), self.primary.storage.currentSerial())
        self.assertEqual(follower.service.fetcher.missing, 1)
        self.assertEqual(follower.blobs.blobs, {})

    def test_otherPrimaryRefused(self) -> None:
        """A primary whose uuid is not the one this replica follows gets nothing applied."""
        follower = Follower(self, self.primary, primaryUUID="0" * 32)
        d = Deferred.fromCoroutine(follower.service.pollOnce())
        self.primary.treq.flush()
        self.assertIn("new, empty server directory", str(self.failureResultOf(d, ReplicationError).value))
        self.assertEqual(follower.storage.currentSerial(), -1)

    def test_otherSecretForbidden(self) -> None:
        """A replica without the primary's secret is refused and applies nothing."""
        follower = Follower(self, self.primary, secret=b"w" * 48)
        d = Deferred.fromCoroutine(follower.service.pollOnce())
        self.primary.treq.flush()
        failure = self.failureResultOf(d, ReplicationError)
        self.assertIn("403", str(failure.value))
        self.assertEqual(follower.storage.currentSerial(), -1)

    def test_serviceRetriesAfterFailure(self) -> None:
        """The running service backs off after a failure and succeeds on the retry; stop leaves no timers."""
        follower = Follower(self, self.primary)
        attempts: list[int] = []
        real = follower.service.pollOnce

        async def flaky() -> int:
            attempts.append(1)
            if len(attempts) == 1:
                raise ConnectionRefusedError("primary down")
            return await real()

        follower.service.pollOnce = flaky  # type: ignore[method-assign]
        follower.service.startService()
        self.primary.treq.flush()
        self.assertEqual(follower.service.sync.describe()["state"], "unreachable")
        self.assertIn("primary down", follower.service.sync.describe()["last-error"])
        self.primary.clock.advance(1.0)
        for _ in range(100):
            self.primary.clock.advance(0)
            self.primary.treq.flush()
        self.assertEqual(follower.storage.currentSerial(), self.primary.storage.currentSerial())
        self.assertEqual(follower.service.sync.describe()["state"], "following")
        calls = len(self.primary.clock.getDelayedCalls())
        self.successResultOf(Deferred.fromCoroutine(_stop(follower.service)))
        for _ in range(3):
            self.primary.treq.flush()
        self.assertEqual(follower.service.sync.describe()["state"], "stopped")
        self.assertLess(len(self.primary.clock.getDelayedCalls()), calls)

    def test_statusFields(self) -> None:
        """A replica's /+status fields: role REPLICA, the machine's figures and lag metrics."""
        follower = Follower(self, self.primary)
        follower.poll()
        fields = follower.service.statusFields()
        self.assertEqual(fields["role"], "REPLICA")
        self.assertEqual(fields["replication"]["state"], "following")
        self.assertEqual(fields["primary-uuid"], self.primary.harness.nodeinfo["uuid"])
        metrics = {name: value for name, _, value in fields["metrics"]}
        self.assertEqual(metrics["devpi_replica_lag_serials"], 0)
        self.assertEqual(metrics["devpi_replica_files_fetched"], 1)


async def _stop(service: Any) -> None:
    result = service.stopService()
    if isinstance(result, Deferred):
        await result


class _FlakyBlobs(Resource):
    """Serves a blob, with other bytes of the same length the first C{corrupt} times."""

    isLeaf = True

    def __init__(self, data: bytes, corrupt: int) -> None:
        super().__init__()
        self.data = data
        self.corrupt = corrupt
        self.requests = 0

    def render_GET(self, request: Any) -> bytes:
        self.requests += 1
        if self.requests <= self.corrupt:
            return bytes(reversed(self.data))
        return self.data


class BlobFetcherTests(SynchronousTestCase):
    """Files are verified by hash and fetched again on a mismatch."""

    def fetcher(self, resource: Resource) -> tuple[BlobFetcher, MemoryBlobStore, Clock, StubTreq]:
        clock = Clock()
        stub = StubTreq(resource)
        blobs = MemoryBlobStore()
        client = PrimaryClient(stub, PRIMARY, b"s" * 48, clock, REPLICA_UUID)
        return BlobFetcher(client, blobs, clock, attempts=3, retryDelay=1.0), blobs, clock, stub

    def test_mismatchFetchedAgain(self) -> None:
        """A transfer with the wrong bytes is dropped, and the next one is kept."""
        data = b"0123456789" * 500
        resource = _FlakyBlobs(data, corrupt=1)
        fetcher, blobs, clock, stub = self.fetcher(resource)
        d = Deferred.fromCoroutine(fetcher.ensure(hashlib.sha256(data).hexdigest()))
        stub.flush()
        self.assertNoResult(d)
        self.assertEqual(blobs.blobs, {})
        clock.advance(1.0)
        stub.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual((resource.requests, list(blobs.blobs.values())), (2, [data]))

    def test_alwaysWrongGivesUp(self) -> None:
        """After the last attempt a mismatch is an error and nothing is stored."""
        data = b"abcdef" * 100
        fetcher, blobs, clock, stub = self.fetcher(_FlakyBlobs(data, corrupt=99))
        d = Deferred.fromCoroutine(fetcher.ensure(hashlib.sha256(data).hexdigest()))
        for _ in range(3):
            stub.flush()
            clock.advance(10)
        stub.flush()
        self.failureResultOf(d, HashMismatch)
        self.assertEqual(blobs.blobs, {})

    def test_storedNotFetched(self) -> None:
        """A blob the replica has already is not asked for."""
        data = b"have it"
        resource = _FlakyBlobs(data, corrupt=0)
        fetcher, blobs, _, stub = self.fetcher(resource)
        digest = storeBlob(blobs, data)
        self.assertTrue(self.successResultOf(Deferred.fromCoroutine(fetcher.ensure(digest))))
        self.assertEqual(resource.requests, 0)


class _Lines(Resource):
    """Answers with a prepared body and then drops the connection, or ends it."""

    isLeaf = True

    def __init__(self, body: bytes, cut: bool) -> None:
        super().__init__()
        self.body = body
        self.cut = cut

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"X-Devpi-Serial", b"9")
        request.setHeader(b"X-Devpi-Uuid", b"a" * 32)
        request.write(self.body)
        if self.cut:
            request.channel.transport.loseConnection()
        else:
            request.finish()
        return NOT_DONE_YET


class StreamTests(SynchronousTestCase):
    """The changelog stream is read and applied line by line."""

    def follow(self, body: bytes, cut: bool) -> tuple[list[int], Deferred[int]]:
        clock = Clock()
        stub = StubTreq(_Lines(body, cut))
        client = PrimaryClient(stub, PRIMARY, b"s" * 48, clock, REPLICA_UUID)
        applied: list[int] = []
        answers: list[Any] = []
        d = Deferred.fromCoroutine(client.followChanges(
            -1, 5, answers.append, lambda record: succeed(applied.append(record.serial))))
        stub.flush()
        self.assertEqual([a.serial for a in answers], [9])
        return applied, d

    def line(self, serial: int) -> bytes:
        return json.dumps({"serial": serial, "time": 1.0, "changes": {"k": serial}}).encode() + b"\n"

    def test_linesApplied(self) -> None:
        """Each line is applied in order and the count returned."""
        applied, d = self.follow(self.line(0) + self.line(1) + self.line(2), cut=False)
        self.assertEqual((applied, self.successResultOf(d)), ([0, 1, 2], 3))

    def test_cutStreamKeepsCompleteLines(self) -> None:
        """When the stream breaks mid-line, the complete lines are applied and the poll fails."""
        applied, d = self.follow(self.line(0) + self.line(1) + self.line(2)[:10], cut=True)
        self.failureResultOf(d)
        self.assertEqual(applied, [0, 1])

    def test_garbageRefused(self) -> None:
        """A line that is not a change record stops the stream with a replication error."""
        applied, d = self.follow(self.line(0) + b"<html>oops</html>\n" + self.line(1), cut=False)
        self.failureResultOf(d, ReplicationError)
        self.assertEqual(applied, [0])

    def test_parseRecord(self) -> None:
        """Records need an int serial, a numeric time and a dict of changes."""
        self.assertEqual(parseRecord(self.line(3)), ChangeRecord(3, 1.0, {"k": 3}))
        for bad in (b"[]", b'{"serial": "1", "time": 1, "changes": {}}', b'{"serial": 1, "changes": {}}',
                    b'{"serial": true, "time": 1, "changes": {}}'):
            self.assertRaises(ReplicationError, parseRecord, bad)

    def test_idleTimeout(self) -> None:
        """A stream that goes silent is given up after the idle timeout."""
        clock = Clock()
        reader = LineReader(lambda line: None, clock, 60)

        class Transport:
            stopped = False

            def stopProducing(self) -> None:
                self.stopped = True

        transport = Transport()
        reader.makeConnection(transport)  # type: ignore[arg-type]
        reader.dataReceived(b"partial")
        clock.advance(59)
        self.assertFalse(transport.stopped)
        clock.advance(1)
        self.assertTrue(transport.stopped)
        reader.connectionLost(Failure(ResponseFailed([])))
        self.failureResultOf(reader.done)
        self.assertEqual(clock.getDelayedCalls(), [])


class _Local(Resource):
    """Stands for the replica's own site: records what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.path))
        request.setHeader(b"Content-Type", b"text/plain")
        return b"local answer"


class _FakeReplica:
    def __init__(self) -> None:
        self.reachable = True
        self.answered = 0
        self.waited: list[int] = []

    def isReachable(self) -> bool:
        return self.reachable

    def primaryAnswered(self) -> None:
        self.answered += 1

    def waitForSerial(self, serial: int, timeout: float) -> Deferred[bool]:
        self.waited.append(serial)
        return succeed(True)


class _PrimaryPages(Resource):
    """Stands for the primary: answers every request with C{code}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.seen: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.path)
        request.setResponseCode(self.code)
        return b"primary page"


class _DownAgent:
    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError("primary down"))


class ProxyTests(SynchronousTestCase):
    """Writes are forwarded to the primary; reads stay on the replica unless they need upstream."""

    def setUp(self) -> None:
        self.primary = Primary(self)
        self.primary.harness.createUser("alice", "alicepw")
        self.primaryAgent = RequestTraversalAgent(self.primary.resource)
        self.local = _Local()
        self.replica = _FakeReplica()
        self.storage = MemoryStorage()
        self.blobs = MemoryBlobStore()
        self.proxy = ReplicaProxyResource(self.local, self.primaryAgent, PRIMARY, self.storage, self.blobs,
                                          Clock(), self.replica)
        self.client = StubTreq(self.proxy)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        d = self.client.request(method, "http://replica.test" + path, **kwargs)
        for _ in range(4):
            self.primaryAgent.flush()
            self.client.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        for _ in range(4):
            self.primaryAgent.flush()
            self.client.flush()
        return response, body

    def test_writeForwarded(self) -> None:
        """A PUT to the replica creates the user on the primary and relays its answer after its serial arrived."""
        response, body = self.request("PUT", "/bob", data=json.dumps({"password": "bobpw"}).encode(),
                                      headers={b"Content-Type": [b"application/json"],
                                               b"Accept": [b"application/json"]})
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])
        self.assertEqual(json.loads(body)["result"]["username"], "bob")
        bob = self.successResultOf(self.primary.storage.read(lambda v: v.get("user/bob")))
        self.assertIsNotNone(bob)
        self.assertEqual(self.replica.waited, [self.primary.storage.currentSerial()])
        self.assertEqual(self.replica.answered, 1)
        self.assertEqual(self.local.seen, [])

    def test_largeBodyReadOffTheReactor(self) -> None:
        """A body too large to be kept in memory is sent on from the storage threads, whole."""
        from twisted.internet.defer import maybeDeferred

        reads: list[int] = []

        def runFile(f: Any, *args: Any) -> Deferred[Any]:
            reads.append(args[0])
            return maybeDeferred(f, *args)

        self.proxy = ReplicaProxyResource(self.local, self.primaryAgent, PRIMARY, self.storage, self.blobs,
                                          Clock(), self.replica, runFile=runFile)
        self.client = StubTreq(self.proxy)
        body = json.dumps({"user": "alice", "password": "alicepw", "padding": "x" * 300_000}).encode()
        response, answer = self.request("POST", "/+login", data=body,
                                        headers={b"Content-Type": [b"application/json"],
                                                 b"Accept": [b"application/json"]})
        self.assertEqual(response.code, 200, answer)
        self.assertTrue(reads)
        self.assertGreaterEqual(sum(reads), len(body))
        self.assertEqual(self.local.seen, [])

    def test_credentialsForwarded(self) -> None:
        """The client's credentials reach the primary, which decides (a wrong password is refused there)."""
        body = json.dumps({"bases": []}).encode()
        headers = {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}
        response, _ = self.request("PUT", "/alice/dev", data=body, headers={**headers, **basicAuth("alice", "no")})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.replica.waited, [])
        response, _ = self.request("PUT", "/alice/dev", data=body, headers={**headers, **basicAuth("alice", "alicepw")})
        self.assertEqual(response.code, 200)
        config = self.successResultOf(self.primary.storage.read(lambda v: v.get(keys.indexKey("alice", "dev"))))
        self.assertEqual(config["bases"], [])

    def test_loginForwarded(self) -> None:
        """POST /+login goes to the primary, which issues the token."""
        response, body = self.request("POST", "/+login", data=json.dumps(
            {"user": "alice", "password": "alicepw"}).encode(), headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)
        token = json.loads(body)["result"]["password"]
        self.assertEqual(self.primary.harness.get("/+api", headers=devpiAuth("alice", token)).json["result"]
                         ["authstatus"][:2], ["ok", "alice"])

    def test_readsLocal(self) -> None:
        """GET, HEAD and the read-only POSTs are answered by the replica itself."""
        for method, path in (("GET", "/alice"), ("HEAD", "/alice/dev/+simple/x/"), ("POST", "/+api"),
                             ("POST", "/alice/dev/+api"), ("POST", "/+status")):
            response, body = self.request(method, path)
            self.assertEqual(response.code, 200)
            self.assertIsNone(response.headers.getRawHeaders(b"X-Devpi-Proxy"))
        self.assertEqual([m for m, _ in self.local.seen], [b"GET", b"HEAD", b"POST", b"POST", b"POST"])

    def test_primaryDown(self) -> None:
        """A write while the primary is down is 502 with a message; nothing is changed locally."""
        self.proxy._agent = _DownAgent()
        response, body = self.request("PUT", "/bob", data=b"{}")
        self.assertEqual(response.code, 502)
        self.assertIn("cannot be reached", json.loads(body)["message"])
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Api-Version"), [b"2"])
        self.assertEqual(self.local.seen, [])

    def setMirror(self) -> None:
        mirror = {"type": "mirror", "mirror_url": "https://pypi.org/simple/", "bases": []}
        self.successResultOf(self.storage.write(lambda txn: [
            txn.set(keys.indexKey("root", "pypi"), mirror),
            txn.set(keys.indexKey("alice", "dev"), {"type": "stage", "bases": ["root/pypi"]}),
            txn.set(keys.indexKey("alice", "private"), {"type": "stage", "bases": []}),
        ]))

    def test_mirrorBackedPagesForwarded(self) -> None:
        """Simple pages of indexes with a mirror in their resolution order come from the primary."""
        self.setMirror()
        for path in ("/root/pypi/+simple/requests/", "/alice/dev/+simple/requests/", "/root/pypi/+simple/"):
            response, _ = self.request("GET", path)
            self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"], path)
        response, body = self.request("GET", "/alice/private/+simple/requests/")
        self.assertEqual(body, b"local answer")
        self.replica.reachable = False
        response, body = self.request("GET", "/alice/dev/+simple/requests/")
        self.assertEqual(body, b"local answer")

    def test_privateProjectOfMirrorBackedIndexIsLocal(self) -> None:
        """A project the index holds itself hides the mirror: upstream is never asked, so neither is the primary."""
        self.setMirror()
        self.successResultOf(self.storage.write(
            lambda txn: txn.set(keys.projectKey("alice", "dev", "mine"), {"name": "mine"})))
        response, body = self.request("GET", "/alice/dev/+simple/Mine/")
        self.assertEqual(body, b"local answer")

    def usePrimaryPages(self) -> "_PrimaryPages":
        primary = _PrimaryPages()
        self.primaryAgent = RequestTraversalAgent(primary)
        self.proxy._agent = self.primaryAgent
        return primary

    def test_mirrorPageLocalWhileThePrimaryAnswerIsFresh(self) -> None:
        """
        Once the primary answered a mirror page and its cached links have
        replicated, the replica renders it until the mirror's expiry.
        """
        self.setMirror()
        primary = self.usePrimaryPages()
        clock = self.proxy._clock
        page = "/alice/dev/+simple/requests/"
        self.assertEqual(self.request("GET", page)[1], b"primary page")
        self.assertEqual(self.request("GET", page)[1], b"primary page", "the links are not here yet")
        links = {"links": [], "etag": None, "serial": 1, "status": None, "statusReason": None}
        self.successResultOf(self.storage.write(lambda txn: txn.set("simple/root/pypi/requests", links)))
        self.assertEqual(self.request("GET", page)[1], b"local answer")
        self.assertEqual(self.request("GET", "/root/pypi/+simple/requests/")[1], b"primary page",
                         "answered per index")
        clock.advance(1799)
        self.assertEqual(self.request("GET", page)[1], b"local answer")
        clock.advance(1)
        self.assertEqual(self.request("GET", page)[1], b"primary page", "expired: the primary decides again")
        self.assertEqual(self.request("GET", page)[1], b"local answer")
        self.assertEqual(self.request("GET", "/alice/dev/+simple/")[1], b"primary page", "project lists go on")
        primary.code = 404
        clock.advance(1800)
        self.assertEqual(self.request("GET", page)[1], b"primary page")
        self.assertEqual(self.request("GET", page)[1], b"primary page", "only a 200 counts as an answer")
        self.assertEqual(len(primary.seen), 7)

    def test_mirrorFileForwardedUntilStored(self) -> None:
        """A mirror file not stored here is asked of the primary; once replicated it is served here."""
        self.setMirror()
        content = b"wheel bytes"
        digest = hashlib.sha256(content).hexdigest()
        relpath = f"root/pypi/+f/{digest[:3]}/{digest[3:16]}/x-1.0-py3-none-any.whl"
        response, _ = self.request("GET", "/" + relpath)
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])
        fileKey = keys.fileKey("root", "pypi", "x", "x-1.0-py3-none-any.whl")
        self.successResultOf(self.storage.write(lambda txn: [
            txn.set(fileKey, {"filename": "x-1.0-py3-none-any.whl", "project": "x", "sha256": digest,
                              BLOB_REF: digest}),
            txn.set(keys.pathKey("root", "pypi", digest[:3], digest[3:16], "x-1.0-py3-none-any.whl"),
                    {"file": fileKey}),
        ]))
        response, _ = self.request("GET", "/" + relpath)
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"], "blob not here yet")
        storeBlob(self.blobs, content)
        response, body = self.request("GET", "/" + relpath)
        self.assertEqual(body, b"local answer")
        response, body = self.request("GET", "/" + relpath + ".metadata")
        self.assertEqual(response.headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])

    def test_mirrorTarget(self) -> None:
        """Only +simple and +f paths below an index may need a mirror."""
        self.assertEqual(mirrorTarget(b"/root/pypi/+simple/a%2Db/"), ("+simple", "root", "pypi", ["a-b", ""]))
        self.assertEqual(mirrorTarget(b"/root/pypi/+f/abc/def/x.whl"), ("+f", "root", "pypi", ["abc", "def", "x.whl"]))
        for path in (b"/", b"/root", b"/root/pypi", b"/root/pypi/x/", b"/+status", b"/root/+simple/x"):
            self.assertIsNone(mirrorTarget(path), path)


class ReadOnlyStorageTests(SynchronousTestCase):
    """What a replica's web layer gets: the storage, read-only."""

    def test_readOnly(self) -> None:
        """Reads and subscriptions reach the store; writes fail without changing it."""
        from zope.interface.verify import verifyObject

        from devpi_twisted.interfaces import IStorage
        from devpi_twisted.replica.readonly import ReadOnlyStorage, ReplicaReadOnly

        storage = MemoryStorage()
        self.successResultOf(storage.applyChange(ChangeRecord(0, 1.0, {"a": 1})))
        view = ReadOnlyStorage(storage)
        self.assertTrue(verifyObject(IStorage, view))
        heard: list[Any] = []
        view.subscribe(heard.append)
        self.assertEqual(self.successResultOf(view.read(lambda v: v.get("a"))), 1)
        self.assertEqual((view.currentSerial(), view.lastCommitTime()), (0, 1.0))
        failure = self.failureResultOf(view.write(lambda txn: txn.set("b", 1)), ReplicaReadOnly)
        self.assertEqual(failure.value.status, 503)
        self.failureResultOf(view.applyChange(ChangeRecord(1, 2.0, {"b": 1})), ReplicaReadOnly)
        self.assertEqual(storage.currentSerial(), 0)
        self.successResultOf(storage.applyChange(ChangeRecord(1, 2.0, {"b": 1})))
        self.assertEqual([r.serial for r in heard], [1])


class WaitForSerialTests(SynchronousTestCase):
    """Waiting until a serial is applied locally."""

    def test_waits(self) -> None:
        """It fires True when the serial arrives, False after the timeout, and leaves no timer."""
        clock = Clock()
        storage = MemoryStorage()
        self.assertTrue(self.successResultOf(waitForSerial(storage, clock, -1, 5)))
        d = waitForSerial(storage, clock, 1, 5)
        self.successResultOf(storage.write(lambda txn: txn.set("a", 1)))
        self.assertNoResult(d)
        self.successResultOf(storage.applyChange(ChangeRecord(1, 2.0, {"b": 1})))
        self.assertTrue(self.successResultOf(d))
        late = waitForSerial(storage, clock, 5, 5)
        clock.advance(5)
        self.assertFalse(self.successResultOf(late))
        self.assertEqual(clock.getDelayedCalls(), [])


class ReplicaOptionsTests(SynchronousTestCase):
    """The replication options and the checks on the secret file."""

    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()

    def secretFile(self, content: bytes = b"x" * 48, mode: int = 0o600) -> str:
        path = self.dir.child(f"secret-{mode:o}-{len(content)}")
        path.setContent(content)
        os.chmod(path.path, mode)
        return path.path

    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        return parseServerOptions(self, *argv, environ=environ)

    def test_replicaOptions(self) -> None:
        """--primary-url and --secretfile make a replica's config."""
        secret = self.secretFile()
        config = self.parse("--primary-url", "http://127.0.0.1:3141/", "--secretfile", secret).toConfig()
        self.assertEqual((config.primaryURL, config.secretFile, config.replicaPollTimeout),
                         ("http://127.0.0.1:3141", secret, 25.0))

    def test_secretReadableByOthersRefused(self) -> None:
        """A secret file that group or others may read is refused, saying how to fix it."""
        for mode in (0o644, 0o640, 0o604):
            error = self.assertRaises(usage.UsageError, self.parse, "--secretfile", self.secretFile(mode=mode))
            self.assertIn("chmod 600", str(error))

    def test_shortOrMissingSecretRefused(self) -> None:
        """A secret shorter than 32 bytes, or a missing file, is refused."""
        error = self.assertRaises(usage.UsageError, self.parse, "--secretfile", self.secretFile(b"short"))
        self.assertIn("at least 32", str(error))
        self.assertRaises(usage.UsageError, self.parse, "--secretfile", self.dir.child("nope").path)

    def test_replicaNeedsSecret(self) -> None:
        """A replica without --secretfile, or with a bad primary URL, does not start."""
        error = self.assertRaises(usage.UsageError, self.parse, "--primary-url", "http://127.0.0.1:3141")
        self.assertIn("--secretfile", str(error))
        for url in ("ftp://host/", "http://user:pw@host/", "127.0.0.1:3141"):
            self.assertRaises(usage.UsageError, self.parse, "--primary-url", url, "--secretfile", self.secretFile())
        self.assertRaises(ValueError, checkPrimaryURL, "http:///path")


class ReplicaServerDirTests(SynchronousTestCase):
    """makeService for a replica: an empty directory stays empty, other directories are refused."""

    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.path = FilePath(os.path.abspath(self.mktemp()))
        secret = FilePath(os.path.abspath(self.mktemp()))
        secret.setContent(b"s" * 48)
        os.chmod(secret.path, 0o600)
        self.secret = secret.path

    def build(self, *argv: str) -> tuple[Any, ThreadedMemoryReactor]:
        options = tap.Options()
        options.parseOptions(["--serverdir", self.path.path, *argv])
        reactor = ThreadedMemoryReactor()
        return tap.makeService(options, reactor=reactor), reactor

    def startStop(self, service: Any, reactor: ThreadedMemoryReactor) -> None:
        service.startService()
        d = service.stopService()
        reactor.runUntil(lambda: d.called)

    def test_emptyDirectoryStaysEmpty(self) -> None:
        """A replica's new directory has no root user and no mirror: its state comes from the primary."""
        service, reactor = self.build("--primary-url", "http://127.0.0.1:1", "--secretfile", self.secret)
        self.startStop(service, reactor)
        info = ServerDir(self.path).nodeinfo()
        self.assertEqual((info["role"], info["primary-url"]), ("replica", "http://127.0.0.1:1"))
        self.assertEqual(readState(self.path, lambda view: view.items("")), [])

    def test_standaloneDirectoryRefused(self) -> None:
        """A directory with its own state cannot become a replica, and a replica's cannot run standalone."""
        service, reactor = self.build("--root-passwd", "pw")
        self.startStop(service, reactor)
        self.assertRaises(SystemExit, self.build, "--primary-url", "http://127.0.0.1:1", "--secretfile", self.secret)
        self.assertIn("starts from an empty directory", self.stderr.getvalue())
        other = FilePath(os.path.abspath(self.mktemp()))
        self.path = other
        service, reactor = self.build("--primary-url", "http://127.0.0.1:1", "--secretfile", self.secret)
        self.startStop(service, reactor)
        self.assertRaises(SystemExit, self.build)
        self.assertIn("start it with --primary-url", self.stderr.getvalue())


# -- real processes ---------------------------------------------------------

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _freePort() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevpiProcess:
    """One C{twistd -n devpi} process on 127.0.0.1, its log and output kept in the work directory."""

    def __init__(self, testCase: Any, workdir: str, name: str, serverdir: str, port: int, *options: str) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.logfile = os.path.join(workdir, f"{name}.log")
        self.outputPath = os.path.join(workdir, f"{name}.out")
        self._output = open(self.outputPath, "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "devpi", "--serverdir", serverdir,
             "--listen", f"tcp:{port}:interface=127.0.0.1", *options],
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            env=environment(workdir),
        )
        testCase.addCleanup(self.cleanup)

    def text(self) -> str:
        parts = []
        for path in (self.outputPath, self.logfile):
            try:
                with open(path, "rb") as f:
                    parts.append(f.read().decode("utf-8", "replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL: nothing is cleaned up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    async def stop(self) -> float:
        """SIGTERM and wait; how many seconds the shutdown took."""
        from twisted.internet.threads import deferToThread

        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        await deferToThread(self.process.wait, 60)
        return time.monotonic() - started

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._output.close()


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class ReplicationProcessTests(TestCase):
    """A primary and a replica as real processes on 127.0.0.1."""

    timeout = 300

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.secretfile = os.path.join(self.workdir, "replication.secret")
        with open(self.secretfile, "wb") as f:
            f.write(base64.urlsafe_b64encode(os.urandom(48)))
        os.chmod(self.secretfile, 0o600)
        self.primaryDir = os.path.join(self.workdir, "primary")
        self.replicaDir = os.path.join(self.workdir, "replica")
        self.primaryPort = _freePort()
        self.starts = 0
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.addCleanup(self.pool.closeCachedConnections)

    # processes

    async def startPrimary(self, *extra: str) -> DevpiProcess:
        self.starts += 1
        primary = DevpiProcess(self, self.workdir, f"primary-{self.starts}", self.primaryDir, self.primaryPort,
                               "--root-passwd", ROOT_PASSWORD, "--no-root-pypi", "--secretfile", self.secretfile,
                               *extra)
        await self.answering(primary)
        return primary

    async def startReplica(self) -> DevpiProcess:
        self.starts += 1
        replica = DevpiProcess(self, self.workdir, f"replica-{self.starts}", self.replicaDir, _freePort(),
                               "--primary-url", f"http://127.0.0.1:{self.primaryPort}",
                               "--secretfile", self.secretfile)
        await self.answering(replica)
        return replica

    async def answering(self, server: DevpiProcess) -> None:
        await waitForAnswer(self, self.http, server.url + "/+api", lambda: server.process.poll() is None,
                            lambda: f"{server.name}:\n{server.text()}", timeout=60)

    # requests

    async def call(self, server: DevpiProcess, method: str, path: str, json_: Any = None,
                   headers: dict[bytes, list[bytes]] | None = None, data: bytes | None = None) -> tuple[int, Any, Any]:
        """One request: (status, body (parsed when JSON), headers)."""
        sendHeaders = {b"Accept": [b"application/json"]}
        if json_ is not None:
            data = json.dumps(json_).encode("utf-8")
            sendHeaders[b"Content-Type"] = [b"application/json"]
        sendHeaders.update(headers or {})
        response = await self.http.request(method, server.url + path, data=data, headers=sendHeaders)
        body = await response.content()
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if contentType.startswith(b"application/json") and body:
            return response.code, json.loads(body), response.headers
        return response.code, body, response.headers

    async def status(self, server: DevpiProcess) -> dict[str, Any]:
        code, body, _ = await self.call(server, "GET", "/+status")
        self.assertEqual(code, 200)
        return body["result"]

    async def waitUntil(self, condition: Callable[[], Any], timeout: float, what: str,
                        server: DevpiProcess | None = None) -> float:
        """Poll the coroutine C{condition} until it is true; the seconds it took."""
        started = time.monotonic()
        while not await condition():
            if time.monotonic() - started > timeout:
                self.fail(f"{what}: not within {timeout}s" + (f"\n{server.text()}" if server else ""))
            await _sleep(0.02)
        return time.monotonic() - started

    async def inSync(self, primary: DevpiProcess, replica: DevpiProcess, timeout: float = 30) -> float:
        async def same() -> bool:
            return (await self.status(replica))["serial"] == (await self.status(primary))["serial"]

        return await self.waitUntil(same, timeout, "the replica catching up", replica)

    async def setUpIndex(self, server: DevpiProcess) -> None:
        code, _, _ = await self.call(server, "PUT", "/alice", {"password": "alicepw"})
        self.assertEqual(code, 201)
        code, body, _ = await self.call(server, "PUT", "/alice/dev", {"bases": [], "volatile": False},
                                        headers=basicAuth("alice", "alicepw"))
        self.assertEqual(code, 200, body)

    async def upload(self, server: DevpiProcess, version: str, size: int = 0) -> Any:
        """Upload a wheel of C{hello-replica} as twine does; the dist."""
        from .distbuilder import buildWheel as buildDist, uploadBody

        dist = buildDist("hello-replica", version, extraFiles={"hello_replica/blob.bin": os.urandom(size)}
                         if size else None)
        body = uploadBody(dist)
        code, answer, _ = await self.call(server, "POST", "/alice/dev/", data=body.body,
                                          headers={**body.headers, **basicAuth("alice", "alicepw")})
        self.assertEqual(code, 200, answer)
        return dist

    async def simpleLinks(self, server: DevpiProcess, project: str = "hello-replica",
                          index: str = "alice/dev") -> tuple[list[str], Any]:
        code, body, headers = await self.call(server, "GET", f"/{index}/+simple/{project}/",
                                              headers={b"Accept": [b"text/html"]})
        if code != 200:
            return [], headers
        import re

        return re.findall(r'href="([^"]+)"', body.decode("utf-8")), headers

    async def download(self, server: DevpiProcess, page: str, href: str) -> tuple[int, bytes, Any]:
        from urllib.parse import urljoin

        url = urljoin(server.url + page, href.split("#")[0])
        response = await self.http.get(url)
        return response.code, await response.content(), response.headers

    # the tests

    async def test_uploadAppearsOnReplicaWithinASecond(self) -> None:
        """An upload to the primary is listed and served by the replica itself within a second."""
        primary = await self.startPrimary()
        replica = await self.startReplica()
        await self.setUpIndex(primary)
        await self.inSync(primary, replica)
        dist = await self.upload(primary, "1.0")

        async def listed() -> bool:
            return any(dist.filename in href for href in (await self.simpleLinks(replica))[0])

        elapsed = await self.waitUntil(listed, 5, "the upload on the replica", replica)
        sys.stderr.write(f"\n  devpi-twisted: upload visible on the replica after {elapsed:.3f} s\n")
        self.assertLess(elapsed, 1.0)
        links, headers = await self.simpleLinks(replica)
        self.assertIsNone(headers.getRawHeaders(b"X-Devpi-Proxy"))
        code, content, headers = await self.download(replica, "/alice/dev/+simple/hello-replica/", links[0])
        self.assertEqual((code, content), (200, dist.data))
        self.assertIsNone(headers.getRawHeaders(b"X-Devpi-Proxy"))

        status = await self.status(replica)
        self.assertEqual(status["role"], "REPLICA")
        self.assertEqual(status["replication"]["state"], "following")
        self.assertEqual(status["replication"]["lag-serials"], 0)
        response = await self.http.get(replica.url + "/+metrics")
        metrics = (await response.content()).decode()
        self.assertIn("devpi_replica_lag_serials 0.0", metrics)
        self.assertIn('devpi_replica_state{state="following"} 1.0', metrics)
        primaryStatus = await self.status(primary)
        self.assertEqual(primaryStatus["role"], "MASTER")
        self.assertEqual(status["primary-uuid"], primaryStatus["uuid"])
        self.assertEqual(ServerDir(FilePath(self.replicaDir)).nodeinfo()["primary-uuid"], primaryStatus["uuid"])
        self.assertEqual(len(primaryStatus["polling_replicas"]), 1)
        code, body, _ = await self.call(primary, "GET", "/+changelog/0-")
        self.assertEqual(code, 403)
        code, body, _ = await self.call(replica, "GET", "/alice")
        self.assertEqual(code, 200)
        self.assertFalse({"pwhash", "pwfingerprint"} & set(body["result"]))

    async def test_replicaKilledMidStreamResumes(self) -> None:
        """A replica killed with SIGKILL while changes stream in resumes from its own serial and catches up."""
        primary = await self.startPrimary()
        await self.setUpIndex(primary)
        dists = []
        for n in range(16):
            dists.append(await self.upload(primary, f"1.{n}", size=2 * 1024 * 1024))
        target = (await self.status(primary))["serial"]
        self.starts += 1
        replica = DevpiProcess(self, self.workdir, f"replica-{self.starts}", self.replicaDir, _freePort(),
                               "--primary-url", f"http://127.0.0.1:{self.primaryPort}",
                               "--secretfile", self.secretfile)
        # Kill it as soon as it has fetched a few of the files (watching its blob store).
        blobs = os.path.join(self.replicaDir, "+files")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and replica.process.poll() is None:
            stored = [name for _, _, files in os.walk(blobs) for name in files if len(name) == 64]
            if len(stored) >= 3:
                break
            time.sleep(0.001)
        replica.kill()
        dists.append(await self.upload(primary, "2.0", size=1024 * 1024))
        serialAtKill = readState(FilePath(self.replicaDir), lambda view: view.serial)
        self.assertLess(serialAtKill, target, "the replica had copied everything before the kill")
        sys.stderr.write(f"\n  devpi-twisted: replica killed at serial {serialAtKill} of {target}\n")
        for n in range(3):
            dists.append(await self.upload(primary, f"3.{n}", size=256 * 1024))
        replica = await self.startReplica()
        await self.inSync(primary, replica, timeout=60)
        self.assertIn(f"following http://127.0.0.1:{self.primaryPort} from serial {serialAtKill}", replica.text())
        self.assertGreater(serialAtKill, -1)
        links, _ = await self.simpleLinks(replica)
        self.assertEqual(sorted(href.split("/")[-1].split("#")[0] for href in links),
                         sorted(d.filename for d in dists))
        for href in links:
            code, content, headers = await self.download(replica, "/alice/dev/+simple/hello-replica/", href)
            self.assertEqual(code, 200)
            self.assertEqual(hashlib.sha256(content).hexdigest(), href.split("#sha256=")[1])
            self.assertIsNone(headers.getRawHeaders(b"X-Devpi-Proxy"))

    async def test_primaryDownReplicaServesThenCatchesUp(self) -> None:
        """With the primary stopped the replica serves reads; when it returns the replica catches up."""
        primary = await self.startPrimary()
        replica = await self.startReplica()
        await self.setUpIndex(primary)
        first = await self.upload(primary, "1.0")
        await self.inSync(primary, replica)
        seconds = await primary.stop()
        self.assertLess(seconds, 10, "the primary's shutdown waited for the replica's long poll")

        async def unreachable() -> bool:
            return (await self.status(replica))["replication"]["state"] == "unreachable"

        await self.waitUntil(unreachable, 30, "the replica noticing", replica)
        links, _ = await self.simpleLinks(replica)
        self.assertEqual(len(links), 1)
        code, content, _ = await self.download(replica, "/alice/dev/+simple/hello-replica/", links[0])
        self.assertEqual((code, content), (200, first.data))
        code, body, _ = await self.call(replica, "GET", "/alice/dev")
        self.assertEqual(code, 200)
        code, body, _ = await self.call(replica, "PUT", "/bob", {"password": "bobpw"})
        self.assertEqual(code, 502)
        self.assertIn("cannot be reached", body["message"])

        primary = await self.startPrimary()
        second = await self.upload(primary, "2.0")
        await self.inSync(primary, replica, timeout=60)

        async def both() -> bool:
            return len((await self.simpleLinks(replica))[0]) == 2

        await self.waitUntil(both, 10, "the new upload on the replica", replica)
        self.assertIn(second.filename, " ".join((await self.simpleLinks(replica))[0]))
        self.assertEqual((await self.status(replica))["replication"]["state"], "following")

    async def test_writesToReplicaLandOnPrimary(self) -> None:
        """Users, indexes, uploads and logins sent to the replica are made on the primary and seen at once."""
        primary = await self.startPrimary()
        replica = await self.startReplica()
        code, body, headers = await self.call(replica, "PUT", "/alice", {"password": "alicepw"})
        self.assertEqual(code, 201, body)
        self.assertEqual(headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])
        code, _, _ = await self.call(replica, "GET", "/alice")
        self.assertEqual(code, 200, "the replica must see the write it forwarded")
        code, body, _ = await self.call(replica, "PUT", "/alice/dev", {"bases": []},
                                        headers=basicAuth("alice", "alicepw"))
        self.assertEqual(code, 200, body)
        dist = await self.upload(replica, "3.0", size=2 * 1024 * 1024)  # a body streamed from disk
        self.assertTrue(any(dist.filename in href for href in (await self.simpleLinks(primary))[0]))
        self.assertTrue(any(dist.filename in href for href in (await self.simpleLinks(replica))[0]))

        code, body, _ = await self.call(replica, "POST", "/+login", {"user": "alice", "password": "alicepw"})
        self.assertEqual(code, 200)
        token = body["result"]["password"]
        for server in (primary, replica):
            code, body, _ = await self.call(server, "GET", "/+api", headers=devpiAuth("alice", token))
            self.assertEqual(body["result"]["authstatus"][:2], ["ok", "alice"], server.name)
        code, body, _ = await self.call(replica, "POST", "/+login", {"user": "alice", "password": "wrong"})
        self.assertEqual(code, 401)

    async def mirrorPair(self) -> tuple[Any, list[str], "DevpiProcess", "DevpiProcess"]:
        """
        A fake upstream with two wheels of upstream-pkg, and a primary and a
        replica in sync whose root/up mirrors it.
        """
        from twisted.internet import reactor
        from twisted.web.server import Site

        from devpi_twisted.testing.fakepypi import FakePyPI, buildWheel as buildUpstream

        fake = FakePyPI()
        port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        names = []
        for version in ("1.0", "2.0"):
            filename, data, _ = buildUpstream("upstream-pkg", version)
            fake.addFile("upstream-pkg", filename, data)
            names.append(filename)
        primary = await self.startPrimary()
        replica = await self.startReplica()
        code, body, _ = await self.call(primary, "PUT", "/root/up", {
            "type": "mirror", "mirror_url": f"http://127.0.0.1:{port.getHost().port}/simple/"},
            headers=basicAuth("root", ROOT_PASSWORD))
        self.assertEqual(code, 200, body)
        await self.inSync(primary, replica)
        return fake, names, primary, replica

    async def test_mirrorFilesReplicate(self) -> None:
        """A mirror file fetched through either server is fetched from upstream once and served by both."""
        fake, names, primary, replica = await self.mirrorPair()

        def fetches(filename: str) -> int:
            return sum(1 for _, path in fake.requests if path.endswith("/" + filename))

        def link(links: list[str], filename: str) -> str:
            return next(href for href in links if filename in href)

        page = "/root/up/+simple/upstream-pkg/"
        # through the replica: the primary fetches, and the file replicates back
        links, headers = await self.simpleLinks(replica, "upstream-pkg", "root/up")
        self.assertEqual(headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])
        code, content, headers = await self.download(replica, page, link(links, names[0]))
        self.assertEqual(code, 200)
        self.assertEqual(hashlib.sha256(content).hexdigest(), link(links, names[0]).split("#sha256=")[1])

        async def servedLocally(server: DevpiProcess, filename: str) -> bool:
            code, _, headers = await self.download(server, page, link(links, filename))
            return code == 200 and headers.getRawHeaders(b"X-Devpi-Proxy") is None

        await self.waitUntil(lambda: servedLocally(replica, names[0]), 10, "the mirror file replicating", replica)
        self.assertTrue(await servedLocally(primary, names[0]))
        self.assertEqual(fetches(names[0]), 1)
        # through the primary: the replica gets it without asking anyone
        code, _, _ = await self.download(primary, page, link(links, names[1]))
        self.assertEqual(code, 200)
        await self.waitUntil(lambda: servedLocally(replica, names[1]), 10, "the primary's fetch replicating", replica)
        self.assertEqual((fetches(names[0]), fetches(names[1])), (1, 1))

    async def test_mirrorPagesServedByReplicaOnceThePrimaryAnswered(self) -> None:
        """
        A mirror page the primary answered is then rendered by the replica
        itself, listing every upstream file; with the primary gone it lists
        only the files the replica holds.
        """
        fake, names, primary, replica = await self.mirrorPair()

        def pageFetches() -> int:
            return sum(1 for _, path in fake.requests if "/simple/upstream-pkg/" in path)

        links, headers = await self.simpleLinks(replica, "upstream-pkg", "root/up")
        self.assertEqual(headers.getRawHeaders(b"X-Devpi-Proxy"), [b"replica"])
        self.assertEqual(len(links), 2)

        async def pageLocal() -> bool:
            links, headers = await self.simpleLinks(replica, "upstream-pkg", "root/up")
            return headers.getRawHeaders(b"X-Devpi-Proxy") is None and len(links) == 2

        await self.waitUntil(pageLocal, 10, "the cached links replicating", replica)
        for _ in range(3):
            self.assertTrue(await pageLocal())
        self.assertEqual(pageFetches(), 1)

        # One file through the replica, then the primary goes away.
        code, _, _ = await self.download(replica, "/root/up/+simple/upstream-pkg/",
                                         next(href for href in links if names[0] in href))
        self.assertEqual(code, 200)

        async def fileHere() -> bool:
            code, _, headers = await self.download(replica, "/root/up/+simple/upstream-pkg/",
                                                   next(href for href in links if names[0] in href))
            return code == 200 and headers.getRawHeaders(b"X-Devpi-Proxy") is None

        await self.waitUntil(fileHere, 10, "the file replicating", replica)
        self.assertTrue(await pageLocal(), "rendered here with both links (and kept rendered)")
        await primary.stop()

        async def unreachable() -> bool:
            return (await self.status(replica))["replication"]["state"] == "unreachable"

        await self.waitUntil(unreachable, 30, "the replica noticing", replica)
        links, headers = await self.simpleLinks(replica, "upstream-pkg", "root/up")
        self.assertEqual([href.split("#")[0].rsplit("/", 1)[-1] for href in links], [names[0]])
