"""
API tokens: create, list, delete and verify the macaroons devpi-tokens'
client speaks (see L{devpi_twisted.model.tokens}).

Each token has a record, C{token/<user>/<id>}, holding the random value its
signing key is derived from (with the server secret, so the record alone
signs nothing), its restrictions, when it was made, and the fingerprint of
the owner's password hash at that time.  Verifying reads the record and the
user, so deleting the token, changing the password or deleting the user
refuses it at once on every node and replica: the records replicate, and a
change to any token or user record drops every remembered verification.

A check is an HMAC chain (no argon2), remembered for L{CACHE_SECONDS}, so a
request with a known token costs a dictionary look-up.  Last use is kept in
memory and written in one transaction every L{FLUSH_SECONDS}
(C{tokenuse/<user>/<id>}), not once per request.
"""

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import pymacaroons
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from devpi_twisted.errors import BadRequest, DevpiError, Forbidden, NotFound, Unauthorized
from devpi_twisted.interfaces import IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.acl import ROOT, Policy, matchesPrincipals
from devpi_twisted.model.identity import Identity
from devpi_twisted.model.tokens import (
    ParsedToken, RestrictionError, TokenTerms, newTokenId, newTokenKey, publicRecord,
    restrictionsFromRequest, termsOf, understood,
)
from devpi_twisted.services.auth import passwordFingerprint

CACHE_SECONDS = 60.0
FLUSH_SECONDS = 30.0
MAX_CACHED = 10_000
MAX_DESCRIPTION = 200


def tokenSigningKey(secret: bytes, recordKey: str) -> bytes:
    """The macaroon root key of one token: the server secret and the token's own random value."""
    return hmac.new(secret, b"devpi-twisted api token v1\0" + recordKey.encode("ascii"), hashlib.sha256).digest()


class TokenRefused(Unauthorized):
    """A token that is not (or no longer) valid: 401."""


@dataclass(frozen=True)
class _Verified:
    user: str
    tokenId: str
    terms: TokenTerms
    until: float


class Tokens:
    """
    The token operations of C{/USER/+token-create} and C{/USER/+tokens},
    and the check of a token a request carries.

    @param secret: the server secret (shared by a primary and its replicas).
    @param clock: for expiry, the verification cache and the last-use flush.
    @param throttle: the login throttle; wrong tokens count as wrong passwords.
    @param persistUse: whether last use is written to storage (not on a
        replica, which cannot write).
    """

    log = Logger()

    def __init__(self, storage: IStorage, secret: bytes, clock: IReactorTime, policy: Policy = Policy(),
                 throttle: Any = None, persistUse: bool = True,
                 cacheSeconds: float = CACHE_SECONDS, flushSeconds: float = FLUSH_SECONDS) -> None:
        self._storage = storage
        self._secret = secret
        self._clock = clock
        self._policy = policy
        self.throttle = throttle
        self._persistUse = persistUse
        self._cacheSeconds = cacheSeconds
        self._flushSeconds = flushSeconds
        self._cache: dict[bytes, _Verified] = {}
        self._generation = 0
        self._used: dict[tuple[str, str], int] = {}  # not yet written
        self._shownUse: dict[tuple[str, str], int] = {}  # written or kept here
        self._flushCall: Any = None
        storage.subscribe(self._changed)

    # invalidation

    def _changed(self, record: Any) -> None:
        """Any change to a token or user record drops every remembered verification."""
        if any(key.startswith((keys.TOKEN, keys.USER)) for key in record.changes):
            self._generation += 1
            self._cache.clear()

    # management

    def _checkManager(self, requester: str | None, user: str) -> None:
        if requester is None or requester not in (user, ROOT):
            raise Forbidden(f"no permission to manage the tokens of user {user!r}")

    def _mayExtendExpiry(self, requester: str) -> bool:
        restrict = self._policy.restrictModify
        return requester == ROOT or (restrict is not None and matchesPrincipals(requester, restrict))

    async def create(self, requester: str | None, user: str, body: Any) -> str:
        """A new token of C{user} with the restrictions C{body} asks for; the serialised macaroon."""
        self._checkManager(requester, user)
        assert requester is not None
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("the token restrictions must be a JSON object")
        body = dict(body)
        description = body.pop("description", None)
        if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION
                                        or not description.isprintable()):
            raise BadRequest(f"'description' must be a line of text of at most {MAX_DESCRIPTION} characters")
        now = self._clock.seconds()
        try:
            restrictions = restrictionsFromRequest(body, now, self._mayExtendExpiry(requester))
        except RestrictionError as error:
            raise (Forbidden if error.status == 403 else BadRequest)(error.message) from None
        secret = self._secret

        def _create(txn: IWriteTransaction) -> tuple[str, dict[str, Any]]:
            config = txn.get(keys.userKey(user))
            if config is None:
                raise NotFound(f"no user {user!r}")
            while True:
                tokenId = newTokenId()
                if txn.get(keys.tokenKey(user, tokenId)) is None:
                    break
            record: dict[str, Any] = {
                "key": newTokenKey(),
                "restrictions": restrictions,
                "created": int(now),
                "pwfingerprint": _fingerprint(secret, config),
            }
            if description:
                record["description"] = description
            txn.set(keys.tokenKey(user, tokenId), record)
            return tokenId, record

        _, (tokenId, record) = await self._storage.write(_create)
        macaroon = pymacaroons.Macaroon(
            identifier=f"{user}-{tokenId}", key=tokenSigningKey(secret, record["key"]),
            version=pymacaroons.MACAROON_V2,
        )
        for caveat in restrictions:
            macaroon.add_first_party_caveat(caveat)
        self.log.info("API token {tokenId} of {user} created by {requester}: {restrictions}",
                      tokenId=tokenId, user=user, requester=requester, restrictions=restrictions)
        return f"devpi-{macaroon.serialize()}"

    async def list(self, requester: str | None, user: str) -> dict[str, Any]:
        """C{{id: {restrictions, created, expires, description, last_used}}}; never a key."""
        self._checkManager(requester, user)

        def _list(view: Any) -> tuple[bool, list[tuple[str, Any]], dict[str, Any]]:
            prefix = keys.tokensPrefix(user)
            usePrefix = keys.tokenUsePrefix(user)
            records = [(key[len(prefix):], value) for key, value in view.items(prefix)]
            used = {key[len(usePrefix):]: value for key, value in view.items(usePrefix)}
            return view.get(keys.userKey(user)) is not None, records, used

        exists, records, stored = await self._storage.read(_list)
        if not exists:
            raise NotFound(f"no user {user!r}")
        result = {}
        for tokenId, record in records:
            shown = publicRecord(record)
            terms = termsOf([c for c in record.get("restrictions", []) if understood(c)])
            shown["expires"] = "never" if terms.expires is None else terms.expires
            uses = [v for v in (stored.get(tokenId), self._shownUse.get((user, tokenId))) if isinstance(v, int)]
            shown["last_used"] = max(uses) if uses else None
            result[tokenId] = shown
        return result

    async def delete(self, requester: str | None, user: str, tokenId: str) -> None:
        self._checkManager(requester, user)

        def _delete(txn: IWriteTransaction) -> None:
            if txn.get(keys.tokenKey(user, tokenId)) is None:
                raise NotFound(f"No token with id {tokenId}")
            txn.delete(keys.tokenKey(user, tokenId))
            txn.delete(keys.tokenUseKey(user, tokenId))

        await self._storage.write(_delete)
        self._used.pop((user, tokenId), None)
        self._shownUse.pop((user, tokenId), None)
        self.log.info("API token {tokenId} of {user} deleted by {requester}",
                      tokenId=tokenId, user=user, requester=requester)

    # verification

    async def verify(self, token: ParsedToken, text: str, claimedUser: str | None,
                     address: str | None = None) -> Identity:
        """
        The identity C{token} stands for: its user, narrowed by its caveats.

        @param text: the token as sent (the cache's key).
        @param claimedUser: the user name sent with it, if any: it must be
            the token's.
        @raise TokenRefused: when the token is not valid now.  A wrong
            signature or an unknown token counts as a failed login; an
            expired, not yet valid, revoked or foreign one does not (it is
            no guess: it was signed by this server).
        """
        if claimedUser is not None and claimedUser != token.user:
            raise TokenRefused(f"the API token does not belong to user {claimedUser!r}")
        now = self._clock.seconds()
        cacheKey = _cacheKey(text)
        cached = self._cache.get(cacheKey)
        if cached is None or cached.until <= now:
            cached = await self._check(token, cacheKey, address, now)
        return self._answer(cached, claimedUser, self._clock.seconds())

    def fromCache(self, text: str, claimedUser: str | None) -> Identity | None:
        """
        The identity of a token verified a moment ago, without parsing it
        again (the usual request: a look-up and a time check); C{None} when
        it is not remembered, or is no token at all.

        @raise TokenRefused: as L{verify}, for a remembered token.
        """
        cached = self._cache.get(_cacheKey(text))
        now = self._clock.seconds()
        if cached is None or cached.until <= now:
            return None
        return self._answer(cached, claimedUser, now)

    def _answer(self, cached: _Verified, claimedUser: str | None, now: float) -> Identity:
        if claimedUser is not None and claimedUser != cached.user:
            raise TokenRefused(f"the API token does not belong to user {claimedUser!r}")
        refusal = cached.terms.refusal(now)
        if refusal is not None:
            raise TokenRefused(refusal)
        self._noteUse(cached.user, cached.tokenId, now)
        return Identity(cached.user, cached.terms.scope(cached.tokenId))

    async def _check(self, token: ParsedToken, cacheKey: bytes, address: str | None, now: float) -> _Verified:
        generation = self._generation
        user, tokenId = token.user, token.tokenId

        def _read(view: Any) -> tuple[Any, Any]:
            return view.get(keys.userKey(user)), view.get(keys.tokenKey(user, tokenId))

        config, record = await self._storage.read(_read)
        if config is None or not isinstance(record, dict) or not self._signedBy(token, record):
            self._countFailure(user if config is not None else None, address)
            raise TokenRefused("the API token is not valid")
        unknown = [caveat for caveat in token.caveats if not understood(caveat)]
        if unknown:
            raise TokenRefused(f"the API token has a restriction this server does not know: {unknown[0][:100]!r}")
        if not hmac.compare_digest(str(record.get("pwfingerprint", "")), _fingerprint(self._secret, config)):
            raise TokenRefused("the API token was revoked: the password of its user changed")
        verified = _Verified(user, tokenId, termsOf(token.caveats), now + self._cacheSeconds)
        if generation == self._generation:  # no revocation came in while reading
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[cacheKey] = verified
        return verified

    def _signedBy(self, token: ParsedToken, record: dict[str, Any]) -> bool:
        key = record.get("key")
        if not isinstance(key, str):
            return False
        verifier = pymacaroons.Verifier()
        verifier.satisfy_general(lambda predicate: True)  # the caveats are checked by termsOf
        try:
            return bool(verifier.verify(token.macaroon, tokenSigningKey(self._secret, key)))
        except Exception:  # pymacaroons raises several kinds for a bad signature
            return False

    def _countFailure(self, user: str | None, address: str | None) -> None:
        """A wrong token counts as a wrong password (may raise TooManyRequests when over the limit)."""
        if self.throttle is not None:
            self.throttle.failure(self.throttle.reserve(user, address))

    # last use

    def _noteUse(self, user: str, tokenId: str, now: float) -> None:
        second = int(now)
        pair = (user, tokenId)
        if self._shownUse.get(pair) == second:
            return
        self._shownUse[pair] = second
        if not self._persistUse:
            return
        self._used[pair] = second
        if self._flushCall is None:
            self._flushCall = self._clock.callLater(self._flushSeconds, self._flush)

    def _flush(self) -> Any:
        """Write the last uses noted since the last flush, in one transaction."""
        self._flushCall = None
        pending, self._used = self._used, {}
        if not pending:
            return None

        def _write(txn: IWriteTransaction) -> None:
            for (user, tokenId), second in pending.items():
                if txn.get(keys.tokenKey(user, tokenId)) is not None:
                    txn.set(keys.tokenUseKey(user, tokenId), second)

        def failed(failure: Any) -> None:
            if failure.check(DevpiError):
                self.log.warn("last use of API tokens not recorded: {error}", error=failure.value)
            else:
                self.log.failure("recording the last use of API tokens", failure)

        return self._storage.write(_write).addErrback(failed)

    def flushNow(self) -> Any:
        """Write pending last uses at once (shutdown, tests)."""
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        return self._flush()


def _cacheKey(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _fingerprint(secret: bytes, config: dict[str, Any]) -> str:
    """The password fingerprint of a user config, as the login tokens use it (a replica has it stored)."""
    if "pwhash" not in config and isinstance(config.get("pwfingerprint"), str):
        return config["pwfingerprint"]
    return passwordFingerprint(secret, config.get("pwhash"))

