# -*- test-case-name: tests.test_search -*-
"""
What the search index engines (L{devpi_twisted.storage.searchindex_sqlite},
L{devpi_twisted.storage.searchindex_postgres}) share: the documents and
operations they store, the query they answer and the hits they give back,
and the pure helpers that turn a user's text into a query.

Ranks order the hits of one search: an exact project name first, then
names that start with the query, then names one typo away, then projects
whose words, summary, description, keywords, classifiers or author match,
then documentation pages.
"""

import re
from dataclasses import dataclass, field

from devpi_twisted.model.names import normalizeProject

EXACT, PREFIX, TYPO, TEXT, DOC = 0, 1, 2, 3, 4


class Moved(Exception):
    """The index is not at the position a write started from (another node wrote, or it was cleared)."""


@dataclass(frozen=True)
class ProjectDoc:
    """A project as the index keeps it (the latest version's metadata)."""

    index: str  # "user/index"
    name: str  # normalised
    display: str
    version: str | None = None
    summary: str = ""
    description: str = ""
    keywords: str = ""
    classifiers: str = ""
    author: str = ""

    @property
    def words(self) -> str:
        """The name's words, so that C{login} finds C{flask-login}."""
        return " ".join(re.split(r"[-_.]+", self.display))


@dataclass(frozen=True)
class DocPage:
    path: str
    title: str
    text: str


# Operations given to ISearchIndex.apply, as tuples:
#   ("project", ProjectDoc)                     add or replace a project
#   ("dropProject", index, name)                remove it and its documentation
#   ("docs", index, name, version, sha256, [DocPage])   replace its documentation pages
#   ("dropDocs", index, name)
#   ("names", index, sha256)                    the staged mirror names become the index's list
#   ("dropNames", index)                        forget the mirror names of an index
#   ("dropIndex", index)                        remove everything of an index


@dataclass(frozen=True)
class SearchQuery:
    """What an engine is asked: C{excluded} indexes are never answered."""

    text: str
    name: str  # the normalised name form ("" when none)
    typos: tuple[str, ...]  # names one edit away
    words: tuple[str, ...]  # lowercase words, matched as prefixes
    excluded: frozenset[str] = frozenset()
    limit: int = 1000


@dataclass(frozen=True)
class IndexHit:
    kind: str  # "project" or "doc"
    index: str
    name: str
    display: str
    version: str | None
    summary: str
    rank: int
    score: float = 0.0
    docPath: str | None = None
    title: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        return (self.kind, self.index, self.name, self.docPath)


_WORD = re.compile(r"\w+", re.UNICODE)
_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-"
MAX_QUERY = 200


def queryWords(text: str) -> tuple[str, ...]:
    """The query's words, lowercased, at most ten."""
    return tuple(w.lower() for w in _WORD.findall(text))[:10]


def nameForm(text: str) -> str:
    """The project name a query may mean: its words joined as one normalised name."""
    parts = [p for p in re.split(r"\s+", text.strip()) if p]
    if not parts:
        return ""
    return normalizeProject("-".join(parts)).strip("-")


def oneEditAway(name: str) -> tuple[str, ...]:
    """
    Every normalised name one deletion, transposition, substitution or
    insertion away from C{name} (names of 3 to 40 characters only: shorter
    ones would match too much), for typo-tolerant lookups by key.
    """
    if not 3 <= len(name) <= 40:
        return ()
    found = set()
    for i in range(len(name)):
        found.add(name[:i] + name[i + 1:])
        if i + 1 < len(name):
            found.add(name[:i] + name[i + 1] + name[i] + name[i + 2:])
        for c in _NAME_ALPHABET:
            found.add(name[:i] + c + name[i + 1:])
    for i in range(len(name) + 1):
        for c in _NAME_ALPHABET:
            found.add(name[:i] + c + name[i:])
    found.discard(name)
    return tuple(sorted(n for n in found if n and not n.startswith("-") and not n.endswith("-")))


def makeQuery(text: str, excluded: frozenset[str] = frozenset(), limit: int = 1000) -> SearchQuery:
    name = nameForm(text)
    return SearchQuery(text=text, name=name, typos=oneEditAway(name), words=queryWords(text),
                       excluded=excluded, limit=limit)


def prefixBound(prefix: str) -> str:
    """The smallest string above every string that starts with C{prefix}."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def mergeHits(groups: list[list[IndexHit]], limit: int) -> list[IndexHit]:
    """
    The hits of every kind in rank order, each project or page once (at its
    best rank; a private project before a mirror's bare name), at most C{limit}.
    """
    ordered = sorted((hit for group in groups for hit in group),
                     key=lambda h: (h.rank, -h.score, len(h.name), h.name, h.index, h.docPath or ""))
    seen: set[tuple[str, str, str, str | None]] = set()
    merged = []
    for hit in ordered:
        if hit.key in seen:
            continue
        seen.add(hit.key)
        merged.append(hit)
        if len(merged) >= limit:
            break
    return merged
