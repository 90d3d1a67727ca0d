"""
Events derived from changelog records, and the subscriber machinery:
serial order, persisted positions, retries with backoff, plugins.
"""

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from devpi_twisted.interfaces import IEventSubscriber
from devpi_twisted.model import events as ev
from devpi_twisted.model import keys
from devpi_twisted.services.events import (
    EventDispatcher, PositionFile, SharedPositions, SubscriberPlugin, installedSubscribers,
)
from devpi_twisted.services.fileentries import logEntry, newEntry, removeFileEntry, writeFileEntry
from devpi_twisted.storage import BlobInfo
from devpi_twisted.testing import MemoryStorage

SHA = "ab" * 32


def entry(rel: str | None = "releasefile", filename: str = "demo-1.0.tar.gz", sha: str = SHA,
          yanked: Any = False, who: str = "alice") -> dict[str, Any]:
    made = newEntry("alice", "dev", rel or "releasefile", filename, "demo", "1.0", BlobInfo(sha, 3), 1000.0,
                    [logEntry("upload", who, 1000.0)], yanked=yanked)
    if rel is None:  # a mirror's cached file has no rel
        del made["rel"]
        made["log"] = [logEntry("mirror", None, 1000.0)]
    return made


POLL = 1e9  # the dispatchers' look now and then, out of the way of the retry timers

FILE = keys.fileKey("alice", "dev", "demo", "demo-1.0.tar.gz")


class DeriveTests(SynchronousTestCase):
    def names(self, changes: dict[str, Any], before: dict[str, Any] | None = None) -> list[str]:
        return [e.name for e in ev.deriveEvents(7, 1000.0, changes, before or {})]

    def test_upload(self) -> None:
        [event] = ev.deriveEvents(7, 1000.0, {FILE: entry(), "path/x": {"file": FILE}}, {})
        self.assertEqual(
            (event.name, event.serial, event.ordinal, event.user, event.index, event.project, event.version,
             event.filename, event.sha256, event.by),
            ("file.uploaded", 7, 0, "alice", "dev", "demo", "1.0", "demo-1.0.tar.gz", SHA, "alice"))
        payload = event.toJSON("https://example.org")
        self.assertEqual(payload["url"], f"https://example.org/alice/dev/+f/{SHA[:3]}/{SHA[3:16]}/demo-1.0.tar.gz")
        self.assertEqual(payload["event"], "file.uploaded")
        self.assertEqual(payload["time"], "1970-01-01T00:16:40Z")

    def test_overwriteIsAnUpload(self) -> None:
        self.assertEqual(self.names({FILE: entry(sha="cd" * 32)}, {FILE: entry()}), ["file.uploaded"])

    def test_sameEntryAgainIsNothing(self) -> None:
        self.assertEqual(self.names({FILE: entry()}, {FILE: entry()}), [])

    def test_yankAndUnyank(self) -> None:
        [yank] = ev.deriveEvents(7, 1.0, {FILE: entry(yanked="broken")}, {FILE: entry()})
        self.assertEqual((yank.name, yank.extra), ("file.yanked", {"reason": "broken"}))
        self.assertEqual(self.names({FILE: entry()}, {FILE: entry(yanked=True)}), ["file.unyanked"])

    def test_removed(self) -> None:
        self.assertEqual(self.names({FILE: None}, {FILE: entry()}), ["file.removed"])
        self.assertEqual(self.names({FILE: None}, {}), [])

    def test_docToxMirror(self) -> None:
        doc = keys.fileKey("alice", "dev", "demo", "demo-1.0.doc.zip")
        tox = keys.fileKey("alice", "dev", "demo", "demo-1.0.tar.gz.toxresult-1")
        self.assertEqual(self.names({doc: entry("doczip", "demo-1.0.doc.zip")}), ["doc.uploaded"])
        self.assertEqual(self.names({tox: entry("toxresult", "demo-1.0.tar.gz.toxresult-1")}),
                         ["toxresult.attached"])
        [cached] = ev.deriveEvents(7, 1.0, {FILE: entry(None)}, {})
        self.assertEqual((cached.name, cached.by), ("mirror.file_cached", None))

    def test_usersAndIndexes(self) -> None:
        self.assertEqual(self.names({"user/bob": {"pwhash": "x"}}), ["user.created"])
        self.assertEqual(self.names({"user/bob": {"pwhash": "y"}}, {"user/bob": {"pwhash": "x"}}), ["user.changed"])
        self.assertEqual(self.names({"user/bob": None}, {"user/bob": {}}), ["user.deleted"])
        self.assertEqual(self.names({"index/bob/dev": {"type": "stage"}}), ["index.created"])
        self.assertEqual(self.names({"index/bob/dev": {"volatile": False}}, {"index/bob/dev": {}}),
                         ["index.changed"])
        [deleted] = ev.deriveEvents(3, 1.0, {"index/bob/dev": None}, {"index/bob/dev": {}})
        self.assertEqual((deleted.name, deleted.user, deleted.index), ("index.deleted", "bob", "dev"))

    def test_deletedIndexSaysItAll(self) -> None:
        changes = {"index/alice/dev": None, FILE: None}
        self.assertEqual(self.names(changes, {"index/alice/dev": {}, FILE: entry()}), ["index.deleted"])

    def test_ordinalsAndOtherKeys(self) -> None:
        other = keys.fileKey("alice", "dev", "demo", "demo-1.0-py3-none-any.whl")
        found = ev.deriveEvents(9, 1.0, {FILE: entry(), other: entry(filename="demo-1.0-py3-none-any.whl"),
                                         "version/alice/dev/demo/1.0": {}, "webhookdelivery/x/1": {}}, {})
        self.assertEqual([(e.ordinal, e.filename) for e in found],
                         [(0, "demo-1.0-py3-none-any.whl"), (1, "demo-1.0.tar.gz")])
        self.assertEqual(ev.keysToCompare({FILE: 1, "version/a/b/c/d": 1, "user/x": 1}), [FILE, "user/x"])


@implementer(IEventSubscriber)
class Recorder:
    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.seen: list[tuple[str, int]] = []
        self.failing = 0  # fail this many more deliveries
        self.calls = 0

    def deliver(self, event: ev.Event) -> Deferred[None]:
        self.calls += 1
        if self.failing:
            self.failing -= 1
            return fail(RuntimeError("subscriber down"))
        self.seen.append((event.name, event.serial))
        return succeed(None)


class _Dispatching(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.storage = MemoryStorage(clock=self.clock.seconds)
        self.path = FilePath(self.mktemp()).child("+events").child("positions.json")
        self.started: list[EventDispatcher] = []

    def dispatcher(self, *subscribers: Any) -> EventDispatcher:
        d = EventDispatcher(self.storage, self.clock, subscribers, PositionFile(self.path, maybeDeferred))
        d.pollInterval = POLL
        d.startService()
        self.started.append(d)
        return d

    def stop(self, d: EventDispatcher) -> None:
        self.successResultOf(d.stopService())

    def tearDown(self) -> None:
        for d in self.started:
            if d.running:
                d.stopService()

    def write(self, changes: dict[str, Any]) -> int:
        def _write(txn: Any) -> None:
            for key, value in changes.items():
                txn.delete(key) if value is None else txn.set(key, value)
        serial, _ = self.successResultOf(self.storage.write(_write))
        return serial

    def upload(self) -> int:
        def _write(txn: Any) -> None:
            writeFileEntry(txn, "alice", "dev", entry())
        serial, _ = self.successResultOf(self.storage.write(_write))
        return serial

    def saved(self) -> dict[str, int]:
        return json.loads(self.path.getContent())


class DispatcherTests(_Dispatching):

    def test_inSerialOrderFromNow(self) -> None:
        self.write({"user/old": {}})  # before the subscriber existed: not delivered
        recorder = Recorder()
        self.dispatcher(recorder)
        first = self.write({"user/alice": {}, "index/alice/dev": {}})
        second = self.upload()
        self.write({"version/alice/dev/demo/1.0": {"name": "demo"}})  # no event
        self.assertEqual(recorder.seen, [("index.created", first), ("user.created", first),
                                         ("file.uploaded", second)])
        self.assertEqual(self.saved(), {"recorder": second})  # moves without events: saved at the stop
        self.stop(self.started[0])
        self.assertEqual(self.saved(), {"recorder": second + 1})

    def test_resumesAfterRestart(self) -> None:
        recorder = Recorder()
        d = self.dispatcher(recorder)
        self.write({"user/alice": {}})
        self.stop(d)
        missed = self.write({"user/bob": {}})  # while stopped
        again = Recorder()
        self.dispatcher(again)
        self.assertEqual(again.seen, [("user.created", missed)])
        self.assertEqual(recorder.seen, [("user.created", 0)])

    def test_failingSubscriberRetriedWithBackoffOthersGoOn(self) -> None:
        failing, healthy = Recorder("failing"), Recorder("healthy")
        failing.failing = 12
        self.dispatcher(failing, healthy)
        one = self.write({"user/alice": {}})
        two = self.write({"user/bob": {}})
        self.assertEqual(healthy.seen, [("user.created", one), ("user.created", two)])
        self.assertEqual((failing.seen, failing.calls), ([], 1))
        delays = []
        while failing.failing:
            delays.append(min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays[:10], [1, 2, 4, 8, 16, 32, 64, 128, 256, 300])
        self.assertEqual(delays[-1], 300)
        self.clock.advance(300)
        self.assertEqual(failing.seen, [("user.created", one), ("user.created", two)])
        self.assertEqual(self.saved(), {"failing": two, "healthy": two})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 12)

    def test_failedEventNotPassedAcrossRestart(self) -> None:
        failing = Recorder()
        failing.failing = 100
        d = self.dispatcher(failing)
        serial = self.write({"user/alice": {}})
        self.stop(d)
        self.assertEqual(self.saved(), {"recorder": serial - 1})
        again = Recorder()
        self.dispatcher(again)
        self.assertEqual(again.seen, [("user.created", serial)])
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.getTime() < POLL], [])
        self.flushLoggedErrors(RuntimeError)

    def test_storageTroubleRetried(self) -> None:
        from devpi_twisted.errors import StorageUnavailable

        recorder = Recorder()
        self.dispatcher(recorder)
        real = self.storage.changesSince
        self.patch(self.storage, "changesSince", lambda *a: fail(StorageUnavailable("database down")))
        serial = self.write({"user/alice": {}})
        self.assertEqual(recorder.seen, [])
        self.patch(self.storage, "changesSince", real)
        self.clock.advance(1)
        self.assertEqual(recorder.seen, [("user.created", serial)])
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 1)

    def test_hangingSubscriberDoesNotHoldTheStop(self) -> None:
        class Hanging(Recorder):
            def deliver(self, event: ev.Event) -> Deferred[None]:
                return Deferred()

        d = self.dispatcher(Hanging())
        self.write({"user/alice": {}})
        stopped = d.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(EventDispatcher.stopTimeout)
        self.successResultOf(stopped)

    def test_positionAheadOfStorageIsClamped(self) -> None:
        self.path.parent().makedirs()
        self.path.setContent(b'{"recorder": 50}')
        recorder = Recorder()
        self.dispatcher(recorder)
        serial = self.write({"user/alice": {}})
        self.assertEqual(recorder.seen, [("user.created", serial)])

    def test_derivedFromPreviousState(self) -> None:
        recorder = Recorder()
        self.dispatcher(recorder)
        self.upload()
        serial = self.write({FILE: entry(yanked=True)})

        def remove(txn: Any) -> None:
            removeFileEntry(txn, "alice", "dev", txn.get(FILE))
        removed, _ = self.successResultOf(self.storage.write(remove))
        self.assertEqual(recorder.seen, [("file.uploaded", 0), ("file.yanked", serial), ("file.removed", removed)])


class SharedPositionsTests(_Dispatching):
    """Nodes sharing the storage: each event is delivered by one of them."""

    def node(self, name: str, *subscribers: Any) -> EventDispatcher:
        d = EventDispatcher(self.storage, self.clock, subscribers, SharedPositions(self.storage, self.clock, name))
        d.pollInterval = POLL
        d.startService()
        self.started.append(d)
        return d

    def test_oneNodeDelivers(self) -> None:
        one, two = Recorder(), Recorder()
        self.node("node-1", one)
        self.node("node-2", two)
        serials = [self.write({f"user/u{n}": {}}) for n in range(5)]
        self.assertEqual(sorted(one.seen + two.seen), [("user.created", s) for s in serials])
        stored = self.successResultOf(self.storage.read(lambda v: v.get("eventposition/recorder")))
        self.assertEqual(stored, {"serial": serials[-1]})

    def test_deadNodesClaimLapses(self) -> None:
        one, two = Recorder(), Recorder()
        one.failing = 1000  # node 1 claims, then never finishes
        first = self.node("node-1", one)
        serial = self.write({"user/alice": {}})
        self.stop(first)  # dies holding the claim
        self.flushLoggedErrors(RuntimeError)
        self.node("node-2", two)
        self.assertEqual(two.seen, [])
        self.clock.advance(SharedPositions.claimFor)
        self.assertEqual(two.seen, [("user.created", serial)])

    def test_restartResumesFromStoredPosition(self) -> None:
        one = Recorder()
        first = self.node("node-1", one)
        self.write({"user/alice": {}})
        self.stop(first)
        missed = self.write({"user/bob": {}})
        two = Recorder()
        self.node("node-2", two)
        self.assertEqual(two.seen, [("user.created", missed)])


    def test_unwantedEventsCostNoWrite(self) -> None:
        """
        A subscriber that wants none of a serial's events (webhooks, when no
        webhook asks for them) gets no claim and no position written: the
        serial does not move for it.
        """
        class NotInterested(Recorder):
            def wants(self, events: Any) -> bool:
                return False

        quiet = NotInterested()
        self.node("node-1", quiet)
        serial = self.write({"user/alice": {}})
        self.clock.advance(POLL)
        self.assertEqual(quiet.seen, [])
        self.assertEqual(self.storage.currentSerial(), serial)


def deliverToList(event: ev.Event) -> None:
    DELIVERED.append(event.name)


DELIVERED: list[str] = []


class PluginTests(SynchronousTestCase):
    def test_lazyPlugin(self) -> None:
        plugin = SubscriberPlugin("test", "tests.test_events:deliverToList")
        verifyObject(IEventSubscriber, plugin)
        del DELIVERED[:]
        self.successResultOf(plugin.deliver(ev.Event("user.created", 1, 0, 1.0, user="x")))
        self.assertEqual(DELIVERED, ["user.created"])

    def test_dropinFound(self) -> None:
        """A dropin declaring a L{SubscriberPlugin} is found, as twisted/plugins/ dropins are."""
        import importlib
        import sys

        root = FilePath(self.mktemp())
        package = root.child("eventdropins")
        package.makedirs()
        package.child("__init__.py").setContent(b"")
        package.child("mine.py").setContent(
            b"from devpi_twisted.services.events import SubscriberPlugin\n"
            b"mine = SubscriberPlugin('mine', 'tests.test_events:deliverToList')\n")
        sys.path.insert(0, root.path)
        self.addCleanup(sys.path.remove, root.path)
        self.addCleanup(sys.modules.pop, "eventdropins", None)
        self.addCleanup(sys.modules.pop, "eventdropins.mine", None)
        [found] = installedSubscribers(importlib.import_module("eventdropins"))
        self.assertEqual(found.name, "mine")
        verifyObject(IEventSubscriber, found)
        for subscriber in installedSubscribers():
            verifyObject(IEventSubscriber, subscriber)


class WiringTests(SynchronousTestCase):
    """Only a primary's main process delivers; the real server is built with the dispatcher."""

    def test_whoDelivers(self) -> None:
        from devpi_twisted.app.compose import deliversEvents
        from devpi_twisted.config import ServerConfig

        config = ServerConfig(serverdir=FilePath("/x"), listen=())
        self.assertTrue(deliversEvents(config))
        self.assertFalse(deliversEvents(ServerConfig(serverdir=FilePath("/x"), listen=(), primaryURL="http://p")))
        self.assertFalse(deliversEvents(ServerConfig(serverdir=FilePath("/x"), listen=(), requestsOnly=True)))

    def test_builtIntoTheServer(self) -> None:
        from devpi_twisted.services.webhooks import WebhookSender
        from .test_tap import MakeServiceTests

        case = MakeServiceTests("test_serves")
        case.mktemp = self.mktemp  # type: ignore[method-assign]
        case.patch = self.patch  # type: ignore[method-assign]
        case.addCleanup = self.addCleanup  # type: ignore[method-assign]
        case.setUp()
        service, reactor = case.start("--webhook-allow-private")

        def walk(s: Any) -> list[Any]:
            return [s, *[c for child in getattr(s, "services", []) for c in walk(child)]]

        found = walk(service)
        [dispatcher] = [s for s in found if isinstance(s, EventDispatcher)]
        [sender] = [s for s in found if isinstance(s, WebhookSender)]
        self.assertEqual([type(s).__name__ for s in dispatcher._subscribers][:1], ["WebhookSubscriber"])
        self.assertTrue(dispatcher.running and sender.running)
