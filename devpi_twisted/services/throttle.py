# -*- test-case-name: tests.test_throttle -*-
"""
Throttling password attempts so that they stop attackers, not users.

Every password attempt (on C{/+login}, and in the Basic or C{X-Devpi-Auth}
credentials any request may carry) is counted in three sliding windows of
C{window} seconds:

  - per (user name, address), strictly (C{maxFailures}, 5 by default): the
    one limit a guesser from one place always meets;
  - per user name across addresses (C{maxUserFailures}, 50): a guesser
    spread over many addresses;
  - per address across user names (C{maxAddressFailures}, 100): one address
    trying a common password on many users.  It is high because a CI runner
    behind NAT, or a test suite that checks wrong passwords, shares one
    address with everyone there.

An attempt reserves its place in all three counts I{before} the password is
checked (argon2 runs in a thread, so attempts really are concurrent): 200
guesses sent at once meet the limit after the first few, and the right
password among the later ones is refused like the rest, unchecked.  A right
password gives its place back; a wrong one keeps it as a failure.  A refused
attempt is answered 429 with C{Retry-After} and checks no password, which
also keeps argon2 from being used to burn CPU.

A (user name, address) pair that has logged in successfully is I{known}, and
from then on only its own strict count applies to it, not the per-user and
per-address ones.  That is what gives users the most and attackers the
least: guesses for alice from elsewhere, however many and from however many
places, cannot lock alice out at the address she works from, nor can a
neighbour behind the same NAT; and an attacker gains nothing from it, since
a pair becomes known only through the right password, and from a known
address the strict limit still allows no more than from any other.  Failures
of a known pair still count toward the per-user and per-address limits of
everyone else.  A right password does not wipe earlier failures (they leave
with the window): wiping them would let a guesser who shares alice's address
guess without limit in between her logins.

IPv6 addresses count per /64 (what one host or site is given), so a client
cannot step around the limits by changing its address within its own
network.  Attempts for user names that do not exist count only per address,
so invented names take no memory of their own.  Login tokens are not
throttled (they cannot be guessed, and a client with an expired one must not
lock its user out).  Everything is in memory and bounded by L{MAX_TRACKED}.
"""

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass
from math import ceil

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.errors import TooManyRequests

MAX_TRACKED = 100_000
"""Most failure counts, and most known (user, address) pairs, kept at once."""

DEFAULT_MAX_USER_FAILURES = 50
DEFAULT_MAX_ADDRESS_FAILURES = 100

_Key = tuple[str, ...]

_REFUSED = {
    "pair": "too many failed logins for this user from this address",
    "user": "too many failed logins for this user",
    "address": "too many failed logins from this address",
}


def addressKey(address: str | None) -> str | None:
    """
    What an address counts as: itself for IPv4, its /64 for IPv6 (an
    IPv4-mapped IPv6 address is the IPv4 one).  Anything unparsable counts
    as given.
    """
    if not address:
        return None
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


@dataclass
class Attempt:
    """A reserved password attempt: the counts it holds a place in, and when."""

    user: str | None
    address: str | None
    keys: tuple[_Key, ...]
    at: float
    unreserved: tuple[_Key, ...] = ()
    """Counts of limits a known pair is exempt from: a failure still goes there."""


class LoginThrottle:
    """
    Sliding-window counts of password attempts per (user, address), per user
    and per address.

    @param clock: the reactor's time.
    @param maxFailures: failures allowed within C{window} for one user name
        from one address; the next attempt is refused.  Zero or less turns
        all throttling off.
    @param window: seconds a failure counts.
    @param maxUserFailures: failures allowed for one user name from all
        addresses together (zero or less: no such limit).
    @param maxAddressFailures: failures allowed from one address for all
        user names together (zero or less: no such limit).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        maxFailures: int = 5,
        window: float = 60.0,
        maxUserFailures: int = DEFAULT_MAX_USER_FAILURES,
        maxAddressFailures: int = DEFAULT_MAX_ADDRESS_FAILURES,
    ) -> None:
        self._clock = clock
        self.maxFailures = maxFailures
        self.window = window
        self._limits = {"pair": maxFailures, "user": maxUserFailures, "address": maxAddressFailures}
        self._counts: dict[_Key, deque[float]] = {}
        self._known: OrderedDict[tuple[str, str | None], None] = OrderedDict()
        self.refused = 0
        self.failed = 0

    def reserve(self, user: str | None, address: str | None) -> Attempt:
        """
        Take a place for one password attempt, before checking it.

        @param user: the user name, or C{None} when no such user exists.
        @param address: the client's address, when known.
        @return: what to hand to L{success}, L{failure} or L{release} once
            the password is checked.
        @raise TooManyRequests: a count this attempt belongs to is full.
        """
        address = addressKey(address)
        now = self._clock.seconds()
        if self.maxFailures <= 0:
            return Attempt(user, address, (), now)
        keys = self._keys(user, address)
        exempt = user is not None and (user, address) in self._known
        retryAfter = 0
        refusedKind = None
        for key in keys:
            limit = self._limits[key[0]]
            if limit <= 0 or (exempt and key[0] != "pair"):
                continue
            times = self._recent(key, now)
            if times is not None and len(times) >= limit:
                wait = max(1, ceil(times[0] + self.window - now))
                if wait > retryAfter:
                    retryAfter, refusedKind = wait, key[0]
        if refusedKind is not None:
            self.refused += 1
            raise TooManyRequests(f"{_REFUSED[refusedKind]}; try again in {retryAfter} seconds",
                                  retryAfter=retryAfter)
        counted = [key for key in keys if self._limits[key[0]] > 0]
        reserved = tuple(key for key in counted if not exempt or key[0] == "pair")
        for key in reserved:
            self._add(key, now)
        return Attempt(user, address, reserved, now, tuple(key for key in counted if key not in reserved))

    def success(self, attempt: Attempt) -> None:
        """The password was right: give the place back and know the pair."""
        self.release(attempt)
        if attempt.user is not None and self.maxFailures > 0:
            pair = (attempt.user, attempt.address)
            self._known[pair] = None
            self._known.move_to_end(pair)
            while len(self._known) > MAX_TRACKED:
                self._known.popitem(last=False)

    def failure(self, attempt: Attempt) -> None:
        """The password was wrong: the place stays taken for C{window} seconds."""
        self.failed += 1
        for key in attempt.unreserved:
            self._add(key, self._clock.seconds())
        for key in attempt.keys + attempt.unreserved:
            times = self._counts.get(key)
            if times is not None and len(times) == self._limits[key[0]]:
                self.log.warn(
                    "{failures} failed logins within {window}s for {kind} {name}; throttling it",
                    failures=len(times), window=self.window, kind=key[0], name="/".join(key[1:]),
                )

    def release(self, attempt: Attempt) -> None:
        """Give the place back without counting anything (the check itself failed)."""
        for key in attempt.keys:
            times = self._counts.get(key)
            if times is None:
                continue
            try:
                times.remove(attempt.at)
            except ValueError:
                continue  # already left the window, or pruned
            if not times:
                del self._counts[key]

    def _add(self, key: _Key, now: float) -> None:
        times = self._counts.get(key)
        if times is None:
            if len(self._counts) >= MAX_TRACKED:
                self._prune(now)
            times = self._counts[key] = deque(maxlen=self._limits[key[0]])
        times.append(now)

    def _keys(self, user: str | None, address: str | None) -> list[_Key]:
        keys: list[_Key] = []
        if user is not None:
            keys.append(("pair", user, address or ""))
            keys.append(("user", user))
        if address is not None:
            keys.append(("address", address))
        return keys

    def _recent(self, key: _Key, now: float) -> deque[float] | None:
        times = self._counts.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._counts[key]
            return None
        return times

    def _prune(self, now: float) -> None:
        """Forget what left the window; if still full, the longest-tracked tenth."""
        for key in list(self._counts):
            self._recent(key, now)
        if len(self._counts) >= MAX_TRACKED:
            for key in list(self._counts)[: max(1, len(self._counts) // 10)]:
                del self._counts[key]
