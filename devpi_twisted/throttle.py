# -*- test-case-name: tests.test_ops -*-
"""
Throttling failed logins, per user and per client address.

Every wrong password (on C{/+login}, and in the Basic or C{X-Devpi-Auth}
credentials any request may carry) is remembered with its time.  After
C{maxFailures} failures within C{window} seconds for the same user name, or
from the same address, further password attempts for that user or from that
address are refused with 429 and C{Retry-After} until the oldest of those
failures leaves the window: no password is checked then, which also keeps
argon2 from being used to burn CPU.  Login tokens are not throttled (they
cannot be guessed, and a client with an expired one must not lock its user
out).  Everything is in memory and bounded.
"""

from collections import deque
from math import ceil

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .errors import TooManyRequests

MAX_TRACKED = 100_000


class LoginThrottle:
    """
    Sliding-window failure counts for user names and client addresses.

    @param clock: the reactor's time.
    @param maxFailures: failures allowed within C{window}; the next attempt
        is refused.  Zero or less turns throttling off.
    @param window: seconds a failure counts.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, maxFailures: int = 5, window: float = 60.0) -> None:
        self._clock = clock
        self.maxFailures = maxFailures
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self.refused = 0
        self.failed = 0

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def check(self, user: str | None, address: str | None) -> None:
        """
        Raise L{TooManyRequests} when C{user} or C{address} has failed too
        often recently.
        """
        if self.maxFailures <= 0:
            return
        now = self._clock.seconds()
        for key in self._keys(user, address):
            times = self._recent(key, now)
            if times is not None and len(times) >= self.maxFailures:
                self.refused += 1
                retryAfter = max(1, ceil(times[0] + self.window - now))
                raise TooManyRequests(
                    f"too many failed logins for this {'user' if key[0] == 'user' else 'address'}; "
                    f"try again in {retryAfter} seconds",
                    retryAfter=retryAfter,
                )

    def failure(self, user: str | None, address: str | None) -> None:
        """Remember a failed password attempt."""
        self.failed += 1
        if self.maxFailures <= 0:
            return
        now = self._clock.seconds()
        if len(self._failures) >= MAX_TRACKED:
            self._prune(now)
        for key in self._keys(user, address):
            times = self._failures.setdefault(key, deque(maxlen=self.maxFailures))
            times.append(now)
            if len(times) == self.maxFailures:
                self.log.warn(
                    "{failures} failed logins within {window}s for {kind} {name}; throttling it",
                    failures=len(times), window=self.window, kind=key[0], name=key[1],
                )

    def success(self, user: str | None, address: str | None) -> None:
        """A correct password: forget that user's failures (the address's stay)."""
        if user is not None:
            self._failures.pop(("user", user), None)

    def _keys(self, user: str | None, address: str | None) -> list[tuple[str, str]]:
        keys = []
        if user is not None:
            keys.append(("user", user))
        if address is not None:
            keys.append(("address", address))
        return keys

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) >= MAX_TRACKED:
            self._failures.clear()
