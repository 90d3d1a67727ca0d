"""
API tokens as devpi-tokens makes them: macaroons whose identifier is
C{USER-TOKENID} and whose first-party caveats are C{key=value}
restrictions.  Pure: parsing the restrictions a client asks for, writing
and reading caveats, and deciding what a verified token allows and when.

The caveats understood, all of devpi-tokens' own:
  - C{expires=<unix time>} or C{expires=never};
  - C{not_before=<unix time>};
  - C{allowed=<permission>,...};
  - C{indexes=<user>/<index>,...};
  - C{projects=<name>,...}.
Each caveat narrows the token: a holder may add more (C{devpi token-derive})
but never remove one, and with several of a kind all of them apply (the
earliest expiry, the latest start, the intersection of lists).  A caveat not
understood makes the token invalid, so a restriction is never ignored.
"""

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import pymacaroons

from devpi_twisted.model.identity import TokenScope
from devpi_twisted.model.names import normalizeProject

TOKEN_PREFIX = "devpi-"
ONE_YEAR_SECONDS = 366 * 24 * 60 * 60 + 10
"""The longest expiry anyone but root (or C{--restrict-modify} users) may give, as devpi-tokens has it."""

MAX_TOKEN_LENGTH = 8192
MAX_CAVEATS = 64
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
_LISTS = ("allowed", "indexes", "projects")
RESTRICTIONS = ("allowed", "expires", "indexes", "not_before", "projects")


class RestrictionError(ValueError):
    """A requested restriction is malformed (C{status} 400) or not allowed to this requester (403)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def newTokenId() -> str:
    """Eight characters without look-alikes, as devpi-tokens' ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def restrictionsFromRequest(body: dict[str, Any], now: float, extendedExpiry: bool) -> list[str]:
    """
    The caveats for a new token from C{POST /USER/+token-create}'s JSON
    body, sorted by name as devpi-tokens writes them, with its messages.

    @param extendedExpiry: whether the requester may create tokens that
        never expire or expire in more than a year (root, or the
        C{--restrict-modify} users).
    @raise RestrictionError: for an unknown or malformed restriction.
    """
    data = dict(body)
    data.setdefault("expires", None)
    caveats = []
    for key, value in sorted(data.items()):
        if key not in RESTRICTIONS:
            raise RestrictionError(f"Unknown restriction '{key}'.")
        if key == "expires":
            caveats.append("expires=" + _expires(value, now, extendedExpiry))
        elif key == "not_before":
            caveats.append(f"not_before={_integer(value, 'not before')}")
        else:
            caveats.append(f"{key}={','.join(_stringList(key, value))}")
    return caveats


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RestrictionError(f"Invalid value '{value}' for {what}")
    try:
        return int(value)
    except ValueError:
        raise RestrictionError(f"Invalid value '{value}' for {what}") from None


def _expires(value: Any, now: float, extendedExpiry: bool) -> str:
    longest = now + ONE_YEAR_SECONDS
    if value is None:
        return str(int(longest))
    if value == "never":
        if not extendedExpiry:
            raise RestrictionError("Not allowed to create token with no expiration", 403)
        return "never"
    expires = _integer(value, "expiration")
    if expires <= now:
        raise RestrictionError("Can't set expiration before current time")
    if expires > longest and not extendedExpiry:
        raise RestrictionError("Not allowed to set expiration to more than one year", 403)
    return str(expires)


def _stringList(name: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise RestrictionError(f"The {name} restriction must be a list")
    for position, item in enumerate(value, 1):
        if not isinstance(item, str):
            raise RestrictionError(f"Item at position {position} is not a string in {name} list")
        if not item:
            raise RestrictionError(f"Empty item at position {position} in {name} list")
        if "," in item or not item.isprintable():
            raise RestrictionError(f"Item at position {position} in {name} list has a comma or control character")
    return sorted(value)


@dataclass(frozen=True)
class ParsedToken:
    """A token's parts before its signature is checked."""

    user: str
    tokenId: str
    caveats: tuple[str, ...]
    macaroon: Any  # the pymacaroons.Macaroon, for the verifier


def parseToken(text: str) -> ParsedToken | None:
    """
    C{text} as a devpi-tokens token (with or without its C{devpi-} prefix,
    which derived tokens lack), or C{None} when it is not one: a password,
    a login token, garbage.
    """
    if not text or len(text) > MAX_TOKEN_LENGTH:
        return None
    if text.startswith(TOKEN_PREFIX):
        text = text[len(TOKEN_PREFIX):]
    if len(text) < 16 or not _BASE64URL.issuperset(text):
        return None
    try:
        macaroon = pymacaroons.Macaroon.deserialize(text)
        identifier = macaroon.identifier
        if isinstance(identifier, bytes):
            identifier = identifier.decode("ascii")
        caveats = []
        for caveat in macaroon.caveats:
            cid = caveat.caveat_id
            caveats.append(cid.decode("utf-8") if isinstance(cid, bytes) else cid)
    except Exception:  # pymacaroons raises whatever its parser meets in garbage
        return None
    user, sep, tokenId = identifier.rpartition("-")
    if not sep or not user or not tokenId or len(caveats) > MAX_CAVEATS:
        return None
    return ParsedToken(user, tokenId, tuple(caveats), macaroon)


def looksLikeToken(text: str) -> bool:
    """Whether C{text} is meant as a devpi-tokens token (cheap: no parsing unless it may be one)."""
    return parseToken(text) is not None


def understood(caveat: str) -> bool:
    """Whether C{caveat} is one this server knows how to check (the verifier's test)."""
    key, sep, value = caveat.partition("=")
    if not sep:
        return False
    if key == "expires":
        return value == "never" or _isInt(value)
    if key == "not_before":
        return _isInt(value)
    if key in _LISTS:
        return all(item.strip() for item in value.split(","))
    return False


def _isInt(value: str) -> bool:
    return value.lstrip("-").isdigit() and len(value) < 20


@dataclass(frozen=True)
class TokenTerms:
    """What the caveats of a verified token add up to."""

    notBefore: int | None
    expires: int | None  # None: never
    allowed: frozenset[str] | None
    indexes: frozenset[str] | None
    projects: frozenset[str] | None

    def scope(self, tokenId: str) -> TokenScope:
        return TokenScope(tokenId, self.allowed, self.indexes, self.projects)

    def refusal(self, now: float) -> str | None:
        """Why the token is not valid at C{now}, or C{None} when it is."""
        if self.expires is not None and now >= self.expires:
            return f"the API token expired at {self.expires}"
        if self.notBefore is not None and now < self.notBefore:
            return f"the API token is not valid before {self.notBefore}"
        return None


def termsOf(caveats: tuple[str, ...] | list[str]) -> TokenTerms:
    """The combined terms of understood caveats (check with L{understood} first)."""
    notBefore = expires = None
    lists: dict[str, frozenset[str] | None] = {name: None for name in _LISTS}
    for caveat in caveats:
        key, _, value = caveat.partition("=")
        if key == "expires":
            if value != "never":
                expires = int(value) if expires is None else min(expires, int(value))
        elif key == "not_before":
            notBefore = int(value) if notBefore is None else max(notBefore, int(value))
        elif key in _LISTS:
            items = frozenset(item.strip() for item in value.split(","))
            if key == "projects":
                items = frozenset(normalizeProject(item) for item in items)
            current = lists[key]
            lists[key] = items if current is None else current & items
    return TokenTerms(notBefore, expires, lists["allowed"], lists["indexes"], lists["projects"])


def publicRecord(record: dict[str, Any]) -> dict[str, Any]:
    """A token record as C{GET /USER/+tokens} shows it: never its key."""
    return {k: v for k, v in record.items() if k not in ("key", "pwfingerprint")}


def newTokenKey() -> str:
    """The random per-token value the token's signing key is derived from."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
