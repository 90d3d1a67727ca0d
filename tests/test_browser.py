"""
The web interface in a real browser: headless Chromium from Debian's
package driven by Playwright for Python, against a real C{twistd devpi} on
127.0.0.1.  A person clicks from C{/} to an index, a project, a version,
its documentation and its tox results, and uses the search box; the pages
raise no console errors (a CSP violation is one), nothing is asked of any
host but 127.0.0.1, and screenshots are saved in the test's directory.
devpi-client and pip, against the same server, see no difference.

Playwright's own browser downloads are never used (C{playwright install}
is not run): the browser is C{/usr/bin/chromium}.  The tests skip when it
or Playwright is missing, unless C{DEVPI_TWISTED_REQUIRE_ENGINES=1}.
"""

import importlib.util
import json
import os
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from .distbuilder import buildWheel, uploadBody
from . import test_clients, test_devpi_client  # modules: their test cases are not run again here
from .test_docs_push import form, makeZip

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESCRIPTION = ("Demo package\n============\n\nA package to *show* the web interface.\n\n"
               "Install it with ``pip``; ``<script>alert(1)</script>`` stays text.\n")


def _requireBrowser() -> None:
    """Skip (or fail, when engines are required) without Chromium or Playwright."""
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is not installed (Debian package chromium)"
    else:
        try:
            found = importlib.util.find_spec("playwright.sync_api") is not None
        except ImportError:
            found = False
        if not found:
            problem = "Playwright for Python is not installed"
    if problem is not None:
        if os.environ.get("DEVPI_TWISTED_REQUIRE_ENGINES") == "1":
            raise AssertionError(problem + " and DEVPI_TWISTED_REQUIRE_ENGINES=1")
        raise SkipTest(problem)


class Visit:
    """
    One browser session (run in a thread: Playwright's sync API), recording
    console errors, failed page errors and any request for another host.
    """

    def __init__(self, base: str, shots: str) -> None:
        self.base = base
        self.shots = shots
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.seen: dict[str, Any] = {}

    def _watch(self, context: Any, page: Any) -> None:
        def route(route: Any) -> None:
            if urlsplit(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                self.outside.append(route.request.url)
                route.abort()

        context.route("**/*", route)
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def shot(self, page: Any, name: str, full: bool = False) -> None:
        page.screenshot(path=os.path.join(self.shots, f"{name}.png"), full_page=full)

    def run(self) -> dict[str, Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                self._desktop(browser)
                self._withoutJavaScript(browser)
                self._phone(browser)
            finally:
                browser.close()
        return self.seen

    def _desktop(self, browser: Any) -> None:
        context = browser.new_context(viewport={"width": 1000, "height": 760})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=self.base)
        page = context.new_page()
        self._watch(context, page)
        seen = self.seen
        page.goto(self.base + "/")
        seen["rootHeading"] = page.inner_text("main h1")
        seen["rootText"] = page.inner_text("main")
        self.shot(page, "root")
        page.click("main a[href='/alice/dev']")
        page.wait_for_url("**/alice/dev")
        seen["indexHeading"] = page.inner_text("main h1")
        seen["indexText"] = page.inner_text("main")
        self.shot(page, "index")
        page.click("main a[href='/alice/dev/demo-pkg']")
        page.wait_for_url("**/alice/dev/demo-pkg")
        seen["projectHeading"] = page.inner_text("main h1")
        seen["description"] = page.inner_text("main .description")
        self.shot(page, "project")
        self.shot(page, "project-full", full=True)
        page.click("main a[href='/alice/dev/demo-pkg/1.0']")
        page.wait_for_url("**/alice/dev/demo-pkg/1.0")
        seen["versionHeading"] = page.inner_text("main h1")
        seen["installLine"] = page.inner_text("#install-line")
        seen["copyVisible"] = page.is_visible("button[data-copy]")  # shown by our script
        page.click("button[data-copy]")
        page.wait_for_function("document.querySelector('button[data-copy]').textContent === 'Copied'")
        seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
        seen["toxText"] = page.inner_text("main table")
        self.shot(page, "version", full=True)
        page.click("main a:text('log')")
        page.wait_for_url("**/+toxresults/**")
        seen["toxLog"] = page.inner_text("main")
        self.shot(page, "toxresult", full=True)
        page.go_back()
        page.click("main a:text('Read the documentation')")
        page.wait_for_url("**/+d/index.html")
        frame = page.frame_locator("iframe.docs")
        seen["docsText"] = frame.locator("h1").inner_text()
        self.shot(page, "docs")
        page.fill("#search-query", "demo")
        page.press("#search-query", "Enter")
        page.wait_for_url("**/+search?query=demo")
        seen["searchText"] = page.inner_text("main")
        self.shot(page, "search")
        context.close()

    def _withoutJavaScript(self, browser: Any) -> None:
        context = browser.new_context(java_script_enabled=False, viewport={"width": 1000, "height": 760})
        page = context.new_page()
        self._watch(context, page)
        page.goto(self.base + "/alice/dev/demo-pkg/1.0")
        self.seen["noJSInstallLine"] = page.inner_text("#install-line")
        self.seen["noJSCopyVisible"] = page.is_visible("button[data-copy]")
        context.close()

    def _phone(self, browser: Any) -> None:
        context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, device_scale_factor=1)
        page = context.new_page()
        self._watch(context, page)
        page.goto(self.base + "/alice/dev/demo-pkg/1.0")
        self.seen["phoneFits"] = page.evaluate(
            "document.documentElement.scrollWidth <= window.innerWidth + 1")
        self.shot(page, "phone")
        context.close()


class BrowserTests(test_clients._ClientCase):
    """A person in Chromium, and devpi-client and pip, against one real server."""

    devpi = test_devpi_client.DevpiClientTests.devpi
    devpiEnvironment = test_devpi_client.DevpiClientTests.devpiEnvironment

    def setUp(self) -> Any:
        _requireBrowser()
        return super().setUp()

    async def _publish(self) -> None:
        dist = buildWheel("demo-pkg", "1.0", summary="Shows the web interface")
        body = uploadBody(dist, extra=[("description", DESCRIPTION), ("description_content_type", "text/x-rst"),
                                       ("classifiers", "Programming Language :: Python :: 3"),
                                       ("project_urls", "Source, https://example.org/demo")])
        code, content, _ = await self.api("POST", "/alice/dev/", headers=body.headers, data=body.body)
        self.assertEqual(code, 200, content)
        self.assertSucceeded(await self.twineUpload("alice/dev", buildWheel("demo-pkg", "0.9")))
        headers, data = form({":action": "doc_upload", "name": "demo-pkg", "version": "1.0"},
                             makeZip({"index.html": b"<h1>demo-pkg documentation</h1>"}))
        code, content, _ = await self.api("POST", "/alice/dev/", headers=headers, data=data)
        self.assertEqual(code, 200, content)
        files = await self.simpleFiles("alice/dev", "demo-pkg")
        wheel = "demo_pkg-1.0-py3-none-any.whl"
        fileURL = f"/alice/dev/+f/{files[wheel][:3]}/{files[wheel][3:16]}/{wheel}"
        tox = {"host": "ci", "platform": "linux", "testenvs": {
            "py311": {"test": [{"command": ["pytest"], "retcode": 0, "output": "3 passed"}]},
            "py312": {"test": [{"command": ["pytest"], "retcode": 1, "output": "1 failed, 2 passed"}]}}}
        code, content, _ = await self.api("POST", fileURL, body=tox)
        self.assertEqual(code, 200, content)

    async def test_clickThrough(self) -> None:
        """From / to an index, a project, a version, its tox results and docs, and the search box."""
        await self._publish()
        shots = os.path.join(self.workdir, "screenshots")
        os.makedirs(shots)
        visit = Visit(self.server.url, shots)
        seen = await deferToThread(visit.run)
        self.assertEqual(visit.outside, [])
        self.assertEqual(visit.errors, [])
        self.assertEqual(seen["rootHeading"], "Indexes")
        self.assertIn("Server status", seen["rootText"])
        self.assertEqual(seen["indexHeading"], "alice/dev")
        self.assertIn("demo-pkg", seen["indexText"])
        self.assertEqual(seen["projectHeading"], "demo-pkg 1.0")
        self.assertIn("A package to show the web interface.", seen["description"])
        self.assertIn("<script>alert(1)</script>", seen["description"])  # as text
        self.assertEqual(seen["versionHeading"], "demo-pkg 1.0")
        line = f"pip install -i {self.server.url}/alice/dev/+simple/ demo-pkg==1.0"
        self.assertEqual(seen["installLine"], line)
        self.assertTrue(seen["copyVisible"])
        self.assertEqual(seen["clipboard"], line)
        self.assertIn("py311: passed", seen["toxText"])
        self.assertIn("py312: failed", seen["toxText"])
        self.assertIn("1 failed, 2 passed", seen["toxLog"])
        self.assertEqual(seen["docsText"], "demo-pkg documentation")
        self.assertIn("demo-pkg 1.0", seen["searchText"])
        self.assertIn("results for", seen["searchText"])
        self.assertEqual(seen["noJSInstallLine"], line)
        self.assertFalse(seen["noJSCopyVisible"])
        self.assertTrue(seen["phoneFits"])
        for name in ("root", "index", "project", "version", "toxresult", "docs", "search", "phone"):
            self.assertTrue(os.path.getsize(os.path.join(shots, f"{name}.png")) > 1000, name)

    async def test_clientsSeeNoDifference(self) -> None:
        """devpi-client lists and pip installs from the server a browser gets pages from."""
        await self._publish()
        code, body, response = await self.api("GET", "/alice/dev", auth=None,
                                              headers={b"Accept": [b"text/html,*/*;q=0.8"]})
        self.assertEqual(code, 200)
        self.assertIn(b"<main", body)
        code, body, response = await self.api("GET", "/alice/dev", auth=None)
        self.assertEqual(json.loads(body)["result"]["projects"], ["demo-pkg"])
        await self.devpi("use", self.server.url + "/alice/dev")
        listing = await self.devpi("list", "demo-pkg")
        self.assertIn("demo_pkg-1.0-py3-none-any.whl", listing.stdout)
        got = await self.devpi("getjson", "/alice/dev/demo-pkg")
        self.assertEqual(sorted(json.loads(got.stdout)["result"]), ["0.9", "1.0"])
        result, target = await self.pipInstall("alice/dev", "demo-pkg")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "1.0")
        result, target = await self.uvInstall("alice/dev", "demo-pkg==0.9")
        self.assertSucceeded(result)
        self.assertEqual(await self.importedVersion(target), "0.9")


