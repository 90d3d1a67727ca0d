"""
What a view needs to know about a request: who sent it and where the server
is reached from outside.
"""

from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.web.iweb import IRequest

from devpi_twisted.errors import Forbidden, Unauthorized
from devpi_twisted.model.identity import Identity
from devpi_twisted.services.auth import Authenticator, parseCredentials
from devpi_twisted.web.headers import isValidHost

_REQUESTER = "_devpiRequester"


async def requesterOf(request: IRequest, auth: Authenticator) -> str | None:
    """
    The authenticated user name, or C{None} for anonymous.

    C{X-Devpi-Auth} (devpi-client) wins over C{Authorization} (pip, twine);
    when it is present but invalid the request is anonymous, as with devpi.
    Either may carry a password, a login token or an API token; an API
    token may also come as C{Authorization: Bearer}.  A request with an API
    token gets its scope (L{identityOf}); one with an API token that is not
    valid is refused (401).  The answer is kept on the request.
    """
    if hasattr(request, _REQUESTER):
        return getattr(request, _REQUESTER)
    refused = getattr(request, _REFUSED, None)
    if refused is not None:
        raise refused
    credentials = requestCredentials(request)
    identity = None
    if credentials is not None:
        try:
            identity = await auth.identify(*credentials, address=clientAddress(request))
        except Unauthorized as error:
            setattr(request, _REFUSED, error)  # checked once: a wrong token counts once
            raise
    if identity is not None and identity.scope is not None:
        setattr(request, _SCOPE, identity.scope)
    user = None if identity is None else identity.user
    setattr(request, _REQUESTER, user)
    return user


def requestCredentials(request: IRequest) -> tuple[str | None, str] | None:
    """C{(user, secret)} a request carries (C{user} C{None} for a Bearer token), or C{None}."""
    devpiAuth = request.getHeader(b"x-devpi-auth")
    if devpiAuth is not None:
        return parseCredentials(devpiAuth.encode("latin-1") if isinstance(devpiAuth, str) else devpiAuth)
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    if isinstance(header, str):
        header = header.encode("latin-1")
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        token = value.strip().decode("ascii", "replace")
        return (None, token) if token else None
    if scheme.lower() != b"basic":
        return None
    return parseCredentials(value)


async def identityOf(request: IRequest, auth: Authenticator) -> Identity | None:
    """
    Who the request acts as, with the scope of the API token that
    authenticated it, if one did; C{None} for anonymous.
    """
    user = await requesterOf(request, auth)
    return None if user is None else Identity(user, getattr(request, _SCOPE, None))


async def accountRequester(request: IRequest, auth: Authenticator) -> str | None:
    """
    The requester for user management, password changes and token
    management, which an API token never grants: a request authenticated by
    one is refused (403).
    """
    identity = await identityOf(request, auth)
    if identity is None:
        return None
    if identity.scope is not None:
        raise Forbidden("an API token cannot be used to manage users, passwords or tokens")
    return identity.user


async def requesterFor(request: IRequest, auth: Authenticator, permission: str,
                       index: str | None = None, project: str | None = None) -> str | None:
    """
    The requester's user name for an action needing C{permission} on
    C{index} ("user/index") and C{project}: as L{requesterOf}, but a request
    authenticated by an API token that does not allow it is refused (403).
    """
    identity = await identityOf(request, auth)
    if identity is None:
        return None
    if not identity.permits(permission, index, project):
        where = f" on {index}" if index else ""
        raise Forbidden(f"the API token used does not allow {permission}{where}")
    return identity.user


_SCOPE = "_devpiTokenScope"
_REFUSED = "_devpiAuthRefused"


def clientAddress(request: IRequest) -> str | None:
    """The client's IP address (the peer of the connection), for throttling and logs."""
    address: Any = request.getClientAddress()
    return getattr(address, "host", None)


def hasQueryFlag(request: IRequest, name: bytes) -> bool:
    """
    Whether the query string names C{name}, with or without a value.

    devpi tests flags such as C{?error_on_noop} and C{?force} by presence;
    Twisted's C{request.args} drops a parameter that has no C{=}, so the raw
    query string is read instead.
    """
    _, _, query = request.uri.partition(b"?")
    for item in query.split(b"&"):
        key = item.split(b"=", 1)[0]
        if key and unquote_to_bytes(key.replace(b"+", b" ")) == name:
            return True
    return False


def hasCredentials(request: IRequest) -> bool:
    return bool(request.getHeader(b"x-devpi-auth") or request.getHeader(b"authorization"))


def fromTrustedProxy(request: IRequest) -> bool:
    """
    Whether the connection's peer is one of the site's C{--trusted-proxies}
    (the peer itself, not whom C{X-Forwarded-For} names).
    """
    channel = getattr(request, "channel", None)
    limits = getattr(getattr(channel, "site", None), "limits", None)
    proxies = getattr(limits, "trustedProxies", None)
    if not proxies or channel is None or channel.transport is None:
        return False
    return getattr(channel.transport.getPeer(), "host", None) in proxies


def outsideURL(request: IRequest, configured: str | None) -> str:
    """
    The server's base URL as clients see it, without a trailing slash:
    C{X-Outside-Url} when a trusted proxy sent it (anyone else could aim
    the server's links, and vary its cached pages, at will), then
    C{--outside-url}, then the request's own host.
    """
    header = request.getHeader(b"x-outside-url")
    if header is not None and fromTrustedProxy(request):
        base = _baseURL(header)
        if base is not None:
            return base
    if configured:
        return configured
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host:
        hostBytes = host if isinstance(host, bytes) else host.encode("utf-8", "replace")
        if isValidHost(hostBytes):
            return f"{scheme}://{hostBytes.decode('ascii')}"
    address: Any = request.getHost()
    return f"{scheme}://{address.host}:{address.port}"


def _baseURL(value: bytes | str | None) -> str | None:
    """
    C{value} without its trailing slash if it is a usable base URL: http or
    https, a valid host, no user, query or fragment.  Anything else (absent,
    not ASCII, unparsable such as C{http://[::1}) is ignored.
    """
    if not value:
        return None
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
        parts = urlsplit(text)
        parts.port  # raises for a port that is not a number
    except (UnicodeError, ValueError):
        return None
    if parts.scheme not in ("http", "https") or "@" in parts.netloc or parts.query or parts.fragment:
        return None
    if not isValidHost(parts.netloc.encode("ascii")):
        return None
    return text.rstrip("/")
