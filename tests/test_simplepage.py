"""
Tests for L{devpi_twisted.model.simplepage}.
"""

import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model.simplepage import (
    ProjectPage,
    SimpleFile,
    renderIndexHTML,
    renderIndexJSON,
    renderProjectHTML,
    renderProjectJSON,
)

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
META_SHA = "f" * 64
UPLOAD_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


def makeFile(**kw: Any) -> SimpleFile:
    """A plain, not yanked wheel; keywords override fields."""
    fields: dict[str, Any] = dict(
        filename="demo_pkg-1.0-py3-none-any.whl",
        url="../../+f/aaa/aaaaaaaaaaaaa/demo_pkg-1.0-py3-none-any.whl",
        sha256=SHA_A,
        size=950,
        uploadTime="2025-01-01T00:00:00.000000Z",
        requiresPython=">=3.8",
        yanked=False,
        version="1.0",
    )
    fields.update(kw)
    return SimpleFile(**fields)


def makePage(*files: SimpleFile, **kw: Any) -> ProjectPage:
    """A page named demo-pkg holding C{files}."""
    fields: dict[str, Any] = dict(name="demo-pkg", files=files, versions=("1.0",))
    fields.update(kw)
    return ProjectPage(**fields)


class _Collector(HTMLParser):
    """Records start tags with their attributes, and the text inside each C{<a>}."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.links: list[tuple[dict[str, str | None], str]] = []
        self.paragraphs: list[str] = []
        self.texts: dict[str, str] = {}
        self._open: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("a", "p", "title", "h1"):
            self._open = tag
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._open:
            return
        text = "".join(self._text)
        if tag == "a":
            self.links.append((self.tags[-1][1], text))
        elif tag == "p":
            self.paragraphs.append(text)
        else:
            self.texts[tag] = text
        self._open = None


def parseHTML(body: bytes) -> _Collector:
    """Parse a rendered page the way a lenient client would."""
    collector = _Collector()
    collector.feed(body.decode("utf-8"))
    collector.close()
    return collector


def metas(parsed: _Collector) -> dict[str, str | None]:
    """The C{<meta name=... content=...>} pairs of a page."""
    return {a["name"]: a.get("content") for t, a in parsed.tags if t == "meta" and "name" in a}


def assertNoNulls(case: SynchronousTestCase, value: object) -> None:
    """Fail if any value anywhere in a decoded JSON document is null."""
    if isinstance(value, dict):
        for v in value.values():
            case.assertIsNot(v, None)
            assertNoNulls(case, v)
    elif isinstance(value, list):
        for v in value:
            case.assertIsNot(v, None)
            assertNoNulls(case, v)


class ProjectJSONTests(SynchronousTestCase):
    """
    The PEP 691 project page has the shape pip and uv both accept.
    """

    def render(self, page: ProjectPage) -> dict[str, Any]:
        body = renderProjectJSON(page)
        self.assertIsInstance(body, bytes)
        document = json.loads(body)
        assertNoNulls(self, document)
        return document

    def test_shape(self) -> None:
        """A plain file carries every key clients read, with the right types."""
        document = self.render(makePage(makeFile()))
        self.assertEqual(document["meta"], {"api-version": "1.4"})
        self.assertEqual(document["name"], "demo-pkg")
        self.assertEqual(document["versions"], ["1.0"])
        self.assertEqual(document["files"], [{
            "filename": "demo_pkg-1.0-py3-none-any.whl",
            "url": "../../+f/aaa/aaaaaaaaaaaaa/demo_pkg-1.0-py3-none-any.whl",
            "hashes": {"sha256": SHA_A},
            "requires-python": ">=3.8",
            "size": 950,
            "upload-time": "2025-01-01T00:00:00.000000Z",
            "yanked": False,
            "core-metadata": False,
        }])
        self.assertNotIn("project-status", document)

    def test_compact(self) -> None:
        """The document uses compact separators, no padding after , or :."""
        body = renderProjectJSON(makePage(makeFile()))
        self.assertNotIn(b", ", body)
        self.assertNotIn(b": ", body)

    def test_normalisedName(self) -> None:
        """The name key is the normalised project name, as PEP 691 requires."""
        document = self.render(makePage(name="Demo_Pkg.X"))
        self.assertEqual(document["name"], "demo-pkg-x")

    def test_lastSerial(self) -> None:
        """The serial goes into meta as the private _last-serial key."""
        document = self.render(makePage(lastSerial=42))
        self.assertEqual(document["meta"], {"api-version": "1.4", "_last-serial": 42})

    def test_emptyProject(self) -> None:
        """A project with no files still has files and versions lists."""
        document = self.render(makePage(versions=()))
        self.assertEqual((document["files"], document["versions"]), ([], []))

    def test_optionalKeysOmitted(self) -> None:
        """Unknown requires-python and upload-time are left out, never null."""
        document = self.render(
            makePage(makeFile(requiresPython=None, uploadTime=None))
        )
        entry = document["files"][0]
        self.assertNotIn("requires-python", entry)
        self.assertNotIn("upload-time", entry)
        self.assertNotIn(b"null", renderProjectJSON(
            makePage(makeFile(requiresPython=None, uploadTime=None))
        ))

    def test_emptyRequiresPython(self) -> None:
        """An empty requires-python restricts nothing and is left out."""
        entry = self.render(makePage(makeFile(requiresPython="")))["files"][0]
        self.assertNotIn("requires-python", entry)

    def test_uploadTimeFormat(self) -> None:
        """upload-time is passed through in the RFC 3339 form clients parse."""
        entry = self.render(makePage(makeFile()))["files"][0]
        self.assertRegex(entry["upload-time"], UPLOAD_TIME_RE)

    def test_yanked(self) -> None:
        """yanked is false, true or the reason, and an empty reason becomes true."""
        page = makePage(
            makeFile(filename="a", yanked=False),
            makeFile(filename="b", yanked=True),
            makeFile(filename="c", yanked="broken build"),
            makeFile(filename="d", yanked=""),
        )
        body = renderProjectJSON(page)
        self.assertNotIn(b'"yanked":""', body)
        values = [f["yanked"] for f in self.render(page)["files"]]
        self.assertEqual(values, [False, True, "broken build", True])

    def test_coreMetadata(self) -> None:
        """core-metadata carries the hash; dist-info-metadata is never emitted."""
        page = makePage(makeFile(coreMetadataSha256=META_SHA))
        entry = self.render(page)["files"][0]
        self.assertEqual(entry["core-metadata"], {"sha256": META_SHA})
        self.assertNotIn(b"dist-info-metadata", renderProjectJSON(page))

    def test_provenance(self) -> None:
        """provenance appears only when the page has a provenance URL."""
        url = "https://example.com/integrity/demo-pkg/1.0/x.whl/provenance"
        entries = self.render(makePage(makeFile(), makeFile(provenanceURL=url)))["files"]
        self.assertNotIn("provenance", entries[0])
        self.assertEqual(entries[1]["provenance"], url)

    def test_sizeIsInt(self) -> None:
        """size is always a JSON integer."""
        entry = self.render(makePage(makeFile(size=0)))["files"][0]
        self.assertIs(type(entry["size"]), int)
        self.assertEqual(entry["size"], 0)

    def test_versionsOrder(self) -> None:
        """versions follow PEP 440 order, unparseable ones last, no duplicates."""
        page = makePage(
            makeFile(version="10.0"),
            makeFile(version="2.0"),
            versions=("1.0rc1", "not a version", "2.0", "1.0", "1.0.post1", "abc", "1.0"),
        )
        self.assertEqual(
            self.render(page)["versions"],
            ["1.0rc1", "1.0", "1.0.post1", "2.0", "10.0", "abc", "not a version"],
        )

    def test_fileVersionsIncluded(self) -> None:
        """Every file's version is listed even if the caller forgot it."""
        page = makePage(makeFile(version="3.1"), versions=())
        self.assertEqual(self.render(page)["versions"], ["3.1"])

    def test_status(self) -> None:
        """A PEP 792 status is a top-level object with the reason when given."""
        document = self.render(makePage(status="archived", statusReason="moved to foo"))
        self.assertEqual(
            document["project-status"], {"status": "archived", "reason": "moved to foo"}
        )
        self.assertNotIn("project-status", document["meta"])
        document = self.render(makePage(status="deprecated"))
        self.assertEqual(document["project-status"], {"status": "deprecated"})

    def test_escaping(self) -> None:
        """Quotes, backslashes, control and non-ASCII characters round-trip."""
        reason = 'say "no" \\ <b> & \x01 caf\u00e9 \u2603'
        entry = self.render(makePage(makeFile(yanked=reason, requiresPython='<4,>="3"')))
        self.assertEqual(entry["files"][0]["yanked"], reason)
        self.assertEqual(entry["files"][0]["requires-python"], '<4,>="3"')

    def test_urlQuoted(self) -> None:
        """A filename with a space is percent-encoded in the URL, not in filename."""
        entry = self.render(makePage(makeFile(filename="a b.tar.gz", url="x/a b.tar.gz")))
        self.assertEqual(entry["files"][0]["url"], "x/a%20b.tar.gz")
        self.assertEqual(entry["files"][0]["filename"], "a b.tar.gz")

    def test_manyFiles(self) -> None:
        """A page with hundreds of files is one valid document listing them all."""
        files = tuple(
            makeFile(filename=f"demo_pkg-{i}.0.tar.gz", version=f"{i}.0") for i in range(500)
        )
        document = self.render(makePage(*files))
        self.assertEqual(len(document["files"]), 500)
        self.assertEqual(document["versions"][-1], "499.0")


class ProjectHTMLTests(SynchronousTestCase):
    """
    The PEP 503 project page carries the same facts as the JSON one.
    """

    def test_document(self) -> None:
        """The page is an HTML5 document with the repository version and title."""
        body = renderProjectHTML(makePage(makeFile()), "Links for <demo>")
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        parsed = parseHTML(body)
        self.assertEqual(parsed.tags[0], ("html", {"lang": "en"}))
        self.assertEqual(metas(parsed), {"pypi:repository-version": "1.4"})
        self.assertEqual(parsed.texts["title"], "Links for <demo>")
        self.assertEqual(parsed.texts["h1"], "Links for <demo>")
        head, _, _ = body.partition(b"</head>")
        self.assertIn(b'<meta name="pypi:repository-version" content="1.4">', head)

    def test_link(self) -> None:
        """A file link has the hash fragment and every data attribute."""
        body = renderProjectHTML(
            makePage(makeFile(coreMetadataSha256=META_SHA)), "t"
        )
        [(attrs, text)] = parseHTML(body).links
        self.assertEqual(text, "demo_pkg-1.0-py3-none-any.whl")
        self.assertEqual(attrs, {
            "href": "../../+f/aaa/aaaaaaaaaaaaa/demo_pkg-1.0-py3-none-any.whl"
                    f"#sha256={SHA_A}",
            "data-requires-python": ">=3.8",
            "data-core-metadata": f"sha256={META_SHA}",
            "data-dist-info-metadata": f"sha256={META_SHA}",
            "data-size": "950",
            "data-upload-time": "2025-01-01T00:00:00.000000Z",
        })
        self.assertIn(b'data-requires-python="&gt;=3.8"', body)

    def test_hrefMatchesFilename(self) -> None:
        """The last path segment of each href decodes to the anchor text."""
        names = ["demo_pkg-1.0+local.tar.gz", "a b#c?d%e.tar.gz", "caf\u00e9-1.0.zip"]
        files = [makeFile(filename=n, url=f"../../+f/abc/{n}") for n in names]
        links = parseHTML(renderProjectHTML(makePage(*files), "t")).links
        self.assertEqual([text for _, text in links], names)
        for attrs, text in links:
            url = urlsplit(attrs["href"])
            self.assertEqual(url.query, "")
            self.assertEqual(url.fragment, f"sha256={SHA_A}")
            self.assertEqual(unquote(url.path.rsplit("/", 1)[1]), text)
            self.assertNotIn(" ", attrs["href"])

    def test_hashLowercase(self) -> None:
        """The fragment carries exactly one sha256 in lowercase hex, as uv expects."""
        page = makePage(makeFile(sha256=SHA_B.upper()))
        [(attrs, _)] = parseHTML(renderProjectHTML(page, "t")).links
        self.assertRegex(urlsplit(attrs["href"]).fragment, r"^sha256=[0-9a-f]{64}$")
        self.assertTrue(attrs["href"].endswith(f"#sha256={SHA_B}"))
        self.assertEqual(
            json.loads(renderProjectJSON(page))["files"][0]["hashes"], {"sha256": SHA_B}
        )

    def test_safeHrefUnchanged(self) -> None:
        """Typical file URLs, absolute or relative, are not re-encoded."""
        for url in [
            "../../+f/0a1/b2c3d4e5f6a7b/demo_pkg-1.0+cpu-py3-none-any.whl",
            "https://files.example.com/packages/ab/cd/ef/demo_pkg-1.0~x.tar.gz",
            "http://[::1]:3141/root/pypi/+f/abc/demo-1.0.tar.gz",
            "../x/pkg%2B1.tar.gz",
        ]:
            [(attrs, _)] = parseHTML(renderProjectHTML(makePage(makeFile(url=url)), "t")).links
            self.assertEqual(attrs["href"], f"{url}#sha256={SHA_A}")

    def test_ampersandInHref(self) -> None:
        """An ampersand in the URL is HTML-escaped in the attribute and decodes back."""
        body = renderProjectHTML(makePage(makeFile(url="x/a&b.tar.gz")), "t")
        self.assertIn(b'href="x/a&amp;b.tar.gz#sha256=', body)
        [(attrs, _)] = parseHTML(body).links
        self.assertEqual(attrs["href"], f"x/a&b.tar.gz#sha256={SHA_A}")

    def test_escaping(self) -> None:
        """requires-python, yank reasons and filenames have <, >, \" and & escaped."""
        nasty = '<4,>="3" & \'x\''
        page = makePage(makeFile(
            requiresPython=nasty, yanked=nasty, filename='<x>&"y".whl',
        ))
        body = renderProjectHTML(page, "t")
        line = [line for line in body.split(b"\n") if line.startswith(b"<a ")][0]
        self.assertNotIn(b"<4", line)
        self.assertNotIn(b'"3"', line)
        self.assertIn(b"&lt;4,&gt;=&quot;3&quot; &amp; &#x27;x&#x27;", line)
        [(attrs, text)] = parseHTML(body).links
        self.assertEqual(attrs["data-requires-python"], nasty)
        self.assertEqual(attrs["data-yanked"], nasty)
        self.assertEqual(text, '<x>&"y".whl')

    def test_yanked(self) -> None:
        """Yanked files have data-yanked, empty or with the reason; others lack it."""
        page = makePage(
            makeFile(filename="a", yanked=False),
            makeFile(filename="b", yanked=True),
            makeFile(filename="c", yanked=""),
            makeFile(filename="d", yanked="bad"),
        )
        links = parseHTML(renderProjectHTML(page, "t")).links
        self.assertNotIn("data-yanked", links[0][0])
        self.assertEqual([a["data-yanked"] for a, _ in links[1:]], ["", "", "bad"])

    def test_optionalAttributesOmitted(self) -> None:
        """Unknown values leave their attributes out; size is always there."""
        page = makePage(makeFile(requiresPython=None, uploadTime=None))
        [(attrs, _)] = parseHTML(renderProjectHTML(page, "t")).links
        self.assertEqual(set(attrs), {"href", "data-size"})

    def test_provenance(self) -> None:
        """data-provenance carries the provenance URL when there is one."""
        url = "https://example.com/p?a=1&b=2"
        body = renderProjectHTML(makePage(makeFile(provenanceURL=url)), "t")
        [(attrs, _)] = parseHTML(body).links
        self.assertEqual(attrs["data-provenance"], url)
        self.assertIn(b"a=1&amp;b=2", body)

    def test_status(self) -> None:
        """A status adds the PEP 792 meta tags in the head, escaped."""
        page = makePage(status="quarantined", statusReason='malware "x" <y>')
        body = renderProjectHTML(page, "t")
        head, _, _ = body.partition(b"</head>")
        self.assertIn(b'<meta name="pypi:project-status" content="quarantined">', head)
        self.assertEqual(metas(parseHTML(body)), {
            "pypi:repository-version": "1.4",
            "pypi:project-status": "quarantined",
            "pypi:project-status-reason": 'malware "x" <y>',
        })

    def test_noStatus(self) -> None:
        """Without a status no project-status meta appears."""
        body = renderProjectHTML(makePage(statusReason="ignored"), "t")
        self.assertNotIn(b"project-status", body)

    def test_notices(self) -> None:
        """Each notice is an escaped paragraph before the links."""
        page = makePage(makeFile(), notices=("<b>one</b>", "two & three"))
        body = renderProjectHTML(page, "t")
        self.assertEqual(parseHTML(body).paragraphs, ["<b>one</b>", "two & three"])
        self.assertNotIn(b"<b>", body)
        self.assertLess(body.index(b"<p>"), body.index(b"<a "))

    def test_utf8(self) -> None:
        """The page is UTF-8 encoded."""
        body = renderProjectHTML(makePage(makeFile(yanked="caf\u00e9")), "caf\u00e9")
        self.assertIn("caf\u00e9".encode("utf-8"), body)

    def test_oneLinkPerFile(self) -> None:
        """A page with hundreds of files has exactly one link per file, in order."""
        files = tuple(makeFile(filename=f"demo_pkg-{i}.0.tar.gz") for i in range(300))
        links = parseHTML(renderProjectHTML(makePage(*files), "t")).links
        self.assertEqual([t for _, t in links], [f.filename for f in files])


class IndexTests(SynchronousTestCase):
    """
    The project list in both representations.
    """

    def test_json(self) -> None:
        """The JSON list has meta and one object per name, in the given order."""
        document = json.loads(renderIndexJSON(["Frob", "spam.eggs"]))
        self.assertEqual(document, {
            "meta": {"api-version": "1.4"},
            "projects": [{"name": "Frob"}, {"name": "spam.eggs"}],
        })

    def test_jsonLastSerial(self) -> None:
        """The serial goes into meta, and a generator of names is accepted."""
        document = json.loads(renderIndexJSON((n for n in ["a"]), lastSerial=7))
        self.assertEqual(document["meta"], {"api-version": "1.4", "_last-serial": 7})
        assertNoNulls(self, document)

    def test_jsonEmpty(self) -> None:
        """An index without projects is still a valid list."""
        self.assertEqual(json.loads(renderIndexJSON([]))["projects"], [])

    def test_html(self) -> None:
        """Each name links to its normalised URL with a trailing slash."""
        body = renderIndexHTML(["Frob", "Spam_Eggs.x"], "Simple index")
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        parsed = parseHTML(body)
        self.assertEqual(metas(parsed), {"pypi:repository-version": "1.4"})
        self.assertEqual(parsed.texts["title"], "Simple index")
        self.assertEqual(
            parsed.links,
            [({"href": "frob/"}, "Frob"), ({"href": "spam-eggs-x/"}, "Spam_Eggs.x")],
        )

    def test_htmlEscaping(self) -> None:
        """Odd names from a mirror are escaped in text and href."""
        body = renderIndexHTML(['a<b>"c"'], "<t>")
        self.assertNotIn(b"<b>", body)
        self.assertNotIn(b"<t>", body)
        [(attrs, text)] = parseHTML(body).links
        self.assertEqual(text, 'a<b>"c"')
        self.assertNotIn('"', attrs["href"])
        self.assertNotIn("<", attrs["href"])
