"""
What a search answers (L{devpi_twisted.services.search}), shared by its JSON
answer and the web interface's page.  Pure.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Highlight:
    """A piece of matched text: C{text}, and whether it is what the query matched."""

    text: str
    match: bool


@dataclass(frozen=True)
class SearchHit:
    """One result: a project (latest matching version) or a documentation page."""

    index: str  # "user/index"
    project: str  # the display name
    version: str | None
    summary: str
    kind: str = "project"  # "project" or "doc"
    docPath: str | None = None  # for kind "doc": the page's path inside the docs
    score: float = 0.0
    highlights: tuple[tuple[str, tuple[Highlight, ...]], ...] = ()  # (field, pieces) that matched


@dataclass(frozen=True)
class SearchResults:
    query: str
    page: int  # 1-based
    pageSize: int
    total: int
    hits: tuple[SearchHit, ...] = field(default_factory=tuple)
