# -*- test-case-name: tests.test_workers_option -*-
"""
C{--workers N}: one command, N serving processes on this machine.

The main process (C{twistd devpi --workers N}) opens and cleans up the server
directory as usual, then starts N-1 children: the same C{twistd devpi} as
C{--requests-only} workers (README "Workers").  Every process listens on the
same ports with C{SO_REUSEPORT} (C{tcp:PORT} becomes C{reuseport:PORT},
C{ssl:PORT:...} C{reuseport:PORT:...} with the same key and certificate
files, C{tls:DIR...} C{tls:DIR...:reuseport=yes}), so the kernel spreads the
connections among them; each process reads the TLS files itself.

The children get the main's parsed options through their environment
(C{DEVPI_TWISTED_<OPTION>}, which every option reads): nothing the user
wrote is lost or re-quoted, and a secret given in the environment (a
PostgreSQL DSN) does not show up in C{ps}.  They run in the foreground
without a pidfile and log Twisted's JSON events to their standard output;
L{WorkerPool} re-publishes each event in the main's log, its level kept, its
text prefixed with the worker's number (and in the main's C{--json-log},
with a C{devpi_worker} field; the children write none of their own).

A child that exits while the main runs is started again after a delay that
doubles (1 s up to 30 s; back to 1 s after it ran a while).  On stop, the
children get SIGTERM (they drain their own requests), then SIGKILL after a
bound.  A child whose main process disappears (SIGKILL) stops itself
(L{ParentWatch}).
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, IO

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, eventFromJSON, formatEvent, globalLogPublisher, jsonFileLogObserver
from twisted.python.failure import Failure

from devpi_twisted.app.endpoints import _parts

ENV_PREFIX = "DEVPI_TWISTED_"
# The main's pid, in its children's environment: a child whose parent is
# another one (the main died) stops itself.  No option reads it.
PARENT_VARIABLE = ENV_PREFIX + "WORKER_PARENT"
_BOOT = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
_MAX_LINE = 1024 * 1024

log = Logger()


_SHAREABLE = "tcp:PORT[:interface=ADDRESS], ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem or tls:DIRECTORY[:port=443]"
_SSL_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")


def _quote(value: str) -> str:
    """A value for an endpoint string, its separators escaped."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def reusePortDescription(description: str) -> str:
    """
    The C{--listen} C{description} as several processes can serve it, each
    binding the same port with C{SO_REUSEPORT}: C{tcp:}/C{tcp6:} becomes
    C{reuseport:} on the same port and interface, C{ssl:} C{reuseport:} with
    the same TLS files, C{tls:DIR} C{tls:DIR:reuseport=yes}.

    @raise ValueError: for a listener several processes cannot share
        (systemd, UNIX sockets, port 0, arguments it does not know), in one
        line for the user.
    """
    args, kwargs = _parts(description)
    kind = args[0].lower() if args else ""
    if kind not in ("tcp", "tcp6", "reuseport", "ssl", "tls", "tlsdir"):
        raise ValueError(
            f"--workers needs listeners on a TCP port ({_SHAREABLE}), not --listen {description!r}; "
            "or run one process per listener (README \"Workers\")"
        )
    if kind in ("tls", "tlsdir"):
        known, positional, port = {"port", "interface", "backlog", "reuseport"}, 2, kwargs.get("port", "443")
        syntax = "tls:DIRECTORY[:port=443][:interface=ADDRESS][:backlog=N]"
    else:
        known = {"port", "interface", "backlog"} | (set(_SSL_FILES) if kind in ("ssl", "reuseport") else set())
        positional = 1 if "port" in kwargs else 2
        port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        syntax = f"{'tcp' if kind == 'reuseport' else kind}:PORT[:interface=ADDRESS][:backlog=N]"
        if kind == "ssl":
            syntax += ":privateKey=KEY.pem:certKey=CERT.pem[:extraCertChain=CHAIN.pem]"
    if set(kwargs) - known or len(args) != positional or not port.isdigit() or int(port) == 0 \
            or kwargs.get("reuseport", "yes").lower() != "yes":
        raise ValueError(f"--workers needs a fixed port, given as {syntax}, not --listen {description!r}")
    rewritten = f"tls:{_quote(args[1])}:port={int(port)}" if kind in ("tls", "tlsdir") else f"reuseport:{int(port)}"
    interface = kwargs.get("interface", "::" if kind == "tcp6" else "")
    if interface:
        rewritten += ":interface=" + _quote(interface)
    if "backlog" in kwargs:
        rewritten += f":backlog={kwargs['backlog']}"
    if kind == "ssl":
        # ssl:'s default key file, written out: for reuseport: no key means no TLS.
        kwargs.setdefault("privateKey", "server.pem")
    for name in _SSL_FILES:
        if name in kwargs:
            rewritten += f":{name}={_quote(kwargs[name])}"
    if kind in ("tls", "tlsdir"):
        rewritten += ":reuseport=yes"
    return rewritten


def twistdCommand() -> list[str]:
    """The program and first arguments that run C{twistd} with this Python."""
    return [sys.executable, "-c", _BOOT]


def childCommand(options: Any, listen: list[str], environ: dict[str, str],
                 twistd: list[str] | None = None, parentPid: int | None = None) -> tuple[list[str], dict[str, str]]:
    """
    The command line and environment of a C{--requests-only} child of the
    main process whose parsed C{options} (a L{devpi_twisted.app.options.Options})
    are given; C{listen}: the (rewritten) descriptions to serve.
    """
    env = dict(environ)
    for long, *_ in options.optParameters:
        name = ENV_PREFIX + long.upper().replace("-", "_")
        value = options[long]
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    for long, *_ in options.optFlags:
        env[ENV_PREFIX + long.upper().replace("-", "_")] = "1" if options[long] else "0"
    env[ENV_PREFIX + "SERVERDIR"] = os.path.abspath(str(options["serverdir"]))
    env[ENV_PREFIX + "WORKERS"] = "1"
    env[ENV_PREFIX + "REQUESTS_ONLY"] = "1"
    env.pop(ENV_PREFIX + "LISTEN", None)  # the command line's --listen wins anyway
    # The main writes the children's events (relayed) to its --json-log: one writer, no duplicates.
    env.pop(ENV_PREFIX + "JSON_LOG", None)
    env[PARENT_VARIABLE] = str(os.getpid() if parentPid is None else parentPid)
    args = [*(twistd or twistdCommand()), "--nodaemon", "--pidfile=",
            f"--logger={__name__}.workerLogObserver", "devpi", "--requests-only", "--workers=1"]
    args += [f"--listen={description}" for description in listen]
    return args, env


def workerLogObserver() -> ILogObserver:
    """A child's log (twistd C{--logger}): Twisted's JSON events on standard output, for its main process."""
    out: IO[str] = sys.stdout
    return jsonFileLogObserver(out)


class _Relay(ProcessProtocol):
    """A child's output, line by line, to its L{WorkerPool}."""

    def __init__(self, pool: "WorkerPool", number: int) -> None:
        self._pool = pool
        self._number = number
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > _MAX_LINE:  # a runaway line is passed on in pieces
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self._pool._childOutput(self._number, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in sorted(self._buffers.items()):
            if rest:
                self._pool._childOutput(self._number, childFD, rest)
        self._buffers.clear()
        self._pool._childEnded(self._number, reason)


@dataclass
class _Child:
    number: int
    transport: Any = None
    pid: int | None = None
    startedAt: float = 0.0
    delay: float = 0.0
    restart: Any = None
    ended: list[Deferred[None]] = field(default_factory=list)


class WorkerPool(Service):
    """
    Keeps C{count - 1} child processes running while it runs.

    @param reactor: provides C{spawnProcess} and the clock (C{callLater},
        C{seconds}).
    @param command: the child's C{(args, environment)}; C{args[0]} is run.
    @param ready: when to start them: after the main's startup cleanup.
    @param stopTimeout: seconds the children get after SIGTERM before SIGKILL.
    @param observer: where the children's log events go.
    """

    log = Logger()

    def __init__(self, reactor: Any, count: int, command: Callable[[], tuple[list[str], dict[str, str]]],
                 ready: Callable[[], "Deferred[None]"], stopTimeout: float, path: str | None = None,
                 firstDelay: float = 1.0, maxDelay: float = 30.0, stableAfter: float = 30.0,
                 observer: Any = None) -> None:
        self._reactor = reactor
        self._command = command
        self._ready = ready
        self._stopTimeout = stopTimeout
        self._path = path
        self._firstDelay = firstDelay
        self._maxDelay = maxDelay
        self._stableAfter = stableAfter
        self._observer = observer if observer is not None else globalLogPublisher
        self.children = {number: _Child(number, delay=firstDelay) for number in range(1, count)}

    def startService(self) -> None:
        super().startService()
        d = self._ready()
        d.addCallback(lambda _: self._startAll())
        d.addErrback(lambda f: self.log.failure("starting the worker processes failed", failure=f))

    def _startAll(self) -> None:
        if not self.running:
            return
        self.log.info("starting {count} worker processes", count=len(self.children))
        for number in self.children:
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        child = self.children[number]
        child.restart = None
        if not self.running:
            return
        args, env = self._command()
        try:
            child.transport = self._reactor.spawnProcess(_Relay(self, number), args[0], args, env=env,
                                                         path=self._path)
        except Exception:
            self.log.failure("worker {worker}: could not start", worker=number)
            self._scheduleRestart(child)
            return
        child.pid = child.transport.pid
        child.startedAt = self._reactor.seconds()
        self.log.info("worker {worker} started (pid {pid})", worker=number, pid=child.pid)

    def _childOutput(self, number: int, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").lstrip("\x1e").rstrip("\r")
        if not text.strip():
            return
        if childFD == 1:
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = None
            if isinstance(event, dict) and "log_time" in event:
                # Formatted here, where the child's flattened fields are at hand;
                # the fields stay for structured observers (--json-log).
                event["devpi_worker"] = number
                event["devpi_text"] = formatEvent(event)
                event.pop("log_flattened", None)
                event["log_format"] = "worker {devpi_worker}: {devpi_text}"
                self._observer(event)
                return
        self.log.warn("worker {worker}: {line}", worker=number, line=text)

    def _childEnded(self, number: int, reason: Failure) -> None:
        child = self.children[number]
        child.transport = None
        waiters, child.ended = child.ended, []
        if not self.running:
            self.log.info("worker {worker} (pid {pid}) stopped: {reason}", worker=number, pid=child.pid,
                          reason=reason.getErrorMessage())
        else:
            if self._reactor.seconds() - child.startedAt >= self._stableAfter:
                child.delay = self._firstDelay
            self.log.warn("worker {worker} (pid {pid}) exited unexpectedly ({reason}); starting it again in "
                          "{delay:g} s", worker=number, pid=child.pid, reason=reason.getErrorMessage(),
                          delay=child.delay)
            self._scheduleRestart(child)
        for waiter in waiters:
            waiter.callback(None)

    def _scheduleRestart(self, child: _Child) -> None:
        child.restart = self._reactor.callLater(child.delay, self._spawn, child.number)
        child.delay = min(child.delay * 2, self._maxDelay)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return Deferred.fromCoroutine(self._stopAll())

    async def _stopAll(self) -> None:
        waiting = []
        for child in self.children.values():
            if child.restart is not None:
                child.restart.cancel()
                child.restart = None
            if child.transport is not None:
                ended: Deferred[None] = Deferred()
                child.ended.append(ended)
                waiting.append(ended)
                self._signal(child, "TERM")
        if not waiting:
            return
        self.log.info("stopping {count} worker processes", count=len(waiting))
        kill = self._reactor.callLater(self._stopTimeout, self._killRemaining)
        await DeferredList(waiting)
        if kill.active():
            kill.cancel()

    def _killRemaining(self) -> None:
        for child in self.children.values():
            if child.transport is not None:
                self.log.warn("worker {worker} (pid {pid}) did not stop within {timeout:g} s: killing it",
                              worker=child.number, pid=child.pid, timeout=self._stopTimeout)
                self._signal(child, "KILL")

    @staticmethod
    def _signal(child: _Child, name: str) -> None:
        try:
            child.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


class ParentWatch(Service):
    """
    In a child of L{WorkerPool}: stop when the main process is gone (it was
    killed and could not stop its children), instead of serving on alone.
    """

    log = Logger()

    def __init__(self, reactor: Any, parentPid: int, getppid: Callable[[], int] = os.getppid,
                 interval: float = 1.0) -> None:
        self._reactor = reactor
        self._parentPid = parentPid
        self._getppid = getppid
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if self._getppid() != self._parentPid:
            self.log.warn("the main process (pid {pid}) is gone: stopping", pid=self._parentPid)
            assert self._loop is not None
            self._loop.stop()
            if self._reactor.running:
                self._reactor.stop()


def parentWatch(reactor: Any, environ: Any) -> ParentWatch | None:
    """The L{ParentWatch} of a child started by a L{WorkerPool}, or C{None} in any other process."""
    value = environ.get(PARENT_VARIABLE, "")
    return ParentWatch(reactor, int(value)) if value.isdigit() else None


__all__ = ["WorkerPool", "ParentWatch", "childCommand", "reusePortDescription", "parentWatch",
           "workerLogObserver"]
