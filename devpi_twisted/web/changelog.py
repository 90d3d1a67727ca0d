"""
The replication feed: what a replica reads from its primary.

  - C{GET /+changelog/<serial>-}: the changes from C{serial} on as JSON
    lines, one record a line (C{{"serial", "time", "changes"}}), streamed and
    bounded (L{ChangelogFeed.maxRecords} records or L{ChangelogFeed.maxBytes}
    bytes an answer).  When C{serial} is not committed yet the answer waits
    for it up to C{?timeout} seconds (long poll, at most 30) and is then
    empty.  C{X-Devpi-Serial} is the serial when the stream started.
    When the changes after C{serial - 1} are no longer kept (history is
    pruned, L{devpi_twisted.storage.collector.HistoryPruner}) the answer
    is 410 with a JSON message, and the replica starts over from:
  - C{GET /+snapshot}: the whole current state as JSON lines: first
    C{{"serial", "time", "keys"}}, then C{{"key", "value"}} for each key.
  - C{GET /+blob/<sha256>}: a stored file by its content address.

Both need a replication credential (C{Authorization: Bearer}, see
L{devpi_twisted.services.auth.makeReplicationToken}), made with the secret both
servers are given; anything else is 403.  Password hashes never leave the
server: user configs carry only the keyed fingerprint login tokens need.
"""

import json
import re
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from devpi_twisted.services.auth import checkReplicationToken, replicationKey
from devpi_twisted.errors import Conflict, Forbidden, Gone, NotFound
from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.storage import ChangeRecord, HistoryPruned
from devpi_twisted.services.users import replicaChanges, replicaSnapshot
from devpi_twisted.web.context import clientAddress
from devpi_twisted.web.files import FileResponse
from devpi_twisted.web.headers import setSerial

JSONL = b"application/x-ndjson"
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def _pruned(start: int, oldest: int) -> Gone:
    return Gone(f"the changes from serial {start} on are no longer kept here (the oldest kept serial "
                f"is {oldest}): a replica this far behind starts over from /+snapshot")


def recordLine(record: ChangeRecord, secret: bytes) -> bytes:
    """One record of the feed, password hashes replaced by fingerprints."""
    changes = replicaChanges(secret, record.changes)
    line = json.dumps({"serial": record.serial, "time": record.time, "changes": changes},
                      separators=(",", ":"))
    return line.encode("utf-8") + b"\n"


class ChangelogFeed:
    """
    The primary's side of replication.

    @param secret: the server secret (tokens and replication credentials
        are derived from it).
    @param clock: for credential expiry and the long-poll timeout.
    """

    maxRecords = 1000
    maxBytes = 8 * 1024 * 1024
    batch = 100
    maxTimeout = 30.0
    defaultTimeout = 25.0

    def __init__(self, storage: IStorage, blobs: IBlobStore, secret: bytes, clock: IReactorTime) -> None:
        self._storage = storage
        self._blobs = blobs
        self._secret = secret
        self._key = replicationKey(secret)
        self._clock = clock
        self._waiting: set[Deferred[None]] = set()
        self._stopping = False
        self.pollers: dict[str, dict[str, Any]] = {}

    def stopWaiting(self) -> None:
        """
        The server is stopping: answer the long polls now (so they do not
        hold up the shutdown), and do not start new ones.
        """
        self._stopping = True
        waiting, self._waiting = self._waiting, set()
        for arrived in waiting:
            if not arrived.called:
                arrived.callback(None)

    def _authorize(self, request: IRequest) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not checkReplicationToken(
            self._key, token.decode("ascii", "replace"), self._clock.seconds()
        ):
            raise Forbidden("replication needs a valid replication credential (the same --secretfile on both sides)")

    def _timeout(self, request: IRequest) -> float:
        values = request.args.get(b"timeout")
        if not values:
            return self.defaultTimeout
        try:
            return max(0.0, min(self.maxTimeout, float(values[0])))
        except ValueError:
            return self.defaultTimeout

    async def _waitForCommit(self, serial: int, timeout: float) -> None:
        """Return when C{serial} is committed, or after C{timeout} seconds."""
        arrived: Deferred[None] = Deferred()

        def heard(record: ChangeRecord) -> None:
            if record.serial >= serial and not arrived.called:
                arrived.callback(None)

        def expired() -> None:
            if not arrived.called:
                arrived.callback(None)

        if self._stopping:
            return
        unsubscribe = self._storage.subscribe(heard)
        timer = self._clock.callLater(timeout, expired)
        self._waiting.add(arrived)
        try:
            if self._storage.currentSerial() < serial:
                await arrived
        finally:
            self._waiting.discard(arrived)
            unsubscribe()
            if timer.active():
                timer.cancel()

    def _poller(self, request: IRequest, since: int) -> dict[str, Any] | None:
        uuid = request.getHeader(b"x-devpi-replica-uuid")
        if not uuid:
            return None
        name = uuid.decode("ascii", "replace")[:64]
        if name not in self.pollers and len(self.pollers) >= 1000:
            self.pollers.clear()
        poller = self.pollers.setdefault(name, {})
        outside = request.getHeader(b"x-devpi-replica-outside-url")
        poller.update({
            "remote-ip": clientAddress(request),
            "serial": since - 1,
            "in-request": True,
            "last-request": self._clock.seconds(),
            "outside-url": outside.decode("utf-8", "replace") if outside else None,
        })
        return poller

    async def changes(self, request: IRequest, start: int) -> bytes:
        """Stream the changes from C{start} on (see the module docstring)."""
        self._authorize(request)
        current = self._storage.currentSerial()
        if start > current + 1:
            raise Conflict(
                f"serial {start} is ahead of this server (at serial {current}): "
                "the replica does not belong to this primary"
            )
        oldest = await self._storage.oldestKeptSerial()
        if start - 1 < oldest:
            raise _pruned(start, oldest)
        poller = self._poller(request, start)
        try:
            timeout = self._timeout(request)
            if start == current + 1 and timeout > 0:
                await self._waitForCommit(start, timeout)
            setSerial(request, self._storage.currentSerial())
            request.setHeader(b"Content-Type", JSONL)
            request.setHeader(b"Cache-Control", b"no-store")
            last, sent, size = start - 1, 0, 0
            while sent < self.maxRecords and size < self.maxBytes:
                try:
                    records = await self._storage.changesSince(last, min(self.batch, self.maxRecords - sent))
                except HistoryPruned as e:
                    # Pruned meanwhile: said at once, or the replica hears it on its next request.
                    if sent:
                        break
                    raise _pruned(start, e.oldest)
                if not records:
                    break
                for record in records:
                    line = recordLine(record, self._secret)
                    request.write(line)
                    last, sent, size = record.serial, sent + 1, size + len(line)
                    if size >= self.maxBytes:
                        break
            return b""
        finally:
            if poller is not None:
                poller["in-request"] = False

    async def snapshot(self, request: IRequest) -> bytes:
        """The whole current state, for a replica that starts over (see the module docstring)."""
        self._authorize(request)
        serial, when, state = await replicaSnapshot(self._storage, self._secret)
        setSerial(request, serial)
        request.setHeader(b"Content-Type", JSONL)
        request.setHeader(b"Cache-Control", b"no-store")
        head = {"serial": serial, "time": when if when is not None else self._clock.seconds(), "keys": len(state)}
        request.write(json.dumps(head, separators=(",", ":")).encode("utf-8") + b"\n")
        for key, value in state.items():
            request.write(json.dumps({"key": key, "value": value}, separators=(",", ":")).encode("utf-8") + b"\n")
        return b""

    async def blob(self, request: IRequest, sha256: str) -> Any:
        """A stored file by its sha256, for replicas."""
        self._authorize(request)
        if not _DIGEST.match(sha256):
            raise NotFound("not a sha256 digest")
        file = await self._blobs.open(sha256)
        if file is None:
            raise NotFound(f"no blob {sha256}")
        return FileResponse(
            file=file, size=file.size, filename=sha256, etag=b'"' + sha256.encode("ascii") + b'"',
            lastModified=None, contentType=b"application/octet-stream",
        )

    def statusFields(self) -> dict[str, Any]:
        """What C{/+status} shows of the replicas polling this server."""
        return {"polling_replicas": {name: dict(info) for name, info in sorted(self.pollers.items())}}


class FeedStopper(Service):
    """Stops the feed's long polls first when the server stops (see L{ChangelogFeed.stopWaiting})."""

    def __init__(self, feed: ChangelogFeed) -> None:
        self._feed = feed

    def stopService(self) -> None:
        super().stopService()
        self._feed.stopWaiting()
