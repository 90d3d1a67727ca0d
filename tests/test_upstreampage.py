"""
Tests for L{devpi_twisted.model.upstream}: project pages, the project list, the shared types.
"""

import json
import random
import threading
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from devpi_twisted.errors import UpstreamError
from devpi_twisted.mirror.names import MirrorNames
from devpi_twisted.mirror import pages as pagesModule
from devpi_twisted.mirror.pages import MirrorPages
from devpi_twisted.mirror.upstream import PageResponse
from devpi_twisted.model.inheritance import Stage

from devpi_twisted.model.simplepage import SimpleFile
from devpi_twisted.model.upstream.common import UpstreamLink, UpstreamPageError, UpstreamProject
from devpi_twisted.model.upstream.project import MAX_PAGE_SIZE, parseProjectPage, toSimpleFile
from devpi_twisted.model.upstream.projectlist import MAX_LIST_CONSTRUCT, ProjectListScanner, parseProjectList
from devpi_twisted.storage.threads import SynchronousRunner, ThreadRunner
from devpi_twisted.testing.memory import MemoryBlobStore, MemoryStorage

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
PAGE_URL = "https://pypi.example/simple/demo-pkg/"
SHA_WHEEL = "6c22" + "0" * 56 + "a8f1"
SHA_SDIST = "1234567890abcdef" * 4
SHA_META = "7fed" + "1" * 56 + "d66e"
MD5 = "0123456789abcdef" * 2
FILES_HOST = "https://files.example/packages/ab/cd/ef"


def jsonPage(files: list[dict[str, Any]], **top: Any) -> bytes:
    """A PEP 691 project page for demo-pkg holding C{files}."""
    document: dict[str, Any] = {
        "meta": {"api-version": "1.4", "_last-serial": 123},
        "name": "demo-pkg",
        "files": files,
    }
    document.update(top)
    return json.dumps(document).encode("utf-8")


def jsonFile(filename: str = "demo_pkg-1.0-py3-none-any.whl", **fields: Any) -> dict[str, Any]:
    """A file object of PyPI's shape; keywords override fields."""
    entry: dict[str, Any] = {
        "filename": filename,
        "url": f"{FILES_HOST}/{filename}",
        "hashes": {"sha256": SHA_WHEEL},
        "requires-python": ">=3.8",
        "size": 950,
        "upload-time": "2025-01-01T00:00:00.000000Z",
        "yanked": False,
        "core-metadata": {"sha256": SHA_META},
        "data-dist-info-metadata": {"sha256": SHA_META},
        "provenance": None,
    }
    entry.update(fields)
    return entry


def htmlPage(anchors: str, head: str = "") -> bytes:
    """A PEP 503 project page shaped like Warehouse's."""
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.4">\n'
        f"    {head}\n    <title>Links for demo-pkg</title>\n  </head>\n  <body>\n"
        f"    <h1>Links for demo-pkg</h1>\n{anchors}\n  </body>\n</html>\n<!--SERIAL 123-->\n"
    ).encode("utf-8")


def parseJSON(files: list[dict[str, Any]], **top: Any) -> UpstreamProject:
    return parseProjectPage(jsonPage(files, **top), JSON_TYPE, PAGE_URL, "demo-pkg")


def parseHTML(anchors: str, head: str = "", pageURL: str = PAGE_URL) -> UpstreamProject:
    return parseProjectPage(htmlPage(anchors, head), "text/html", pageURL, "demo-pkg")


def onlyLink(project: UpstreamProject) -> UpstreamLink:
    assert len(project.links) == 1, project.links
    return project.links[0]


class ParseJSONPageTests(SynchronousTestCase):
    """
    Tests for L{parseProjectPage} on PEP 691 JSON pages.
    """

    def test_pypiShape(self) -> None:
        """Every field of a PyPI-shaped file object is carried into the link."""
        project = parseJSON(
            [
                jsonFile(),
                jsonFile(
                    "demo_pkg-1.1.tar.gz",
                    hashes={"sha256": SHA_SDIST.upper(), "md5": MD5},
                    **{
                        "requires-python": None,
                        "yanked": "broken build",
                        "core-metadata": False,
                        "data-dist-info-metadata": False,
                        "provenance": "https://pypi.example/integrity/demo-pkg/1.1/demo_pkg-1.1.tar.gz/provenance",
                        "size": 1234,
                    },
                ),
            ],
            versions=["1.0", "1.1", "2.0"],
            **{"project-status": {"status": "deprecated", "reason": "use other-pkg"}},
        )
        self.assertEqual(project.name, "demo-pkg")
        self.assertEqual(project.versions, ("1.0", "1.1", "2.0"))
        self.assertEqual((project.status, project.statusReason), ("deprecated", "use other-pkg"))
        wheel, sdist = project.links
        self.assertEqual(
            wheel,
            UpstreamLink(
                filename="demo_pkg-1.0-py3-none-any.whl",
                url=f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl",
                sha256=SHA_WHEEL,
                hashes={"sha256": SHA_WHEEL},
                requiresPython=">=3.8",
                yanked=False,
                size=950,
                uploadTime="2025-01-01T00:00:00.000000Z",
                coreMetadata=SHA_META,
                provenance=None,
                version="1.0",
            ),
        )
        self.assertEqual(sdist.sha256, SHA_SDIST)
        self.assertEqual(sdist.hashes, {"sha256": SHA_SDIST, "md5": MD5})
        self.assertIsNone(sdist.requiresPython)
        self.assertEqual(sdist.yanked, "broken build")
        self.assertEqual(sdist.size, 1234)
        self.assertFalse(sdist.coreMetadata)
        self.assertEqual(
            sdist.provenance,
            "https://pypi.example/integrity/demo-pkg/1.1/demo_pkg-1.1.tar.gz/provenance",
        )
        self.assertEqual(sdist.version, "1.1")

    def test_relativeURLs(self) -> None:
        """Relative file URLs are resolved against the page URL."""
        project = parseJSON([
            jsonFile(url="../../files/demo_pkg-1.0-py3-none-any.whl"),
            jsonFile("demo_pkg-1.1.tar.gz", url="demo_pkg-1.1.tar.gz"),
            jsonFile("demo_pkg-1.2.tar.gz", url="/p/demo_pkg-1.2.tar.gz"),
            jsonFile("demo_pkg-1.3.tar.gz", url="//mirror.example/demo_pkg-1.3.tar.gz"),
        ])
        self.assertEqual([link.url for link in project.links], [
            "https://pypi.example/files/demo_pkg-1.0-py3-none-any.whl",
            "https://pypi.example/simple/demo-pkg/demo_pkg-1.1.tar.gz",
            "https://pypi.example/p/demo_pkg-1.2.tar.gz",
            "https://mirror.example/demo_pkg-1.3.tar.gz",
        ])

    def test_urlFragmentRemoved(self) -> None:
        """A fragment on a JSON URL is removed, and its hashes only fill gaps."""
        link = onlyLink(parseJSON([jsonFile(
            url=f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl#sha256={SHA_SDIST}&md5={MD5}"
        )]))
        self.assertEqual(link.url, f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl")
        self.assertEqual(link.hashes, {"sha256": SHA_WHEEL, "md5": MD5})

    def test_yankedForms(self) -> None:
        """C{true} and a reason are yanked; C{""}, C{false}, C{null} and absence are not, as pip reads them."""
        cases = [(True, True), ("gone", "gone"), ("", False), (False, False), (None, False)]
        for value, expected in cases:
            link = onlyLink(parseJSON([jsonFile(yanked=value)]))
            self.assertEqual(link.yanked, expected, value)
        entry = jsonFile()
        del entry["yanked"]
        self.assertIs(onlyLink(parseJSON([entry])).yanked, False)

    def test_coreMetadataForms(self) -> None:
        """C{core-metadata} gives the sha256, L{True} without one, and falls back to its deprecated aliases."""
        def coreMetadata(**fields: Any) -> str | bool:
            entry = jsonFile()
            del entry["core-metadata"], entry["data-dist-info-metadata"]
            entry.update(fields)
            return onlyLink(parseJSON([entry])).coreMetadata

        self.assertEqual(coreMetadata(**{"core-metadata": {"sha256": SHA_META.upper()}}), SHA_META)
        self.assertIs(coreMetadata(**{"core-metadata": True}), True)
        self.assertIs(coreMetadata(**{"core-metadata": {"md5": MD5}}), True)
        self.assertIs(coreMetadata(**{"core-metadata": {}}), True)
        self.assertIs(coreMetadata(**{"core-metadata": False}), False)
        self.assertIs(coreMetadata(**{"core-metadata": "yes"}), False)
        self.assertIs(coreMetadata(), False)
        self.assertEqual(coreMetadata(**{"dist-info-metadata": {"sha256": SHA_META}}), SHA_META)
        self.assertIs(coreMetadata(**{"data-dist-info-metadata": True}), True)
        self.assertIs(
            coreMetadata(**{"core-metadata": False, "data-dist-info-metadata": {"sha256": SHA_META}}),
            False,
        )

    def test_hashes(self) -> None:
        """Hashes are lowercased; unknown algorithms and malformed digests are dropped."""
        link = onlyLink(parseJSON([jsonFile(hashes={
            "SHA256": SHA_WHEEL.upper(),
            "md5": MD5,
            "blake2b": "ab" * 64,
            "whirlpool9": "ab" * 32,
            "sha512": "abc",
            "sha384": "zz" * 48,
            "sha1": 12,
        })]))
        self.assertEqual(link.hashes, {"sha256": SHA_WHEEL, "md5": MD5, "blake2b": "ab" * 64})
        self.assertEqual(link.sha256, SHA_WHEEL)

    def test_linkWithoutSha256(self) -> None:
        """A file with only other hashes, or none, has no sha256 but is kept."""
        project = parseJSON([
            jsonFile(hashes={"md5": MD5}),
            jsonFile("demo_pkg-1.1.tar.gz", hashes={}),
            jsonFile("demo_pkg-1.2.tar.gz", hashes=None),
        ])
        self.assertEqual([(link.sha256, link.hashes) for link in project.links], [
            (None, {"md5": MD5}), (None, {}), (None, {}),
        ])

    def test_sizeAndUploadTime(self) -> None:
        """Only a non-negative integer size and a real PEP 700 time are kept."""
        sizes = [(0, 0), (5, 5), (None, None), ("5", None), (-1, None), (True, None), (1.5, None)]
        for value, expected in sizes:
            self.assertEqual(onlyLink(parseJSON([jsonFile(size=value)])).size, expected, value)
        times = [
            ("2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            ("2025-01-01T00:00:00.123456Z", "2025-01-01T00:00:00.123456Z"),
            ("2025-01-01 00:00:00", None),
            ("2025-01-01T00:00:00+00:00", None),
            ("2025-13-01T00:00:00Z", None),
            ("2025-02-30T00:00:00Z", None),
            (None, None),
            (1735689600, None),
        ]
        for value, expected in times:
            link = onlyLink(parseJSON([jsonFile(**{"upload-time": value})]))
            self.assertEqual(link.uploadTime, expected, value)

    def test_requiresPython(self) -> None:
        """C{requires-python} is kept as given; blank or non-string values are dropped."""
        for value, expected in [(">=3.8,<4", ">=3.8,<4"), ("", None), ("  ", None), (3, None)]:
            link = onlyLink(parseJSON([jsonFile(**{"requires-python": value})]))
            self.assertEqual(link.requiresPython, expected)

    def test_otherProjectsFiltered(self) -> None:
        """Only distributions whose name normalises to the project are kept."""
        names = [
            "demo_pkg-1.0-py3-none-any.whl",
            "Demo.Pkg-1.1.tar.gz",
            "demo-pkg-1.2.zip",
            "demo_pkg-1.3.tgz",
            "demo_pkg-1.4.tar.bz2",
            "demo_pkg-1.5-py2.7.egg",
            "demo_pkg_extra-1.0-py3-none-any.whl",
            "demo-pkg-extra-1.0.tar.gz",
            "demo-1.0.tar.gz",
            "demo_pkg-1.0.tar.xz",
            "demo_pkg-1.0.win32.exe",
            "demo_pkg-1.0.tar.gz.asc",
            "other-1.0.tar.gz",
            "demo_pkg-1.0-py3-none-any.WHL",
            "demo_pkg.tar.gz",
            "../demo_pkg-1.6.tar.gz",
            "sub/demo_pkg-1.7.tar.gz",
        ]
        project = parseJSON([jsonFile(name, url=f"{FILES_HOST}/x") for name in names])
        self.assertEqual(
            [(link.filename, link.version) for link in project.links],
            [
                ("demo_pkg-1.0-py3-none-any.whl", "1.0"),
                ("Demo.Pkg-1.1.tar.gz", "1.1"),
                ("demo-pkg-1.2.zip", "1.2"),
                ("demo_pkg-1.3.tgz", "1.3"),
                ("demo_pkg-1.4.tar.bz2", "1.4"),
                ("demo_pkg-1.5-py2.7.egg", None),
            ],
        )

    def test_legacySdistVersions(self) -> None:
        """Legacy sdist names are matched by project; a non-PEP 440 version gives no version."""
        project = parseProjectPage(
            jsonPage([
                jsonFile("foo-1.0-beta.tar.gz"),
                jsonFile("foo-2.0-custom-build.tar.gz"),
                jsonFile("foo-2-1.0.tar.gz"),
                jsonFile("foo-bar-1.0.tar.gz"),
            ]),
            JSON_TYPE, "https://pypi.example/simple/foo/", "foo",
        )
        self.assertEqual(
            [(link.filename, link.version) for link in project.links],
            [("foo-1.0-beta.tar.gz", "1.0b0"), ("foo-2.0-custom-build.tar.gz", None)],
        )

    def test_duplicatesPreferHashed(self) -> None:
        """Of two links with one file name, the one with a sha256 wins, in either order."""
        plain = jsonFile(hashes={}, url="https://a.example/demo_pkg-1.0-py3-none-any.whl")
        md5 = jsonFile(hashes={"md5": MD5}, url="https://b.example/demo_pkg-1.0-py3-none-any.whl")
        hashed = jsonFile(url="https://c.example/demo_pkg-1.0-py3-none-any.whl")
        for order in ([plain, md5, hashed], [hashed, md5, plain], [md5, plain]):
            link = onlyLink(parseJSON(order))
            expected = hashed if hashed in order else md5
            self.assertEqual(link.url, expected["url"])

    def test_versionsFromLinksWhenAbsent(self) -> None:
        """Without a C{versions} key the versions come from the links, in PEP 440 order."""
        project = parseJSON([
            jsonFile("demo_pkg-1.10-py3-none-any.whl"),
            jsonFile("demo_pkg-1.9.tar.gz"),
            jsonFile("demo_pkg-1.9-py3-none-any.whl"),
        ])
        self.assertEqual(project.versions, ("1.9", "1.10"))

    def test_versionsFromPage(self) -> None:
        """A C{versions} list is used as given, without duplicates or non-strings."""
        project = parseJSON([], versions=["2.0", "1.0", "2.0", 3, ""])
        self.assertEqual(project.versions, ("2.0", "1.0"))
        self.assertEqual(project.links, ())

    def test_projectStatus(self) -> None:
        """The top-level C{project-status} is read; C{meta.project-status} is a fallback; unknown values mean active."""
        project = parseJSON([], **{"project-status": {"status": "Quarantined"}})
        self.assertEqual((project.status, project.statusReason), ("quarantined", None))
        page = json.loads(jsonPage([]))
        page["meta"]["project-status"] = {"status": "archived", "reason": "done"}
        project = parseProjectPage(json.dumps(page).encode(), JSON_TYPE, PAGE_URL, "demo-pkg")
        self.assertEqual((project.status, project.statusReason), ("archived", "done"))
        project = parseJSON([], **{"project-status": {"status": "frozen", "reason": "x"}})
        self.assertEqual((project.status, project.statusReason), (None, None))

    def test_sniffedByBrace(self) -> None:
        """A body starting with C{{} is JSON whatever its content type; the latest type is JSON too."""
        body = b"\n  " + jsonPage([jsonFile()])
        for contentType in (None, "text/html", "application/vnd.pypi.simple.latest+json",
                            "application/json; charset=utf-8", "text/plain"):
            project = parseProjectPage(body, contentType, PAGE_URL, "Demo_Pkg")
            self.assertEqual(len(project.links), 1, contentType)

    def test_nonHTTPURLsDropped(self) -> None:
        """Links that do not resolve to an http(s) URL with a host are dropped."""
        urls = [
            "javascript:alert(1)",
            "data:application/zip;base64,UEsFBgA=",
            "file:///etc/demo_pkg-1.0-py3-none-any.whl",
            "ftp://files.example/demo_pkg-1.0-py3-none-any.whl",
            "http:///demo_pkg-1.0-py3-none-any.whl",
            "http://[::1/demo_pkg-1.0-py3-none-any.whl",
            "http://host:99999/demo_pkg-1.0-py3-none-any.whl",
        ]
        project = parseJSON([jsonFile(url=url) for url in urls])
        self.assertEqual(project.links, ())
        relative = jsonPage([jsonFile(url="demo_pkg-1.0-py3-none-any.whl")])
        self.assertEqual(parseProjectPage(relative, JSON_TYPE, "", "demo-pkg").links, ())

    def test_malformedEntriesSkipped(self) -> None:
        """File entries that are not objects or lack a string filename or URL are skipped."""
        project = parseJSON([
            "demo_pkg-1.0-py3-none-any.whl",
            None,
            {"filename": "demo_pkg-1.0-py3-none-any.whl"},
            {"url": f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl"},
            jsonFile(filename=7),
            jsonFile("demo_pkg-2.0.tar.gz"),
        ])
        self.assertEqual([link.filename for link in project.links], ["demo_pkg-2.0.tar.gz"])

    def test_emptyProject(self) -> None:
        """A valid page without files is a project with no links."""
        project = parseJSON([])
        self.assertEqual(project, UpstreamProject("demo-pkg", (), (), None, None))

    def test_wrongShapes(self) -> None:
        """JSON that is not a PEP 691 project page raises L{UpstreamPageError}."""
        bodies = [
            b"[]",
            b'{"meta": {"api-version": "1.0"}}',
            b'{"meta": {"api-version": "1.0"}, "files": {}}',
            b'{"files": []}',
            b'{"meta": "1.0", "files": []}',
            b'{"meta": {}, "files": []}',
            b'{"meta": {"api-version": 1.0}, "files": []}',
            b'{"meta": {"api-version": "2.0"}, "files": []}',
            b'{"meta": {"api-version": "0.9"}, "files": []}',
            b'{"meta": {"api-version": "1.0"}, "files": []',
            b'{"meta": {"api-version": "1.0"}, "files": [], }',
            b"{" * 100000,
            b"",
            b"not json at all",
        ]
        for body in bodies:
            self.assertRaises(UpstreamPageError, parseProjectPage, body, JSON_TYPE, PAGE_URL, "demo-pkg")

    def test_minorVersionIgnored(self) -> None:
        """An unknown minor API version is accepted."""
        body = json.dumps({"meta": {"api-version": "1.99"}, "name": "demo-pkg", "files": []}).encode()
        self.assertEqual(parseProjectPage(body, JSON_TYPE, PAGE_URL, "demo-pkg").links, ())

    def test_apiVersionTwoContentType(self) -> None:
        """A v2 content type on a non-JSON body is refused."""
        self.assertRaises(
            UpstreamPageError, parseProjectPage,
            htmlPage(""), "application/vnd.pypi.simple.v2+html", PAGE_URL, "demo-pkg",
        )

    def test_sizeLimit(self) -> None:
        """A body larger than L{MAX_PAGE_SIZE} is refused before parsing."""
        body = jsonPage([]) + b" " * MAX_PAGE_SIZE
        error = self.assertRaises(UpstreamPageError, parseProjectPage, body, JSON_TYPE, PAGE_URL, "demo-pkg")
        self.assertIn("larger", str(error))


class ParseHTMLPageTests(SynchronousTestCase):
    """
    Tests for L{parseProjectPage} on PEP 503 HTML pages.
    """

    def test_pypiShape(self) -> None:
        """A Warehouse-shaped page gives hashes, Requires-Python, yanking and core metadata."""
        project = parseHTML(
            f'    <a href="{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl#sha256={SHA_WHEEL}" '
            f'data-requires-python="&gt;=3.8,&lt;4" data-dist-info-metadata="sha256={SHA_META}" '
            f'data-core-metadata="sha256={SHA_META}">demo_pkg-1.0-py3-none-any.whl</a><br />\n'
            f'    <a href="{FILES_HOST}/demo_pkg-1.1.tar.gz#sha256={SHA_SDIST}" '
            f'data-yanked="broken &amp; bad">demo_pkg-1.1.tar.gz</a><br />\n'
        )
        wheel, sdist = project.links
        self.assertEqual(
            wheel,
            UpstreamLink(
                filename="demo_pkg-1.0-py3-none-any.whl",
                url=f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl",
                sha256=SHA_WHEEL,
                hashes={"sha256": SHA_WHEEL},
                requiresPython=">=3.8,<4",
                yanked=False,
                size=None,
                uploadTime=None,
                coreMetadata=SHA_META,
                provenance=None,
                version="1.0",
            ),
        )
        self.assertEqual((sdist.sha256, sdist.yanked, sdist.coreMetadata), (SHA_SDIST, "broken & bad", False))
        self.assertEqual(project.versions, ("1.0", "1.1"))
        self.assertEqual((project.status, project.statusReason), (None, None))

    def test_relativeAndAbsoluteURLs(self) -> None:
        """Relative hrefs are resolved against the page URL; absolute ones are kept."""
        project = parseHTML(
            '<a href="../../packages/demo_pkg-1.0.tar.gz">a</a>'
            '<a href="demo_pkg-1.1.tar.gz">b</a>'
            '<a href="  https://files.example/demo_pkg-1.2.tar.gz\n">c</a>'
        )
        self.assertEqual([link.url for link in project.links], [
            "https://pypi.example/packages/demo_pkg-1.0.tar.gz",
            "https://pypi.example/simple/demo-pkg/demo_pkg-1.1.tar.gz",
            "https://files.example/demo_pkg-1.2.tar.gz",
        ])

    def test_baseHref(self) -> None:
        """C{<base href>} (resolved against the page URL) is the base of relative links; only the first counts."""
        project = parseHTML(
            '<a href="demo_pkg-1.0.tar.gz">a</a><a href="/root/demo_pkg-1.1.tar.gz">b</a>',
            head='<base href="../../mirror/files/"><base href="https://ignored.example/">',
        )
        self.assertEqual([link.url for link in project.links], [
            "https://pypi.example/mirror/files/demo_pkg-1.0.tar.gz",
            "https://pypi.example/root/demo_pkg-1.1.tar.gz",
        ])
        project = parseHTML(
            '<a href="demo_pkg-1.0.tar.gz">a</a>',
            head='<base href="https://files.example/x/">',
            pageURL="",
        )
        self.assertEqual(onlyLink(project).url, "https://files.example/x/demo_pkg-1.0.tar.gz")

    def test_yankedForms(self) -> None:
        """An empty or bare C{data-yanked} is a yank without reason; a value is the reason; absence is not yanked."""
        cases = [
            ('data-yanked=""', True),
            ("data-yanked", True),
            ('data-yanked="  "', True),
            ('data-yanked="security &lt;issue&gt;"', "security <issue>"),
            ("", False),
        ]
        for attribute, expected in cases:
            link = onlyLink(parseHTML(f'<a href="demo_pkg-1.0.tar.gz" {attribute}>x</a>'))
            self.assertEqual(link.yanked, expected, attribute)

    def test_coreMetadataForms(self) -> None:
        """C{data-core-metadata} (or the legacy name) gives the sha256, L{True}, or nothing."""
        cases = [
            (f'data-core-metadata="sha256={SHA_META.upper()}"', SHA_META),
            ('data-core-metadata="true"', True),
            ('data-core-metadata="TRUE"', True),
            (f'data-core-metadata="md5={MD5}"', True),
            ('data-core-metadata="sha256=nothex"', False),
            ('data-core-metadata="false"', False),
            ("data-core-metadata", False),
            (f'data-dist-info-metadata="sha256={SHA_META}"', SHA_META),
            (f'data-core-metadata="true" data-dist-info-metadata="sha256={SHA_META}"', True),
            ("", False),
        ]
        for attributes, expected in cases:
            link = onlyLink(parseHTML(f'<a href="demo_pkg-1.0.tar.gz" {attributes}>x</a>'))
            self.assertEqual(link.coreMetadata, expected, attributes)

    def test_fragmentHashes(self) -> None:
        """Hash fragments of any hashlib algorithm are kept, lowercased; other fragment parts are ignored."""
        cases = [
            (f"#sha256={SHA_SDIST.upper()}", SHA_SDIST, {"sha256": SHA_SDIST}),
            (f"#md5={MD5}", None, {"md5": MD5}),
            (f"#sha256={SHA_SDIST}&md5={MD5}", SHA_SDIST, {"sha256": SHA_SDIST, "md5": MD5}),
            (f"#egg=demo_pkg&sha1={'a' * 40}", None, {"sha1": "a" * 40}),
            ("#foo=bar", None, {}),
            (f"#whirlpool9={'a' * 128}", None, {}),
            ("#sha256=short", None, {}),
            ("", None, {}),
        ]
        for fragment, sha256, hashes in cases:
            link = onlyLink(parseHTML(f'<a href="demo_pkg-1.0.tar.gz{fragment}">x</a>'))
            self.assertEqual((link.sha256, link.hashes), (sha256, hashes), fragment)
            self.assertEqual(link.url, "https://pypi.example/simple/demo-pkg/demo_pkg-1.0.tar.gz")

    def test_sizeAndUploadTime(self) -> None:
        """C{data-size} and C{data-upload-time} are read when present and well-formed."""
        link = onlyLink(parseHTML(
            '<a href="demo_pkg-1.0.tar.gz" data-size="4096" data-upload-time="2025-01-01T00:00:00Z">x</a>'
        ))
        self.assertEqual((link.size, link.uploadTime), (4096, "2025-01-01T00:00:00Z"))
        link = onlyLink(parseHTML(
            '<a href="demo_pkg-1.0.tar.gz" data-size="-4" data-upload-time="yesterday">x</a>'
        ))
        self.assertEqual((link.size, link.uploadTime), (None, None))

    def test_provenance(self) -> None:
        """C{data-provenance} is resolved and kept only if it is http(s)."""
        link = onlyLink(parseHTML(
            '<a href="demo_pkg-1.0.tar.gz" data-provenance="https://pypi.example/integrity/p">x</a>'
        ))
        self.assertEqual(link.provenance, "https://pypi.example/integrity/p")
        link = onlyLink(parseHTML('<a href="demo_pkg-1.0.tar.gz" data-provenance="javascript:x">x</a>'))
        self.assertIsNone(link.provenance)

    def test_filenameFromHref(self) -> None:
        """The file name is the percent-decoded last path segment of the href, not the anchor text."""
        link = onlyLink(parseHTML(
            '<a href="https://files.example/p/demo_pkg-1.0%2Blocal.tar.gz?x=1">something else</a>'
        ))
        self.assertEqual(link.filename, "demo_pkg-1.0+local.tar.gz")
        self.assertEqual(link.version, "1.0+local")
        self.assertEqual(link.url, "https://files.example/p/demo_pkg-1.0%2Blocal.tar.gz?x=1")
        self.assertEqual(parseHTML('<a href="demo_pkg-1.0%2F.tar.gz">x</a>').links, ())

    def test_otherProjectsAndJunkFiltered(self) -> None:
        """Other projects' files, non-distributions and non-http links are left out."""
        project = parseHTML(
            '<a href="demo_pkg_extra-1.0.tar.gz">a</a>'
            '<a href="other-1.0-py3-none-any.whl">b</a>'
            '<a href="demo_pkg-1.0.tar.gz.asc">c</a>'
            '<a href="javascript:void(demo_pkg-1.0.tar.gz)">d</a>'
            '<a href="data:,demo_pkg-1.0.tar.gz">e</a>'
            '<a href="file:///srv/demo_pkg-1.0.tar.gz">f</a>'
            '<a href="../">g</a>'
            "<a>no href</a>"
            '<a href="demo_pkg-1.0.tar.gz">kept</a>'
        )
        self.assertEqual([link.filename for link in project.links], ["demo_pkg-1.0.tar.gz"])

    def test_relativeToNothing(self) -> None:
        """Relative links on a page without a usable URL are dropped."""
        for pageURL in ("", "file:///srv/simple/demo-pkg/", "not a url"):
            self.assertEqual(parseHTML('<a href="demo_pkg-1.0.tar.gz">x</a>', pageURL=pageURL).links, ())

    def test_duplicatesPreferHashed(self) -> None:
        """Of two anchors for one file, the hashed one wins."""
        link = onlyLink(parseHTML(
            '<a href="https://a.example/demo_pkg-1.0.tar.gz">x</a>'
            f'<a href="https://b.example/demo_pkg-1.0.tar.gz#sha256={SHA_SDIST}">x</a>'
            f'<a href="https://c.example/demo_pkg-1.0.tar.gz#sha256={SHA_WHEEL}">x</a>'
        ))
        self.assertEqual((link.url, link.sha256), ("https://b.example/demo_pkg-1.0.tar.gz", SHA_SDIST))

    def test_projectStatus(self) -> None:
        """The C{pypi:project-status} meta tags give the status and reason."""
        project = parseHTML(
            "",
            head='<meta name="pypi:project-status" content="archived">'
                 '<meta name="pypi:project-status-reason" content="moved &amp; renamed">',
        )
        self.assertEqual((project.status, project.statusReason), ("archived", "moved & renamed"))

    def test_repositoryVersionTwo(self) -> None:
        """A C{pypi:repository-version} with major 2 is refused."""
        body = b'<html><head><meta name="pypi:repository-version" content="2.0"></head></html>'
        self.assertRaises(UpstreamPageError, parseProjectPage, body, "text/html", PAGE_URL, "demo-pkg")

    def test_emptyPage(self) -> None:
        """A valid page without anchors is a project with no links."""
        for body in (htmlPage(""), b"<html></html>", b"<!DOCTYPE html>"):
            project = parseProjectPage(body, None, PAGE_URL, "Demo.Pkg")
            self.assertEqual(project, UpstreamProject("demo-pkg", (), (), None, None))

    def test_charset(self) -> None:
        """The declared charset decodes the page."""
        body = '<a href="demo_pkg-1.0.tar.gz" data-yanked="caf\xe9">x</a>'.encode("latin-1")
        link = onlyLink(parseProjectPage(body, "text/html; charset=ISO-8859-1", PAGE_URL, "demo-pkg"))
        self.assertEqual(link.yanked, "caf\xe9")

    def test_garbage(self) -> None:
        """Bodies that are neither HTML nor JSON raise L{UpstreamPageError}."""
        cases = [
            (b"", None),
            (b"   \n", "text/html"),
            (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
            (b"<html>\x00</html>", "text/html"),
            (b"just some words", "text/html"),
            (b"<a href='demo_pkg-1.0.tar.gz'>x</a>", "image/png"),
            (b"<a href='demo_pkg-1.0.tar.gz'>x</a>", "application/vnd.pypi.simple.v2+html"),
            (b"<html><![DOCTYPE x]></html>", "text/html"),
        ]
        for body, contentType in cases:
            self.assertRaises(UpstreamPageError, parseProjectPage, body, contentType, PAGE_URL, "demo-pkg")


class RobustnessTests(SynchronousTestCase):
    """
    Mutated and random inputs only ever give a result or L{UpstreamPageError}.
    """

    SEEDS = [
        jsonPage(
            [jsonFile(), jsonFile("demo_pkg-1.1.tar.gz", yanked="r", url="../x/demo_pkg-1.1.tar.gz#md5=" + MD5)],
            versions=["1.0"], **{"project-status": {"status": "archived", "reason": "r"}},
        ),
        htmlPage(
            f'<a href="demo_pkg-1.0.tar.gz#sha256={SHA_SDIST}" data-requires-python="&gt;=3" '
            f'data-yanked="" data-core-metadata="sha256={SHA_META}" data-size="3">x</a>',
            head='<base href="https://files.example/a/"><meta name="pypi:project-status" content="archived">',
        ),
        b'{"meta":{"api-version":"1.4","_last-serial":3},"projects":[{"name":"Frob","_last-serial":1},{"name":"spam"}]}',
        b'<!DOCTYPE html><html><body><a href="/simple/frob/">Frob</a><!-- <a>x</a> --><a href=spam/>spam</a></body></html>',
    ]
    JUNK = [b"<", b">", b'"', b"'", b"{", b"}", b"[", b"]", b"\\", b"&#", b"<!--", b"-->",
            b"#sha256=", b"=", b"\x00", b"\xff", b"<a ", b"</a>", b'"name":', b"\\u00"]

    def mutate(self, rnd: random.Random, body: bytes) -> bytes:
        data = bytearray(body)
        for _ in range(rnd.randint(1, 6)):
            at = rnd.randrange(len(data) + 1)
            choice = rnd.random()
            if choice < 0.3 and data:
                del data[at:at + rnd.randint(1, 20)]
            elif choice < 0.55:
                data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 5)))
            elif choice < 0.75 and data:
                start = rnd.randrange(len(data))
                data[at:at] = data[start:start + rnd.randint(1, 30)]
            else:
                data[at:at] = rnd.choice(self.JUNK)
        return bytes(data)

    def test_mutatedPages(self) -> None:
        """L{parseProjectPage} returns or raises L{UpstreamPageError} on thousands of mutated pages."""
        rnd = random.Random(20261125)
        for _ in range(2000):
            body = self.mutate(rnd, rnd.choice(self.SEEDS))
            for contentType in (None, "text/html", JSON_TYPE, "application/octet-stream"):
                try:
                    project = parseProjectPage(body, contentType, PAGE_URL, "demo-pkg")
                except UpstreamPageError:
                    continue
                for link in project.links:
                    self.assertTrue(link.url.startswith(("http://", "https://")), link.url)

    def test_mutatedListsChunked(self) -> None:
        """The list scanner gives the same names, or fails, whether a mutated body is fed whole or in pieces."""
        rnd = random.Random(7)
        for _ in range(1000):
            body = self.mutate(rnd, rnd.choice(self.SEEDS))
            contentType = rnd.choice([None, "text/html", JSON_TYPE])
            try:
                whole: list[str] | None = parseProjectList(body, contentType)
            except UpstreamPageError:
                whole = None
            scanner = ProjectListScanner(contentType)
            size = rnd.randint(1, 17)
            try:
                pieces = []
                for start in range(0, len(body), size):
                    pieces.extend(scanner.feed(body[start:start + size]))
                pieces.extend(scanner.close())
            except UpstreamPageError:
                pieces = None
            self.assertEqual(pieces, whole, body)

    def test_oddArguments(self) -> None:
        """Bytes-like bodies and bytes content types work; a non-bytes body is an L{UpstreamPageError}."""
        body = jsonPage([jsonFile()])
        self.assertEqual(len(parseProjectPage(bytearray(body), JSON_TYPE.encode(), PAGE_URL, "demo-pkg").links), 1)
        self.assertEqual(len(parseProjectPage(memoryview(body), None, PAGE_URL.encode(), "demo-pkg").links), 1)
        self.assertRaises(UpstreamPageError, parseProjectPage, None, None, PAGE_URL, "demo-pkg")
        self.assertRaises(UpstreamPageError, parseProjectPage, 12, None, PAGE_URL, "demo-pkg")
        self.assertRaises(UpstreamPageError, parseProjectList, object(), None)


class ToSimpleFileTests(SynchronousTestCase):
    """
    Tests for L{toSimpleFile}.
    """

    def link(self, **fields: Any) -> UpstreamLink:
        values: dict[str, Any] = dict(
            filename="demo_pkg-1.0-py3-none-any.whl",
            url=f"{FILES_HOST}/demo_pkg-1.0-py3-none-any.whl",
            sha256=SHA_WHEEL,
            hashes={"sha256": SHA_WHEEL, "md5": MD5},
            requiresPython=">=3.8",
            yanked="old",
            size=950,
            uploadTime="2025-01-01T00:00:00Z",
            coreMetadata=SHA_META,
            provenance="https://pypi.example/integrity/p",
            version="1.0",
        )
        values.update(fields)
        return UpstreamLink(**values)

    def test_mapping(self) -> None:
        """Every upstream fact is carried over, with our own URL."""
        self.assertEqual(
            toSimpleFile(self.link(), "../../+f/6c2/2000000000000/demo_pkg-1.0-py3-none-any.whl"),
            SimpleFile(
                filename="demo_pkg-1.0-py3-none-any.whl",
                url="../../+f/6c2/2000000000000/demo_pkg-1.0-py3-none-any.whl",
                sha256=SHA_WHEEL,
                size=950,
                uploadTime="2025-01-01T00:00:00Z",
                requiresPython=">=3.8",
                yanked="old",
                coreMetadataSha256=SHA_META,
                provenanceURL="https://pypi.example/integrity/p",
                version="1.0",
            ),
        )

    def test_unknowns(self) -> None:
        """No size gives C{-1}, no sha256 gives C{""}, and core metadata without a hash is not advertised."""
        simple = toSimpleFile(self.link(size=None, sha256=None, coreMetadata=True), "x")
        self.assertEqual((simple.size, simple.sha256, simple.coreMetadataSha256), (-1, "", None))
        self.assertIsNone(toSimpleFile(self.link(coreMetadata=False), "x").coreMetadataSha256)


class ParseProjectListTests(SynchronousTestCase):
    """
    Tests for L{parseProjectList}.
    """

    def test_json(self) -> None:
        """PyPI's JSON list gives the names, whatever the key order or extra keys."""
        body = json.dumps({
            "meta": {"_last-serial": 31, "api-version": "1.4"},
            "projects": [
                {"_last-serial": 30, "name": "Frob"},
                {"name": "spamspamspam", "_last-serial": 3},
                {"name": "with.dots_and-dashes", "extra": {"nested": ["x"]}},
                {"name": "caf\u00e9"},
                {"name": 12},
                "bare-string",
                {},
            ],
        }).encode()
        self.assertEqual(parseProjectList(body, JSON_TYPE), ["Frob", "spamspamspam", "with.dots_and-dashes"])

    def test_html(self) -> None:
        """Anchor texts of a Warehouse-shaped list are the names; comments and invalid names are skipped."""
        body = (
            b"<!DOCTYPE html>\n<html>\n  <head>\n"
            b'    <meta name="pypi:repository-version" content="1.4">\n'
            b"    <title>Simple index</title>\n  </head>\n  <body>\n"
            b'    <a href="/simple/frob/">Frob</a>\n'
            b'    <a href="/simple/spam/" title="a > b">  spam </a>\n'
            b"    <!-- <a href=\"/simple/hidden/\">hidden</a> -->\n"
            b'    <A HREF="/simple/x/"><span>Nested.Name</span></A>\n'
            b'    <a href="/simple/bad/">not valid!</a>\n'
            b"    <abbr>abbr-is-not-an-anchor</abbr>\n"
            b'    <a href="/simple/amp/">a&#46;b</a>\n'
            b"  </body>\n</html>\n<!--SERIAL 3-->"
        )
        self.assertEqual(parseProjectList(body, "text/html"), ["Frob", "spam", "Nested.Name", "a.b"])

    def test_jsonErrors(self) -> None:
        """JSON lists of the wrong shape or version raise L{UpstreamPageError}."""
        bodies = [
            b'{"meta": {"api-version": "2.0"}, "projects": []}',
            b'{"meta": {"api-version": 1}, "projects": []}',
            b'{"meta": [], "projects": []}',
            b'{"projects": []}',
            b'{"meta": {"api-version": "1.0"}}',
            b'{"meta": {"api-version": "1.0"}, "projects": {}}',
            b'{"meta": {"api-version": "1.0"}, "projects": [}',
            b'{"meta": {"api-version": "1.0"}, "projects": []',
            b'{"meta": {"api-version": "1.0"}, "projects": []} x',
            b'{"meta": {"api-version": "1.0"}, "projects": [01]}',
            b'{"meta": {"api-version": "1.0"} "projects": []}',
            b"[]",
            b"",
        ]
        for body in bodies:
            self.assertRaises(UpstreamPageError, parseProjectList, body, JSON_TYPE)

    def test_htmlErrors(self) -> None:
        """HTML lists of version 2, binary junk and plain text raise L{UpstreamPageError}."""
        cases = [
            (b'<meta name="pypi:repository-version" content="2.0"><a>x</a>', "text/html"),
            (b"\x89PNG\x00\x00", None),
            (b"hello world", "text/html"),
            (b"<a>x</a>", "application/octet-stream"),
            (b"   ", None),
        ]
        for body, contentType in cases:
            self.assertRaises(UpstreamPageError, parseProjectList, body, contentType)

    def test_emptyLists(self) -> None:
        """Valid lists without projects give no names."""
        self.assertEqual(parseProjectList(b'{"meta": {"api-version": "1.1"}, "projects": []}', None), [])
        self.assertEqual(parseProjectList(b"<html><body></body></html>", "text/html"), [])


def longJSONList(count: int) -> tuple[bytes, list[str]]:
    names = [f"project-{i:06d}" for i in range(count)]
    body = json.dumps({
        "meta": {"api-version": "1.4", "_last-serial": 99},
        "projects": [{"name": name, "_last-serial": i} for i, name in enumerate(names)],
    }).encode()
    return body, names


def longHTMLList(count: int) -> tuple[bytes, list[str]]:
    names = [f"Project_{i:06d}" for i in range(count)]
    anchors = "".join(f'    <a href="/simple/project-{i:06d}/">{name}</a>\n' for i, name in enumerate(names))
    body = (
        '<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.4">'
        f"<title>Simple index</title></head><body>\n{anchors}</body></html>\n"
    ).encode()
    return body, names


class ProjectListScannerTests(SynchronousTestCase):
    """
    Tests for L{ProjectListScanner}.
    """

    SHORT_JSON = (
        b'\xef\xbb\xbf {"meta": {"api-version": "1.4", "x": [1, -2.5e3, 0, 10E+2, -0.5e-1, true, false, null, {"a": "b"}, []]},'
        b' "projects": [{"name": "Fr\\u006fb", "_last-serial": 12}, {"_last-serial": 3, "name": "spam"},'
        b' {"name": "a\\"b"}, {"n\\u0061me": "esc-key"}]}\n'
    )
    SHORT_HTML = (
        b'\xef\xbb\xbf<!DOCTYPE html><html><head><meta name="pypi:repository-version" content="1.4"></head>'
        b'<body><a href="/simple/frob/">Frob</a><br/><!-- <a href="x">hidden</a> -->'
        b'<a href="/simple/spam/" data-x=\'>\'>sp&#97;m</a> < 3 <a\nhref="/simple/z/">z</a></body></html>'
    )

    def splitEverywhere(self, body: bytes, contentType: str | None, expected: list[str]) -> None:
        """Feeding C{body} in two pieces, split at each position, and byte by byte, gives C{expected}."""
        for at in range(len(body) + 1):
            scanner = ProjectListScanner(contentType)
            names = scanner.feed(body[:at]) + scanner.feed(body[at:]) + scanner.close()
            self.assertEqual(names, expected, at)
        scanner = ProjectListScanner(contentType)
        names = []
        for index in range(len(body)):
            names.extend(scanner.feed(body[index:index + 1]))
        self.assertEqual(names + scanner.close(), expected)

    def test_everySplitJSON(self) -> None:
        """A short JSON list gives the same names wherever it is split."""
        self.splitEverywhere(self.SHORT_JSON, JSON_TYPE, ["Frob", "spam", "esc-key"])
        self.splitEverywhere(self.SHORT_JSON, None, ["Frob", "spam", "esc-key"])

    def test_everySplitHTML(self) -> None:
        """A short HTML list gives the same names wherever it is split."""
        self.splitEverywhere(self.SHORT_HTML, "text/html", ["Frob", "spam", "z"])
        self.splitEverywhere(self.SHORT_HTML, None, ["Frob", "spam", "z"])

    def assertStreams(self, body: bytes, contentType: str, names: list[str], chunkSize: int) -> None:
        scanner = ProjectListScanner(contentType)
        found: list[str] = []
        largest = 0
        for start in range(0, len(body), chunkSize):
            found.extend(scanner.feed(body[start:start + chunkSize]))
            largest = max(largest, scanner.buffered)
        found.extend(scanner.close())
        self.assertEqual(found, names)
        self.assertLessEqual(largest, 256)
        self.assertEqual(scanner.buffered, 0)

    def test_longJSON(self) -> None:
        """A 100,000-name JSON list streams in chunks while holding at most a few hundred bytes."""
        body, names = longJSONList(100_000)
        self.assertStreams(body, JSON_TYPE, names, 65536)
        self.assertStreams(body, JSON_TYPE, names, 8191)

    def test_longHTML(self) -> None:
        """A 100,000-name HTML list streams in chunks while holding at most a few hundred bytes."""
        body, names = longHTMLList(100_000)
        self.assertStreams(body, "text/html", names, 65536)
        self.assertStreams(body, "text/html", names, 8191)

    def test_namesReturnedAsTheyComplete(self) -> None:
        """Each feed returns the names completed by its piece."""
        scanner = ProjectListScanner("text/html")
        self.assertEqual(scanner.feed(b"<html><a href=x>one</a><a href=y>tw"), ["one"])
        self.assertEqual(scanner.feed(b"o</a>"), ["two"])
        self.assertEqual(scanner.close(), [])

    def test_tooLongConstruct(self) -> None:
        """A construct longer than L{MAX_LIST_CONSTRUCT} is an error, however it is fed."""
        huge = b"x" * (MAX_LIST_CONSTRUCT + 10)
        cases = [
            (b"<html><a href=x>" + huge + b"</a>", "text/html"),
            (b"<html><!--" + huge + b"-->", "text/html"),
            (b'{"meta": {"api-version": "1.0"}, "projects": [{"name": "' + huge + b'"}]}', JSON_TYPE),
        ]
        for body, contentType in cases:
            self.assertRaises(UpstreamPageError, parseProjectList, body, contentType)
            scanner = ProjectListScanner(contentType)
            with self.assertRaises(UpstreamPageError):
                for start in range(0, len(body), 1000):
                    scanner.feed(body[start:start + 1000])
                    self.assertLessEqual(scanner.buffered, MAX_LIST_CONSTRUCT + 1000)
                scanner.close()

    def test_deepNesting(self) -> None:
        """JSON nested deeper than the scanner allows is an error, not unbounded memory."""
        body = b'{"meta": {"api-version": "1.0"}, "projects": [], "x": ' + b"[" * 10000
        scanner = ProjectListScanner(JSON_TYPE)
        self.assertRaises(UpstreamPageError, scanner.feed, body)

    def test_errorsAreSticky(self) -> None:
        """After an error every further call raises the same error."""
        scanner = ProjectListScanner(JSON_TYPE)
        error = self.assertRaises(UpstreamPageError, scanner.feed, b"<html>")
        self.assertIs(self.assertRaises(UpstreamPageError, scanner.feed, b"{}"), error)
        self.assertIs(self.assertRaises(UpstreamPageError, scanner.close), error)

    def test_truncatedJSON(self) -> None:
        """A JSON list cut short is an error at L{ProjectListScanner.close}, after the names so far."""
        body, names = longJSONList(10)
        scanner = ProjectListScanner(JSON_TYPE)
        found = scanner.feed(body[: len(body) // 2])
        self.assertTrue(found)
        self.assertEqual(found, names[: len(found)])
        self.assertRaises(UpstreamPageError, scanner.close)

    def test_closeTwice(self) -> None:
        """Closing twice is an error."""
        scanner = ProjectListScanner("text/html")
        scanner.feed(b"<html></html>")
        self.assertEqual(scanner.close(), [])
        self.assertRaises(UpstreamPageError, scanner.close)


# -- parsing off the reactor ---------------------------------------------------

MIRROR_URL = "https://pypi.example/simple/"


class HeldRunner:
    """
    A runner that records each call and holds it until L{release}: proof
    that the work went through the runner and not onto the caller's thread.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def runFile(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    runRead = runWrite = runFile

    def release(self) -> None:
        """Run the calls held so far, in order, each as a thread would; new ones wait for the next release."""
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


class FakeUpstream:
    """Answers C{fetchPage} with one page and C{openPage} with one streamed response."""

    idleTimeout = 60.0

    def __init__(self, page: PageResponse | None = None, response: Any = None) -> None:
        self.page = page
        self.response = response

    async def fetchPage(self, url: str, etag: str | None) -> PageResponse:
        assert self.page is not None
        return self.page

    async def openPage(self, url: str, etag: str | None) -> Any:
        return self.response


class StreamedResponse:
    """An C{IResponse} whose body the test delivers by hand."""

    code = 200

    def __init__(self, contentType: bytes) -> None:
        self.headers = Headers({b"content-type": [contentType]})
        self.protocol: Any = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def mirrorStage() -> Stage:
    return Stage("root", "pypi", {"type": "mirror", "mirror_url": MIRROR_URL, "mirror_cache_expiry": 1800})


def resultOf(d: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    d.addBoth(box.append)
    return box


class MirrorPagesParsingTests(SynchronousTestCase):
    """L{MirrorPages} parses upstream pages in its runner, not on the reactor."""

    def fetch(self, runner: Any, body: bytes) -> tuple[list[Any], Any]:
        pageURL = MIRROR_URL + "demo-pkg/"
        upstream = FakeUpstream(PageResponse(200, body, JSON_TYPE, '"e1"', 7, pageURL))
        pages = MirrorPages(MemoryStorage(), upstream, Clock(), parseRunner=runner)  # type: ignore[arg-type]
        return resultOf(ensureDeferred(pages.project(mirrorStage(), "demo-pkg"))), pages

    def largePage(self) -> bytes:
        files = [jsonFile(f"demo_pkg-1.{i}-py3-none-any.whl", hashes={"sha256": f"{i:064x}"}) for i in range(2000)]
        body = jsonPage(files)
        self.assertGreater(len(body), 512 * 1024)
        return body

    def test_largePageParsedInRunner(self) -> None:
        """
        A large page's parse is handed to the runner with the response, and
        the project is answered only once the runner has done it.
        """
        body = self.largePage()
        runner = HeldRunner()
        result, _ = self.fetch(runner, body)
        self.assertEqual(result, [])
        [(f, args, _)] = runner.calls
        self.assertIs(f, parseProjectPage)
        self.assertEqual(args, (body, JSON_TYPE, MIRROR_URL + "demo-pkg/", "demo-pkg"))
        runner.release()
        [cached] = result
        self.assertEqual(len(cached.links), 2000)

    def test_sameResultAsInline(self) -> None:
        """The links, serial and ETag cached are those of a parse on the calling thread."""
        body = self.largePage()
        runner = HeldRunner()
        held, _ = self.fetch(runner, body)
        runner.release()
        inline, _ = self.fetch(SynchronousRunner(), body)
        expected = parseProjectPage(body, JSON_TYPE, MIRROR_URL + "demo-pkg/", "demo-pkg")
        self.assertEqual(held[0].toStored(), inline[0].toStored())
        self.assertEqual(held[0].links, list(expected.links))
        self.assertEqual((held[0].etag, held[0].serial), ('"e1"', 7))

    def test_unusablePageFromRunner(self) -> None:
        """A page the runner's parse refuses is an upstream error, as before."""
        runner = HeldRunner()
        result, pages = self.fetch(runner, b"{not json" + b" " * 100_000)
        runner.release()
        [failure] = result
        failure.trap(UpstreamError)
        self.assertIn("not valid JSON", failure.getErrorMessage())
        self.assertEqual(pages.state(mirrorStage()).status.describe()["consecutive-failures"], 1)


class MirrorNamesParsingTests(SynchronousTestCase):
    """L{MirrorNames} scans upstream's project list in its runner, not on the reactor."""

    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.blobs = MemoryBlobStore()
        self.response = StreamedResponse(JSON_TYPE.encode("ascii"))
        upstream = FakeUpstream(response=self.response)
        clock = Clock()
        storage = MemoryStorage()
        pages = MirrorPages(storage, upstream, clock, parseRunner=self.runner)  # type: ignore[arg-type]
        self.names = MirrorNames(storage, self.blobs, upstream, clock, pages)  # type: ignore[arg-type]

    def test_listScannedInRunner(self) -> None:
        """
        Each piece of the list is scanned in the runner, one at a time, with
        upstream paused meanwhile; what arrived meanwhile is scanned as one
        piece; the names stored are those of a one-shot parse.
        """
        body, names = longJSONList(5000)
        result = resultOf(ensureDeferred(self.names.openCurrent(mirrorStage())))
        protocol = self.response.protocol
        third = len(body) // 3
        protocol.dataReceived(body[:third])
        [(f, args, _)] = self.runner.calls
        self.assertEqual(f.__name__, "feed")
        self.assertEqual(args, (body[:third],))
        protocol.dataReceived(body[third:2 * third])
        protocol.dataReceived(body[2 * third:])
        self.assertEqual(self.response.transport.producerState, "paused")
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.release()
        [(f, args, _)] = self.runner.calls
        self.assertEqual(args, (body[third:],))
        self.runner.release()
        self.assertEqual(self.response.transport.producerState, "producing")
        protocol.connectionLost(Failure(ResponseDone()))
        [(f, args, _)] = self.runner.calls
        self.assertEqual((f.__name__, args), ("close", ()))
        self.assertEqual(result, [])
        self.runner.release()
        [(sha256, opened)] = result
        self.assertEqual(self.successResultOf(opened.read(10 ** 7)).decode("utf-8").splitlines(), names)
        self.assertEqual(names, parseProjectList(body, JSON_TYPE))

    def test_unreadableListFromRunner(self) -> None:
        """A list the runner's scan refuses stops upstream and keeps no list."""
        result = resultOf(ensureDeferred(self.names.current(mirrorStage())))
        self.response.protocol.dataReceived(b"<html>")
        self.runner.release()
        self.assertEqual(self.response.transport.producerState, "stopped")
        self.assertEqual(result, [None])
        self.assertEqual(self.blobs.blobs, {})


class WiringTests(SynchronousTestCase):
    """The composition root hands the storage service's runner to the mirror pages."""

    def test_mirrorsOverParsesInTheGivenRunner(self) -> None:
        from twisted.python.filepath import FilePath

        from devpi_twisted.app.compose import mirrorsOver
        from devpi_twisted.config import ServerConfig

        runner = HeldRunner()
        config = ServerConfig(serverdir=FilePath(self.mktemp()), listen=())
        mirrors = mirrorsOver(config, MemoryStorage(), MemoryBlobStore(), object(), Clock(),  # type: ignore[arg-type]
                              runner=runner)
        self.assertIs(mirrors.pages.parseRunner, runner)


class ThreadedParsingTests(TestCase):
    """With the real L{ThreadRunner} the parse runs off the reactor thread and its result comes back."""

    async def test_pageParsedInAThread(self) -> None:
        from twisted.internet import reactor

        runner = ThreadRunner(reactor)
        runner.start()
        self.addCleanup(runner.stopService)
        threads: list[str] = []

        def parse(*args: Any) -> UpstreamProject:
            threads.append(threading.current_thread().name)
            return parseProjectPage(*args)

        self.patch(pagesModule, "parseProjectPage", parse)
        body = jsonPage([jsonFile(f"demo_pkg-1.{i}-py3-none-any.whl") for i in range(300)])
        upstream = FakeUpstream(PageResponse(200, body, JSON_TYPE, None, None, MIRROR_URL + "demo-pkg/"))
        pages = MirrorPages(MemoryStorage(), upstream, Clock(), parseRunner=runner)  # type: ignore[arg-type]
        cached = await pages.project(mirrorStage(), "demo-pkg")
        self.assertEqual(len(cached.links), 300)
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads[0], threading.current_thread().name)
