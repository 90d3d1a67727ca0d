"""
Passwords, login tokens and the credentials a request carries.

Password checks are deliberately slow (argon2id), so they run off the reactor
thread and each (user, password, stored hash) answer is remembered for a short
while: twine sends Basic auth on every request, and checking it each time
would make uploads crawl.  Tokens are HMAC-signed with the server's secret and
carry a fingerprint of the password hash, so they survive a restart but stop
working when the password changes or the user is deleted.
"""

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any, Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.model.identity import Identity
from devpi_twisted.model.keys import userKey
from devpi_twisted.model.tokens import looksLikeToken, parseToken

TOKEN_PREFIX = "dtw1."
TOKEN_LIFETIME = 36000  # seconds, as devpi's login
CACHE_SECONDS = 300.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def passwordFingerprint(secret: bytes, pwhash: str | None) -> str:
    """
    What a login token carries of the password hash: a keyed digest, so a
    token dies with the password, and neither the token nor a replica that
    only knows this value can check or crack the password.
    """
    digest = hmac.new(secret, (pwhash or "").encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:16]


def replicaUserConfig(secret: bytes, config: dict[str, Any]) -> dict[str, Any]:
    """
    A user config as the replication feed sends it: the password hash
    replaced by its L{passwordFingerprint}, which is all a replica needs to
    accept the primary's login tokens.
    """
    if "pwhash" not in config:
        return config
    shown = dict(config)
    shown["pwfingerprint"] = passwordFingerprint(secret, shown.pop("pwhash"))
    return shown


REPLICATION_TOKEN_WINDOW = 60.0
"""Seconds a replication credential stays valid, either way (clock skew)."""


def replicationKey(secret: bytes) -> bytes:
    """The key of replication credentials, derived from the server secret."""
    return hmac.new(secret, b"devpi-twisted replication v1", hashlib.sha256).digest()


def makeReplicationToken(key: bytes, now: float) -> str:
    """A short-lived credential for the changelog feed: a timestamp and its HMAC."""
    stamp = str(int(now))
    return f"{stamp}.{hmac.new(key, stamp.encode('ascii'), hashlib.sha256).hexdigest()}"


def checkReplicationToken(key: bytes, token: str, now: float,
                          window: float = REPLICATION_TOKEN_WINDOW) -> bool:
    """Whether C{token} was made with C{key} less than C{window} seconds from C{now}."""
    stamp, _, mac = token.strip().partition(".")
    if not stamp.isdigit() or len(stamp) > 15:
        return False
    expected = hmac.new(key, stamp.encode("ascii"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, mac) and abs(now - int(stamp)) <= window


class PasswordHashing:
    """argon2id hashing and checking (blocking; call from a thread)."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or PasswordHasher()

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, pwhash: str, password: str) -> bool:
        try:
            return self._hasher.verify(pwhash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    @staticmethod
    def isHash(value: Any) -> bool:
        """Whether C{value} looks like a stored argon2 hash."""
        return isinstance(value, str) and value.startswith("$argon2")


def parseBasic(header: bytes | None) -> tuple[str, str] | None:
    """C{(user, secret)} from a C{Basic} Authorization header or an X-Devpi-Auth value."""
    if not header:
        return None
    value = header.strip()
    if value[:6].lower() == b"basic ":
        value = value[6:].strip()
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, secret = decoded.partition(":")
    if not sep or not user:
        return None
    return user, secret


def parseCredentials(header: bytes | None) -> tuple[str, str | None] | None:
    """
    C{(user, secret)} from a Basic value as API tokens may come: the user
    name may be empty (C{:TOKEN}, as twine and uv send it) and the colon
    missing (C{TOKEN} alone, as devpi-tokens allows), giving no secret.
    """
    if not header:
        return None
    value = header.strip()
    if value[:6].lower() == b"basic ":
        value = value[6:].strip()
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, secret = decoded.partition(":")
    return user, secret if sep else None


TOKEN_USER = "__token__"
"""The user name PyPI's convention sends with a token (twine, uv publish, poetry)."""


class Authenticator:
    """
    Checks passwords and tokens against the users in storage.

    @param storage: the L{devpi_twisted.interfaces.IStorage}.
    @param runInThread: runs the slow password check off the reactor thread.
    @param secret: the server's signing secret (bytes).
    @param clock: for token expiry and the answer cache.
    """

    log = Logger()

    def __init__(
        self,
        storage: Any,
        runInThread: Callable[..., Deferred[Any]],
        secret: bytes,
        clock: IReactorTime,
        hashing: PasswordHashing | None = None,
        throttle: Any = None,
        tokens: Any = None,
    ) -> None:
        self.tokens = tokens  # a devpi_twisted.services.tokens.Tokens: API tokens, or None
        self._throttle = throttle  # a devpi_twisted.services.throttle.LoginThrottle, or None
        self._storage = storage
        self._runInThread = runInThread
        self._secret = secret
        self._clock = clock
        self._hashing = hashing or PasswordHashing()
        self._answers: dict[bytes, tuple[float, bool]] = {}
        self._inFlight: dict[bytes, list[Deferred[bool]]] = {}

    # passwords

    def hashPassword(self, password: str) -> Deferred[str]:
        """Hash a new password in a thread."""
        return self._runInThread(self._hashing.hash, password)

    def _cacheKey(self, user: str, password: str, pwhash: str) -> bytes:
        material = "\0".join((user, password, pwhash)).encode("utf-8")
        return hmac.new(self._secret, material, hashlib.sha256).digest()

    def _checkPassword(self, user: str, password: str, pwhash: str) -> Deferred[bool]:
        """Check once per (user, password, hash) in a window; share concurrent checks."""
        key = self._cacheKey(user, password, pwhash)
        now = self._clock.seconds()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return succeed(cached[1])
        waiter: Deferred[bool] = Deferred()
        if key in self._inFlight:
            self._inFlight[key].append(waiter)
            return waiter
        self._inFlight[key] = [waiter]

        def done(ok: bool) -> None:
            self._remember(key, ok)
            for w in self._inFlight.pop(key):
                w.callback(ok)

        def failed(failure: Any) -> None:
            for w in self._inFlight.pop(key):
                w.errback(failure)

        self._runInThread(self._hashing.verify, pwhash, password).addCallbacks(done, failed)
        return waiter

    def _remember(self, key: bytes, ok: bool) -> None:
        now = self._clock.seconds()
        if len(self._answers) > 10000:
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
            if len(self._answers) > 10000:
                self._answers.clear()
        self._answers[key] = (now + CACHE_SECONDS, ok)

    # tokens

    def _fingerprint(self, pwhash: str | None) -> str:
        return passwordFingerprint(self._secret, pwhash)

    def fingerprintOf(self, config: dict[str, Any]) -> str:
        """
        The fingerprint tokens of this user must carry: from the password
        hash, or on a replica (which never receives hashes) as stored.
        """
        if "pwhash" not in config and isinstance(config.get("pwfingerprint"), str):
            return config["pwfingerprint"]
        return self._fingerprint(config.get("pwhash"))

    def makeToken(self, user: str, pwhash: str | None) -> str:
        """A login token for C{user}, valid for L{TOKEN_LIFETIME} seconds."""
        expires = int(self._clock.seconds()) + TOKEN_LIFETIME
        payload = _b64(json.dumps([user, expires, self._fingerprint(pwhash)]).encode("utf-8"))
        signature = _b64(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())
        return f"{TOKEN_PREFIX}{payload}.{signature}"

    def _signedPayload(self, token: str) -> str | None:
        """The payload of a token this server signed (valid or not), else C{None}."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        payload, _, signature = token[len(TOKEN_PREFIX):].partition(".")
        expected = _b64(hmac.new(self._secret, payload.encode("ascii", "replace"), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature):
            return None
        return payload

    def _tokenUser(self, token: str, user: str, fingerprint: str) -> bool:
        payload = self._signedPayload(token)
        if payload is None:
            return False
        try:
            name, expires, tokenFingerprint = json.loads(_unb64(payload))
        except (ValueError, TypeError, binascii.Error):
            return False
        return (
            name == user
            and isinstance(expires, int)
            and expires > self._clock.seconds()
            and hmac.compare_digest(str(tokenFingerprint), fingerprint)
        )

    # the entry points

    async def identify(self, user: str | None, secret: str | None, address: str | None = None) -> Identity | None:
        """
        Who credentials stand for: a user by password or login token, or a
        user narrowed by an API token; C{None} when they stand for no one.

        An API token comes as the password with its owner's name,
        C{__token__} or no name (C{user} C{None} for a Bearer token), or as
        the user name with no password.

        @raise devpi_twisted.services.tokens.TokenRefused: an API token that
            is not valid (401).
        """
        tokens = self.tokens
        if tokens is not None:
            # a token checked a moment ago: no parsing, no storage read
            if secret:
                known = tokens.fromCache(secret, None if user in ("", TOKEN_USER) else user)
            else:
                known = tokens.fromCache(user, None) if user else None
            if known is not None:
                return known
        token = parseToken(secret) if secret else None
        claimed = user
        if token is None and not secret and user:
            asName = parseToken(user)
            if asName is not None:
                token, secret, claimed = asName, user, None
        if token is not None and secret is not None:
            if tokens is None:
                return None
            if claimed in ("", TOKEN_USER):
                claimed = None
            return await tokens.verify(token, secret, claimed, address)
        if not user or secret is None:
            return None
        name = await self.authenticate(user, secret, address)
        return None if name is None else Identity(name)

    async def authenticate(self, user: str, secret: str, address: str | None = None) -> str | None:
        """
        The user name when C{secret} is C{user}'s password or a valid token
        of theirs, else C{None}.

        A password attempt takes its place in the login throttle before the
        (slow, threaded) check, so concurrent guesses are all counted.  A
        token this server signed that is no longer valid (expired, or its
        password changed) is refused without counting: it is no guess, and a
        client that keeps sending it must not lock its user out.

        @param address: the client's address, for login throttling.
        @raise devpi_twisted.errors.TooManyRequests: a password attempt for
            this user from this address, for this user, or from this address
            that failed too often recently.
        """
        if looksLikeToken(secret):
            return None  # an API token never logs in: the login token would not carry its limits
        config = await self._storage.read(lambda view: view.get(userKey(user)))
        pwhash = config.get("pwhash") if config is not None else None
        if config is not None and self._tokenUser(secret, user, self.fingerprintOf(config)):
            return user
        if config is not None and "pwhash" not in config and "pwfingerprint" in config:
            return None  # a replica: only the primary can check passwords (logins are forwarded)
        if self._signedPayload(secret) is not None:
            return None
        throttle = self._throttle
        attempt = throttle.reserve(user if config is not None else None, address) if throttle is not None else None
        try:
            ok = bool(pwhash) and await self._checkPassword(user, secret, pwhash)
        except BaseException:
            if throttle is not None:
                throttle.release(attempt)
            raise
        if throttle is not None:
            if ok:
                throttle.success(attempt)
            else:
                throttle.failure(attempt)
        return user if ok else None
