"""
Webhooks: registration routes, stored deliveries and their retries, the
address check, and real deliveries from a real server process to a
receiver on 127.0.0.1.
"""

import hashlib
import hmac
import json
import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from devpi_twisted.model.events import Event
from devpi_twisted.services.webhooks import (
    CheckedEndpoints, RefusedTarget, WebhookRegistry, WebhookSender, WebhookSubscriber, deliveryId,
    isPublicAddress, validateRegistration,
)
from devpi_twisted.errors import BadRequest
from devpi_twisted.testing import MemoryStorage

from .helpers import APIHarness, ROOT_PASSWORD, basicAuth
from .test_clients import _ClientCase

SECRET = "a-webhook-secret-1234"
HOOK = {"url": "http://hooks.example.org/in", "secret": SECRET, "events": ["file.uploaded"]}


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (the README's example)."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.api = APIHarness(self)
        self.api.createUser("alice")
        self.api.createUser("bob")
        self.api.createIndex("alice", "dev")
        self.alice = basicAuth("alice", "secret")

    def test_registerListRemove(self) -> None:
        answer = self.api.post("/alice/dev/+webhooks", json=HOOK, headers=self.alice)
        self.assertEqual(answer.code, 201, answer.body)
        hookId = answer.json["result"]["id"]
        listed = self.api.get("/alice/dev/+webhooks", headers=self.alice)
        self.assertEqual(listed.code, 200)
        [hook] = listed.json["result"]
        self.assertEqual((hook["id"], hook["url"], hook["events"], hook["deliveries"]),
                         (hookId, HOOK["url"], ["file.uploaded"], []))
        self.assertNotIn(SECRET.encode(), listed.body)
        self.assertEqual(self.api.delete(f"/alice/dev/+webhooks/{hookId}", headers=self.alice).code, 200)
        self.assertEqual(self.api.get("/alice/dev/+webhooks", headers=self.alice).json["result"], [])
        self.assertEqual(self.api.delete(f"/alice/dev/+webhooks/{hookId}", headers=self.alice).code, 404)

    def test_ownerOrRootOnly(self) -> None:
        self.assertEqual(self.api.post("/alice/dev/+webhooks", json=HOOK).code, 401)
        self.assertEqual(self.api.get("/alice/dev/+webhooks").code, 401)
        bob = basicAuth("bob", "secret")
        self.assertEqual(self.api.post("/alice/dev/+webhooks", json=HOOK, headers=bob).code, 403)
        self.assertEqual(self.api.get("/alice/dev/+webhooks", headers=bob).code, 403)
        root = basicAuth("root", ROOT_PASSWORD)
        self.assertEqual(self.api.post("/alice/dev/+webhooks", json=HOOK, headers=root).code, 201)
        self.assertEqual(self.api.post("/alice/nothere/+webhooks", json=HOOK, headers=self.alice).code, 404)

    def test_serverWideForRootOnly(self) -> None:
        self.assertEqual(self.api.post("/+webhooks", json=HOOK, headers=self.alice).code, 403)
        root = basicAuth("root", ROOT_PASSWORD)
        answer = self.api.post("/+webhooks", json=HOOK, headers=root)
        self.assertEqual(answer.code, 201, answer.body)
        self.assertEqual(len(self.api.get("/+webhooks", headers=root).json["result"]), 1)
        self.assertEqual(self.api.get("/alice/dev/+webhooks", headers=self.alice).json["result"], [])
        hookId = answer.json["result"]["id"]
        self.assertEqual(self.api.delete(f"/+webhooks/{hookId}", headers=self.alice).code, 403)
        self.assertEqual(self.api.delete(f"/+webhooks/{hookId}", headers=root).code, 200)

    def test_badRegistrations(self) -> None:
        for body, words in [
            ([], "JSON object"),
            ({**HOOK, "url": "ftp://example.org/"}, "http"),
            ({**HOOK, "url": "http:///nohost"}, "host"),
            ({**HOOK, "url": "http://user:pw@example.org/"}, "credentials"),
            ({**HOOK, "url": "http://example.org:99999/"}, "valid URL"),
            ({**HOOK, "secret": "short"}, "secret"),
            ({**HOOK, "secret": 12345678901234567}, "secret"),
            ({**HOOK, "events": []}, "events"),
            ({**HOOK, "events": ["file.exploded"]}, "file.exploded"),
            ({**HOOK, "extra": 1}, "extra"),
        ]:
            answer = self.api.post("/alice/dev/+webhooks", json=body, headers=self.alice)
            self.assertEqual(answer.code, 400, (body, answer.body))
            self.assertIn(words, answer.json["message"])
        answer = self.api.post("/alice/dev/+webhooks", body=b"{nope", headers=self.alice)
        self.assertEqual(answer.code, 400)

    def test_validatedFields(self) -> None:
        self.assertEqual(validateRegistration({**HOOK, "events": ["file.uploaded", "doc.uploaded", "doc.uploaded"]}),
                         {**HOOK, "events": ["doc.uploaded", "file.uploaded"]})
        self.assertRaises(BadRequest, validateRegistration, {**HOOK, "url": "javascript:alert(1)"})


class Receiver:
    """A fake poster: records what would be sent and answers the next outcome."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []
        self.outcomes: list[Any] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> Deferred[int]:
        self.sent.append((url, body, headers))
        outcome = self.outcomes.pop(0) if self.outcomes else 200
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.storage = MemoryStorage(clock=self.clock.seconds)
        self.successResultOf(self.storage.write(lambda txn: txn.set("index/alice/dev", {"type": "stage"})))
        self.registry = WebhookRegistry(self.storage, self.clock.seconds)
        self.hookId = self.successResultOf(self.registry.add("alice/dev", {**HOOK, "events": ["file.uploaded"]}))
        self.receiver = Receiver()
        self.sender = self.newSender()
        self.subscriber = WebhookSubscriber(self.storage, self.clock.seconds, "https://pkgs", wake=self.sender.wake)
        self.event = Event("file.uploaded", 5, 0, 1000.0, user="alice", index="dev", project="demo",
                           filename="demo-1.0.tar.gz", path="alice/dev/+f/abc/def/demo-1.0.tar.gz", sha256="ab" * 32)

    def newSender(self, shared: bool = False) -> WebhookSender:
        sender = WebhookSender(self.storage, self.clock, self.receiver, "node-1", shared=shared)
        sender.startService()
        self.addCleanup(lambda: sender.running and sender.stopService())
        return sender

    def deliveries(self) -> list[dict[str, Any]]:
        return self.successResultOf(self.registry.list("alice/dev"))[0]["deliveries"]

    def test_signedBodyAndHeaders(self) -> None:
        self.successResultOf(self.subscriber.deliver(self.event))
        [(url, body, headers)] = self.receiver.sent
        self.assertEqual(url, HOOK["url"])
        payload = json.loads(body)
        self.assertEqual(payload["delivery"], deliveryId(self.hookId, self.event))
        self.assertEqual((payload["event"], payload["serial"], payload["project"], payload["url"]),
                         ("file.uploaded", 5, "demo", "https://pkgs/alice/dev/+f/abc/def/demo-1.0.tar.gz"))
        self.assertEqual(headers["X-Devpi-Event"], "file.uploaded")
        self.assertEqual(headers["X-Devpi-Delivery"], payload["delivery"])
        self.assertTrue(verify(SECRET, body, headers["X-Devpi-Signature-256"]))
        self.assertFalse(verify("a-wrong-secret-123456", body, headers["X-Devpi-Signature-256"]))
        self.assertFalse(verify(SECRET, body + b" ", headers["X-Devpi-Signature-256"]))
        [delivery] = self.deliveries()
        self.assertEqual((delivery["state"], delivery["status"], delivery["attempts"]), ("delivered", 200, 1))

    def test_otherEventsAndIndexesNotSent(self) -> None:
        self.successResultOf(self.subscriber.deliver(Event("file.removed", 5, 0, 1.0, user="alice", index="dev")))
        self.successResultOf(self.subscriber.deliver(Event("file.uploaded", 6, 0, 1.0, user="bob", index="dev")))
        self.assertEqual(self.receiver.sent, [])

    def test_sameEventTwiceIsOneDelivery(self) -> None:
        self.receiver.outcomes = [500]
        self.successResultOf(self.subscriber.deliver(self.event))
        self.successResultOf(self.subscriber.deliver(self.event))
        self.assertEqual(len(self.deliveries()), 1)

    def test_retriedWithBackoffSameIdUntilDelivered(self) -> None:
        self.receiver.outcomes = [ConnectionRefusedError(), 503, 302, 404]
        self.successResultOf(self.subscriber.deliver(self.event))
        for delay in (1, 2, 4):
            self.clock.advance(delay - 0.01)
            sent = len(self.receiver.sent)
            self.clock.advance(0.01)
            self.assertEqual(len(self.receiver.sent), sent + 1)
        [delivery] = self.deliveries()
        self.assertEqual((delivery["state"], delivery["status"], delivery["error"], delivery["attempts"]),
                         ("pending", 404, "HTTP 404", 4))
        self.clock.advance(7.99)
        self.assertEqual(self.deliveries()[0]["state"], "pending")
        self.clock.advance(0.01)
        self.assertEqual(self.deliveries()[0]["state"], "delivered")
        ids = {headers["X-Devpi-Delivery"] for _, _, headers in self.receiver.sent}
        bodies = {body for _, body, _ in self.receiver.sent}
        self.assertEqual((len(self.receiver.sent), len(ids), len(bodies)), (5, 1, 1))

    def test_givenUpAfterADay(self) -> None:
        self.receiver.outcomes = [500] * 1000
        self.successResultOf(self.subscriber.deliver(self.event))
        for _ in range(60):
            self.clock.advance(3600)
        [delivery] = self.deliveries()
        self.assertEqual(delivery["state"], "failed")
        attempts = len(self.receiver.sent)
        self.assertLess(attempts, 40)
        self.clock.advance(7 * 24 * 3600)
        self.assertEqual(len(self.receiver.sent), attempts)

    def test_pendingSentByANewSender(self) -> None:
        """Deliveries are stored: a sender started later (after a restart) sends them."""
        self.sender.stopService()
        self.successResultOf(self.subscriber.deliver(self.event))
        self.assertEqual(self.receiver.sent, [])
        self.newSender()
        self.assertEqual(len(self.receiver.sent), 1)
        self.assertEqual(self.deliveries()[0]["state"], "delivered")

    def test_sharedStorageClaimsBeforeSending(self) -> None:
        self.sender.stopService()
        self.successResultOf(self.subscriber.deliver(self.event))
        key = next(k for k, _ in self.successResultOf(self.storage.read(lambda v: v.items("webhookdelivery/"))))

        def claimedElsewhere(txn: Any) -> None:
            txn.set(key, {**txn.get(key), "claimedBy": "node-2", "claimUntil": self.clock.seconds() + 60})
        self.successResultOf(self.storage.write(claimedElsewhere))
        self.newSender(shared=True)
        self.assertEqual(self.receiver.sent, [])
        self.clock.advance(61)
        self.assertEqual(len(self.receiver.sent), 1)
        self.assertEqual(self.deliveries()[0]["state"], "delivered")

    def test_removedWebhookDropsItsDeliveries(self) -> None:
        self.sender.stopService()
        self.successResultOf(self.subscriber.deliver(self.event))
        self.successResultOf(self.registry.remove("alice/dev", self.hookId))
        self.newSender()
        self.assertEqual(self.receiver.sent, [])
        self.assertEqual(self.successResultOf(self.storage.read(lambda v: v.items("webhookdelivery/"))), [])

    def test_finishedDeliveriesPruned(self) -> None:
        for serial in range(30):
            self.successResultOf(self.subscriber.deliver(Event("file.uploaded", serial, 0, 1.0, user="alice",
                                                               index="dev")))
        self.assertEqual(len(self.receiver.sent), 30)
        self.assertEqual([d["serial"] for d in self.deliveries()], list(range(10, 30)))

    def test_indexDeletedRemovesItsWebhooks(self) -> None:
        self.successResultOf(self.registry.add("alice/dev", {**HOOK, "events": ["index.deleted"]}))
        self.successResultOf(self.subscriber.deliver(Event("index.deleted", 9, 0, 1.0, user="alice", index="dev")))
        self.assertEqual(len(self.receiver.sent), 1)
        hooks = self.successResultOf(self.storage.read(lambda v: v.items("webhook/")))
        self.assertEqual(hooks, [])


class AddressTests(SynchronousTestCase):
    def test_publicOnly(self) -> None:
        for address in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1",
                        "fe80::1", "fd00:ec2::254", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1", "224.0.0.1"]:
            self.assertFalse(isPublicAddress(address), address)
        for address in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"]:
            self.assertTrue(isPublicAddress(address), address)

    def connect(self, allowPrivate: bool, host: str, resolved: list[str]) -> Deferred[Any]:
        clock = Clock()
        lookups: list[str] = []

        def resolve(name: str, port: int) -> Deferred[list[str]]:
            lookups.append(name)
            return succeed(resolved)
        endpoints = CheckedEndpoints(NoConnect(), allowPrivate, resolve)
        uri = type("URI", (), {"scheme": b"http", "host": host.encode(), "port": 80})()
        del clock
        return endpoints.endpointForURI(uri).connect(None)

    def test_nameResolvingToLoopbackRefused(self) -> None:
        failure = self.failureResultOf(self.connect(False, "innocent.example", ["127.0.0.1"]), RefusedTarget)
        self.assertIn("127.0.0.1", str(failure.value))
        self.failureResultOf(self.connect(False, "169.254.169.254", []), RefusedTarget)
        self.failureResultOf(self.connect(False, "mixed.example", ["8.8.8.8", "10.0.0.1"]), RefusedTarget)

    def test_publicAddressOrFlagConnects(self) -> None:
        self.failureResultOf(self.connect(False, "public.example", ["8.8.8.8"]), Connecting)
        failure = self.failureResultOf(self.connect(True, "innocent.example", ["127.0.0.1"]), Connecting)
        self.assertEqual(failure.value.args, ("127.0.0.1", 80))


class Connecting(Exception):
    pass


class NoConnect:
    """A reactor that tells where a connection would go instead of making it."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        raise Connecting(host, port)


# --- real server process, real receiver ---------------------------------------------------------

class HookReceiver(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.arrived: list[Deferred[None]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((time.monotonic(), headers, request.content.read()))
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            d.callback(None)
        return b"thanks"


class RealDeliveryTests(_ClientCase):
    """A real server (C{--webhook-allow-private}) with alice/dev, and a receiver on 127.0.0.1."""

    serverOptions = ("--webhook-allow-private",)

    def setUp(self) -> Deferred[None]:
        self.receiver = HookReceiver()
        self.receiverPort: Any = None
        return super().setUp()

    async def listen(self, port: int = 0) -> int:
        endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        self.receiverPort = await endpoint.listen(Site(self.receiver))
        self.addCleanup(self.stopReceiver)
        return self.receiverPort.getHost().port

    async def stopReceiver(self) -> None:
        if self.receiverPort is not None:
            port, self.receiverPort = self.receiverPort, None
            await port.stopListening()

    async def register(self, port: int, events: list[str] | None = None) -> str:
        result = await self.mustAPI("POST", "/alice/dev/+webhooks", {
            "url": f"http://127.0.0.1:{port}/hook", "secret": SECRET,
            "events": events or ["file.uploaded"]}, expect=201)
        return result["result"]["id"]

    async def upload(self, version: str = "1.0") -> float:
        from .distbuilder import buildWheel

        result = await self.twineUpload("alice/dev", buildWheel("demo-pkg", version))
        self.assertSucceeded(result)
        return time.monotonic()

    async def waitFor(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.receiver.received) < count:
            if time.monotonic() > deadline:
                self.fail(f"{len(self.receiver.received)} of {count} deliveries after {timeout} s\n"
                          f"{self.server.output()[-3000:]}")
            await deferLater(reactor, 0.05, lambda: None)

    def uploadsReceived(self) -> list[str]:
        return sorted(json.loads(body)["filename"] for _, _, body in self.receiver.received)


class DeliveredTests(RealDeliveryTests):
    async def test_uploadDeliveredSignedWithinTwoSeconds(self) -> None:
        port = await self.listen()
        await self.register(port)
        uploaded = await self.upload()
        await self.waitFor(1, 10)
        arrived, headers, body = self.receiver.received[0]
        self.assertLess(arrived - uploaded, 2.0)
        payload = json.loads(body)
        self.assertEqual((payload["event"], payload["user"], payload["index"], payload["project"], payload["version"],
                          payload["filename"]), ("file.uploaded", "alice", "dev", "demo-pkg", "1.0",
                                                 "demo_pkg-1.0-py3-none-any.whl"))
        self.assertTrue(payload["url"].endswith(f"/alice/dev/+f/{payload['sha256'][:3]}/"
                                                f"{payload['sha256'][3:16]}/demo_pkg-1.0-py3-none-any.whl"))
        self.assertEqual(headers["x-devpi-event"], "file.uploaded")
        self.assertEqual(headers["x-devpi-delivery"], payload["delivery"])
        self.assertTrue(verify(SECRET, body, headers["x-devpi-signature-256"]))
        self.assertFalse(verify("not-the-secret-at-all", body, headers["x-devpi-signature-256"]))
        listed = await self.mustAPI("GET", "/alice/dev/+webhooks")
        [delivery] = listed["result"][0]["deliveries"]
        self.assertEqual((delivery["state"], delivery["status"], delivery["attempts"]), ("delivered", 200, 1))

    async def test_receiverDownThenBackGetsEverything(self) -> None:
        from .serverprocess import freePort

        port = freePort()
        await self.register(port)
        await self.upload("1.0")
        await self.upload("2.0")
        await deferLater(reactor, 1.5, lambda: None)
        listed = await self.mustAPI("GET", "/alice/dev/+webhooks")
        self.assertEqual({d["state"] for d in listed["result"][0]["deliveries"]}, {"pending"})
        self.assertTrue(all(d["attempts"] >= 1 and d["error"] for d in listed["result"][0]["deliveries"]), listed)
        await self.listen(port)
        await self.waitFor(2, 20)
        self.assertEqual(self.uploadsReceived(),
                         ["demo_pkg-1.0-py3-none-any.whl", "demo_pkg-2.0-py3-none-any.whl"])
        ids = [headers["x-devpi-delivery"] for _, headers, _ in self.receiver.received]
        self.assertEqual(len(set(ids)), 2)

    async def test_pendingDeliveredAfterRestart(self) -> None:
        from .serverprocess import freePort
        from .test_clients import ServerProcess

        port = freePort()
        await self.register(port)
        await self.upload("1.0")
        await deferLater(reactor, 0.5, lambda: None)
        old = self.server
        old.process.send_signal(signal.SIGTERM)
        await deferLater(reactor, 0, lambda: None)
        for _ in range(600):
            if old.process.poll() is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.receiver.received, [])
        self.assertTrue(os.path.exists(os.path.join(old.serverdir, "+events", "positions.json")))
        self.assertNotIn("Traceback", old.output())
        await self.listen(port)
        self.server = ServerProcess(self, self.workdir, "--webhook-allow-private")
        await self.waitForServer()
        await self.waitFor(1, 20)
        self.assertEqual(self.uploadsReceived(), ["demo_pkg-1.0-py3-none-any.whl"])


class PrivateRefusedTests(RealDeliveryTests):
    serverOptions = ()

    async def test_loopbackRefusedWithoutTheFlag(self) -> None:
        port = await self.listen()
        await self.register(port)
        await self.upload()
        for _ in range(100):
            listed = await self.mustAPI("GET", "/alice/dev/+webhooks")
            deliveries = listed["result"][0]["deliveries"]
            if deliveries and deliveries[0].get("error"):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertIn("not a public address", deliveries[0]["error"])
        self.assertEqual(deliveries[0]["state"], "pending")
        self.assertEqual(self.receiver.received, [])


class ExportTests(SynchronousTestCase):
    """Webhooks go out with their index (and server-wide ones with the server) and come back in."""

    def test_roundTrip(self) -> None:
        from .test_export import _Dirs, fired, openStorage, readState

        dirs = _Dirs()
        dirs.mktemp = self.mktemp  # type: ignore[attr-defined]
        dirs.setUp()
        dirs.importInto("server1")
        storage, _ = openStorage(dirs.workdir.child("server1"))
        registry = WebhookRegistry(storage, lambda: 1234.0)
        try:
            indexHook = fired(registry.add("alice/dev", HOOK))
            serverHook = fired(registry.add("+server", {**HOOK, "events": ["user.created"]}))
        finally:
            fired(storage.close())
        exported = dirs.exportTo("server1", "export")
        data = json.loads(exported.child("dataindex.json").getContent())
        [dumped] = data["indexes"]["alice/dev"]["devpi_twisted"]["webhooks"]
        self.assertEqual((dumped["id"], dumped["secret"]), (indexHook, SECRET))
        self.assertEqual([h["id"] for h in data["devpi_twisted"]["webhooks"]], [serverHook])
        # a broken one is left out with a warning, not an import failure
        data["indexes"]["alice/dev"]["devpi_twisted"]["webhooks"].append({**HOOK, "id": "x", "url": "ftp://x"})
        exported.child("dataindex.json").setContent(json.dumps(data).encode())
        dirs.importInto("server2", exported)
        state = readState(dirs.workdir.child("server2"), "webhook/")
        self.assertEqual(sorted(state), sorted([f"webhook/alice/dev/{indexHook}", f"webhook/+server/{serverHook}"]))
        self.assertEqual(state[f"webhook/alice/dev/{indexHook}"],
                         {**HOOK, "id": indexHook, "created": 1234.0})
        self.assertIn("webhook 'x' not imported", dirs.out.getvalue())


class PosterResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []
        self.stalled: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.requests.append(request.path)
        if request.path == b"/redirect":
            request.redirect(b"/elsewhere")
            return b""
        if request.path == b"/huge":
            return b"x" * (4 * 1024 * 1024)
        if request.path == b"/stall":
            self.stalled.append(request)
            from twisted.web.server import NOT_DONE_YET
            return NOT_DONE_YET
        return b"ok"


class PosterTests(TestCase):
    """The real poster against a receiver on 127.0.0.1 (allowed only with the flag)."""

    async def serve(self) -> int:
        self.resource = PosterResource()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.resource))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def post(self, url: str, allowPrivate: bool = True, resolved: list[str] | None = None) -> Deferred[int]:
        from devpi_twisted.services.webhooks import webhookPoster

        resolve = (lambda host, port: succeed(resolved)) if resolved is not None else None
        return webhookPoster(reactor, allowPrivate, resolve)(url, b"{}", {"X-Devpi-Event": "file.uploaded"})

    async def test_redirectNotFollowed(self) -> None:
        port = await self.serve()
        self.assertEqual(await self.post(f"http://127.0.0.1:{port}/redirect"), 302)
        self.assertEqual(self.resource.requests, [b"/redirect"])

    async def test_hugeAnswerCut(self) -> None:
        port = await self.serve()
        self.assertEqual(await self.post(f"http://127.0.0.1:{port}/huge"), 200)

    def test_readsAtMost64KB(self) -> None:
        from devpi_twisted.services.webhooks import MAX_ANSWER, _Capped

        class Transport:
            stopped = 0

            def stopProducing(self) -> None:
                self.stopped += 1

        done: Deferred[None] = Deferred()
        reader = _Capped(done)
        reader.makeConnection(Transport())  # type: ignore[arg-type]
        reader.dataReceived(b"x" * MAX_ANSWER)
        self.assertEqual(reader.transport.stopped, 0)
        reader.dataReceived(b"x")
        self.assertEqual(reader.transport.stopped, 1)
        self.assertEqual(MAX_ANSWER, 64 * 1024)

    async def test_nameResolvingToLoopbackRefused(self) -> None:
        port = await self.serve()
        with self.assertRaises(RefusedTarget):
            await self.post(f"http://hooks.example.org:{port}/ok", allowPrivate=False, resolved=["127.0.0.1"])
        with self.assertRaises(RefusedTarget):
            await self.post(f"http://127.0.0.1:{port}/ok", allowPrivate=False)
        self.assertEqual(self.resource.requests, [])
        self.assertEqual(await self.post(f"http://hooks.example.org:{port}/ok", resolved=["127.0.0.1"]), 200)

    async def test_timeout(self) -> None:
        from devpi_twisted.services import webhooks

        self.patch(webhooks, "TIMEOUT", 0.3)
        port = await self.serve()
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            await self.post(f"http://127.0.0.1:{port}/stall")
        self.assertLess(time.monotonic() - started, 5)
        for request in self.resource.stalled:
            request.channel.transport.loseConnection()
