"""
The embedded metadata store: SQLite in WAL mode.

Tables:
  - C{changelog(serial, at)}: one row per committed change;
  - C{history(key, serial, value)}: every value each key ever had (C{NULL}:
    deleted), which gives reads "as of serial N" and the changelog contents;
  - C{kv(key, serial, value, blob)}: the current value of each key, and the
    blob digest it refers to, for fast reads and garbage collection;
  - C{meta(name, value)}: C{oldest}, the oldest serial history is kept for
    (L{SqliteStorage.pruneHistory}; absent: -1).

History older than what readers need is pruned; the database uses
incremental auto-vacuum (an older database is vacuumed once, at its first
prune), so the pages pruning frees go back to the file system and the file
stops growing under a steady stream of overwrites.

One connection per thread.  Writes run in the runner's single writer thread,
so there is one writer at a time; reads run in parallel reader threads, each
inside its own read transaction, so a view is a consistent snapshot.

Several processes may share the database (C{--requests-only} workers next to
the main process): SQLite serialises their writes (C{BEGIN IMMEDIATE} takes
the database's write lock, and the serial is read inside it), and
L{SqliteStorage.startWatching} makes a process notice the others' commits.
"""

import json
import sqlite3
import threading
import time
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from devpi_twisted.errors import InsufficientStorage
from devpi_twisted.interfaces import IReadView, IStorage, IWriteTransaction
from devpi_twisted.storage import (
    ChangeRecord, ChangeTeller, HistoryPruned, OverlayTransaction, SerialMismatch, blobRef, canonicalJSON, prefixUpperBound,
)
from devpi_twisted.storage.threads import Runner

T = TypeVar("T")
log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changelog (serial INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    key TEXT NOT NULL, serial INTEGER NOT NULL, value TEXT,
    PRIMARY KEY (key, serial));
CREATE INDEX IF NOT EXISTS history_serial ON history (serial);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, serial INTEGER NOT NULL, value TEXT NOT NULL, blob TEXT);
CREATE INDEX IF NOT EXISTS kv_blob ON kv (blob) WHERE blob IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

PRUNE_STEP = 2000
"""Serials pruned in one transaction: the writer is never held up long."""


def _oldest(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = 'oldest'").fetchone()
    return -1 if row is None else int(row[0])


_dumps = canonicalJSON


_SQLITE_FULL = getattr(sqlite3, "SQLITE_FULL", 13)


def _diskFull(failure: Any) -> Any:
    """
    A write SQLite could not make because the disk is full becomes the
    domain's L{InsufficientStorage}; the transaction was rolled back, so
    the database is as before and later writes work once there is space.
    """
    error = failure.value
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL:
        raise InsufficientStorage() from error
    return failure


def _storeChanges(conn: sqlite3.Connection, serial: int, at: float, changes: dict[str, Any]) -> None:
    """Record one change (inside the caller's transaction)."""
    conn.execute("INSERT INTO changelog (serial, at) VALUES (?, ?)", (serial, at))
    for key, value in changes.items():
        if value is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            conn.execute("INSERT INTO history VALUES (?, ?, NULL)", (key, serial))
        else:
            text = _dumps(value)
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, serial, value, blob) VALUES (?, ?, ?, ?)",
                (key, serial, text, blobRef(value)),
            )
            conn.execute("INSERT INTO history VALUES (?, ?, ?)", (key, serial, text))


@implementer(IReadView)
class _CurrentView:
    def __init__(self, conn: sqlite3.Connection, serial: int) -> None:
        self._conn = conn
        self.serial = serial

    def get(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        rows = self._conn.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefixUpperBound(prefix)),
        )
        return [(k, json.loads(v)) for k, v in rows]


@implementer(IReadView)
class _HistoricalView:
    def __init__(self, conn: sqlite3.Connection, serial: int) -> None:
        self._conn = conn
        self.serial = serial

    def get(self, key: str) -> Any:
        row = self._conn.execute(
            "SELECT value FROM history WHERE key = ? AND serial <= ? ORDER BY serial DESC LIMIT 1",
            (key, self.serial),
        ).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        rows = self._conn.execute(
            "SELECT h.key, h.value FROM history h WHERE h.key >= ? AND h.key < ? "
            "AND h.serial = (SELECT MAX(serial) FROM history WHERE key = h.key AND serial <= ?) "
            "ORDER BY h.key",
            (prefix, prefixUpperBound(prefix), self.serial),
        )
        return [(k, json.loads(v)) for k, v in rows if v is not None]


@implementer(IStorage)
class SqliteStorage:
    """
    L{IStorage} on one SQLite database file.

    @param path: the database file.
    @param runner: runs writes in one thread, reads in others.
    """

    pruneStep = PRUNE_STEP

    def __init__(self, path: FilePath, runner: Runner) -> None:
        self._path = path
        self._runner = runner
        self._local = threading.local()
        conn = self._connect()
        with conn:
            conn.executescript(_SCHEMA)
        row = conn.execute("SELECT serial, at FROM changelog ORDER BY serial DESC LIMIT 1").fetchone()
        # Tells subscribers of each commit once, this process's or another's.
        self._teller = ChangeTeller(*((row[0], row[1]) if row else (-1, None)))
        conn.close()
        self._local = threading.local()
        self._watcher: LoopingCall | None = None
        self._catchUpLock = DeferredLock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path.path, isolation_level=None, timeout=30)
        # Takes effect in a new database (before its first table); an older
        # one is vacuumed into it once, at its first prune.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # The WAL is truncated back to this after checkpoints instead of keeping its largest size.
        conn.execute("PRAGMA journal_size_limit=16777216")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def currentSerial(self) -> int:
        return self._teller.serial

    def lastCommitTime(self) -> float | None:
        return self._teller.lastTime

    def _readSnapshot(self, function: Callable[[IReadView], T], serial: int | None) -> T:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            if serial is None:
                row = conn.execute("SELECT MAX(serial) FROM changelog").fetchone()
                view: IReadView = _CurrentView(conn, -1 if row[0] is None else row[0])
            else:
                oldest = _oldest(conn)
                if serial < oldest:
                    raise HistoryPruned(serial, oldest)
                view = _HistoricalView(conn, serial)
            return function(view)
        finally:
            conn.execute("ROLLBACK")

    def read(self, function: Callable[[IReadView], T]) -> Deferred[T]:
        return self._runner.runRead(self._readSnapshot, function, None)

    def readAsOf(self, serial: int, function: Callable[[IReadView], T]) -> Deferred[T]:
        return self._runner.runRead(self._readSnapshot, function, serial)

    def _write(self, function: Callable[[IWriteTransaction], T]) -> tuple[ChangeRecord | None, T]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT MAX(serial) FROM changelog").fetchone()
            last = -1 if row[0] is None else row[0]
            txn = OverlayTransaction(_CurrentView(conn, last), last)
            result = function(txn)
            if not txn.changes:
                conn.execute("ROLLBACK")
                return None, result
            serial = last + 1
            now = time.time()
            _storeChanges(conn, serial, now, txn.changes)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return ChangeRecord(serial, now, dict(txn.changes)), result

    def _applyRecord(self, record: ChangeRecord) -> tuple[ChangeRecord, int]:
        # Values go through JSON as in a write, so reads return the same shapes.
        changes = {k: None if v is None else json.loads(_dumps(v)) for k, v in record.changes.items()}
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT MAX(serial) FROM changelog").fetchone()
            last = -1 if row[0] is None else row[0]
            if record.serial != last + 1:
                raise SerialMismatch(f"change {record.serial} cannot follow serial {last}")
            _storeChanges(conn, record.serial, record.time, changes)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return ChangeRecord(record.serial, record.time, changes), record.serial

    def applyChange(self, record: ChangeRecord) -> Deferred[int]:
        d = self._runner.runWrite(self._applyRecord, record).addErrback(_diskFull)
        return d.addCallback(self._committed).addCallback(lambda outcome: outcome[0])

    def write(self, function: Callable[[IWriteTransaction], T]) -> Deferred[tuple[int, T]]:
        d = self._runner.runWrite(self._write, function).addErrback(_diskFull)
        return d.addCallback(self._committed)

    def _committed(self, outcome: tuple[ChangeRecord | None, T]) -> tuple[int, T]:
        record, result = outcome
        if record is None:
            return self._teller.serial, result
        self._teller.tell(record)
        if self._watcher is not None and record.serial > self._teller.told:
            # Another process committed just before us: tell its change too.
            self._catchUp().addErrback(lambda f: log.failure("following other processes' commits", f))
        return record.serial, result

    # other processes on the same database

    def startWatching(self, clock: IReactorTime, interval: float = 0.2) -> None:
        """
        Notice commits of other processes sharing the database: every
        C{interval} seconds, when the last serial moved, tell subscribers of
        the new changes as if they were this process's own, so caches
        invalidate and L{currentSerial} is right.  Each change is told once;
        with several writers, changes may be told out of serial order.

        Off unless called: a single process already sees all its commits.
        """
        if self._watcher is not None:
            return
        self._watcher = LoopingCall(self._poll)
        self._watcher.clock = clock
        self._watcher.start(interval, now=True).addErrback(
            lambda f: log.failure("watching the database for other processes' commits", f)
        )

    def isWatching(self) -> bool:
        return self._watcher is not None

    def stopWatching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher.running:
            watcher.stop()

    def _lastSerial(self) -> int:
        row = self._conn().execute("SELECT MAX(serial) FROM changelog").fetchone()
        return -1 if row[0] is None else row[0]

    def _poll(self) -> Deferred[None]:
        def check(last: int) -> Deferred[None] | None:
            if last > self._teller.told and not self._catchUpLock.locked:
                return self._catchUp()
            return None

        d = self._runner.runRead(self._lastSerial).addCallback(check)
        # A failed check is logged; the next one runs on schedule.
        return d.addErrback(lambda f: log.failure("checking for other processes' commits", f))

    def _catchUp(self) -> Deferred[None]:
        """Tell subscribers of every committed change they have not been told of, in order."""

        def fetch() -> Deferred[None]:
            def got(records: list[ChangeRecord]) -> Deferred[None] | None:
                for record in records:
                    self._teller.tell(record)
                return fetch() if len(records) == 500 else None

            def pruned(failure: Any) -> None:
                # Only a process that stopped following for the whole kept
                # history gets here: it goes on from what is kept.
                failure.trap(HistoryPruned)
                log.warn("changes before serial {oldest} were pruned before this process heard of them",
                         oldest=failure.value.oldest)
                self._teller.skipTo(failure.value.oldest)

            return self.changesSince(self._teller.told, 500).addCallbacks(got, pruned)

        return self._catchUpLock.run(fetch)

    def _changesSince(self, serial: int, limit: int) -> list[ChangeRecord]:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            oldest = _oldest(conn)
            if serial < oldest:
                raise HistoryPruned(serial, oldest)
            records = []
            rows = conn.execute(
                "SELECT serial, at FROM changelog WHERE serial > ? ORDER BY serial LIMIT ?",
                (serial, limit),
            ).fetchall()
            for s, at in rows:
                changes = {
                    k: None if v is None else json.loads(v)
                    for k, v in conn.execute(
                        "SELECT key, value FROM history WHERE serial = ?", (s,)
                    )
                }
                records.append(ChangeRecord(s, at, changes))
            return records
        finally:
            conn.execute("ROLLBACK")

    def changesSince(self, serial: int, limit: int) -> Deferred[list[ChangeRecord]]:
        return self._runner.runRead(self._changesSince, serial, limit)

    def subscribe(self, callback: Callable[[ChangeRecord], None]) -> Callable[[], None]:
        return self._teller.subscribe(callback)

    # pruning

    def oldestKeptSerial(self) -> Deferred[int]:
        return self._runner.runRead(lambda: _oldest(self._conn()))

    def _pruneStep(self, keepFrom: int, olderThan: float | None) -> tuple[int, bool]:
        """
        Move the horizon up to C{keepFrom}, at most L{pruneStep} serials:
        the entries removed, and whether there is more to do.
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = _oldest(conn)
            last = conn.execute("SELECT MAX(serial) FROM changelog").fetchone()[0]
            target = min(keepFrom, -1 if last is None else last)
            if olderThan is not None:
                row = conn.execute("SELECT MAX(serial) FROM changelog WHERE at <= ?", (olderThan,)).fetchone()
                target = min(target, -1 if row[0] is None else row[0])
            new = min(target, old + self.pruneStep)
            if new <= old:
                conn.execute("ROLLBACK")
                return 0, False
            # Values overwritten by a later one up to the new horizon: a read
            # as of it, or later, finds the later one.  Keys not changed
            # since the old horizon have one entry up to it already.
            removed = conn.execute(
                "DELETE FROM history WHERE serial <= :new "
                "AND key IN (SELECT key FROM history WHERE serial > :old AND serial <= :new) "
                "AND serial < (SELECT MAX(h.serial) FROM history h WHERE h.key = history.key AND h.serial <= :new)",
                {"old": old, "new": new},
            ).rowcount
            # Deletions up to it: no entry reads as absent just the same.
            removed += conn.execute(
                "DELETE FROM history WHERE serial > ? AND serial <= ? AND value IS NULL", (old, new)
            ).rowcount
            conn.execute("DELETE FROM changelog WHERE serial < ?", (new,))
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('oldest', ?)", (str(new),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return removed, new < target

    def _giveBackSpace(self) -> None:
        """Return the pages pruning freed to the file system."""
        conn = self._conn()
        if conn.execute("PRAGMA auto_vacuum").fetchall()[0][0] == 0:
            # A database made before incremental vacuum: converted once.
            log.info("converting {path} to incremental vacuum (once)", path=self._path.path)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
        else:
            # executescript runs the pragma to its end (execute frees one page).
            conn.executescript("PRAGMA incremental_vacuum;")
        # The file shrinks once the WAL is copied back (without waiting for readers).
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _prune(self, keepFrom: int, olderThan: float | None) -> int:
        total = 0
        more = True
        while more:
            removed, more = await self._runner.runWrite(self._pruneStep, keepFrom, olderThan)
            total += removed
        if total:
            await self._runner.runWrite(self._giveBackSpace)
        return total

    def pruneHistory(self, keepFrom: int, olderThan: float | None = None) -> Deferred[int]:
        return Deferred.fromCoroutine(self._prune(keepFrom, olderThan))

    def _applySnapshot(self, serial: int, at: float, state: dict[str, Any]) -> ChangeRecord:
        texts = {key: _dumps(value) for key, value in state.items()}
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT MAX(serial) FROM changelog").fetchone()
            last = -1 if row[0] is None else row[0]
            if serial <= last:
                raise SerialMismatch(f"a snapshot at {serial} cannot follow serial {last}")
            old = dict(conn.execute("SELECT key, value FROM kv"))
            changes = {k: json.loads(t) for k, t in texts.items() if old.get(k) != t}
            changes.update({k: None for k in old if k not in texts})
            for table in ("kv", "history", "changelog"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT INTO changelog (serial, at) VALUES (?, ?)", (serial, at))
            conn.executemany("INSERT INTO kv (key, serial, value, blob) VALUES (?, ?, ?, ?)",
                             [(k, serial, t, blobRef(state[k])) for k, t in texts.items()])
            conn.executemany("INSERT INTO history (key, serial, value) VALUES (?, ?, ?)",
                             [(k, serial, t) for k, t in texts.items()])
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('oldest', ?)", (str(serial),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return ChangeRecord(serial, at, changes)

    def applySnapshot(self, serial: int, time: float, state: dict[str, Any]) -> Deferred[int]:
        def applied(record: ChangeRecord) -> int:
            # Nothing before it is left to tell.
            self._teller.skipTo(record.serial - 1)
            self._teller.tell(record)
            return record.serial

        d = self._runner.runWrite(self._applySnapshot, serial, time, state).addErrback(_diskFull)
        return d.addCallback(applied)

    def referencedBlobs(self) -> Deferred[set[str]]:
        """The digests of every blob a current value refers to."""

        def _refs(view: Any) -> set[str]:
            rows = self._conn().execute("SELECT DISTINCT blob FROM kv WHERE blob IS NOT NULL")
            return {r[0] for r in rows}

        return self._runner.runRead(self._readSnapshot, _refs, None)

    def isBlobReferenced(self, sha256: str) -> Deferred[bool]:
        def _referenced(view: Any) -> bool:
            row = self._conn().execute("SELECT 1 FROM kv WHERE blob = ? LIMIT 1", (sha256,)).fetchone()
            return row is not None

        return self._runner.runRead(self._readSnapshot, _referenced, None)

    def close(self) -> Deferred[None]:
        # Thread-local connections close with their threads; checkpoint the
        # WAL so the database file is complete on its own.  With other
        # processes on the database, do not wait for their readers.
        shared = self._watcher is not None
        self.stopWatching()

        def _checkpointAndClose() -> None:
            conn = self._conn()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)" if shared else "PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            self._local.conn = None

        return self._runner.runWrite(_checkpointAndClose)
