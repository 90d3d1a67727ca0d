"""
How far a replica is with its primary: an Automat state machine.

  - initial: since the start, the replica has not caught up with the
    primary yet (an empty replica copies everything here);
  - following: the replica has every change the primary last told of and
    waits (long poll) for the next one;
  - behind: it had caught up, and the primary has changes it has not
    applied yet;
  - unreachable: asking the primary (or applying what it sent) failed; a
    timer, backing off from C{firstDelay} to C{maxDelay}, allows the next
    try (then "probing", described as unreachable, until it answers or
    fails again);
  - stopped: the service stopped; no timers are left.

The follower loop (L{devpi_twisted.replica.service}) asks L{nextPoll}
before each request to the primary and reports with L{progress} and
L{failed}; reads such as L{describe} and L{isReachable} never change the state.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class ReplicaSync(Protocol):
    """The inputs of the machine; call these, never read its state."""

    def progress(self, primarySerial: int, pendingTime: float | None) -> None:
        """
        The primary answered: it is at C{primarySerial}; C{pendingTime} is
        the primary's commit time of the first change not applied here yet,
        when known.  Called on each answer and around each applied change.
        """

    def failed(self, reason: str) -> None:
        "Asking the primary, or applying its changes, failed."

    def nextPoll(self) -> "Deferred[None]":
        "Fires when the next request to the primary may be sent."

    def primaryAnswered(self) -> None:
        "Another request (a forwarded write) reached the primary: if waiting to retry, retry now."

    def isReachable(self) -> bool:
        "Whether the primary answered last time (worth forwarding reads to)."

    def describe(self) -> dict[str, Any]:
        "The state and its figures, for /+status and metrics."

    def stop(self) -> None:
        "The service stops: cancel timers and waiting polls."

    def _caughtUp(self) -> None:
        "Internal: the replica has every change the primary told of."

    def _lagging(self) -> None:
        "Internal: the primary has changes the replica lacks (after a first catch-up)."

    def _notYetSynced(self) -> None:
        "Internal: the primary has changes the replica lacks, and it never caught up."

    def _retryDue(self) -> None:
        "Internal: the back-off delay is over."


STATE_CODES = {"initial": 0, "following": 1, "behind": 2, "unreachable": 3, "probing": 3, "stopped": 4}
"""The state as a number, for metrics."""


# the states in which the primary answers (probing: not known yet)
_REACHABLE = frozenset({"initial", "following", "behind"})


@dataclass
class SyncCore:
    """What the machine needs and what it records."""

    primaryURL: str
    clock: IReactorTime
    localSerial: Callable[[], int]
    lastCommitTime: Callable[[], float | None] = lambda: None
    firstDelay: float = 1.0
    maxDelay: float = 60.0
    startedAt: float | None = None
    primarySerial: int | None = None
    pendingTime: float | None = None
    lastContact: float | None = None
    lastError: str | None = None
    failures: int = 0
    delay: float = 0.0
    syncedOnce: bool = False
    inSyncAt: float | None = None
    # told True or False when the primary becomes reachable or unreachable
    reachabilityListeners: list[Callable[[bool], None]] = field(default_factory=list)
    transitions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.startedAt is None:
            self.startedAt = self.clock.seconds()

    def record(self, old: str, new: str) -> None:
        self.transitions.append(new)
        reachable = new in _REACHABLE
        if reachable != (old in _REACHABLE):
            for listener in self.reachabilityListeners:
                listener(reachable)
        if new == "unreachable":
            log.warn("replica: primary {url} is unreachable (was {old}): {error}; retrying in {delay}s",
                     url=self.primaryURL, old=old, error=self.lastError, delay=self.delay)
        elif {old, new} != {"following", "behind"}:  # that happens with every change: not worth a line
            log.info("replica: {state} primary {url} (was {old}; local serial {local}, primary serial {primary})",
                     state=new, url=self.primaryURL, old=old, local=self.localSerial(),
                     primary=self.primarySerial)

    def contact(self, primarySerial: int, pendingTime: float | None) -> None:
        self.primarySerial = primarySerial
        self.pendingTime = pendingTime if pendingTime is not None else self.pendingTime
        self.lastContact = self.clock.seconds()
        self.failures = 0
        self.delay = 0.0

    def caughtUp(self) -> bool:
        return self.primarySerial is not None and self.localSerial() >= self.primarySerial

    def judge(self, machine: ReplicaSync) -> None:
        """Move to the state the figures call for."""
        if self.caughtUp():
            self.pendingTime = None
            self.inSyncAt = self.clock.seconds()
            machine._caughtUp()
        elif self.syncedOnce:
            machine._lagging()
        else:
            machine._notYetSynced()

    def figures(self, state: str) -> dict[str, Any]:
        now = self.clock.seconds()
        local = self.localSerial()
        lagSerials = None if self.primarySerial is None else max(0, self.primarySerial - local)
        lagSeconds: float | None
        if lagSerials is None:
            lagSeconds = None
        elif lagSerials == 0:
            lagSeconds = 0.0
        else:
            since = self.pendingTime or self.lastCommitTime() or self.startedAt or now
            lagSeconds = max(0.0, now - since)
        return {
            "state": state,
            "primary-url": self.primaryURL,
            "primary-serial": self.primarySerial,
            "local-serial": local,
            "lag-serials": lagSerials,
            "lag-seconds": lagSeconds,
            "last-contact": self.lastContact,
            "in-sync-at": self.inSyncAt,
            "started-at": self.startedAt,
            "consecutive-failures": self.failures,
            "last-error": self.lastError,
            "retry-delay": self.delay if state in ("unreachable", "probing") else None,
        }


@dataclass
class _Waiting:
    """The unreachable state's data: the retry timer and the polls held back."""

    timer: IDelayedCall
    waiters: list[Deferred[None]] = field(default_factory=list)


builder = TypeMachineBuilder(ReplicaSync, SyncCore)
initial = builder.state("initial")
following = builder.state("following")
behind = builder.state("behind")


def _scheduleRetry(machine: ReplicaSync, core: SyncCore, *inputArgs: Any) -> _Waiting:
    core.delay = min(core.maxDelay, core.delay * 2) if core.delay else core.firstDelay
    return _Waiting(core.clock.callLater(core.delay, machine._retryDue))


unreachable = builder.state("unreachable", _scheduleRetry)
probing = builder.state("probing")
stopped = builder.state("stopped")


def _failure(core: SyncCore, reason: str) -> None:
    core.failures += 1
    core.lastError = reason


# initial, following, behind, probing: the primary may be asked

for _state, _name in ((initial, "initial"), (following, "following"), (behind, "behind"), (probing, "probing")):

    @_state.upon(ReplicaSync.progress).loop()
    def _progress(machine: ReplicaSync, core: SyncCore, primarySerial: int, pendingTime: float | None) -> None:
        core.contact(primarySerial, pendingTime)
        core.judge(machine)

    @_state.upon(ReplicaSync.failed).to(unreachable)
    def _fail(machine: ReplicaSync, core: SyncCore, reason: str, _name: str = _name) -> None:
        # the data factory (the retry timer and its delay) has run already
        _failure(core, reason)
        core.record(_name, "unreachable")

    _state.upon(ReplicaSync.nextPoll).loop()(lambda machine, core: succeed(None))
    _state.upon(ReplicaSync.primaryAnswered).loop().returns(None)
    # probing is the moment of a retry: still unreachable as far as anyone can tell
    _state.upon(ReplicaSync.describe).loop()(
        lambda machine, core, _shown=("unreachable" if _name == "probing" else _name): core.figures(_shown))
    _state.upon(ReplicaSync.stop).to(stopped).returns(None)

for _state in (initial, following, behind):
    _state.upon(ReplicaSync.isReachable).loop().returns(True)
probing.upon(ReplicaSync.isReachable).loop().returns(False)


def _entered(old: str, new: str) -> Callable[[ReplicaSync, SyncCore], None]:
    def behaviour(machine: ReplicaSync, core: SyncCore) -> None:
        if new == "following":
            core.syncedOnce = True
        core.record(old, new)

    return behaviour


def _quiet(machine: ReplicaSync, core: SyncCore) -> None:
    pass


initial.upon(ReplicaSync._caughtUp).to(following)(_entered("initial", "following"))
initial.upon(ReplicaSync._notYetSynced).loop()(_quiet)
initial.upon(ReplicaSync._lagging).loop()(_quiet)

following.upon(ReplicaSync._caughtUp).loop()(_quiet)
following.upon(ReplicaSync._lagging).to(behind)(_entered("following", "behind"))
following.upon(ReplicaSync._notYetSynced).to(behind)(_entered("following", "behind"))

behind.upon(ReplicaSync._caughtUp).to(following)(_entered("behind", "following"))
behind.upon(ReplicaSync._lagging).loop()(_quiet)
behind.upon(ReplicaSync._notYetSynced).loop()(_quiet)

probing.upon(ReplicaSync._caughtUp).to(following)(_entered("probing", "following"))
probing.upon(ReplicaSync._lagging).to(behind)(_entered("probing", "behind"))
probing.upon(ReplicaSync._notYetSynced).to(initial)(_entered("probing", "initial"))


# unreachable: polls wait for the timer


@unreachable.upon(ReplicaSync.nextPoll).loop()
def _waitForRetry(machine: ReplicaSync, core: SyncCore, data: _Waiting) -> Deferred[None]:
    waiter: Deferred[None] = Deferred()
    data.waiters.append(waiter)
    return waiter


@unreachable.upon(ReplicaSync._retryDue).to(probing)
def _retry(machine: ReplicaSync, core: SyncCore, data: _Waiting) -> None:
    # The held-back polls go on once this transition is over: a poll that
    # finished at once would otherwise come back to the machine from inside
    # it, which Automat refuses.
    waiters, data.waiters = data.waiters, []
    for waiter in waiters:
        core.clock.callLater(0, waiter.callback, None)


@unreachable.upon(ReplicaSync.primaryAnswered).to(probing)
def _retryNow(machine: ReplicaSync, core: SyncCore, data: _Waiting) -> None:
    if data.timer.active():
        data.timer.cancel()
    _retry(machine, core, data)


@unreachable.upon(ReplicaSync.failed).loop()
def _failedAgain(machine: ReplicaSync, core: SyncCore, data: _Waiting, reason: str) -> None:
    _failure(core, reason)


@unreachable.upon(ReplicaSync.progress).loop()
def _lateProgress(machine: ReplicaSync, core: SyncCore, data: _Waiting, primarySerial: int,
                  pendingTime: float | None) -> None:
    # An answer that was under way when another request failed: note the
    # figures; the retry timer still decides when to ask again.
    core.primarySerial = max(primarySerial, core.primarySerial or -1)


unreachable.upon(ReplicaSync.isReachable).loop().returns(False)


@unreachable.upon(ReplicaSync.describe).loop()
def _describeUnreachable(machine: ReplicaSync, core: SyncCore, data: _Waiting) -> dict[str, Any]:
    return core.figures("unreachable")


@unreachable.upon(ReplicaSync.stop).to(stopped)
def _stopWaiting(machine: ReplicaSync, core: SyncCore, data: _Waiting) -> None:
    if data.timer.active():
        data.timer.cancel()
    waiters, data.waiters = data.waiters, []
    for waiter in waiters:
        waiter.errback(CancelledError("replication stopped"))


# probing: failures go back to waiting, with a longer delay
# (its progress, failed, nextPoll, describe and stop are set in the loop above)


# stopped: forgets news, refuses polls

stopped.upon(ReplicaSync.progress).loop()(lambda machine, core, primarySerial, pendingTime: None)
stopped.upon(ReplicaSync.failed).loop()(lambda machine, core, reason: None)
stopped.upon(ReplicaSync.nextPoll).loop()(lambda machine, core: fail(CancelledError("replication stopped")))
stopped.upon(ReplicaSync.isReachable).loop().returns(False)
stopped.upon(ReplicaSync.primaryAnswered).loop().returns(None)
stopped.upon(ReplicaSync.describe).loop()(lambda machine, core: core.figures("stopped"))
stopped.upon(ReplicaSync.stop).loop().returns(None)
for _input in (ReplicaSync._caughtUp, ReplicaSync._lagging, ReplicaSync._notYetSynced):
    stopped.upon(_input).loop().returns(None)

makeReplicaSync = builder.build()
"""C{makeReplicaSync(SyncCore(primaryURL, clock, storage.currentSerial))}: a new machine, initial."""
