"""
The HTTP client for upstream indexes.

Pages go through treq (content decoding welcome); files go through a plain
Agent, so the bytes hashed are exactly the bytes upstream stored (a gzip
C{Content-Encoding} on an sdist must not be undone).  Every request has a
timeout for the headers and an idle timeout while the body arrives, both on
the injected clock.  Credentials in a mirror URL are sent as a header and
never appear in a URL we log or store.
"""

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from devpi_twisted import __version__
from devpi_twisted.model.upstream.project import MAX_PAGE_SIZE

PAGE_ACCEPT = (
    b"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
)
USER_AGENT = f"devpi-twisted/{__version__}".encode("ascii")


class UpstreamFailure(Exception):
    """Upstream could not be asked, or answered with an error or garbage."""


class UpstreamMissing(UpstreamFailure):
    """Upstream answered, and does not have what was asked for (404, 410)."""


@dataclass(frozen=True)
class PageResponse:
    status: int
    body: bytes
    contentType: str | None
    etag: str | None
    serial: int | None
    url: str


def splitCredentials(url: str) -> tuple[str, bytes | None]:
    """C{(url without user:password, Authorization header value or None)}."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    from urllib.parse import unquote

    userpass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode("utf-8")
    return clean, b"Basic " + base64.b64encode(userpass)


def redacted(url: str) -> str:
    """C{url} without credentials, for logs and messages."""
    return splitCredentials(url)[0]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def credentialsFor(url: str, mirrorURL: str | None) -> bytes | None:
    """
    The C{Authorization} value of C{mirrorURL}'s embedded credentials, for
    a C{url} on the same origin (files of a private index that needs them);
    never for another host, so they cannot leak to a CDN.
    """
    if not mirrorURL:
        return None
    _, auth = splitCredentials(mirrorURL)
    if auth is None or _origin(url) != _origin(mirrorURL):
        return None
    return auth


def upstreamTLSPolicy(caBundle: str | None = None) -> Any:
    """
    The TLS policy for upstream connections: certificates and host names
    verified, against the system's CAs or against every certificate in the
    PEM file C{caBundle} (C{--upstream-ca}; a bundle may hold several).
    """
    from twisted.internet.ssl import Certificate, trustRootFromCertificates
    from twisted.web.client import BrowserLikePolicyForHTTPS

    if not caBundle:
        return BrowserLikePolicyForHTTPS()
    with open(caBundle, "rb") as f:
        text = f.read()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in text.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    if not blocks:
        raise ValueError(f"{caBundle}: no PEM certificate found")
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(
        [Certificate.loadPEM(block) for block in blocks]))


class _Collector(Protocol):
    """Collects a bounded body, with an idle timeout between chunks."""

    def __init__(self, clock: IReactorTime, idleTimeout: float, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._chunks: list[bytes] = []
        self._size = 0
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._limit = limit
        self._timer = clock.callLater(idleTimeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self.transport.stopProducing()
        if not self.done.called:
            self.done.errback(UpstreamFailure(f"no data from upstream for {self._idleTimeout} seconds"))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._cancelTimer()
            self.transport.stopProducing()
            self.done.errback(UpstreamFailure(f"upstream page larger than {self._limit} bytes"))
            return
        self._chunks.append(data)
        if self._timer is not None:
            self._timer.reset(self._idleTimeout)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancelTimer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: no length given, the connection closed at the end (as treq takes it).
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(UpstreamFailure(f"upstream body incomplete: {reason.getErrorMessage()}"))


class UpstreamClient:
    """
    Fetches pages and opens file downloads.

    @param agent: an L{IAgent} on a connection pool the caller owns (its TLS
        policy verifies upstream certificates).
    @param pageAgent: the same, wrapped to decode gzip (for pages only).
    """

    def __init__(self, agent: IAgent, pageAgent: IAgent, clock: IReactorTime, timeout: float = 10.0,
                 idleTimeout: float = 30.0) -> None:
        self._agent = agent
        self._pageAgent = pageAgent
        self._clock = clock
        self.timeout = timeout
        self.idleTimeout = idleTimeout

    async def _request(self, agent: IAgent, url: str, headers: dict[bytes, bytes],
                       auth: bytes | None = None) -> IResponse:
        clean, embedded = splitCredentials(url)
        auth = embedded or auth
        allHeaders = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in headers.items():
            allHeaders.setRawHeaders(name, [value])
        if auth is not None:
            allHeaders.setRawHeaders(b"Authorization", [auth])
        d = agent.request(b"GET", clean.encode("utf-8"), allHeaders)
        timedOut = []

        def timeout() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self._clock.callLater(self.timeout, timeout)
        try:
            return await d
        except Exception as e:
            if timedOut:
                # Depending on how far the request got, cancelling it gives a
                # CancelledError or one wrapped in ResponseNeverReceived.
                raise UpstreamFailure(f"no answer from {redacted(url)} within {self.timeout} seconds")
            if isinstance(e, UpstreamFailure):
                raise
            raise UpstreamFailure(f"cannot reach {redacted(url)}: {_describe(e)}")
        finally:
            if timer.active():
                timer.cancel()

    async def fetchPage(self, url: str, etag: str | None) -> PageResponse:
        """GET a simple page, following no redirects beyond what the agent does."""
        headers = {b"Accept": PAGE_ACCEPT}
        if etag:
            headers[b"If-None-Match"] = etag.encode("latin-1")
        response = await self._request(self._pageAgent, url, headers)
        if response.code == 304 or response.code >= 400:
            response.deliverBody(_Discard())
            body = b""
        else:
            collector = _Collector(self._clock, self.idleTimeout, MAX_PAGE_SIZE)
            response.deliverBody(collector)
            body = await collector.done

        def header(name: bytes) -> str | None:
            values = response.headers.getRawHeaders(name)
            return values[-1].decode("latin-1") if values else None

        serialText = header(b"x-pypi-last-serial")
        try:
            serial = int(serialText) if serialText is not None else None
        except ValueError:
            serial = None
        return PageResponse(
            status=response.code, body=body, contentType=header(b"content-type"),
            etag=header(b"etag"), serial=serial,
            url=_finalURL(response, url),
        )

    async def openPage(self, url: str, etag: str | None) -> IResponse:
        """GET a (possibly huge) page whose body the caller streams."""
        headers = {b"Accept": PAGE_ACCEPT}
        if etag:
            headers[b"If-None-Match"] = etag.encode("latin-1")
        return await self._request(self._pageAgent, url, headers)

    async def openFile(self, url: str, mirrorURL: str | None = None) -> IResponse:
        """
        GET a file; the caller reads the body (with L{idleTimeout}) from the response.

        @param mirrorURL: the mirror's URL, whose credentials are sent when
            C{url} is on the same origin.
        """
        return await self._request(self._agent, url, {b"Accept": b"*/*", b"Accept-Encoding": b"identity"},
                                   credentialsFor(url, mirrorURL))


def _finalURL(response: IResponse, url: str) -> str:
    """
    The URL the page was finally served from (after redirects), which its
    relative links are resolved against; without credentials.
    """
    request = getattr(response, "request", None)
    absolute = getattr(request, "absoluteURI", None)
    if isinstance(absolute, bytes):
        try:
            return redacted(absolute.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return redacted(url)


def _describe(error: BaseException) -> str:
    """A one-line account of a connection error, unwrapping Twisted's lists of reasons."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(reason.value) for reason in reasons)
    text = str(error)
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        pass
