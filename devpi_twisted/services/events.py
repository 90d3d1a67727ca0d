"""
Event subscribers: each is told of every event in serial order, at least
once, from its own persisted position in the changelog.

Events are derived from the changelog (L{devpi_twisted.model.events}), not
raised by the code that writes, so nothing a request does is held up by a
subscriber and nothing is missed across a restart: a subscriber resumes
after the last serial it fully handled.  A failing subscriber is retried
with a growing (capped) delay; it holds up only its own later events.

Positions are kept in a small file of the server directory
(C{+events/positions.json}), outside the replicated and exported state: a
position is this node's, and only the node that delivers (a primary's main
process, never a replica or a C{--requests-only} worker) keeps one.

Subscribers from extensions are Twisted plugins: a dropin in
C{twisted/plugins/} declares a L{SubscriberPlugin} with a name and the
dotted path of a C{deliver(event)} function, imported only when the server
starts delivering.
"""

import json
import os
from collections import OrderedDict
from importlib import import_module
from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.filepath import FilePath
from zope.interface import implementer

from devpi_twisted.interfaces import IEventSubscriber, IStorage
from devpi_twisted.model.events import Event, deriveEvents, keysToCompare
from devpi_twisted.storage import ChangeRecord, HistoryPruned

log = Logger()


@implementer(IPlugin, IEventSubscriber)
class SubscriberPlugin:
    """
    A subscriber declared in a dropin: C{deliver} is the dotted path
    (C{"package.module:function"}) of a function taking an event and
    answering a Deferred (or nothing), imported on the first event.
    """

    def __init__(self, name: str, deliver: str) -> None:
        self.name = name
        self._path = deliver
        self._function: Callable[[Event], Any] | None = None

    def deliver(self, event: Event) -> Deferred[Any]:
        if self._function is None:
            module, _, attr = self._path.partition(":")
            self._function = getattr(import_module(module), attr)
        return maybeDeferred(self._function, event)


def installedSubscribers(package: Any = None) -> list[IEventSubscriber]:
    """The subscribers installed as plugins (in C{twisted.plugins}, or C{package}), by name."""
    return sorted(getPlugins(IEventSubscriber, package), key=lambda s: s.name)


class PositionFile:
    """
    The position of every subscriber on this node, in one JSON file,
    replaced atomically (written and fsynced in C{runFile}'s thread).
    """

    claimFor = 0.0

    def __init__(self, path: FilePath, runFile: Callable[..., Deferred[Any]]) -> None:
        self._path = path
        self._runFile = runFile
        self._saving: Deferred[Any] | None = None
        self._again: dict[str, int] | None = None

    def load(self) -> dict[str, int]:
        """The saved positions (blocking: read once at startup)."""
        try:
            data = json.loads(self._path.getContent())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warn("event positions in {path} unreadable; subscribers start at the current serial",
                     path=self._path.path)
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    async def start(self, names: list[str], current: int) -> dict[str, int]:
        saved = self.load()
        # A new subscriber starts now: it is not given the whole history.
        positions = {name: min(saved.get(name, current), current) for name in names}
        await self.save(positions)
        return positions

    async def claim(self, name: str, serial: int) -> bool:
        return True  # one node: nobody else delivers

    def moved(self, positions: dict[str, int], name: str, serial: int, hadEvents: bool) -> None:
        # Moves over records without events are saved when the server stops:
        # reading them again after a crash costs little.
        if hadEvents:
            self.save(positions).addErrback(lambda f: log.failure("event positions not saved", f))

    def _write(self, positions: dict[str, int]) -> None:
        self._path.parent().makedirs(ignoreExistingDirectory=True)
        temporary = self._path.siblingExtension(".tmp")
        with open(temporary.path, "w") as f:
            json.dump(positions, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary.path, self._path.path)

    def save(self, positions: dict[str, int]) -> Deferred[Any]:
        """
        Save C{positions}; while a save runs the latest ones wait and are
        written after it.  @return: a Deferred that fires once they are on disk.
        """
        return ensureDeferred(self._save(dict(positions)))

    async def _save(self, positions: dict[str, int]) -> None:
        if self._saving is not None:
            self._again = positions
            while self._saving is not None:
                await self._saving
            if self._again is None:
                return  # an earlier waiter wrote them
            positions, self._again = self._again, None
        done: Deferred[Any] = Deferred()
        self._saving = done
        try:
            await self._runFile(self._write, positions)
        finally:
            self._saving = None
            done.callback(None)


class Busy(Exception):
    """Another node is delivering this subscriber's events right now."""


class SharedPositions:
    """
    Positions for nodes that share their storage (PostgreSQL): kept in
    storage (C{eventposition/<name>}, never exported), and a node claims a
    serial's events in a transaction before delivering them, so one node
    delivers them while the others skip them or wait.  A claim lapses after
    L{claimFor} seconds (its node died), and another node delivers again:
    at least once.  Only records with events are claimed and written.
    """

    prefix = "eventposition/"
    claimFor = 60.0

    def __init__(self, storage: IStorage, clock: IReactorTime, node: str) -> None:
        self._storage = storage
        self._clock = clock
        self._node = node

    async def start(self, names: list[str], current: int) -> dict[str, int]:
        def _start(txn: Any) -> dict[str, int]:
            positions = {}
            for name in names:
                stored = txn.get(self.prefix + name)
                if stored is None:
                    stored = {"serial": current}
                    txn.set(self.prefix + name, stored)
                positions[name] = min(stored["serial"], current)
            return positions

        _, positions = await self._storage.write(_start)
        return positions

    async def claim(self, name: str, serial: int) -> bool:
        now = self._clock.seconds()

        def _claim(txn: Any) -> bool:
            stored = txn.get(self.prefix + name) or {"serial": -1}
            if stored["serial"] >= serial:
                return False  # delivered by another node
            claim = stored.get("claim")
            if claim and claim["node"] != self._node and claim["until"] > now:
                raise Busy(claim["node"])
            txn.set(self.prefix + name, {**stored, "claim": {"node": self._node, "serial": serial,
                                                              "until": now + self.claimFor}})
            return True

        _, claimed = await self._storage.write(_claim)
        return claimed

    def moved(self, positions: dict[str, int], name: str, serial: int, hadEvents: bool) -> None:
        if not hadEvents:
            return

        def _moved(txn: Any) -> None:
            stored = txn.get(self.prefix + name) or {"serial": -1}
            if stored["serial"] < serial:
                txn.set(self.prefix + name, {"serial": serial})

        self._storage.write(_moved).addErrback(lambda f: log.failure("event position not saved", f))

    async def save(self, positions: dict[str, int]) -> None:
        pass  # written as they move


class EventSource:
    """
    The events of each changelog record, derived once for every subscriber
    (the last few are kept).
    """

    keep = 256

    def __init__(self, storage: IStorage) -> None:
        self._storage = storage
        self._cache: OrderedDict[int, list[Event]] = OrderedDict()

    async def eventsOf(self, record: ChangeRecord) -> list[Event]:
        cached = self._cache.get(record.serial)
        if cached is not None:
            return cached
        needed = keysToCompare(record.changes)
        before: dict[str, Any] = {}
        if needed and record.serial > 0:
            before = await self._storage.readAsOf(
                record.serial - 1, lambda view: {key: view.get(key) for key in needed})
        events = deriveEvents(record.serial, record.time, record.changes, before)
        self._cache[record.serial] = events
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return events


class _Stopped(Exception):
    pass


class _Follower:
    """One subscriber going through the changelog from its position."""

    def __init__(self, dispatcher: "EventDispatcher", subscriber: IEventSubscriber, position: int) -> None:
        self.dispatcher = dispatcher
        self.subscriber = subscriber
        self.position = position
        self.failures = 0
        self._running = False
        self._sleeping: Deferred[Any] | None = None
        self.idle: Deferred[Any] | None = None

    def wake(self) -> None:
        if self._running:
            return  # the running pass reads up to the current serial
        self._running = True
        self.idle = Deferred()
        ensureDeferred(self._run()).addErrback(
            lambda f: log.failure("events for {subscriber} stopped", f, subscriber=self.subscriber.name))

    def stop(self) -> None:
        if self._sleeping is not None:
            self._sleeping.cancel()

    async def _run(self) -> None:
        d = self.dispatcher
        delay = d.firstDelay
        try:
            while not d.stopping and self.position < d.storage.currentSerial():
                try:
                    records = await d.storage.changesSince(self.position, d.batch)
                    if not records:
                        break
                    for record in records:
                        events = await d.source.eventsOf(record)
                        if events and not await self._wanted(events):
                            events = []  # nothing to do: no claim, no position written
                        if events and await self._claim(record.serial):
                            for event in events:
                                await self._deliver(event)
                        self.position = record.serial
                        d.moved(self, bool(events))
                    delay = d.firstDelay
                except (_Stopped, CancelledError):
                    raise
                except HistoryPruned as e:
                    # Only when another node pruned what this one had not gone
                    # through (its own pruner waits for these positions).
                    log.warn("events for {subscriber} from serial {position} to {oldest} are no longer kept: skipped",
                             subscriber=self.subscriber.name, position=self.position, oldest=e.oldest)
                    self.position = e.oldest
                    d.moved(self, True)
                except Exception:
                    # Storage unreachable: the changelog is read again later.
                    log.failure("events for {subscriber} not read; again in {delay} s",
                                subscriber=self.subscriber.name, delay=delay)
                    await self._sleep(delay)
                    delay = min(delay * 2, d.maxDelay)
        except _Stopped:
            pass
        finally:
            self._running = False
            idle, self.idle = self.idle, None
            if idle is not None:
                idle.callback(None)

    async def _wanted(self, events: list[Event]) -> bool:
        """Whether the subscriber wants any of C{events} (its optional C{wants}; else all)."""
        wants = getattr(self.subscriber, "wants", None)
        return True if wants is None else bool(await maybeDeferred(wants, events))

    async def _claim(self, serial: int) -> bool:
        """Whether this node delivers the events of C{serial} (waiting while another node does)."""
        d = self.dispatcher
        while True:
            try:
                return await d.positionStore.claim(self.subscriber.name, serial)
            except Busy:
                await self._sleep(d.positionStore.claimFor / 2)

    async def _sleep(self, delay: float) -> None:
        if self.dispatcher.stopping:
            raise _Stopped()
        self._sleeping = deferLater(self.dispatcher.clock, delay, lambda: None)
        try:
            await self._sleeping
        except CancelledError:
            raise _Stopped()
        finally:
            self._sleeping = None

    async def _deliver(self, event: Event) -> None:
        d = self.dispatcher
        delay = d.firstDelay
        while True:
            if d.stopping:
                raise _Stopped()
            try:
                await maybeDeferred(self.subscriber.deliver, event)
                self.failures = 0
                return
            except Exception:
                self.failures += 1
                log.failure("subscriber {subscriber} failed on {event} at serial {serial}; again in {delay} s",
                            subscriber=self.subscriber.name, event=event.name, serial=event.serial, delay=delay)
            await self._sleep(delay)
            delay = min(delay * 2, d.maxDelay)


class EventDispatcher(Service):
    """
    Delivers events to subscribers from their positions on, after every
    commit.  Starts once C{ready} fires (storage may be written: the
    startup cleanup is over).
    """

    batch = 100
    firstDelay = 1.0
    maxDelay = 300.0
    pollInterval = 30.0
    stopTimeout = 10.0

    def __init__(self, storage: IStorage, clock: IReactorTime, subscribers: Iterable[IEventSubscriber],
                 positions: "PositionFile | SharedPositions", ready: Callable[[], Deferred[Any]] | None = None) -> None:
        self.storage = storage
        self.clock = clock
        self.source = EventSource(storage)
        self.stopping = False
        self._subscribers = list(subscribers)
        self.positionStore = positions
        self._ready = ready
        self._unsubscribe: Callable[[], Any] | None = None
        self._poller: Any = None
        self.followers: dict[str, _Follower] = {}

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        ready = self._ready() if self._ready is not None else None
        d = ensureDeferred(self._start(ready))
        d.addErrback(lambda f: log.failure("event delivery did not start", f))

    async def _start(self, ready: Deferred[Any] | None) -> None:
        if ready is not None:
            await ready
        if self.stopping or not self.running:
            return
        names = [subscriber.name for subscriber in self._subscribers]
        positions = await self.positionStore.start(names, self.storage.currentSerial())
        if self.stopping:
            return
        for subscriber in self._subscribers:
            self.followers[subscriber.name] = _Follower(self, subscriber, positions[subscriber.name])
        self._unsubscribe = self.storage.subscribe(lambda record: self.wakeAll())
        self.wakeAll()
        self._poll()

    def _poll(self) -> None:
        """Look again now and then: nodes sharing storage may not hear of each other's commits."""
        self.wakeAll()
        if not self.stopping:
            self._poller = self.clock.callLater(self.pollInterval, self._poll)

    def wakeAll(self) -> None:
        if not self.stopping:
            for follower in self.followers.values():
                follower.wake()

    def positions(self) -> dict[str, int]:
        return {name: f.position for name, f in self.followers.items()}

    def neededSerial(self) -> int | None:
        """
        The oldest serial the subscribers still read from (history at and
        after it must be kept): -1, all of it, until they have started.
        """
        if self._subscribers and not self.followers:
            return -1
        return min(self.positions().values(), default=None)

    def moved(self, follower: _Follower, hadEvents: bool) -> None:
        self.positionStore.moved(self.positions(), follower.subscriber.name, follower.position, hadEvents)

    async def _stop(self) -> None:
        self.stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for follower in self.followers.values():
            follower.stop()
        if self._poller is not None and self._poller.active():
            self._poller.cancel()
        for follower in list(self.followers.values()):
            if follower.idle is not None:
                # A subscriber that hangs does not hold up the stop for long.
                waiting: Deferred[Any] = Deferred()
                follower.idle.chainDeferred(waiting)
                try:
                    await waiting.addTimeout(self.stopTimeout, self.clock)
                except TimeoutError:
                    log.warn("subscriber {subscriber} still busy at the stop", subscriber=follower.subscriber.name)
        await self.positionStore.save(self.positions())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())
