# -*- test-case-name: tests.test_ops -*-
"""
JSON logs: one JSON object per line and event.

Each line has C{time} (ISO 8601, UTC), C{level}, C{namespace}, the formatted
C{message}, every plain-valued field of the event (the access log's
C{client}, C{status}, C{duration}; an upload's C{filename}, C{sha256}; a
mirror's C{mirror}, C{state}), and C{traceback} for failures.  Text goes
through L{devpi_twisted.model.redact.scrubText} on the way out.

Two ways to get them:
  - C{twistd --logger=devpi_twisted.app.logs.jsonStdout ...}: twistd's own
    hook; JSON instead of text on standard output (for systemd's journal);
  - C{--json-log PATH}: JSON to a file (rotated at 50 MB, 5 kept) in
    addition to twistd's text log, e.g. in daemon mode.
"""

import json
import sys
from datetime import datetime, timezone
from typing import Any, IO

from twisted.application.service import Service
from twisted.logger import ILogObserver, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.logfile import LogFile
from zope.interface import implementer

from devpi_twisted.model.redact import scrubText

_PLAIN = (str, int, float, bool, type(None))
_SKIP = {"format", "message", "isError", "system", "time", "why", "failure", "printed"}


def jsonRecord(event: dict[str, Any]) -> str:
    """One event as a line of JSON (without the newline)."""
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
        if isinstance(when, (int, float)) else None,
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": scrubText(formatEvent(event)),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        if isinstance(value, _PLAIN):
            record[key] = scrubText(value) if isinstance(value, str) else value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = scrubText(failure.getTraceback())
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False, default=repr)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as a line of JSON to C{outFile}."""

    def __init__(self, outFile: IO[str]) -> None:
        self._outFile = outFile

    def __call__(self, event: dict[str, Any]) -> None:
        self._outFile.write(jsonRecord(event) + "\n")
        self._outFile.flush()


def jsonStdout() -> JSONLinesObserver:
    """The observer factory for C{twistd --logger=devpi_twisted.app.logs.jsonStdout}."""
    return JSONLinesObserver(sys.stdout)


class JSONLogService(Service):
    """
    Adds a JSON observer writing to C{path} (C{-}: standard output as it is
    now, before twistd redirects it) while the service runs.
    """

    def __init__(self, path: str, publisher: LogPublisher = globalLogPublisher) -> None:
        self._path = path
        self._publisher = publisher
        self._stdout = sys.stdout
        self._file: Any = None
        self._observer: JSONLinesObserver | None = None

    def startService(self) -> None:
        super().startService()
        if self._path == "-":
            self._observer = JSONLinesObserver(self._stdout)
        else:
            self._file = LogFile.fromFullPath(self._path, rotateLength=50_000_000, maxRotatedFiles=5)
            self._observer = JSONLinesObserver(self._file)
        self._publisher.addObserver(self._observer)

    def stopService(self) -> None:
        super().stopService()
        if self._observer is not None:
            self._publisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
