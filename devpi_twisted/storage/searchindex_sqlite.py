# -*- test-case-name: tests.test_search -*-
"""
The embedded search index: SQLite with FTS5, in its own file of the server
directory (C{search.sqlite}), apart from the state: it is derived data,
deleted and rebuilt at will.

Names (private projects and mirrors' project lists) are B-tree keys, so an
exact name, a prefix and the few hundred names one typo away are index
lookups whatever the number of names; words of names, summaries,
descriptions, keywords, classifiers, authors and documentation pages are in
FTS5 tables, ranked with bm25.  The FTS rows share their rowid with a plain
table row, so a project is replaced without scanning the FTS table.

One writer connection, behind a lock; reads use a connection per thread
(WAL: they never wait for the writer).
"""

import os
import sqlite3
import threading
from typing import Any, Iterable

from zope.interface import implementer

from devpi_twisted.interfaces import ISearchIndex
from devpi_twisted.storage.searchindex import (
    DOC, EXACT, PREFIX, TEXT, TYPO, IndexHit, Moved, ProjectDoc, SearchQuery, prefixBound,
)

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL, idx TEXT NOT NULL,"
    " display TEXT NOT NULL, version TEXT, summary TEXT NOT NULL, UNIQUE (name, idx))",
    "CREATE INDEX IF NOT EXISTS projects_by_index ON projects (idx)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS projects_fts USING fts5(words, summary, description, keywords,"
    " classifiers, author, tokenize='unicode61 remove_diacritics 2')",
    "CREATE TABLE IF NOT EXISTS names (name TEXT NOT NULL, idx TEXT NOT NULL, display TEXT NOT NULL,"
    " PRIMARY KEY (name, idx)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS names_by_index ON names (idx)",
    "CREATE TABLE IF NOT EXISTS namelists (idx TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS staging (name TEXT PRIMARY KEY, display TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS docsets (idx TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,"
    " sha256 TEXT NOT NULL, PRIMARY KEY (idx, name))",
    "CREATE TABLE IF NOT EXISTS docpages (id INTEGER PRIMARY KEY, idx TEXT NOT NULL, name TEXT NOT NULL,"
    " version TEXT NOT NULL, path TEXT NOT NULL, title TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS docpages_by_project ON docpages (idx, name)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(title, body, tokenize='unicode61 remove_diacritics 2')",
]
_TABLES = ("meta", "projects", "projects_fts", "names", "namelists", "staging", "docsets", "docpages", "docs_fts")


def ftsQuery(words: Iterable[str]) -> str:
    """Every word as a prefix, all required (FTS5 syntax, each word quoted)."""
    return " AND ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _notIn(column: str, excluded: frozenset[str]) -> tuple[str, list[str]]:
    if not excluded:
        return "", []
    return f" AND {column} NOT IN ({','.join('?' * len(excluded))})", sorted(excluded)


@implementer(ISearchIndex)
class SQLiteSearchIndex:
    """
    @param path: the database file, or C{None} for an in-memory index (the
        tests' servers, which have no server directory): then reads use the
        writer's connection.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._writer = self._connect()
        with self._lock:
            for statement in _SCHEMA:
                self._writer.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path or ":memory:", isolation_level=None, check_same_thread=False)
        if self._path is not None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost last batch is indexed again
            conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._path is None:
            return self._writer
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._readers.append(conn)
        return conn

    # position and claim

    def _position(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()
        return int(row[0]) if row else -1

    def position(self) -> int:
        with self._lock if self._path is None else _nothing():
            return self._position(self._reader())

    def claim(self, node: str, now: float, lease: float) -> bool:
        return True  # one file per node: only its main process indexes

    # writes

    def apply(self, operations: list[tuple[Any, ...]], expected: int, position: int) -> None:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._position(conn) != expected:
                    raise Moved(f"search index at {self._position(conn)}, not {expected}")
                for op in operations:
                    getattr(self, "_op_" + op[0])(conn, *op[1:])
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('position', ?)", (str(position),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _op_project(self, conn: sqlite3.Connection, doc: ProjectDoc) -> None:
        row = conn.execute("SELECT id FROM projects WHERE name = ? AND idx = ?", (doc.name, doc.index)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM projects_fts WHERE rowid = ?", (row[0],))
            conn.execute("UPDATE projects SET display = ?, version = ?, summary = ? WHERE id = ?",
                         (doc.display, doc.version, doc.summary, row[0]))
            rowid = row[0]
        else:
            rowid = conn.execute("INSERT INTO projects (name, idx, display, version, summary) VALUES (?, ?, ?, ?, ?)",
                                 (doc.name, doc.index, doc.display, doc.version, doc.summary)).lastrowid
        conn.execute("INSERT INTO projects_fts (rowid, words, summary, description, keywords, classifiers, author)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (rowid, doc.words, doc.summary, doc.description, doc.keywords, doc.classifiers, doc.author))

    def _op_dropProject(self, conn: sqlite3.Connection, index: str, name: str) -> None:
        row = conn.execute("SELECT id FROM projects WHERE name = ? AND idx = ?", (name, index)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM projects_fts WHERE rowid = ?", (row[0],))
            conn.execute("DELETE FROM projects WHERE id = ?", (row[0],))
        self._op_dropDocs(conn, index, name)

    def _op_dropDocs(self, conn: sqlite3.Connection, index: str, name: str) -> None:
        ids = [r[0] for r in conn.execute("SELECT id FROM docpages WHERE idx = ? AND name = ?", (index, name))]
        conn.executemany("DELETE FROM docs_fts WHERE rowid = ?", [(i,) for i in ids])
        conn.execute("DELETE FROM docpages WHERE idx = ? AND name = ?", (index, name))
        conn.execute("DELETE FROM docsets WHERE idx = ? AND name = ?", (index, name))

    def _op_docs(self, conn: sqlite3.Connection, index: str, name: str, version: str, sha256: str,
                 pages: list[Any]) -> None:
        self._op_dropDocs(conn, index, name)
        conn.execute("INSERT INTO docsets (idx, name, version, sha256) VALUES (?, ?, ?, ?)",
                     (index, name, version, sha256))
        for page in pages:
            rowid = conn.execute("INSERT INTO docpages (idx, name, version, path, title) VALUES (?, ?, ?, ?, ?)",
                                 (index, name, version, page.path, page.title)).lastrowid
            conn.execute("INSERT INTO docs_fts (rowid, title, body) VALUES (?, ?, ?)", (rowid, page.title, page.text))

    def _op_names(self, conn: sqlite3.Connection, index: str, sha256: str) -> None:
        conn.execute("DELETE FROM names WHERE idx = ? AND NOT EXISTS"
                     " (SELECT 1 FROM staging s WHERE s.name = names.name)", (index,))
        conn.execute("INSERT OR REPLACE INTO names (name, idx, display) SELECT name, ?, display FROM staging", (index,))
        conn.execute("DELETE FROM staging")
        conn.execute("INSERT OR REPLACE INTO namelists (idx, sha256) VALUES (?, ?)", (index, sha256))

    def _op_dropNames(self, conn: sqlite3.Connection, index: str) -> None:
        conn.execute("DELETE FROM names WHERE idx = ?", (index,))
        conn.execute("DELETE FROM namelists WHERE idx = ?", (index,))

    def _op_dropIndex(self, conn: sqlite3.Connection, index: str) -> None:
        for (name,) in conn.execute("SELECT name FROM projects WHERE idx = ?", (index,)).fetchall():
            self._op_dropProject(conn, index, name)
        for (name,) in conn.execute("SELECT name FROM docsets WHERE idx = ?", (index,)).fetchall():
            self._op_dropDocs(conn, index, name)
        conn.execute("DELETE FROM names WHERE idx = ?", (index,))
        conn.execute("DELETE FROM namelists WHERE idx = ?", (index,))

    def stageNames(self, names: list[tuple[str, str]]) -> None:
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany("INSERT OR IGNORE INTO staging (name, display) VALUES (?, ?)", names)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise

    def clearStage(self) -> None:
        with self._lock:
            self._writer.execute("DELETE FROM staging")

    def clear(self) -> None:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table in _TABLES:
                    conn.execute(f"DELETE FROM {table}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            for conn in [self._writer, *self._readers]:
                conn.close()
            self._readers = []

    # reads

    def _read(self, function: Any, *args: Any) -> Any:
        if self._path is None:
            with self._lock:
                return function(self._writer, *args)
        return function(self._reader(), *args)

    def namesDigest(self, index: str) -> str | None:
        row = self._read(lambda c: c.execute("SELECT sha256 FROM namelists WHERE idx = ?", (index,)).fetchone())
        return row[0] if row else None

    def docDigests(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        def _digests(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
            found = {}
            for index, name in pairs:
                row = conn.execute("SELECT sha256 FROM docsets WHERE idx = ? AND name = ?", (index, name)).fetchone()
                if row:
                    found[(index, name)] = row[0]
            return found

        return self._read(_digests)

    def search(self, query: SearchQuery) -> list[IndexHit]:
        return self._read(self._search, query)

    def _search(self, conn: sqlite3.Connection, q: SearchQuery) -> list[IndexHit]:
        hits: list[IndexHit] = []
        pNot, pArgs = _notIn("idx", q.excluded)
        projectCols = "name, idx, display, version, summary"

        def left() -> int:
            # Ranks come in order: once the better ones fill the results, worse ones are not looked for.
            return max(0, q.limit - len(hits))

        def projects(rank: int, where: str, args: list[Any], score: float = 1.0) -> None:
            if not left():
                return
            for name, idx, display, version, summary in conn.execute(
                    f"SELECT {projectCols} FROM projects WHERE {where}{pNot} ORDER BY name LIMIT ?",
                    [*args, *pArgs, left()]):
                hits.append(IndexHit("project", idx, name, display, version, summary, rank, score))

        def names(rank: int, where: str, args: list[Any]) -> None:
            if not left():
                return
            for name, idx, display in conn.execute(
                    f"SELECT name, idx, display FROM names WHERE {where}{pNot} ORDER BY name LIMIT ?",
                    [*args, *pArgs, left()]):
                hits.append(IndexHit("project", idx, name, display, None, "", rank, 0.0))

        if q.name:
            projects(EXACT, "name = ?", [q.name])
            names(EXACT, "name = ?", [q.name])
            bound = prefixBound(q.name)
            projects(PREFIX, "name > ? AND name < ?", [q.name, bound])
            names(PREFIX, "name > ? AND name < ?", [q.name, bound])
            for start in range(0, len(q.typos), 500):
                chunk = list(q.typos[start:start + 500])
                marks = ",".join("?" * len(chunk))
                projects(TYPO, f"name IN ({marks})", chunk)
                names(TYPO, f"name IN ({marks})", chunk)
        if q.words and left():
            match = ftsQuery(q.words)
            fNot, fArgs = _notIn("p.idx", q.excluded)
            for name, idx, display, version, summary, score in conn.execute(
                    "SELECT p.name, p.idx, p.display, p.version, p.summary,"
                    " bm25(projects_fts, 10.0, 5.0, 1.0, 4.0, 2.0, 2.0)"
                    " FROM projects_fts JOIN projects p ON p.id = projects_fts.rowid"
                    f" WHERE projects_fts MATCH ?{fNot} ORDER BY bm25(projects_fts, 10.0, 5.0, 1.0, 4.0, 2.0, 2.0)"
                    " LIMIT ?", [match, *fArgs, left()]):
                hits.append(IndexHit("project", idx, name, display, version, summary, TEXT, -score))
            dNot, dArgs = _notIn("d.idx", q.excluded)
            for rowid, name, idx, version, path, title, score in conn.execute(
                    "SELECT d.id, d.name, d.idx, d.version, d.path, d.title, bm25(docs_fts, 5.0, 1.0)"
                    " FROM docs_fts JOIN docpages d ON d.id = docs_fts.rowid"
                    f" WHERE docs_fts MATCH ?{dNot} ORDER BY bm25(docs_fts, 5.0, 1.0) LIMIT ?",
                    [match, *dArgs, left()]) if left() else ():
                hits.append(IndexHit("doc", idx, name, name, version, "", DOC, -score, docPath=path, title=title,
                                     extra={"rowid": rowid}))
        return hits

    def texts(self, hits: list[IndexHit]) -> dict[Any, str]:
        def _texts(conn: sqlite3.Connection) -> dict[Any, str]:
            found = {}
            for hit in hits:
                if hit.kind == "doc":
                    row = conn.execute("SELECT body FROM docs_fts WHERE rowid = ?", (hit.extra.get("rowid"),)).fetchone()
                else:
                    row = conn.execute(
                        "SELECT f.description FROM projects p JOIN projects_fts f ON f.rowid = p.id"
                        " WHERE p.name = ? AND p.idx = ?", (hit.name, hit.index)).fetchone()
                if row and row[0]:
                    found[hit.key] = row[0]
            return found

        return self._read(_texts)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def openSQLiteIndex(serverdir: str | None) -> SQLiteSearchIndex:
    """The index file of a server directory (C{search.sqlite}), or one in memory without a directory."""
    if serverdir is None or not os.path.isdir(serverdir):
        return SQLiteSearchIndex(None)
    return SQLiteSearchIndex(os.path.join(serverdir, "search.sqlite"))
