"""
The pages' markup, built with C{twisted.web.template}'s C{tags}: every
string from metadata is escaped by the flattener.  The one exception is a
description already rendered and sanitised by C{readme_renderer}
(L{Trusted}): the flattener has no raw-markup node, so it is spliced in
after flattening at a marker only this render knows.
"""

import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred
from twisted.web.template import Comment, Tag, flattenString, tags

from devpi_twisted.web.ui.static import StaticAssets

# CSP of the pages: nothing but our own stylesheet and script.
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; "
            "form-action 'self'; frame-ancestors 'self'; base-uri 'none'")
DOCS_CSP = PAGE_CSP + "; frame-src 'self'"


class Trusted:
    """Sanitised HTML to place as is (see the module docstring)."""

    def __init__(self, html: str) -> None:
        self.html = html


@dataclass
class Page:
    """One page: its title, breadcrumb trail, and main content."""

    title: str
    content: list[Any]
    crumbs: list[tuple[str, str]] = field(default_factory=list)  # (label, href)
    query: str = ""


def _splice(node: Any, found: dict[str, str]) -> Any:
    """Replace every L{Trusted} in the tree by a marker comment, recorded in C{found}."""
    if isinstance(node, Trusted):
        marker = "trusted-" + secrets.token_hex(16)
        found[marker] = node.html
        return Comment(marker)
    if isinstance(node, Tag):
        node.children = [_splice(child, found) for child in node.children]
        return node
    if isinstance(node, (list, tuple)):
        return [_splice(child, found) for child in node]
    return node


def renderPage(page: Page, assets: StaticAssets, serverVersion: str) -> "Deferred[bytes]":
    """The whole document, as bytes."""
    found: dict[str, str] = {}
    content = _splice(page.content, found)
    crumbs = [tags.li(tags.a(label, href=href)) for label, href in [("devpi", "/"), *page.crumbs]]
    document = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{page.title} - devpi"),
            tags.link(rel="stylesheet", href=assets.css.url),
            tags.script(src=assets.js.url, defer="defer"),
        ),
        tags.body(
            tags.header(class_="site")(
                tags.nav(class_="brand", **{"aria-label": "Breadcrumb"})(tags.ol(crumbs)),
                searchForm(page.query),
            ),
            Tag("main")(id="main")(content),
            tags.footer(class_="site")(
                f"devpi-twisted {serverVersion} · ",
                tags.a("server status (JSON)", href="/+status"),
            ),
        ),
    )

    def spliced(body: bytes) -> bytes:
        for marker, html in found.items():
            body = body.replace(f"<!--{marker}-->".encode("ascii"), html.encode("utf-8"), 1)
        return b"<!DOCTYPE html>\n" + body

    return flattenString(None, document).addCallback(spliced)


def searchForm(query: str = "") -> Tag:
    return tags.form(class_="search", action="/+search", method="get", role="search")(
        tags.label("Search packages", for_="search-query", class_="muted"),
        tags.input(type="search", id="search-query", name="query", value=query),
        tags.button("Search", type="submit"),
    )


def link(label: str, *parts: str, **query: Any) -> Tag:
    """A link to a path of this server made of escaped segments."""
    href = path(*parts)
    if query:
        href += "?" + urlencode(query)
    return tags.a(label, href=href)


def path(*parts: str) -> str:
    """A path of this server from its segments, each quoted (C{+} kept: devpi's special segments)."""
    return "/" + "/".join(quote(part, safe="+") for part in parts)


def definitionList(rows: Iterable[tuple[str, Any]]) -> Tag:
    items: list[Any] = []
    for term, value in rows:
        items.extend([tags.dt(term), tags.dd(value)])
    return tags.dl(class_="settings")(items)


def table(caption: str, headers: list[str], rows: list[list[Any]]) -> Tag:
    return tags.div(class_="table-wrap")(tags.table(
        tags.caption(caption, class_="muted"),
        tags.thead(tags.tr([tags.th(h, scope="col") for h in headers])),
        tags.tbody([tags.tr([tags.td(cell) for cell in row]) for row in rows]),
    ))


def pager(page: int, pages: int, base: str, **query: Any) -> Tag | str:
    if pages <= 1:
        return ""
    links: list[Any] = []
    if page > 1:
        links.append(tags.a("← Previous", href=base + "?" + urlencode({**query, "page": page - 1}), rel="prev"))
    links.append(tags.span(f"Page {page} of {pages}"))
    if page < pages:
        links.append(tags.a("Next →", href=base + "?" + urlencode({**query, "page": page + 1}), rel="next"))
    return tags.nav(class_="pager", **{"aria-label": "Pages"})(links)


def humanSize(size: int | None) -> str:
    if size is None:
        return "–"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)
