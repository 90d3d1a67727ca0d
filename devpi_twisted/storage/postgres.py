"""
The shared metadata store: PostgreSQL, for several nodes serving and
writing one state.

The data model is the embedded backend's (L{devpi_twisted.storage.sqlite}),
in tables prefixed C{devpi_}:
  - C{devpi_changelog(serial, at)}: one row per committed change;
  - C{devpi_history(key, serial, value)}: every value each key ever had
    (C{NULL}: deleted), for reads "as of serial N" and the changelog;
  - C{devpi_kv(key, serial, value, blob)}: the current values, and the blob
    each refers to, for fast reads and garbage collection;
  - C{devpi_meta(name, value)}: the schema version and the secret the nodes
    share (kept out of C{devpi_kv}, so out of the changelog and exports),
    and C{oldest}, the oldest serial history is kept for (absent: -1).

Pruning history deletes rows in short transactions; autovacuum gives the
space back to later inserts.

Writes take a transaction-scoped advisory lock before reading the last
serial, so serials stay gapless and ordered whichever node writes; each
commit sends C{NOTIFY devpi_changes}, which a listener thread on every
other node turns into a catch-up through L{PostgresStorage.changesSince}.
Reads run in C{REPEATABLE READ READ ONLY} transactions: a view is a
snapshot.

Every blocking call runs in the runner's threads.  When PostgreSQL cannot
be reached, a circuit breaker makes every call fail at once with
L{StorageUnavailable}; a probe (made by the next call, then at most once
a second) builds a fresh connection pool once the server answers again.
"""

import base64
import json
import threading
import time
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from zope.interface import implementer

from devpi_twisted.errors import BadRequest, InsufficientStorage, StorageError, StorageUnavailable
from devpi_twisted.interfaces import IReadView, ISharedSecret, IStorage, IWriteTransaction
from devpi_twisted.storage import (
    ChangeRecord, ChangeTeller, HistoryPruned, OverlayTransaction, SerialMismatch, blobRef, canonicalJSON, prefixUpperBound,
)
from devpi_twisted.storage.threads import Runner

T = TypeVar("T")
log = Logger()

SCHEMA_VERSION = "1"
CHANNEL = "devpi_changes"
# Advisory lock keys (scoped to the database): creating the schema, writing.
_SCHEMA_LOCK = 0x64657670_00000001
_WRITE_LOCK = 0x64657670_00000002

# Keys are compared as code points ("C"), as in SQLite: prefix ranges and
# ORDER BY key then agree with the other backends whatever the database's locale.
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS devpi_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devpi_changelog (serial BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devpi_history ("
    " key TEXT COLLATE \"C\" NOT NULL, serial BIGINT NOT NULL, value TEXT,"
    " PRIMARY KEY (key, serial))",
    "CREATE INDEX IF NOT EXISTS devpi_history_serial ON devpi_history (serial)",
    "CREATE TABLE IF NOT EXISTS devpi_kv ("
    " key TEXT COLLATE \"C\" PRIMARY KEY, serial BIGINT NOT NULL, value TEXT NOT NULL, blob TEXT)",
    "CREATE INDEX IF NOT EXISTS devpi_kv_blob ON devpi_kv (blob) WHERE blob IS NOT NULL",
]

PROBE_INTERVAL = 1.0
PRUNE_STEP = 2000
_MAX_MISSED = 1000
CONNECT_TIMEOUT = 2


_dumps = canonicalJSON


def describeDSN(dsn: str) -> str:
    """Where C{dsn} points, for messages: never its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured --pg-dsn"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def _firstLine(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _lostConnection(conn: Any, error: BaseException) -> bool:
    """Whether C{error} says the server cannot be reached (rather than a query being wrong)."""
    if isinstance(error, (PoolTimeout, PoolClosed)):
        return True
    if conn is not None and (conn.broken or conn.closed):
        return True
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state.startswith("08") or state.startswith("57P")
    return False


def _storeChanges(conn: psycopg.Connection, serial: int, at: float, changes: dict[str, Any]) -> None:
    """Record one change and announce it (inside the caller's transaction)."""
    conn.execute("INSERT INTO devpi_changelog (serial, at) VALUES (%s, %s)", (serial, at))
    history, upserts, deletes = [], [], []
    for key, value in changes.items():
        if value is None:
            deletes.append((key,))
            history.append((key, serial, None))
        else:
            text = _dumps(value)
            upserts.append((key, serial, text, blobRef(value)))
            history.append((key, serial, text))
    with conn.cursor() as cur:
        if deletes:
            cur.executemany("DELETE FROM devpi_kv WHERE key = %s", deletes)
        if upserts:
            cur.executemany(
                "INSERT INTO devpi_kv (key, serial, value, blob) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (key) DO UPDATE SET serial = EXCLUDED.serial, value = EXCLUDED.value, "
                "blob = EXCLUDED.blob",
                upserts,
            )
        if history:
            cur.executemany("INSERT INTO devpi_history (key, serial, value) VALUES (%s, %s, %s)", history)
    # Delivered to the listeners when (and only if) the transaction commits.
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(serial)))


def _fetchChanges(conn: psycopg.Connection, serial: int, limit: int) -> list[ChangeRecord]:
    """The change records after C{serial}, at most C{limit}."""
    rows = conn.execute(
        "SELECT c.serial, c.at, h.key, h.value FROM "
        "(SELECT serial, at FROM devpi_changelog WHERE serial > %s ORDER BY serial LIMIT %s) c "
        "LEFT JOIN devpi_history h ON h.serial = c.serial ORDER BY c.serial, h.key",
        (serial, limit),
    ).fetchall()
    records: list[ChangeRecord] = []
    for s, at, key, value in rows:
        if not records or records[-1].serial != s:
            records.append(ChangeRecord(s, at, {}))
        if key is not None:
            records[-1].changes[key] = None if value is None else json.loads(value)
    return records


def _oldest(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT value FROM devpi_meta WHERE name = 'oldest'").fetchone()
    return -1 if row is None else int(row[0])


def _lastSerial(conn: psycopg.Connection) -> tuple[int, float | None]:
    row = conn.execute("SELECT serial, at FROM devpi_changelog ORDER BY serial DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (-1, None)


def _checkStorable(key: str) -> None:
    if not _storable(key):
        raise BadRequest(f"a name must not contain a NUL character: {key!r}")


def _storable(key: str) -> bool:
    """
    PostgreSQL text cannot hold NUL, so no key with one was ever stored:
    a read of such a key (a name taken from a URL) finds nothing.
    """
    return "\x00" not in key


@implementer(IReadView)
class _CurrentView:
    def __init__(self, conn: psycopg.Connection, serial: int) -> None:
        self._conn = conn
        self.serial = serial

    def get(self, key: str) -> Any:
        if not _storable(key):
            return None
        row = self._conn.execute("SELECT value FROM devpi_kv WHERE key = %s", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        if not _storable(prefix):
            return []
        rows = self._conn.execute(
            "SELECT key, value FROM devpi_kv WHERE key >= %s AND key < %s ORDER BY key",
            (prefix, prefixUpperBound(prefix)),
        ).fetchall()
        return [(k, json.loads(v)) for k, v in rows]


@implementer(IReadView)
class _HistoricalView:
    def __init__(self, conn: psycopg.Connection, serial: int) -> None:
        self._conn = conn
        self.serial = serial

    def get(self, key: str) -> Any:
        if not _storable(key):
            return None
        row = self._conn.execute(
            "SELECT value FROM devpi_history WHERE key = %s AND serial <= %s ORDER BY serial DESC LIMIT 1",
            (key, self.serial),
        ).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        if not _storable(prefix):
            return []
        rows = self._conn.execute(
            "SELECT DISTINCT ON (key) key, value FROM devpi_history "
            "WHERE key >= %s AND key < %s AND serial <= %s ORDER BY key, serial DESC",
            (prefix, prefixUpperBound(prefix), self.serial),
        ).fetchall()
        return [(k, json.loads(v)) for k, v in rows if v is not None]


def _createSchema(conn: psycopg.Connection) -> None:
    """Create the tables if missing; two nodes starting at once take turns."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO devpi_meta (name, value) VALUES ('schema', %s) ON CONFLICT (name) DO NOTHING",
            (SCHEMA_VERSION,),
        )
        row = conn.execute("SELECT value FROM devpi_meta WHERE name = 'schema'").fetchone()
    if row[0] != SCHEMA_VERSION:
        raise StorageError(f"the PostgreSQL database has devpi-twisted schema version {row[0]}, "
                           f"this version knows {SCHEMA_VERSION}")


@implementer(IStorage, ISharedSecret)
class PostgresStorage:
    """
    L{IStorage} on a PostgreSQL database that several nodes share.

    @param dsn: a libpq connection string or C{postgresql://} URI.
    @param runner: runs writes in its writer thread, reads in its readers.
    @param poolSize: the most connections this node opens (readers, the
        writer and a spare).
    """

    sharedByNodes = True
    """Other nodes write to the same state: the storage service follows them from the start."""

    pruneStep = PRUNE_STEP
    """Serials pruned in one transaction: writers are never held up long."""

    def __init__(self, dsn: str, runner: Runner, poolSize: int = 10) -> None:
        self._dsn = dsn
        self._where = describeDSN(dsn)
        self._runner = runner
        self._poolSize = poolSize
        self._lock = threading.Lock()
        self._closed = False
        self._lastProbe = 0.0
        self._probing = False
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                _createSchema(conn)
                # Tells subscribers of each commit once, this node's or another's.
                self._teller = ChangeTeller(*_lastSerial(conn))
            self._pool: ConnectionPool | None = self._newPool()
        except psycopg.OperationalError as e:
            raise StorageUnavailable(f"cannot reach PostgreSQL at {self._where}: {_firstLine(e)}") from e
        except psycopg.Error as e:
            raise StorageError(f"cannot use PostgreSQL at {self._where}: {_firstLine(e)}") from e
        self._catchUpLock = DeferredLock()
        self._catchUpPending = False
        self._reactor: Any = None
        self._retry: Any = None
        self._listener: threading.Thread | None = None
        self._stopListening: threading.Event | None = None

    # connections and the circuit breaker

    def _newPool(self) -> ConnectionPool:
        pool: ConnectionPool = ConnectionPool(
            # The runner bounds how many calls run at once (below max_size), so
            # a call waits only for a new connection: never long when the server answers.
            self._dsn, min_size=2, max_size=self._poolSize, open=False, timeout=1.0,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT}, name="devpi-postgres",
        )
        try:
            pool.open(wait=True, timeout=CONNECT_TIMEOUT + 1)
        except BaseException:
            pool.close(timeout=0)
            raise
        return pool

    def _usablePool(self) -> ConnectionPool:
        """The pool, or at once L{StorageUnavailable} while the breaker is open and no probe is due."""
        with self._lock:
            if self._closed:
                raise StorageUnavailable("the storage is closed")
            if self._pool is not None:
                return self._pool
            now = time.monotonic()
            if self._probing or now - self._lastProbe < PROBE_INTERVAL:
                raise StorageUnavailable(f"PostgreSQL at {self._where} is unreachable just now")
            self._probing, self._lastProbe = True, now
        pool = None
        try:
            # Refused at once when the server is down, unlike a pool's wait.
            psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT).close()
            pool = self._newPool()
        except psycopg.Error as e:
            raise StorageUnavailable(f"PostgreSQL at {self._where} is unreachable just now") from e
        finally:
            with self._lock:
                self._probing = False
                self._lastProbe = time.monotonic()
                if pool is not None and not self._closed:
                    self._pool = pool
                    pool = None
        if pool is not None:  # closed meanwhile
            pool.close(timeout=0)
            raise StorageUnavailable("the storage is closed")
        log.info("PostgreSQL at {where} answers again", where=self._where)
        return self._usablePool()

    def _trip(self, pool: ConnectionPool, error: BaseException) -> None:
        """
        Open the breaker: the pool's connections are gone; later calls fail
        fast until a probe works.  The next call probes at once (a server
        that restarted is back for it), later ones at most once a second.
        """
        with self._lock:
            if self._pool is not pool:
                return
            self._pool = None
        log.warn("lost PostgreSQL at {where}: {error}", where=self._where, error=_firstLine(error))
        # Its threads take a moment to stop: let them, off the request's thread
        # (closing with no wait makes the pool log an error for each).
        threading.Thread(target=pool.close, kwargs={"timeout": 10}, name="devpi-postgres-close",
                         daemon=True).start()

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run C{work} on a pooled connection (in a storage thread), mapping lost connections."""
        pool = self._usablePool()
        conn = None
        try:
            conn = pool.getconn()
            try:
                return work(conn)
            finally:
                if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
        except psycopg.Error as e:
            if e.sqlstate == "53100":  # disk full: rolled back, nothing changed
                raise InsufficientStorage() from e
            if _lostConnection(conn, e):
                self._trip(pool, e)
                raise StorageUnavailable(f"PostgreSQL at {self._where} is unreachable just now") from e
            if isinstance(e, psycopg.OperationalError):
                raise StorageUnavailable(f"PostgreSQL at {self._where}: {_firstLine(e)}") from e
            raise
        finally:
            if conn is not None:
                pool.putconn(conn)

    # IStorage

    def currentSerial(self) -> int:
        return self._teller.serial

    def lastCommitTime(self) -> float | None:
        return self._teller.lastTime

    def _readSnapshot(self, function: Callable[[IReadView], T], serial: int | None) -> T:
        def work(conn: psycopg.Connection) -> T:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if serial is None:
                view: IReadView = _CurrentView(conn, _lastSerial(conn)[0])
            else:
                oldest = _oldest(conn)
                if serial < oldest:
                    raise HistoryPruned(serial, oldest)
                view = _HistoricalView(conn, serial)
            result = function(view)
            conn.execute("COMMIT")
            return result

        return self._run(work)

    def read(self, function: Callable[[IReadView], T]) -> Deferred[T]:
        return self._runner.runRead(self._readSnapshot, function, None)

    def readAsOf(self, serial: int, function: Callable[[IReadView], T]) -> Deferred[T]:
        return self._runner.runRead(self._readSnapshot, function, serial)

    def _write(self, function: Callable[[IWriteTransaction], T]) -> tuple[ChangeRecord | None, T, list[ChangeRecord]]:
        def work(conn: psycopg.Connection) -> tuple[ChangeRecord | None, T, list[ChangeRecord]]:
            conn.execute("BEGIN")
            # Held to the commit: the next writer, on any node, reads our serial.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            last = _lastSerial(conn)[0]
            txn = OverlayTransaction(_CurrentView(conn, last), last, _checkStorable)
            result = function(txn)
            if not txn.changes:
                conn.execute("ROLLBACK")
                return None, result, []
            # Other nodes' changes our subscribers have not heard of yet: told
            # before ours, so every subscriber hears the changes in serial order.
            told = self._teller.told
            missed = _fetchChanges(conn, told, _MAX_MISSED) if self.isWatching() and last > told else []
            serial, now = last + 1, time.time()
            _storeChanges(conn, serial, now, txn.changes)
            conn.execute("COMMIT")
            return ChangeRecord(serial, now, dict(txn.changes)), result, missed

        return self._run(work)

    def write(self, function: Callable[[IWriteTransaction], T]) -> Deferred[tuple[int, T]]:
        return self._runner.runWrite(self._write, function).addCallback(self._committed)

    def _applyRecord(self, record: ChangeRecord) -> tuple[ChangeRecord, int, list[ChangeRecord]]:
        changes = {k: None if v is None else json.loads(_dumps(v)) for k, v in record.changes.items()}

        def work(conn: psycopg.Connection) -> tuple[ChangeRecord, int, list[ChangeRecord]]:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            last = _lastSerial(conn)[0]
            if record.serial != last + 1:
                raise SerialMismatch(f"change {record.serial} cannot follow serial {last}")
            _storeChanges(conn, record.serial, record.time, changes)
            conn.execute("COMMIT")
            return ChangeRecord(record.serial, record.time, changes), record.serial, []

        return self._run(work)

    def applyChange(self, record: ChangeRecord) -> Deferred[int]:
        d = self._runner.runWrite(self._applyRecord, record)
        return d.addCallback(self._committed).addCallback(lambda outcome: outcome[0])

    def _committed(self, outcome: tuple[ChangeRecord | None, T, list[ChangeRecord]]) -> tuple[int, T]:
        record, result, missed = outcome
        if record is None:
            return self._teller.serial, result
        for earlier in missed:
            self._teller.tell(earlier)
        self._teller.tell(record)
        if self.isWatching() and record.serial > self._teller.told:
            # Another node committed just before us: tell its change too.
            self._scheduleCatchUp()
        return record.serial, result

    def _changesSince(self, serial: int, limit: int) -> list[ChangeRecord]:
        def work(conn: psycopg.Connection) -> list[ChangeRecord]:
            # One snapshot: a prune cannot slip in between the check and the rows.
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            oldest = _oldest(conn)
            if serial < oldest:
                raise HistoryPruned(serial, oldest)
            records = _fetchChanges(conn, serial, limit)
            conn.execute("COMMIT")
            return records

        return self._run(work)

    # pruning

    def oldestKeptSerial(self) -> Deferred[int]:
        return self._runner.runRead(self._run, _oldest)

    def _pruneStep(self, keepFrom: int, olderThan: float | None) -> tuple[int, bool]:
        """Move the horizon up to C{keepFrom}, at most L{pruneStep} serials (see the SQLite backend)."""

        def work(conn: psycopg.Connection) -> tuple[int, bool]:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            old = _oldest(conn)
            target = min(keepFrom, _lastSerial(conn)[0])
            if olderThan is not None:
                row = conn.execute("SELECT MAX(serial) FROM devpi_changelog WHERE at <= %s", (olderThan,)).fetchone()
                target = min(target, -1 if row[0] is None else row[0])
            new = min(target, old + self.pruneStep)
            if new <= old:
                conn.execute("ROLLBACK")
                return 0, False
            removed = conn.execute(
                "DELETE FROM devpi_history d USING ("
                " SELECT key, MAX(serial) AS last FROM devpi_history"
                " WHERE serial <= %(new)s AND key IN"
                "  (SELECT key FROM devpi_history WHERE serial > %(old)s AND serial <= %(new)s)"
                " GROUP BY key) k "
                "WHERE d.key = k.key AND d.serial < k.last",
                {"old": old, "new": new},
            ).rowcount
            removed += conn.execute(
                "DELETE FROM devpi_history WHERE serial > %s AND serial <= %s AND value IS NULL", (old, new)
            ).rowcount
            conn.execute("DELETE FROM devpi_changelog WHERE serial < %s", (new,))
            conn.execute(
                "INSERT INTO devpi_meta (name, value) VALUES ('oldest', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", (str(new),))
            conn.execute("COMMIT")
            return removed, new < target

        return self._run(work)

    async def _prune(self, keepFrom: int, olderThan: float | None) -> int:
        total = 0
        more = True
        while more:
            removed, more = await self._runner.runWrite(self._pruneStep, keepFrom, olderThan)
            total += removed
        return total

    def pruneHistory(self, keepFrom: int, olderThan: float | None = None) -> Deferred[int]:
        return Deferred.fromCoroutine(self._prune(keepFrom, olderThan))

    def _applySnapshot(self, serial: int, at: float, state: dict[str, Any]) -> ChangeRecord:
        texts = {key: _dumps(value) for key, value in state.items()}

        def work(conn: psycopg.Connection) -> ChangeRecord:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            last = _lastSerial(conn)[0]
            if serial <= last:
                raise SerialMismatch(f"a snapshot at {serial} cannot follow serial {last}")
            old = dict(conn.execute("SELECT key, value FROM devpi_kv").fetchall())
            changes = {k: json.loads(t) for k, t in texts.items() if old.get(k) != t}
            changes.update({k: None for k in old if k not in texts})
            for table in ("devpi_kv", "devpi_history", "devpi_changelog"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT INTO devpi_changelog (serial, at) VALUES (%s, %s)", (serial, at))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO devpi_kv (key, serial, value, blob) VALUES (%s, %s, %s, %s)",
                                [(k, serial, t, blobRef(state[k])) for k, t in texts.items()])
                cur.executemany("INSERT INTO devpi_history (key, serial, value) VALUES (%s, %s, %s)",
                                [(k, serial, t) for k, t in texts.items()])
            conn.execute(
                "INSERT INTO devpi_meta (name, value) VALUES ('oldest', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", (str(serial),))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(serial)))
            conn.execute("COMMIT")
            return ChangeRecord(serial, at, changes)

        return self._run(work)

    def applySnapshot(self, serial: int, time: float, state: dict[str, Any]) -> Deferred[int]:
        def applied(record: ChangeRecord) -> int:
            self._teller.skipTo(record.serial - 1)
            self._teller.tell(record)
            return record.serial

        return self._runner.runWrite(self._applySnapshot, serial, time, state).addCallback(applied)

    def changesSince(self, serial: int, limit: int) -> Deferred[list[ChangeRecord]]:
        return self._runner.runRead(self._changesSince, serial, limit)

    def subscribe(self, callback: Callable[[ChangeRecord], None]) -> Callable[[], None]:
        return self._teller.subscribe(callback)

    def referencedBlobs(self) -> Deferred[set[str]]:
        """The digests of every blob a current value refers to."""

        def work(conn: psycopg.Connection) -> set[str]:
            rows = conn.execute("SELECT DISTINCT blob FROM devpi_kv WHERE blob IS NOT NULL").fetchall()
            return {r[0] for r in rows}

        return self._runner.runRead(self._run, work)

    def isBlobReferenced(self, sha256: str) -> Deferred[bool]:
        def work(conn: psycopg.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM devpi_kv WHERE blob = %s LIMIT 1", (sha256,)).fetchone()
            return row is not None

        return self._runner.runRead(self._run, work)

    # ISharedSecret

    def _shared(self, name: str, candidate: str) -> str:
        """The value of C{name} every node uses; the first node's candidate becomes it.  Blocking."""

        def work(conn: psycopg.Connection) -> str:
            conn.execute(
                "INSERT INTO devpi_meta (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, candidate),
            )
            row = conn.execute("SELECT value FROM devpi_meta WHERE name = %s", (name,)).fetchone()
            return row[0]

        return self._run(work)

    def sharedSecret(self, candidate: bytes) -> bytes:
        return base64.b64decode(self._shared("secret", base64.b64encode(candidate).decode("ascii")))

    def sharedUUID(self, candidate: str) -> str:
        return self._shared("uuid", candidate)

    # following other nodes

    def startWatching(self, reactor: Any) -> None:
        """
        Follow the other nodes' commits: a listener thread waits for their
        notifications and has the reactor tell subscribers of each new
        change (once), so caches invalidate and L{currentSerial} is right.
        When the listener's connection drops it reconnects with backoff and
        catches up, so nothing is missed.
        """
        if self._listener is not None:
            return
        self._reactor = reactor
        stop = self._stopListening = threading.Event()
        self._listener = threading.Thread(target=self._listen, args=(stop,), name="devpi-postgres-listener",
                                          daemon=True)
        self._listener.start()

    def isWatching(self) -> bool:
        return self._listener is not None

    def stopWatching(self) -> threading.Thread | None:
        """Stop the listener; it ends within a fraction of a second (returned, to join off the reactor)."""
        listener, self._listener = self._listener, None
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        if self._stopListening is not None:
            self._stopListening.set()
        return listener

    def _listen(self, stop: threading.Event) -> None:
        """The listener thread: LISTEN, hand each notification to the reactor, reconnect when cut off."""
        delay = 0.1
        while not stop.is_set():
            try:
                conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            except psycopg.Error:
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if delay > 0.1:
                        log.info("listening to PostgreSQL at {where} again", where=self._where)
                    delay = 0.1
                    # What was committed while no one listened.
                    self._fromThread(stop)
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=0.2):
                            self._fromThread(stop)
                            if stop.is_set():
                                break
            except psycopg.Error as e:
                if not stop.is_set():
                    log.warn("lost the PostgreSQL listener at {where}: {error}; reconnecting",
                             where=self._where, error=_firstLine(e))
                    stop.wait(delay)
                    delay = 0.2

    def _fromThread(self, stop: threading.Event) -> None:
        if not stop.is_set():
            self._reactor.callFromThread(self._notified, stop)

    def _notified(self, stop: threading.Event) -> None:
        if stop is self._stopListening and not stop.is_set():
            self._scheduleCatchUp()

    def _scheduleCatchUp(self) -> None:
        """Catch up once more after any catch-up under way (notifications coalesce)."""
        if self._catchUpPending:
            return
        self._catchUpPending = True

        def failed(f: Any) -> None:
            # Likely unreachable: try again shortly (the listener reconnecting also does).
            log.warn("catching up with other nodes' commits failed: {error}", error=f.getErrorMessage())
            if self.isWatching() and self._retry is None:
                self._retry = self._reactor.callLater(PROBE_INTERVAL, self._retryCatchUp)

        self._catchUpLock.run(self._catchUp).addErrback(failed)

    def _retryCatchUp(self) -> None:
        self._retry = None
        self._scheduleCatchUp()

    def _catchUp(self) -> Deferred[None]:
        """Tell subscribers of every committed change they have not been told of, in order."""
        self._catchUpPending = False

        def got(records: list[ChangeRecord]) -> Deferred[None] | None:
            for record in records:
                self._teller.tell(record)
            return self._catchUp() if len(records) == 500 else None

        def pruned(failure: Any) -> None:
            # Only a node that stopped following for the whole kept history
            # gets here: it goes on from what is kept.
            failure.trap(HistoryPruned)
            log.warn("changes before serial {oldest} were pruned before this node heard of them",
                     oldest=failure.value.oldest)
            self._teller.skipTo(failure.value.oldest)

        return self.changesSince(self._teller.told, 500).addCallbacks(got, pruned)

    def close(self) -> Deferred[None]:
        listener = self.stopWatching()
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None

        def _close() -> None:
            if pool is not None:
                pool.close(timeout=1.0)
            if listener is not None:
                listener.join(CONNECT_TIMEOUT + 1)

        return self._runner.runWrite(_close)


def openPostgres(serverdir: Any, runner: Runner, settings: Any) -> PostgresStorage:
    """Open (creating the schema if needed) the database at C{settings.pgDSN}."""
    if not settings.pgDSN:
        raise StorageError("--storage postgresql needs --pg-dsn (or DEVPI_TWISTED_PG_DSN)")
    return PostgresStorage(settings.pgDSN, runner)
