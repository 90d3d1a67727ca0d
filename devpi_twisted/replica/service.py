"""
The replica's follower: a service that keeps the local state a copy of the
primary's.

It asks the primary for the changes after its own serial (a long poll that
answers at once when there are some), fetches and verifies the files each
change refers to, and applies each change as one transaction at the
primary's serial.  After any interruption (the primary restarting, a cut
stream, this process killed) it resumes from its own serial.  When the
primary no longer keeps the changes after that serial (its history is
pruned: answered 410), the replica starts over from a snapshot of the
primary's whole state, fetching and verifying its files as for changes,
and follows on from the snapshot's serial.  The sync
machine (L{devpi_twisted.replica.sync}) says how far it is and owns the
back-off timer.
"""

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.storage import ChangeRecord, blobRef
from devpi_twisted.replica.client import ChangelogAnswer, HistoryGone, PrimaryClient, ReplicationError
from devpi_twisted.replica.files import BlobFetcher
from devpi_twisted.replica.sync import STATE_CODES, ReplicaSync, SyncCore, makeReplicaSync

log = Logger()


def waitForSerial(storage: IStorage, clock: IReactorTime, serial: int, timeout: float) -> Deferred[bool]:
    """
    Fire with C{True} once the local serial reaches C{serial}, or with
    C{False} after C{timeout} seconds.
    """
    if storage.currentSerial() >= serial:
        return succeed(True)
    reached: Deferred[bool] = Deferred()

    def heard(record: ChangeRecord) -> None:
        if record.serial >= serial and not reached.called:
            reached.callback(True)

    def expired() -> None:
        if not reached.called:
            reached.callback(False)

    unsubscribe = storage.subscribe(heard)
    timer = clock.callLater(timeout, expired)

    def cleanup(result: Any) -> Any:
        unsubscribe()
        if timer.active():
            timer.cancel()
        return result

    return reached.addBoth(cleanup)


class ReplicaService(Service):
    """
    Follows the primary while running.

    @param client: requests to the primary, with the replication credential.
    @param primaryUUID: the uuid of the primary this replica follows, when
        known from an earlier run; a primary with another uuid is refused.
    @param rememberPrimaryUUID: records the primary's uuid on first contact.
    @param ready: returns a Deferred that fires when storage may be written
        (after the startup cleanup).
    """

    name = "replica"

    def __init__(self, storage: IStorage, blobs: IBlobStore, client: PrimaryClient, clock: IReactorTime, *,
                 pollTimeout: float = 25.0, primaryUUID: str | None = None,
                 rememberPrimaryUUID: Callable[[str], Any] | None = None,
                 ready: Callable[[], Deferred[Any]] | None = None,
                 firstDelay: float = 1.0, maxDelay: float = 30.0) -> None:
        self._storage = storage
        self._client = client
        self._clock = clock
        self._pollTimeout = pollTimeout
        self._primaryUUID = primaryUUID
        self._remember = rememberPrimaryUUID
        self._ready = ready
        self._primarySerial = -1
        self._loop: Deferred[None] | None = None
        self.fetcher = BlobFetcher(client, blobs, clock)
        self._syncCore = SyncCore(
            client.primaryURL, clock, storage.currentSerial, storage.lastCommitTime,
            firstDelay=firstDelay, maxDelay=maxDelay,
        )
        self.sync: ReplicaSync = makeReplicaSync(self._syncCore)
        self.feed: Any = None  # this server's own feed, for polling_replicas
        self.applied = 0
        self.resyncs = 0

    @property
    def primaryURL(self) -> str:
        return self._client.primaryURL

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._loopFailed)

    def _loopFailed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("replica: the follower stopped unexpectedly", failure=failure)

    def stopService(self) -> Any:
        super().stopService()
        self.sync.stop()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        return None

    async def _run(self) -> None:
        if self._ready is not None:
            await self._ready()
        log.info("replica: following {url} from serial {serial}", url=self.primaryURL,
                 serial=self._storage.currentSerial())
        while True:
            await self.sync.nextPoll()
            try:
                await self.pollOnce()
            except CancelledError:
                raise
            except Exception as e:
                self.sync.failed(_describeError(e))

    async def pollOnce(self) -> int:
        """One request for changes, applied as they arrive; how many were applied."""
        try:
            return await self._client.followChanges(
                self._storage.currentSerial(), self._pollTimeout, self._answered,
                lambda record: Deferred.fromCoroutine(self._apply(record)),
            )
        except HistoryGone as e:
            await self.resynchronise(str(e))
            return 1

    async def resynchronise(self, why: str) -> None:
        """
        Start over from the primary's snapshot: its files are fetched and
        verified first, then the whole state is replaced in one transaction
        at the primary's serial (a crash before that leaves the old state,
        and the next poll starts over again).
        """
        local = self._storage.currentSerial()
        log.warn("replica: {why}; copying the primary's whole state (local serial {local})", why=why, local=local)
        snapshot = await self._client.snapshot()
        self._checkPrimary(snapshot.uuid)
        if snapshot.serial <= local:
            raise ReplicationError(f"the primary's snapshot is at serial {snapshot.serial}, "
                                   f"not after this replica's {local}")
        self._primarySerial = max(self._primarySerial, snapshot.serial)
        self.sync.progress(self._primarySerial, snapshot.time)
        for digest in sorted({d for d in map(blobRef, snapshot.state.values()) if d is not None}):
            await self.fetcher.ensure(digest)
        await self._storage.applySnapshot(snapshot.serial, snapshot.time, snapshot.state)
        self.resyncs += 1
        log.info("replica: started over from the primary's snapshot at serial {serial} ({keys} keys)",
                 serial=snapshot.serial, keys=len(snapshot.state))
        self.sync.progress(self._primarySerial, None)

    def _answered(self, answer: ChangelogAnswer) -> None:
        self._checkPrimary(answer.uuid)
        self._primarySerial = answer.serial
        self.sync.progress(answer.serial, None)

    def _checkPrimary(self, uuid: str | None) -> None:
        if not uuid:
            raise ReplicationError(f"{self.primaryURL} did not say who it is (no X-Devpi-Uuid)")
        if self._primaryUUID is None:
            self._primaryUUID = uuid
            log.info("replica: primary {url} is server {uuid}", url=self.primaryURL, uuid=uuid)
            if self._remember is not None:
                Deferred.fromCoroutine(_call(self._remember, uuid)).addErrback(
                    lambda f: log.failure("replica: recording the primary's uuid failed", failure=f))
        elif uuid != self._primaryUUID:
            raise ReplicationError(
                f"{self.primaryURL} is server {uuid}, but this replica follows server {self._primaryUUID}; "
                "a replica of another primary needs a new, empty server directory"
            )

    async def _apply(self, record: ChangeRecord) -> None:
        local = self._storage.currentSerial()
        if record.serial <= local:
            return
        if record.serial != local + 1:
            raise ReplicationError(f"the primary sent change {record.serial}, but the next one here is {local + 1}")
        primarySerial = max(self._primarySerial, record.serial)
        self.sync.progress(primarySerial, record.time)
        for value in record.changes.values():
            digest = blobRef(value)
            if digest is not None:
                await self.fetcher.ensure(digest)
        await self._storage.applyChange(record)
        self.applied += 1
        self._primarySerial = primarySerial
        self.sync.progress(primarySerial, None)

    def waitForSerial(self, serial: int, timeout: float) -> Deferred[bool]:
        """Fire with whether the local serial reached C{serial} within C{timeout} seconds."""
        return waitForSerial(self._storage, self._clock, serial, timeout)

    def isReachable(self) -> bool:
        return self.sync.isReachable()

    def onReachabilityChange(self, listener: Callable[[bool], None]) -> None:
        """Call C{listener(reachable)} whenever the primary becomes reachable or unreachable."""
        self._syncCore.reachabilityListeners.append(listener)

    def primaryAnswered(self) -> None:
        """A forwarded request reached the primary: stop waiting to retry."""
        self.sync.primaryAnswered()

    def statusFields(self) -> dict[str, Any]:
        """What C{/+status} shows on a replica."""
        figures = self.sync.describe()
        fields: dict[str, Any] = {
            "role": "REPLICA",
            "replication": figures,
            "primary-url": self.primaryURL,
            "primary-uuid": self._primaryUUID,
            "primary-serial": figures["primary-serial"],
            "primary-contacted-at": figures["last-contact"],
            "replica-in-sync-at": figures["in-sync-at"],
            "metrics": [
                ["devpi_replica_state", "gauge", STATE_CODES.get(figures["state"], -1)],
                ["devpi_replica_lag_serials", "gauge", figures["lag-serials"]],
                ["devpi_replica_lag_seconds", "gauge", figures["lag-seconds"]],
                ["devpi_replica_primary_serial", "gauge", figures["primary-serial"]],
                ["devpi_replica_changes_applied", "counter", self.applied],
                ["devpi_replica_resyncs", "counter", self.resyncs],
                ["devpi_replica_files_fetched", "counter", self.fetcher.fetched],
                ["devpi_replica_files_missing", "counter", self.fetcher.missing],
            ],
        }
        if self.feed is not None:
            fields.update(self.feed.statusFields())
        return fields


async def _call(function: Callable[[str], Any], argument: str) -> None:
    result = function(argument)
    if isinstance(result, Deferred):
        await result


def _describeError(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if not isinstance(error, ReplicationError):
        text = f"{type(error).__name__}: {text}"
    return text[:500]
