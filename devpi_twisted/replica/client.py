"""
The replica's HTTP side of replication: requests to the primary with the
replication credential, and the changelog stream read line by line.

Each complete line of the stream is handed on (to be applied) as soon as
it arrives, not when the answer ends, so a replica stopped half-way keeps
every change it applied; an answer cut short is an error after the complete
lines were applied.  Every request has a timeout for the answer to start and
an idle timeout while the body arrives, both on the injected clock.
"""

import json
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from devpi_twisted import __version__
from devpi_twisted.services.auth import makeReplicationToken, replicationKey
from devpi_twisted.storage import ChangeRecord

USER_AGENT = f"devpi-twisted-replica/{__version__}".encode("ascii")
MAX_LINE = 64 * 1024 * 1024


class ReplicationError(Exception):
    """The primary answered something a replica cannot use."""


class HistoryGone(ReplicationError):
    """The primary no longer keeps the changes the replica needs next (410): it starts over from a snapshot."""


@dataclass(frozen=True)
class Snapshot:
    """The primary's whole state right after its change C{serial}."""

    serial: int
    time: float
    state: dict[str, Any]
    uuid: str | None


def checkPrimaryURL(url: str) -> str:
    """The primary's base URL without a trailing slash; C{ValueError} if unusable."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the primary URL must be http(s)://host[:port][/path], not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the primary URL must not contain credentials (the replica uses --secretfile)")
    if parts.query or parts.fragment:
        raise ValueError("the primary URL must not have a query or fragment")
    return url.rstrip("/")


def parseRecord(line: bytes) -> ChangeRecord:
    """One line of the feed as a L{ChangeRecord}, or L{ReplicationError}."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReplicationError(f"the changelog stream has a line that is not JSON: {e}")
    if (not isinstance(data, dict) or type(data.get("serial")) is not int
            or not isinstance(data.get("time"), (int, float)) or not isinstance(data.get("changes"), dict)):
        raise ReplicationError("the changelog stream has a line that is not a change record")
    return ChangeRecord(data["serial"], float(data["time"]), data["changes"])


@dataclass(frozen=True)
class ChangelogAnswer:
    """What the headers of a changelog answer say."""

    serial: int
    uuid: str | None


class LineReader(Protocol):
    """
    Hands each complete line of a body to C{onLine}, with an idle timeout.

    C{done} fires when the body ended cleanly, or fails (timeout, a cut,
    a line C{onLine} refused, or L{abort}); cancelling it stops the body.
    """

    def __init__(self, onLine: Callable[[bytes], None], clock: IReactorTime, idleTimeout: float,
                 maxLine: int = MAX_LINE) -> None:
        self._onLine = onLine
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._maxLine = maxLine
        self._buffer = b""
        self._error: BaseException | None = None
        self._timer: Any = None
        self.done: Deferred[None] = Deferred(lambda d: self._stop(CancelledError("stopped")))

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idleTimeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self._stop(TimeoutError(f"no data from the primary for {self._idleTimeout} seconds"))

    def _stop(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.stopProducing()

    def abort(self, error: BaseException) -> None:
        """Stop reading because of C{error} (which C{done} then fails with)."""
        self._stop(error)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idleTimeout)
        self._buffer += data
        while self._error is None:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                break
            self._buffer = rest
            if line.strip():
                try:
                    self._onLine(line)
                except Exception as e:
                    self._stop(e)
        if len(self._buffer) > self._maxLine:
            self._stop(ReplicationError(f"a line of the changelog stream is longer than {self._maxLine} bytes"))

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(Failure(self._error))
        elif reason.check(ResponseDone, PotentialDataLoss) and not self._buffer.strip():
            self.done.callback(None)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(Failure(ReplicationError("the changelog stream ended in the middle of a line")))
        else:
            self.done.errback(reason)


class PrimaryClient:
    """
    Requests to the primary that carry the replication credential.

    @param http: a treq C{HTTPClient} (or C{StubTreq} in tests).
    @param secret: the secret shared with the primary (C{--secretfile}).
    """

    def __init__(self, http: Any, primaryURL: str, secret: bytes, clock: IReactorTime, replicaUUID: str,
                 answerTimeout: float = 30.0, idleTimeout: float = 60.0) -> None:
        self.http = http
        self.primaryURL = checkPrimaryURL(primaryURL)
        self._key = replicationKey(secret)
        self.clock = clock
        self._uuid = replicaUUID
        self.answerTimeout = answerTimeout
        self.idleTimeout = idleTimeout

    def headers(self) -> dict[bytes, list[bytes]]:
        """A fresh credential and who is asking."""
        token = makeReplicationToken(self._key, self.clock.seconds())
        return {
            b"Authorization": [b"Bearer " + token.encode("ascii")],
            b"X-Devpi-Replica-Uuid": [self._uuid.encode("ascii")],
            b"User-Agent": [USER_AGENT],
        }

    async def get(self, path: str, timeout: float | None = None) -> Any:
        """Send C{GET path}; the response (body not read yet), or an error after C{timeout}."""
        d = self.http.get(self.primaryURL + path, headers=self.headers(), unbuffered=True,
                          allow_redirects=False)
        d.addTimeout(self.answerTimeout if timeout is None else timeout, self.clock)
        return await d

    async def errorMessage(self, response: Any) -> str:
        """A short description of an error answer (its JSON message, if any)."""
        try:
            d = self.http.content(response)
            d.addTimeout(10, self.clock)
            body = await d
            message = json.loads(body).get("message")
        except Exception:
            message = None
        return f"{self.primaryURL} answered {response.code}" + (f": {message}" if message else "")

    async def followChanges(self, since: int, pollTimeout: float,
                            onAnswer: Callable[[ChangelogAnswer], None],
                            apply: Callable[[ChangeRecord], Deferred[Any]]) -> int:
        """
        Ask for the changes after C{since} and apply them in order as they arrive.

        @param onAnswer: called with the answer's headers before any record.
        @param apply: applies one record; the next waits for it.
        @return: how many records were applied.
        """
        response = await self.get(f"/+changelog/{since + 1}-?timeout={pollTimeout:g}", timeout=pollTimeout + 15)
        if response.code == 410:
            raise HistoryGone(await self.errorMessage(response))
        if response.code != 200:
            raise ReplicationError(await self.errorMessage(response))
        serials = response.headers.getRawHeaders(b"x-devpi-serial")
        try:
            serial = int(serials[-1])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            raise ReplicationError(f"{self.primaryURL} sent no X-Devpi-Serial: is it a devpi-twisted server?")
        uuids = response.headers.getRawHeaders(b"x-devpi-uuid")
        onAnswer(ChangelogAnswer(serial, uuids[-1].decode("ascii", "replace") if uuids else None))

        chain: list[Deferred[Any]] = [succeed(None)]
        applied = [0]
        reader = LineReader(lambda line: queue(parseRecord(line)), self.clock, self.idleTimeout)

        def stopReading(failure: Failure) -> Failure:
            reader.abort(failure.value)
            return failure

        def counted(result: Any) -> Any:
            applied[0] += 1
            return result

        def queue(record: ChangeRecord) -> None:
            d = chain[0]
            d.addCallback(lambda _, r=record: apply(r))
            d.addCallback(counted)
            d.addErrback(stopReading)

        response.deliverBody(reader)
        readError: Exception | None = None
        try:
            await reader.done
        except CancelledError:
            chain[0].addErrback(lambda failure: None)
            chain[0].cancel()
            raise
        except Exception as e:
            readError = e
        await chain[0]
        if readError is not None:
            raise readError
        return applied[0]

    async def snapshot(self) -> Snapshot:
        """The primary's whole current state (C{GET /+snapshot}), read line by line."""
        response = await self.get("/+snapshot")
        if response.code != 200:
            raise ReplicationError(await self.errorMessage(response))
        uuids = response.headers.getRawHeaders(b"x-devpi-uuid")
        lines: list[Any] = []

        def onLine(line: bytes) -> None:
            try:
                lines.append(json.loads(line))
            except (ValueError, UnicodeDecodeError) as e:
                raise ReplicationError(f"the snapshot has a line that is not JSON: {e}")

        reader = LineReader(onLine, self.clock, self.idleTimeout)
        response.deliverBody(reader)
        await reader.done
        head, entries = (lines[0], lines[1:]) if lines else (None, [])
        if (not isinstance(head, dict) or type(head.get("serial")) is not int
                or not isinstance(head.get("time"), (int, float)) or head.get("keys") != len(entries)
                or not all(isinstance(e, dict) and isinstance(e.get("key"), str) and "value" in e for e in entries)):
            raise ReplicationError(f"{self.primaryURL} sent an incomplete or malformed snapshot")
        return Snapshot(head["serial"], float(head["time"]), {e["key"]: e["value"] for e in entries},
                        uuids[-1].decode("ascii", "replace") if uuids else None)
