"""
Keeping credentials out of logs and status output.

devpi's own history has a leak of this kind (credentials from
C{--master-url} in logs and C{+status}, devpi#403), so everything that
writes a URL or a request line for people to read goes through here.
"""

import re

# scheme://user:password@host  or  //user@host: keep the scheme and host only.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:)?//[^/@\s?#]*@")
# Query parameters whose value could be a secret.
_SECRET_KEYS = re.compile(rb"(?i)(pass|token|secret|auth|key|sig|cred|session)")

REDACTED = "***"


def scrubText(text: str) -> str:
    """C{text} with the user information of every URL in it replaced."""
    if "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}//{REDACTED}@", text)


def scrubURL(value: str | None) -> str | None:
    """A URL as it may be shown: without user name and password."""
    return None if value is None else scrubText(value)


def scrubRequestURI(uri: bytes) -> str:
    """
    A request target for the access log: user information removed, and the
    values of query parameters whose names suggest a secret replaced.
    """
    path, sep, query = uri.partition(b"?")
    if sep:
        parts = []
        for item in query.split(b"&"):
            key, eq, _ = item.partition(b"=")
            parts.append(key + b"=" + REDACTED.encode("ascii") if eq and _SECRET_KEYS.search(key) else item)
        path = path + b"?" + b"&".join(parts)
    return scrubText(path.decode("utf-8", "backslashreplace"))
