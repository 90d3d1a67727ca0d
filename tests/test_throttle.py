"""
Login throttling that stops attackers, not users: counts per (user,
address), per user and per address, places reserved before the threaded
password check, and the message twine shows for a wrong password.
"""

from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase


from devpi_twisted.services import throttle as throttleModule
from devpi_twisted.services.auth import Authenticator
from devpi_twisted.errors import TooManyRequests
from devpi_twisted.services.throttle import LoginThrottle, addressKey

from .helpers import APIHarness, basicAuth, parseServerOptions

ALICE_HOME = "192.0.2.10"
ATTACKER = "198.51.100.66"


class ThreadQueue:
    """A C{runInThread} whose calls wait until the test runs them: real concurrency, in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, f, args))
        return d

    def runAll(self) -> int:
        ran = 0
        while self.pending:
            d, f, args = self.pending.pop(0)
            d.callback(f(*args))
            ran += 1
        return ran


class Setup:
    """Users alice and bob in memory storage, an L{Authenticator} with a throttle on a clock."""

    def __init__(self, testCase: SynchronousTestCase, runInThread: Any = maybeDeferred, **limits: Any) -> None:
        self.testCase = testCase
        self.harness = APIHarness(testCase)
        self.harness.createUser("alice", "right")
        self.harness.createUser("bob", "bobs")
        self.clock = self.harness.clock
        self.throttle = LoginThrottle(self.clock, **{"maxFailures": 5, "window": 60, **limits})
        self.auth = Authenticator(self.harness.storage, runInThread, self.harness.secret, self.clock,
                                  hashing=self.harness.hashing, throttle=self.throttle)

    def start(self, user: str, secret: str, address: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.auth.authenticate(user, secret, address=address))

    def login(self, user: str, secret: str, address: str) -> str | None:
        """The answer of a password attempt that may not be throttled."""
        return self.testCase.successResultOf(self.start(user, secret, address))

    def refused(self, user: str, secret: str, address: str) -> TooManyRequests:
        failure = self.testCase.failureResultOf(self.start(user, secret, address), TooManyRequests)
        return failure.value


class ConcurrentGuessTests(SynchronousTestCase):
    """Attempts that arrive while earlier checks still run in threads are counted."""

    def test_rightPasswordAmongConcurrentGuessesRefused(self) -> None:
        """
        200 guesses sent at once, the right password the 100th: only five
        reach a password check, the rest (the right one too) get 429.
        """
        threads = ThreadQueue()
        s = Setup(self, runInThread=threads)
        attempts = [s.start("alice", "right" if i == 99 else f"guess{i}", ATTACKER) for i in range(200)]
        checks = threads.runAll()
        self.assertEqual(checks, 5)
        results: list[Any] = []
        for d in attempts:
            d.addBoth(results.append)
        self.assertEqual(results[:5], [None] * 5)
        self.assertTrue(all(isinstance(r, Failure) and r.check(TooManyRequests) for r in results[5:]))
        self.assertIsInstance(results[99], Failure)
        self.assertEqual(s.throttle.failed, 5)
        self.assertEqual(s.throttle.refused, 195)

    def test_rightPasswordWithinLimitGivesPlaceBack(self) -> None:
        """A right password among the first five counts as no failure: a sixth attempt is checked."""
        threads = ThreadQueue()
        s = Setup(self, runInThread=threads)
        attempts = [s.start("alice", "right" if i == 2 else f"guess{i}", ATTACKER) for i in range(5)]
        self.assertEqual(threads.runAll(), 5)
        self.assertEqual(self.successResultOf(attempts[2]), "alice")
        sixth = s.start("alice", "guess6", ATTACKER)
        threads.runAll()
        self.assertIsNone(self.successResultOf(sixth))
        s.refused("alice", "right", ATTACKER)

    def test_checkErrorCountsNothing(self) -> None:
        """A password check that fails (not a wrong password) gives its place back."""
        threads = ThreadQueue()
        s = Setup(self, runInThread=threads)
        attempts = [s.start("alice", f"guess{i}", ATTACKER) for i in range(5)]
        for d, _, _ in threads.pending:
            d.errback(RuntimeError("thread pool stopped"))
        threads.pending.clear()
        for d in attempts:
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(s.throttle.failed, 0)
        again = s.start("alice", "right", ATTACKER)
        threads.runAll()
        self.assertEqual(self.successResultOf(again), "alice")


class WhoIsThrottledTests(SynchronousTestCase):
    """An attacker is held back; users elsewhere, and other users there, are not."""

    def test_aliceAtHomeWhileAttackedElsewhere(self) -> None:
        """Five wrong passwords for alice from one address do not lock her out at another."""
        s = Setup(self)
        for i in range(5):
            self.assertIsNone(s.login("alice", f"guess{i}", ATTACKER))
        error = s.refused("alice", "right", ATTACKER)
        self.assertEqual(error.retryAfter, 60)
        self.assertIn("for this user from this address", error.message)
        self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")

    def test_burstEveryMinute(self) -> None:
        """A burst of guesses every minute keeps only the guesser out."""
        s = Setup(self)
        for minute in range(5):
            for i in range(6):
                s.start("alice", f"guess{minute}-{i}", ATTACKER).addErrback(lambda f: f.trap(TooManyRequests))
            s.refused("alice", "right", ATTACKER)
            self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")
            s.clock.advance(60)

    def test_otherUserSameAddress(self) -> None:
        """bob's right password works from the address that is throttled for alice."""
        s = Setup(self)
        for i in range(5):
            s.login("alice", f"guess{i}", ATTACKER)
        s.refused("alice", "right", ATTACKER)
        self.assertEqual(s.login("bob", "bobs", ATTACKER), "bob")

    def test_natTestSuite(self) -> None:
        """
        A test suite behind one NAT address checks wrong passwords for many
        users (existing or not): the other users there still log in.
        """
        s = Setup(self)
        s.harness.createUser("carol", "carols")
        for i in range(5):
            s.login("bob", f"wrong{i}", ALICE_HOME)
        for i in range(15):
            s.login(f"ghost{i}", "x", ALICE_HOME)
        self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")
        self.assertEqual(s.login("carol", "carols", ALICE_HOME), "carol")

    def test_addressLimit(self) -> None:
        """
        Past the per-address limit an address may try no new user, but a user
        who has logged in from there still may.
        """
        s = Setup(self, maxAddressFailures=10)
        s.harness.createUser("carol", "carols")
        self.assertEqual(s.login("alice", "right", ATTACKER), "alice")
        for i in range(10):
            s.login(f"ghost{i}", "x", ATTACKER)
        error = s.refused("carol", "carols", ATTACKER)
        self.assertIn("from this address", error.message)
        self.assertEqual(s.login("alice", "right", ATTACKER), "alice")
        self.assertEqual(s.login("carol", "carols", ALICE_HOME), "carol")

    def test_distributedAttack(self) -> None:
        """
        Guesses for alice from many addresses meet the per-user limit: a new
        address may not try alice any more, the one she logged in from may.
        """
        s = Setup(self, maxUserFailures=20)
        self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")
        for a in range(6):
            for i in range(5):
                s.start("alice", f"guess{i}", f"203.0.113.{a}").addErrback(lambda f: f.trap(TooManyRequests))
        error = s.refused("alice", "right", "203.0.113.200")
        self.assertIn("for this user;", error.message)
        self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")

    def test_knownAddressSuccessesDoNotDrainUserCount(self) -> None:
        """alice logging in again and again from home frees no guesses for the attacker."""
        s = Setup(self, maxUserFailures=10)
        s.login("alice", "right", ALICE_HOME)
        for a in range(2):
            for i in range(5):
                s.login("alice", f"guess{i}", f"203.0.113.{a}")
        for _ in range(20):
            self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")
        s.refused("alice", "guess", "203.0.113.99")

    def test_knownAddressStillStrict(self) -> None:
        """From an address alice logged in from, wrong passwords for alice still meet the strict limit."""
        s = Setup(self)
        s.login("alice", "right", ATTACKER)
        for i in range(5):
            s.login("alice", f"guess{i}", ATTACKER)
        s.refused("alice", "right", ATTACKER)

    def test_rightPasswordDoesNotWipeFailures(self) -> None:
        """Someone sharing alice's address cannot reset the count with her logins in between."""
        s = Setup(self)
        for i in range(4):
            s.login("alice", f"guess{i}", ALICE_HOME)
        s.login("alice", "right", ALICE_HOME)
        s.login("alice", "guess4", ALICE_HOME)
        s.refused("alice", "guess5", ALICE_HOME)

    def test_ipv6CountsPer64(self) -> None:
        """Changing the address within a /64 does not get new guesses."""
        s = Setup(self)
        for i in range(5):
            s.login("alice", f"guess{i}", f"2001:db8:1:2::{i + 1:x}")
        s.refused("alice", "right", "2001:db8:1:2:ffff::1")
        self.assertEqual(s.login("alice", "right", "2001:db8:1:3::1"), "alice")

    def test_tokenLookalikeIsAPasswordGuess(self) -> None:
        """A secret shaped like a token but not signed here is counted like any wrong password."""
        s = Setup(self)
        for i in range(5):
            self.assertIsNone(s.login("alice", f"dtw1.forged{i}.sig", ATTACKER))
        s.refused("alice", "dtw1.forged.sig", ATTACKER)

    def test_staleTokenNotCounted(self) -> None:
        """An expired token of ours is refused without counting: a client that keeps it locks nobody out."""
        s = Setup(self)
        token = s.harness.login("alice", "right")
        s.clock.advance(36001)
        for _ in range(10):
            self.assertIsNone(s.login("alice", token, ALICE_HOME))
        self.assertEqual(s.throttle.failed, 0)
        self.assertEqual(s.login("alice", "right", ALICE_HOME), "alice")


class LoginThrottleTests(SynchronousTestCase):
    """L{LoginThrottle} itself, on a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, maxFailures=5, window=60)

    def fail(self, user: str | None, address: str | None) -> None:
        self.throttle.failure(self.throttle.reserve(user, address))

    def test_windowSlides(self) -> None:
        """When the oldest failure leaves the window, one more attempt is allowed."""
        for _ in range(5):
            self.fail("alice", ATTACKER)
        self.clock.advance(59)
        error = self.assertRaises(TooManyRequests, self.throttle.reserve, "alice", ATTACKER)
        self.assertEqual(error.retryAfter, 1)
        self.clock.advance(1)
        self.throttle.reserve("alice", ATTACKER)

    def test_pendingReservationsCount(self) -> None:
        """Places taken and not yet answered count; a released one is free again."""
        attempts = [self.throttle.reserve("alice", ATTACKER) for _ in range(5)]
        self.assertRaises(TooManyRequests, self.throttle.reserve, "alice", ATTACKER)
        self.throttle.release(attempts[0])
        self.throttle.reserve("alice", ATTACKER)

    def test_unknownUserCountsPerAddressOnly(self) -> None:
        """Invented user names take no count of their own."""
        for i in range(50):
            self.fail(None, f"203.0.113.{i}")
        self.assertEqual(len(self.throttle._counts), 50)

    def test_off(self) -> None:
        """With a limit of 0 nothing is ever refused or kept."""
        throttle = LoginThrottle(self.clock, maxFailures=0)
        for _ in range(100):
            throttle.failure(throttle.reserve("alice", ATTACKER))
        throttle.reserve("alice", ATTACKER)
        self.assertEqual(throttle._counts, {})

    def test_bounded(self) -> None:
        """Counts and known pairs never grow past MAX_TRACKED."""
        self.patch(throttleModule, "MAX_TRACKED", 30)
        for i in range(200):
            self.fail(f"user{i}", f"203.0.113.{i % 250}")
            self.throttle.success(self.throttle.reserve(f"user{i}", "192.0.2.1"))
            self.assertLessEqual(len(self.throttle._counts), 30)
            self.assertLessEqual(len(self.throttle._known), 30)

    def test_addressKey(self) -> None:
        """IPv4 as is, IPv6 per /64, IPv4-mapped as IPv4."""
        self.assertEqual(addressKey("192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(addressKey("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(addressKey("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(addressKey("unix"), "unix")
        self.assertIsNone(addressKey(None))


class UploadMessageTests(SynchronousTestCase):
    """What twine shows when an upload is refused for its credentials."""

    def upload(self, headers: dict[bytes, list[bytes]] | None) -> Any:
        harness = APIHarness(self)
        harness.createUser("alice", "right")
        harness.createIndex("alice", "dev", password="right")
        return harness.post("/alice/dev/", body=b":action=file_upload&name=x&version=1.0",
                            headers={b"Content-Type": [b"application/x-www-form-urlencoded"], **(headers or {})})

    def test_wrongPassword(self) -> None:
        """Credentials given and wrong: say so."""
        answer = self.upload(basicAuth("alice", "wrong"))
        self.assertEqual(answer.code, 401)
        self.assertIn("user name or password is wrong", answer.json["message"])

    def test_noCredentials(self) -> None:
        """No credentials: ask to log in, as before."""
        answer = self.upload(None)
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.json["message"], "no valid credentials, log in to upload")


class OptionsTests(SynchronousTestCase):
    """The throttle's options."""

    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        return parseServerOptions(self, *argv, environ=environ)

    def test_defaults(self) -> None:
        """5 per (user, address), 50 per user, 100 per address, in 60 seconds."""
        config = self.parse().toConfig()
        self.assertEqual((config.loginMaxFailures, config.loginMaxUserFailures, config.loginMaxAddressFailures,
                          config.loginWindow), (5, 50, 100, 60.0))

    def test_set(self) -> None:
        """Set on the command line or from the environment."""
        config = self.parse("--login-user-failures", "7",
                            environ={"DEVPI_TWISTED_LOGIN_ADDR_FAILURES": "9"}).toConfig()
        self.assertEqual((config.loginMaxUserFailures, config.loginMaxAddressFailures), (7, 9))

    def test_negative(self) -> None:
        """Negative limits are usage errors."""
        from twisted.python.usage import UsageError

        for name in ("--login-user-failures", "--login-addr-failures"):
            self.assertRaises(UsageError, self.parse, name, "-1")
