"""
Webhooks: signed JSON POSTs of events to URLs registered on an index (or
server-wide), delivered at least once.

Registrations live in storage (C{webhook/<user>/<index>/<id>}, server-wide
ones under C{webhook/+server/<id>}), so they replicate and are exported
with their index.  L{WebhookSubscriber}, an event subscriber, turns each
event into one pending delivery per matching webhook, stored too
(C{webhookdelivery/<webhook id>/<serial>-<ordinal>}): a delivery survives
a restart and keeps its id and exact body on every attempt.  L{WebhookSender}
sends the pending ones that are due, retrying failures (connection error,
10 s timeout, non-2xx) with a doubling delay for 24 hours.  When several
nodes share the storage, a node claims a delivery in a transaction before
sending it, so only one sends each attempt.

Safe by default: redirects are not followed, at most 64 KB of an answer is
read, and unless C{--webhook-allow-private} the address a name resolves to
must be public (checked when connecting, so a name that resolves to
127.0.0.1 is refused as well).
"""

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from devpi_twisted.errors import BadRequest, NotFound
from devpi_twisted.interfaces import IEventSubscriber, IReadView, IStorage, IWriteTransaction
from devpi_twisted.model.events import EVENT_NAMES, INDEX_DELETED, Event
from devpi_twisted.storage.readers import BytesBodyProducer

log = Logger()

HOOK = "webhook/"
DELIVERY = "webhookdelivery/"
SERVER = "+server"  # the scope of server-wide webhooks (a user name never has "+")
MAX_AGE = 24 * 3600.0
TIMEOUT = 10.0
MAX_ANSWER = 64 * 1024
KEEP_FINISHED = 20  # finished deliveries listed per webhook
MAX_WEBHOOKS = 50  # per scope


def scopeOf(user: str | None, index: str | None) -> str:
    return SERVER if user is None else f"{user}/{index}"


def hookPrefix(scope: str) -> str:
    return f"{HOOK}{scope}/"


def deliveryPrefix(hookId: str) -> str:
    return f"{DELIVERY}{hookId}/"


def signature(secret: str, body: bytes) -> str:
    """The C{X-Devpi-Signature-256} of C{body}: GitHub's C{sha256=<hex HMAC>}."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def deliveryId(hookId: str, event: Event) -> str:
    """The same id for the same event and webhook, wherever and however often it is made."""
    digest = hashlib.sha256(f"{hookId}:{event.serial}:{event.ordinal}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def validateRegistration(body: Any) -> dict[str, Any]:
    """The webhook C{body} asks for, or L{BadRequest} saying what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("a webhook is a JSON object with 'url', 'secret' and 'events'")
    unknown = set(body) - {"url", "secret", "events"}
    if unknown:
        raise BadRequest(f"unknown webhook fields: {', '.join(sorted(unknown))}")
    url = body.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
        raise BadRequest("'url' must be an http:// or https:// URL")
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        raise BadRequest("'url' is not a valid URL")
    if not parts.hostname or parts.username is not None or any(c in url for c in " \r\n\t"):
        raise BadRequest("'url' must name a host (and no credentials or spaces)")
    secret = body.get("secret")
    if not isinstance(secret, str) or not 16 <= len(secret) <= 256:
        raise BadRequest("'secret' must be a string of 16 to 256 characters")
    events = body.get("events")
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise BadRequest(f"'events' must be a non-empty list of event names: {', '.join(EVENT_NAMES)}")
    wrong = sorted(set(events) - set(EVENT_NAMES))
    if wrong:
        raise BadRequest(f"unknown events {', '.join(wrong)}; known: {', '.join(EVENT_NAMES)}")
    return {"url": url, "secret": secret, "events": sorted(set(events))}


def _listed(view: IReadView, scope: str) -> list[dict[str, Any]]:
    listed = []
    for key, hook in view.items(hookPrefix(scope)):
        deliveries = [
            {k: d.get(k) for k in ("id", "event", "serial", "state", "attempts", "status", "error",
                                   "lastAttempt", "created")}
            for _, d in view.items(deliveryPrefix(hook["id"]))
        ]
        listed.append({"id": hook["id"], "url": hook["url"], "events": hook["events"],
                       "created": hook.get("created"), "deliveries": deliveries[-KEEP_FINISHED:]})
    return listed


class WebhookRegistry:
    """Registering, listing and removing webhooks (callers check permissions)."""

    def __init__(self, storage: IStorage, seconds: Callable[[], float]) -> None:
        self._storage = storage
        self._seconds = seconds

    async def add(self, scope: str, body: Any) -> str:
        hook = validateRegistration(body)
        hook["id"] = secrets.token_hex(8)
        hook["created"] = self._seconds()

        def _add(txn: IWriteTransaction) -> None:
            if scope != SERVER and txn.get(f"index/{scope}") is None:
                raise NotFound(f"no index {scope}")
            if len(txn.items(hookPrefix(scope))) >= MAX_WEBHOOKS:
                raise BadRequest(f"at most {MAX_WEBHOOKS} webhooks per index")
            txn.set(hookPrefix(scope) + hook["id"], hook)

        await self._storage.write(_add)
        return hook["id"]

    async def list(self, scope: str) -> list[dict[str, Any]]:
        """The webhooks of C{scope}, without their secrets, with their recent deliveries."""
        def _list(view: IReadView) -> list[dict[str, Any]]:
            if scope != SERVER and view.get(f"index/{scope}") is None:
                raise NotFound(f"no index {scope}")
            return _listed(view, scope)

        return await self._storage.read(_list)

    async def remove(self, scope: str, hookId: str) -> None:
        def _remove(txn: IWriteTransaction) -> None:
            key = hookPrefix(scope) + hookId
            if "/" in hookId or txn.get(key) is None:
                raise NotFound(f"no webhook {hookId!r} on {scope}")
            txn.delete(key)
            for deliveryKey, _ in txn.items(deliveryPrefix(hookId)):
                txn.delete(deliveryKey)

        await self._storage.write(_remove)


def _scopes(event: Event) -> list[str]:
    """The webhook scopes that see C{event}: the server's, and its index's."""
    if event.user is not None and event.index is not None:
        return [SERVER, f"{event.user}/{event.index}"]
    return [SERVER]


@implementer(IEventSubscriber)
class WebhookSubscriber:
    """
    The event subscriber behind webhooks: stores one pending delivery per
    webhook that wants the event (idempotently: an event handled again after
    a restart makes no second delivery), then wakes the sender.
    """

    name = "webhooks"

    def __init__(self, storage: IStorage, seconds: Callable[[], float], baseURL: str = "",
                 wake: Callable[[], Any] = lambda: None) -> None:
        self._storage = storage
        self._seconds = seconds
        self._baseURL = baseURL
        self.wake = wake

    def wants(self, events: list[Event]) -> Deferred[bool]:
        """
        Whether a webhook wants any of C{events}: most interest none, and
        looking costs a read, where handling them would cost writes (and,
        on shared storage, a claim).
        """

        def _wanted(view: IReadView) -> bool:
            return any(event.name in hook["events"] for event in events for scope in _scopes(event)
                       for _, hook in view.items(hookPrefix(scope)))

        return self._storage.read(_wanted)

    def deliver(self, event: Event) -> Deferred[Any]:
        return ensureDeferred(self._enqueue(event))

    async def _enqueue(self, event: Event) -> None:
        scopes = _scopes(event)
        if not await self.wants([event]):
            return
        now = self._seconds()
        payload = event.toJSON(self._baseURL)

        def _store(txn: IWriteTransaction) -> int:
            added = 0
            for scope in scopes:
                for hookKey, hook in txn.items(hookPrefix(scope)):
                    if event.name not in hook["events"]:
                        continue
                    key = f"{deliveryPrefix(hook['id'])}{event.serial:012d}-{event.ordinal:04d}"
                    if txn.get(key) is not None:
                        continue
                    ident = deliveryId(hook["id"], event)
                    body = json.dumps({"delivery": ident, **payload}, sort_keys=True)
                    txn.set(key, {
                        # its own copy of where and how: an index's webhooks go with
                        # the index, after its last event
                        "url": hook["url"], "secret": hook["secret"],
                        "id": ident, "hook": hookKey, "event": event.name, "serial": event.serial,
                        "body": body, "state": "pending", "attempts": 0, "created": now, "due": now,
                    })
                    added += 1
            if event.name == INDEX_DELETED and len(scopes) > 1:
                # The index's webhooks go with it (after this last event).
                for hookKey, hook in txn.items(hookPrefix(scopes[1])):
                    txn.delete(hookKey)
            return added

        _, added = await self._storage.write(_store)
        if added:
            self.wake()


def isPublicAddress(address: str) -> bool:
    """Whether a webhook may reach C{address}: only globally routable ones (no loopback, private, link-local, metadata)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class RefusedTarget(Exception):
    """The webhook's host resolves to an address it may not reach."""


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    def __init__(self, factory: "CheckedEndpoints", scheme: bytes, host: str, port: int) -> None:
        self._f = factory
        self._scheme = scheme
        self._host = host
        self._port = port

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        return ensureDeferred(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: Any) -> Any:
        f = self._f
        try:
            addresses = [str(ipaddress.ip_address(self._host.strip("[]")))]
        except ValueError:
            addresses = await f.resolve(self._host, self._port)
        if not addresses:
            raise RefusedTarget(f"{self._host} does not resolve")
        if not f.allowPrivate:
            refused = [a for a in addresses if not isPublicAddress(a)]
            if refused:
                raise RefusedTarget(f"{self._host} resolves to {refused[0]}, which is not a public address "
                                    "(see --webhook-allow-private)")
        address = addresses[0]
        endpointClass = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: Any = endpointClass(f.reactor, address, self._port, timeout=TIMEOUT)
        if self._scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(self._host), endpoint)
        return await endpoint.connect(protocolFactory)


class CheckedEndpoints:
    """
    The endpoint factory of the webhook agent: resolves the host itself
    (in a thread) and connects to an address it has checked.
    """

    def __init__(self, reactor: Any, allowPrivate: bool,
                 resolve: Callable[[str, int], Deferred[list[str]]] | None = None) -> None:
        self.reactor = reactor
        self.allowPrivate = allowPrivate
        self._resolve = resolve

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        if self._resolve is not None:
            return self._resolve(host, port)
        from twisted.internet.threads import deferToThreadPool

        def lookup() -> list[str]:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return list(dict.fromkeys(str(info[4][0]) for info in infos))

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), lookup)

    def endpointForURI(self, uri: Any) -> _CheckedEndpoint:
        return _CheckedEndpoint(self, uri.scheme, uri.host.decode("idna"), uri.port)


class _Capped(Protocol):
    """Reads at most L{MAX_ANSWER} bytes of an answer, then hangs up."""

    def __init__(self, done: Deferred[None]) -> None:
        self._done = done
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > MAX_ANSWER and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if not self._done.called:
            self._done.callback(None)


def webhookPoster(reactor: Any, allowPrivate: bool,
                  resolve: Callable[[str, int], Deferred[list[str]]] | None = None
                  ) -> Callable[[str, bytes, dict[str, str]], Deferred[int]]:
    """
    The function that POSTs one delivery and answers the status code:
    no redirects followed, no pooled connections, 10 s for it all.
    """
    agent = Agent.usingEndpointFactory(reactor, CheckedEndpoints(reactor, allowPrivate, resolve),
                                       pool=HTTPConnectionPool(reactor, persistent=False))

    async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        allHeaders = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        allHeaders.setRawHeaders(b"content-type", [b"application/json"])
        allHeaders.setRawHeaders(b"user-agent", [b"devpi-twisted-webhooks"])
        d = agent.request(b"POST", url.encode("ascii"), allHeaders, BytesBodyProducer(body))
        done: Deferred[None] = Deferred()
        reader = _Capped(done)

        reading = expired = False

        def timedOut() -> None:
            nonlocal expired
            expired = True
            d.cancel()
            if reader.transport is not None:  # answered, but the body is too slow
                reader.transport.stopProducing()
            if reading and not done.called:
                done.errback(TimeoutError(f"no complete answer within {TIMEOUT:g} s"))

        timer = reactor.callLater(TIMEOUT, timedOut)
        try:
            try:
                response = await d
            except Exception as e:
                if expired:
                    raise TimeoutError(f"no answer within {TIMEOUT:g} s") from e
                raise
            reading = True
            response.deliverBody(reader)
            await done
        finally:
            if timer.active():
                timer.cancel()
        return int(response.code)

    return lambda url, body, headers: ensureDeferred(post(url, body, headers))


def _describe(error: Exception) -> str:
    """A short text of why an attempt failed, for the owner's listing."""
    reasons = getattr(error, "reasons", None)  # ResponseFailed and friends wrap Failures
    if reasons:
        error = getattr(reasons[0], "value", error)
    return (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)[:300]


class WebhookSender(Service):
    """
    Sends the pending deliveries that are due: on a wake (new deliveries),
    when the next retry is due, and every L{scanInterval} seconds (to pick
    up deliveries another node stored).
    """

    scanInterval = 30.0
    firstDelay = 1.0
    maxDelay = 3600.0
    claimFor = 60.0
    concurrency = 8

    def __init__(self, storage: IStorage, clock: IReactorTime,
                 post: Callable[[str, bytes, dict[str, str]], Deferred[int]],
                 node: str, shared: bool = False, ready: Callable[[], Deferred[Any]] | None = None,
                 maxAge: float = MAX_AGE) -> None:
        self._storage = storage
        self._clock = clock
        self._post = post
        self._node = node
        self._shared = shared
        self._ready = ready
        self._maxAge = maxAge
        self._slots = DeferredSemaphore(self.concurrency)
        self._inflight: set[str] = set()
        self._attempts: set[Deferred[Any]] = set()
        self._timer: Any = None
        self._scanning = False
        self._again = False

    def startService(self) -> None:
        super().startService()
        ready = self._ready() if self._ready is not None else None
        if ready is None:
            self.wake()
        else:
            ready.addCallback(lambda _: self.wake())

    def stopService(self) -> Deferred[Any]:
        """Stop scanning; wait for the attempts in flight (10 s at most each) to be recorded."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return DeferredList(list(self._attempts), consumeErrors=True)

    def wake(self) -> None:
        if not self.running:
            return
        if self._scanning:
            self._again = True
            return
        ensureDeferred(self._scan()).addErrback(lambda f: log.failure("webhook scan failed", f))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(max(delay, 0.0), self.wake)

    async def _scan(self) -> None:
        self._scanning = True
        try:
            while True:
                self._again = False
                pending = await self._storage.read(
                    lambda view: [(k, v) for k, v in view.items(DELIVERY) if v.get("state") == "pending"])
                now = self._clock.seconds()
                nextDue = now + self.scanInterval
                for key, value in pending:
                    due = max(value.get("due", 0), value.get("claimUntil", 0) if value.get("claimedBy") != self._node else 0)
                    if key in self._inflight:
                        continue
                    if due <= now:
                        self._inflight.add(key)
                        attempt = self._slots.run(lambda k=key: ensureDeferred(self._attempt(k)))
                        attempt.addErrback(lambda f, k=key: log.failure("webhook delivery {key} failed", f, key=k))
                        self._attempts.add(attempt)
                        attempt.addBoth(lambda _, a=attempt: self._attempts.discard(a))
                    else:
                        nextDue = min(nextDue, due)
                if not self._again or not self.running:
                    break
        finally:
            self._scanning = False
        if self.running:
            self._schedule(nextDue - self._clock.seconds())

    async def _attempt(self, key: str) -> None:
        due = None
        try:
            claimed = await self._claim(key)
            if claimed is None:
                return
            delivery, hook = claimed
            body = delivery["body"].encode("utf-8")
            headers = {
                "X-Devpi-Event": delivery["event"],
                "X-Devpi-Delivery": delivery["id"],
                "X-Devpi-Signature-256": signature(hook["secret"], body),
            }
            status, error = None, None
            try:
                status = await self._post(hook["url"], body, headers)
            except Exception as e:
                error = _describe(e)
            due = await self._finish(key, status, error)
        finally:
            self._inflight.discard(key)
        if due is not None and self.running:
            self._schedule(due - self._clock.seconds())

    async def _claim(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        now = self._clock.seconds()

        def check(view: IReadView) -> tuple[dict[str, Any], dict[str, Any]] | None:
            delivery = view.get(key)
            if delivery is None or delivery.get("state") != "pending" or delivery.get("due", 0) > now:
                return None
            if delivery.get("claimedBy") not in (None, self._node) and delivery.get("claimUntil", 0) > now:
                return None  # another node is sending it
            return delivery, {"url": delivery["url"], "secret": delivery["secret"]}

        if not self._shared:
            return await self._storage.read(check)

        def claim(txn: IWriteTransaction) -> tuple[dict[str, Any], dict[str, Any]] | None:
            found = check(txn)
            if found is not None:
                txn.set(key, {**found[0], "claimedBy": self._node, "claimUntil": now + self.claimFor})
            return found

        _, found = await self._storage.write(claim)
        return found

    async def _finish(self, key: str, status: int | None, error: str | None) -> float | None:
        """Record an attempt's outcome; the time of the next attempt, if there is one."""
        now = self._clock.seconds()
        ok = status is not None and 200 <= status < 300
        if status is not None and not ok:
            error = f"HTTP {status}"

        def finish(txn: IWriteTransaction) -> float | None:
            delivery = txn.get(key)
            if delivery is None:
                return None
            attempts = delivery.get("attempts", 0) + 1
            delivery.update(attempts=attempts, status=status, error=error, lastAttempt=now)
            delivery.pop("claimedBy", None)
            delivery.pop("claimUntil", None)
            if ok:
                delivery["state"] = "delivered"
            elif now - delivery.get("created", now) >= self._maxAge:
                delivery["state"] = "failed"
            else:
                delivery["due"] = now + min(self.firstDelay * 2 ** (attempts - 1), self.maxDelay)
            txn.set(key, delivery)
            if delivery["state"] != "pending":
                prefix = key.rsplit("/", 1)[0] + "/"
                finished = [k for k, v in txn.items(prefix) if v.get("state") != "pending"]
                for old in finished[:-KEEP_FINISHED]:
                    txn.delete(old)
            return delivery["due"] if delivery["state"] == "pending" else None

        _, due = await self._storage.write(finish)
        log.info("webhook delivery {key}: {outcome}", key=key, outcome="delivered" if ok else (error or "failed"))
        return due
