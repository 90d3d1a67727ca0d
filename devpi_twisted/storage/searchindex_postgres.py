# -*- test-case-name: tests.test_search -*-
"""
The search index in PostgreSQL, beside the state (tables C{devpi_search_*},
never in the changelog or exports), shared by every node of that database:
one node indexes at a time, holding a lease on the position row
(L{PostgresSearchIndex.claim}); all of them answer searches from it.

Words are matched with PostgreSQL's full text search (C{tsvector} columns
with GIN indexes, the C{simple} configuration: project names and code are
not English); names one typo away with C{pg_trgm}'s similarity when the
extension can be created, else with the same one-edit key lookups as the
embedded index.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from twisted.logger import Logger
from zope.interface import implementer

from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.interfaces import ISearchIndex
from devpi_twisted.storage.searchindex import (
    DOC, EXACT, PREFIX, TEXT, TYPO, IndexHit, Moved, ProjectDoc, SearchQuery, prefixBound,
)

log = Logger()

_LOCK = 0x64657670_00000005  # advisory lock: creating the schema

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS devpi_search_position (id INT PRIMARY KEY, serial BIGINT NOT NULL,"
    " node TEXT, until DOUBLE PRECISION NOT NULL DEFAULT 0)",
    "INSERT INTO devpi_search_position (id, serial) VALUES (1, -1) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS devpi_search_projects (name TEXT COLLATE \"C\" NOT NULL, idx TEXT NOT NULL,"
    " display TEXT NOT NULL, version TEXT, summary TEXT NOT NULL, description TEXT NOT NULL,"
    " doc tsvector NOT NULL, PRIMARY KEY (name, idx))",
    "CREATE INDEX IF NOT EXISTS devpi_search_projects_doc ON devpi_search_projects USING GIN (doc)",
    "CREATE INDEX IF NOT EXISTS devpi_search_projects_idx ON devpi_search_projects (idx)",
    "CREATE TABLE IF NOT EXISTS devpi_search_names (name TEXT COLLATE \"C\" NOT NULL, idx TEXT NOT NULL,"
    " display TEXT NOT NULL, PRIMARY KEY (name, idx))",
    "CREATE INDEX IF NOT EXISTS devpi_search_names_idx ON devpi_search_names (idx)",
    "CREATE TABLE IF NOT EXISTS devpi_search_namelists (idx TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    # a node's staging of a mirror's names (several chunks, duplicates possible): one node indexes at a time
    "CREATE UNLOGGED TABLE IF NOT EXISTS devpi_search_staging (name TEXT NOT NULL, display TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS devpi_search_staging_name ON devpi_search_staging (name)",
    "CREATE TABLE IF NOT EXISTS devpi_search_docsets (idx TEXT NOT NULL, name TEXT NOT NULL,"
    " version TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (idx, name))",
    "CREATE TABLE IF NOT EXISTS devpi_search_docpages (id BIGSERIAL PRIMARY KEY, idx TEXT NOT NULL,"
    " name TEXT NOT NULL, version TEXT NOT NULL, path TEXT NOT NULL, title TEXT NOT NULL, body TEXT NOT NULL,"
    " doc tsvector NOT NULL)",
    "CREATE INDEX IF NOT EXISTS devpi_search_docpages_doc ON devpi_search_docpages USING GIN (doc)",
    "CREATE INDEX IF NOT EXISTS devpi_search_docpages_project ON devpi_search_docpages (idx, name)",
]
_TRIGRAM = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS devpi_search_names_trgm ON devpi_search_names USING GIN (name gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS devpi_search_projects_trgm ON devpi_search_projects USING GIN (name gin_trgm_ops)",
]
_TABLES = ("devpi_search_projects", "devpi_search_names", "devpi_search_namelists", "devpi_search_staging",
           "devpi_search_docsets", "devpi_search_docpages")

_PROJECT_DOC = (
    "setweight(to_tsvector('simple', %(words)s), 'A') || setweight(to_tsvector('simple', %(summary)s), 'B')"
    " || setweight(to_tsvector('simple', %(keywords)s), 'B')"
    " || setweight(to_tsvector('simple', %(classifiers)s || ' ' || %(author)s), 'C')"
    " || setweight(to_tsvector('simple', %(description)s), 'D')"
)


def tsQuery(words: tuple[str, ...]) -> str:
    """Every word as a prefix, all required (C{to_tsquery} syntax; words are C{\\w+}, so need no quoting)."""
    return " & ".join(f"'{w}':*" for w in words)


def _clean(text: str) -> str:
    return text.replace("\x00", "")


@implementer(ISearchIndex)
class PostgresSearchIndex:
    """
    @param dsn: the database (the state's own, C{--pg-dsn}).
    """

    def __init__(self, dsn: str, maxConnections: int = 4) -> None:
        self._pool = ConnectionPool(dsn, min_size=1, max_size=maxConnections, open=True,
                                    kwargs={"autocommit": True})
        self.trigrams = False
        self._stageLock = threading.Lock()
        with self._pool.connection() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                for statement in _SCHEMA:
                    conn.execute(statement)
            try:
                with conn.transaction():
                    for statement in _TRIGRAM:
                        conn.execute(statement)
                self.trigrams = True
            except psycopg.Error as e:
                # Without pg_trgm (not installed, or no right to create it)
                # typos are found by key lookups instead.
                log.warn("pg_trgm unavailable ({error}); typo-tolerant names use key lookups", error=str(e))

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """
        A pooled connection; PostgreSQL unreachable is L{StorageUnavailable}
        at once (503 to a search, a retry later to the indexer), not a wait
        of the pool's default half minute or a 500.
        """
        try:
            with self._pool.connection(timeout=2.0) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout, PoolClosed) as e:
            raise StorageUnavailable(f"the search index's PostgreSQL is unreachable just now ({type(e).__name__})")

    def position(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT serial FROM devpi_search_position WHERE id = 1").fetchone()
            return int(row[0]) if row else -1

    def claim(self, node: str, now: float, lease: float) -> bool:
        with self._connection() as conn:
            row = conn.execute(
                "UPDATE devpi_search_position SET node = %s, until = %s"
                " WHERE id = 1 AND (node IS NULL OR node = %s OR until < %s) RETURNING 1",
                (node, now + lease, node, now)).fetchone()
            return row is not None

    def apply(self, operations: list[tuple[Any, ...]], expected: int, position: int) -> None:
        with self._connection() as conn:
            with conn.transaction():
                row = conn.execute("SELECT serial FROM devpi_search_position WHERE id = 1 FOR UPDATE").fetchone()
                if row is None or int(row[0]) != expected:
                    raise Moved(f"search index at {row and row[0]}, not {expected}")
                for op in operations:
                    getattr(self, "_op_" + op[0])(conn, *op[1:])
                conn.execute("UPDATE devpi_search_position SET serial = %s WHERE id = 1", (position,))

    def _op_project(self, conn: Any, doc: ProjectDoc) -> None:
        values = {"name": doc.name, "idx": doc.index, "display": doc.display, "version": doc.version,
                  "summary": _clean(doc.summary), "description": _clean(doc.description), "words": _clean(doc.words),
                  "keywords": _clean(doc.keywords), "classifiers": _clean(doc.classifiers),
                  "author": _clean(doc.author)}
        conn.execute(
            "INSERT INTO devpi_search_projects (name, idx, display, version, summary, description, doc)"
            f" VALUES (%(name)s, %(idx)s, %(display)s, %(version)s, %(summary)s, %(description)s, {_PROJECT_DOC})"
            " ON CONFLICT (name, idx) DO UPDATE SET display = EXCLUDED.display, version = EXCLUDED.version,"
            " summary = EXCLUDED.summary, description = EXCLUDED.description, doc = EXCLUDED.doc", values)

    def _op_dropProject(self, conn: Any, index: str, name: str) -> None:
        conn.execute("DELETE FROM devpi_search_projects WHERE name = %s AND idx = %s", (name, index))
        self._op_dropDocs(conn, index, name)

    def _op_dropDocs(self, conn: Any, index: str, name: str) -> None:
        conn.execute("DELETE FROM devpi_search_docpages WHERE idx = %s AND name = %s", (index, name))
        conn.execute("DELETE FROM devpi_search_docsets WHERE idx = %s AND name = %s", (index, name))

    def _op_docs(self, conn: Any, index: str, name: str, version: str, sha256: str, pages: list[Any]) -> None:
        self._op_dropDocs(conn, index, name)
        conn.execute("INSERT INTO devpi_search_docsets (idx, name, version, sha256) VALUES (%s, %s, %s, %s)",
                     (index, name, version, sha256))
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO devpi_search_docpages (idx, name, version, path, title, body, doc) VALUES"
                " (%s, %s, %s, %s, %s, %s, setweight(to_tsvector('simple', %s), 'A')"
                " || setweight(to_tsvector('simple', %s), 'D'))",
                [(index, name, version, p.path, _clean(p.title), _clean(p.text), _clean(p.title), _clean(p.text))
                 for p in pages])

    def _op_names(self, conn: Any, index: str, sha256: str) -> None:
        conn.execute("DELETE FROM devpi_search_names n WHERE idx = %s AND NOT EXISTS"
                     " (SELECT 1 FROM devpi_search_staging s WHERE s.name = n.name)", (index,))
        conn.execute("INSERT INTO devpi_search_names (name, idx, display) SELECT DISTINCT ON (name) name, %s, display"
                     " FROM devpi_search_staging ON CONFLICT (name, idx) DO UPDATE SET display = EXCLUDED.display",
                     (index,))
        conn.execute("DELETE FROM devpi_search_staging")
        conn.execute("INSERT INTO devpi_search_namelists (idx, sha256) VALUES (%s, %s)"
                     " ON CONFLICT (idx) DO UPDATE SET sha256 = EXCLUDED.sha256", (index, sha256))

    def _op_dropNames(self, conn: Any, index: str) -> None:
        conn.execute("DELETE FROM devpi_search_names WHERE idx = %s", (index,))
        conn.execute("DELETE FROM devpi_search_namelists WHERE idx = %s", (index,))

    def _op_dropIndex(self, conn: Any, index: str) -> None:
        for table in ("devpi_search_projects", "devpi_search_names", "devpi_search_namelists",
                      "devpi_search_docsets", "devpi_search_docpages"):
            conn.execute(f"DELETE FROM {table} WHERE idx = %s", (index,))

    def stageNames(self, names: list[tuple[str, str]]) -> None:
        with self._connection() as conn:
            with conn.cursor() as cursor:
                with cursor.copy("COPY devpi_search_staging (name, display) FROM STDIN") as copy:
                    for name, display in names:
                        copy.write_row((name, _clean(display)))

    def clearStage(self) -> None:
        with self._connection() as conn:
            conn.execute("DELETE FROM devpi_search_staging")

    def clear(self) -> None:
        with self._connection() as conn:
            with conn.transaction():
                conn.execute("SELECT serial FROM devpi_search_position WHERE id = 1 FOR UPDATE")
                for table in _TABLES:
                    conn.execute(f"DELETE FROM {table}")
                conn.execute("UPDATE devpi_search_position SET serial = -1 WHERE id = 1")

    def close(self) -> None:
        self._pool.close()

    def namesDigest(self, index: str) -> str | None:
        with self._connection() as conn:
            row = conn.execute("SELECT sha256 FROM devpi_search_namelists WHERE idx = %s", (index,)).fetchone()
            return row[0] if row else None

    def docDigests(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        found = {}
        with self._connection() as conn:
            for index, name in pairs:
                row = conn.execute("SELECT sha256 FROM devpi_search_docsets WHERE idx = %s AND name = %s",
                                   (index, name)).fetchone()
                if row:
                    found[(index, name)] = row[0]
        return found

    def search(self, q: SearchQuery) -> list[IndexHit]:
        hits: list[IndexHit] = []
        excluded = sorted(q.excluded)
        with self._connection() as conn:
            def left() -> int:
                # Ranks come in order: once the better ones fill the results, worse ones are not looked for.
                return max(0, q.limit - len(hits))

            def projects(rank: int, where: str, args: list[Any], order: str = "name") -> None:
                if not left():
                    return
                for name, idx, display, version, summary in conn.execute(
                        "SELECT name, idx, display, version, summary FROM devpi_search_projects"
                        f" WHERE {where} AND NOT (idx = ANY(%s)) ORDER BY {order} LIMIT %s",
                        [*args, excluded, left()]):
                    hits.append(IndexHit("project", idx, name, display, version, summary, rank, 1.0))

            def names(rank: int, where: str, args: list[Any], order: str = "name") -> None:
                if not left():
                    return
                for name, idx, display in conn.execute(
                        f"SELECT name, idx, display FROM devpi_search_names WHERE {where} AND NOT (idx = ANY(%s))"
                        f" ORDER BY {order} LIMIT %s", [*args, excluded, left()]):
                    hits.append(IndexHit("project", idx, name, display, None, "", rank, 0.0))

            if q.name:
                projects(EXACT, "name = %s", [q.name])
                names(EXACT, "name = %s", [q.name])
                bound = prefixBound(q.name)
                projects(PREFIX, "name > %s AND name < %s", [q.name, bound])
                names(PREFIX, "name > %s AND name < %s", [q.name, bound])
                if q.typos:
                    projects(TYPO, "name = ANY(%s)", [list(q.typos)])
                    names(TYPO, "name = ANY(%s)", [list(q.typos)])
                if self.trigrams and len(q.name) >= 4 and left():
                    # pg_trgm: names further off (two typos, a word missing), after those one edit away
                    for table, columns in (("devpi_search_projects", "version, summary"),
                                           ("devpi_search_names", "NULL, ''")):
                        for name, idx, display, version, summary, similarity in conn.execute(
                                f"SELECT name, idx, display, {columns}, similarity(name, %s) FROM {table}"
                                " WHERE name %% %s AND NOT (idx = ANY(%s)) ORDER BY similarity(name, %s) DESC"
                                " LIMIT 50", [q.name, q.name, excluded, q.name]):
                            hits.append(IndexHit("project", idx, name, display, version, summary, TYPO,
                                                 -1.0 + float(similarity)))
            if q.words and left():
                query = tsQuery(q.words)
                for name, idx, display, version, summary, score in conn.execute(
                        "SELECT name, idx, display, version, summary, ts_rank(doc, query)"
                        " FROM devpi_search_projects, to_tsquery('simple', %s) query"
                        " WHERE doc @@ query AND NOT (idx = ANY(%s)) ORDER BY ts_rank(doc, query) DESC LIMIT %s",
                        [query, excluded, left()]):
                    hits.append(IndexHit("project", idx, name, display, version, summary, TEXT, float(score)))
                for rowid, name, idx, version, path, title, score in conn.execute(
                        "SELECT id, name, idx, version, path, title, ts_rank(doc, query)"
                        " FROM devpi_search_docpages, to_tsquery('simple', %s) query"
                        " WHERE doc @@ query AND NOT (idx = ANY(%s)) ORDER BY ts_rank(doc, query) DESC LIMIT %s",
                        [query, excluded, left()]) if left() else ():
                    hits.append(IndexHit("doc", idx, name, name, version, "", DOC, float(score), docPath=path,
                                         title=title, extra={"rowid": rowid}))
        return hits

    def texts(self, hits: list[IndexHit]) -> dict[Any, str]:
        found = {}
        with self._connection() as conn:
            for hit in hits:
                if hit.kind == "doc":
                    row = conn.execute("SELECT body FROM devpi_search_docpages WHERE id = %s",
                                       (hit.extra.get("rowid"),)).fetchone()
                else:
                    row = conn.execute("SELECT description FROM devpi_search_projects WHERE name = %s AND idx = %s",
                                       (hit.name, hit.index)).fetchone()
                if row and row[0]:
                    found[hit.key] = row[0]
        return found
