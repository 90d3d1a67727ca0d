"""
Choosing the representation of a simple page from the C{Accept} header.

PEP 691 names three media types for the simple API.  This module picks one
of them the way the clients expect: q-values count and order does not, the
most specific media range decides each type's q-value, C{q=0} excludes a
type, and ties go to JSON only when the client named JSON explicitly.  A
request without a usable C{Accept} header gets C{text/html}, which keeps
tools that send no header working.

Werkzeug (installed with Klein) splits the header (quoted strings, parameters)
and orders the ranges by specificity and q-value (L{MIMEAccept}); the q-value
rules and the PEP 691 preferences are ours: werkzeug drops a range whose q is
not a number in 0..1, where a sloppy client here still gets served.

Pure code: no I/O, no Twisted.
"""

import math

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_list_header, parse_options_header

JSON = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"

# The "latest" meta-versions must be answered with the concrete v1 type.
_LATEST = {
    "application/vnd.pypi.simple.latest+json": JSON,
    "application/vnd.pypi.simple.latest+html": HTML_V1,
}
_ALL = (JSON, HTML_V1, TEXT_HTML)

# Tie-breaking among equal q-values: a type the client named beats one it
# only reached through a wildcard; among named types JSON comes first, among
# wildcard matches HTML does (so a bare */* gets text/html).
_NAMED_RANK = {JSON: 2, TEXT_HTML: 1, HTML_V1: 0}
_WILDCARD_RANK = {TEXT_HTML: 2, HTML_V1: 1, JSON: 0}

_CACHE_SIZE = 256
_CACHE_MAX_KEY = 1024
_cache: dict[bytes | str, str | None] = {}


def _qValue(text: str) -> float:
    """Parse a q parameter; garbage counts as 1 so a sloppy client still gets served."""
    try:
        q = float(text.strip().strip('"'))
    except ValueError:
        return 1.0
    if math.isnan(q):
        return 1.0
    return min(max(q, 0.0), 1.0)


def _parseAccept(header: str) -> MIMEAccept:
    """The usable media ranges of an C{Accept} value, most specific first."""
    ranges = []
    for item in parse_list_header(header):
        mediaRange, params = parse_options_header(item)
        major, slash, minor = mediaRange.lower().partition("/")
        if not slash or not major or not minor or "/" in minor:
            continue
        if major == "*" and minor != "*":
            continue
        mediaRange = f"{major}/{minor}"
        q = _qValue(params["q"]) if "q" in params else 1.0
        ranges.append((_LATEST.get(mediaRange, mediaRange), q))
    return MIMEAccept(ranges)


def _choose(header: str) -> str | None:
    """Do the work for L{chooseSimpleFormat} on a decoded header."""
    accept = _parseAccept(header)
    if not accept:
        return TEXT_HTML
    best = None
    bestKey = None
    for target in _ALL:
        # The first match is the most specific range, highest q among equals.
        index = accept.find(target)
        if index < 0:
            continue
        mediaRange, q = accept[index]
        if q <= 0.0:
            continue
        named = "*" not in mediaRange
        key = (q, named, (_NAMED_RANK if named else _WILDCARD_RANK)[target])
        if bestKey is None or key > bestKey:
            best, bestKey = target, key
    return best


def chooseSimpleFormat(accept: bytes | str | None) -> str | None:
    """
    Pick the media type for a simple page, or L{None} when the caller should
    answer 406 because nothing we serve is acceptable.

    @param accept: the raw C{Accept} header value, or L{None} if absent.
    @return: L{JSON}, L{HTML_V1}, L{TEXT_HTML} or L{None}.
    """
    if accept is None:
        return TEXT_HTML
    try:
        return _cache[accept]
    except KeyError:
        pass
    except TypeError:
        return TEXT_HTML
    header = accept.decode("latin-1") if isinstance(accept, bytes) else accept
    if not isinstance(header, str):
        return TEXT_HTML
    result = _choose(header)
    if len(accept) <= _CACHE_MAX_KEY:
        if len(_cache) >= _CACHE_SIZE:
            # Drop the oldest entry; dicts remember insertion order.
            _cache.pop(next(iter(_cache)), None)
        _cache[accept] = result
    return result


def wantsJSONAPI(accept: bytes | str | None) -> bool:
    """
    Whether a request is for devpi's JSON views, which devpi decides by the
    literal presence of C{application/json} in C{Accept}.
    """
    if accept is None:
        return False
    if isinstance(accept, bytes):
        return b"application/json" in accept.lower()
    if isinstance(accept, str):
        return "application/json" in accept.lower()
    return False


_PAGE_TYPES = ("text/html", "application/xhtml+xml")


def prefersHTML(accept: bytes | str | None) -> bool:
    """
    Whether C{Accept} is a browser's: C{text/html} (or XHTML) named, with a
    q-value no other named type beats.  A client that names JSON (devpi
    JSON or PEP 691) or a PEP 691 type at all, sends no header or only
    C{*/*} is not a browser, so it keeps the answers it gets today.
    """
    if not accept or wantsJSONAPI(accept):
        return False
    header = accept.decode("latin-1") if isinstance(accept, bytes) else accept
    if not isinstance(header, str):
        return False
    ranges = list(_parseAccept(header))
    html = max((q for mediaRange, q in ranges if mediaRange in _PAGE_TYPES), default=0.0)
    if html <= 0.0:
        return False
    for mediaRange, q in ranges:
        if mediaRange in _ALL[:2] and q > 0.0:  # a PEP 691 client
            return False
        if mediaRange not in _PAGE_TYPES and "*" not in mediaRange and q > html:
            return False
    return True
