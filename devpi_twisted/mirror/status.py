"""
Whether a mirror's upstream is worth asking: an Automat state machine.

  - online: requests go upstream; after C{threshold} consecutive failures
    the mirror goes offline;
  - offline: requests are answered from the cache at once, nothing is sent
    upstream; a timer (backing off from C{firstDelay} to C{maxDelay}) moves
    the mirror to probing;
  - probing: requests may go upstream again; the first success brings the
    mirror online, a failure sends it back offline with a longer delay;
  - stopped: the service stopped; no timers are left.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class MirrorStatus(Protocol):
    """The inputs of the machine; call these, never read its state."""

    def succeeded(self) -> None:
        "An upstream request worked."

    def failed(self, reason: str) -> None:
        "An upstream request failed (connection, timeout, 5xx, garbage)."

    def mayAskUpstream(self) -> bool:
        "Whether a request should contact upstream now."

    def describe(self) -> dict[str, Any]:
        "The state and its figures, for /+status and metrics."

    def stop(self) -> None:
        "The service stops: cancel timers."

    def _tooManyFailures(self) -> None:
        "Internal: the failure threshold was reached."

    def _probeDue(self) -> None:
        "Internal: the offline delay is over."


@dataclass
class StatusCore:
    """What the machine needs and what it records."""

    name: str
    clock: IReactorTime
    threshold: int = 3
    firstDelay: float = 5.0
    maxDelay: float = 300.0
    onTransition: Callable[[str, str], None] | None = None
    failures: int = 0
    delay: float = 0.0
    lastSuccess: float | None = None
    lastFailure: float | None = None
    lastError: str | None = None
    transitions: list[str] = field(default_factory=list)

    def record(self, old: str, new: str) -> None:
        self.transitions.append(new)
        if new == "offline":
            log.warn(
                "mirror {mirror} is now {state} (was {old}; last error: {error})",
                mirror=self.name, state=new, old=old, error=self.lastError,
            )
        else:
            log.info("mirror {mirror} is now {state} (was {old})", mirror=self.name, state=new, old=old)
        if self.onTransition is not None:
            self.onTransition(old, new)

    def figures(self, state: str) -> dict[str, Any]:
        return {
            "state": state,
            "consecutive-failures": self.failures,
            "last-success": self.lastSuccess,
            "last-failure": self.lastFailure,
            "last-error": self.lastError,
            "retry-delay": self.delay if state in ("offline", "probing") else None,
        }


@dataclass
class _Offline:
    probe: IDelayedCall


builder = TypeMachineBuilder(MirrorStatus, StatusCore)
online = builder.state("online")


def _scheduleProbe(machine: MirrorStatus, core: StatusCore, *inputArgs: Any) -> _Offline:
    core.delay = min(core.maxDelay, core.delay * 2) if core.delay else core.firstDelay
    return _Offline(core.clock.callLater(core.delay, machine._probeDue))


offline = builder.state("offline", _scheduleProbe)
probing = builder.state("probing")
stopped = builder.state("stopped")


def _success(core: StatusCore) -> None:
    core.failures = 0
    core.lastSuccess = core.clock.seconds()


def _failure(core: StatusCore, reason: str) -> None:
    core.failures += 1
    core.lastFailure = core.clock.seconds()
    core.lastError = reason


# online

@online.upon(MirrorStatus.succeeded).loop()
def _onlineSucceeded(machine: MirrorStatus, core: StatusCore) -> None:
    _success(core)


@online.upon(MirrorStatus.failed).loop()
def _onlineFailed(machine: MirrorStatus, core: StatusCore, reason: str) -> None:
    _failure(core, reason)
    if core.failures >= core.threshold:
        machine._tooManyFailures()


@online.upon(MirrorStatus._tooManyFailures).to(offline)
def _goOffline(machine: MirrorStatus, core: StatusCore) -> None:
    core.record("online", "offline")


online.upon(MirrorStatus.mayAskUpstream).loop().returns(True)


@online.upon(MirrorStatus.describe).loop()
def _describeOnline(machine: MirrorStatus, core: StatusCore) -> dict[str, Any]:
    return core.figures("online")


@online.upon(MirrorStatus.stop).to(stopped)
def _stopOnline(machine: MirrorStatus, core: StatusCore) -> None:
    pass


# offline

@offline.upon(MirrorStatus.succeeded).to(online)
def _offlineSucceeded(machine: MirrorStatus, core: StatusCore, data: _Offline) -> None:
    # A request that started before the mirror went offline came back fine.
    data.probe.cancel()
    _success(core)
    core.delay = 0.0
    core.record("offline", "online")


@offline.upon(MirrorStatus.failed).loop()
def _offlineFailed(machine: MirrorStatus, core: StatusCore, data: _Offline, reason: str) -> None:
    _failure(core, reason)


offline.upon(MirrorStatus.mayAskUpstream).loop().returns(False)


@offline.upon(MirrorStatus.describe).loop()
def _describeOffline(machine: MirrorStatus, core: StatusCore, data: _Offline) -> dict[str, Any]:
    return core.figures("offline")


@offline.upon(MirrorStatus._probeDue).to(probing)
def _probe(machine: MirrorStatus, core: StatusCore, data: _Offline) -> None:
    core.record("offline", "probing")


@offline.upon(MirrorStatus.stop).to(stopped)
def _stopOffline(machine: MirrorStatus, core: StatusCore, data: _Offline) -> None:
    data.probe.cancel()


@offline.upon(MirrorStatus._tooManyFailures).loop()
def _alreadyOffline(machine: MirrorStatus, core: StatusCore, data: _Offline) -> None:
    pass


# probing

@probing.upon(MirrorStatus.succeeded).to(online)
def _probeSucceeded(machine: MirrorStatus, core: StatusCore) -> None:
    _success(core)
    core.delay = 0.0
    core.record("probing", "online")


@probing.upon(MirrorStatus.failed).to(offline)
def _probeFailed(machine: MirrorStatus, core: StatusCore, reason: str) -> None:
    _failure(core, reason)
    core.record("probing", "offline")


probing.upon(MirrorStatus.mayAskUpstream).loop().returns(True)


@probing.upon(MirrorStatus.describe).loop()
def _describeProbing(machine: MirrorStatus, core: StatusCore) -> dict[str, Any]:
    return core.figures("probing")


@probing.upon(MirrorStatus.stop).to(stopped)
def _stopProbing(machine: MirrorStatus, core: StatusCore) -> None:
    pass


# stopped: answers from the cache only, and forgets further news

stopped.upon(MirrorStatus.succeeded).loop().returns(None)


@stopped.upon(MirrorStatus.failed).loop()
def _stoppedFailed(machine: MirrorStatus, core: StatusCore, reason: str) -> None:
    pass


stopped.upon(MirrorStatus.mayAskUpstream).loop().returns(False)
stopped.upon(MirrorStatus.stop).loop().returns(None)


@stopped.upon(MirrorStatus.describe).loop()
def _describeStopped(machine: MirrorStatus, core: StatusCore) -> dict[str, Any]:
    return core.figures("stopped")


makeMirrorStatus = builder.build()
"""C{makeMirrorStatus(StatusCore(name, clock))} gives a new machine, online."""
