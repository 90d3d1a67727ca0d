"""
Tests for L{devpi_twisted.model.negotiation}.
"""

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import negotiation
from devpi_twisted.model.negotiation import (
    HTML_V1,
    JSON,
    TEXT_HTML,
    chooseSimpleFormat,
    wantsJSONAPI,
)

# The headers real clients send, verbatim (standards.md section 5).
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
UV_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
)
POETRY_ACCEPT = "application/vnd.pypi.simple.v1+json, */*;q=0.1"


class ClientHeaderTests(SynchronousTestCase):
    """
    The installers we care about get the representation they prefer.
    """

    def test_pip(self) -> None:
        """pip's exact header (also pdm's) selects JSON."""
        self.assertEqual(chooseSimpleFormat(PIP_ACCEPT), JSON)

    def test_pipBytes(self) -> None:
        """The raw header bytes from the request work the same as text."""
        self.assertEqual(chooseSimpleFormat(PIP_ACCEPT.encode("ascii")), JSON)

    def test_uv(self) -> None:
        """uv's exact header selects JSON."""
        self.assertEqual(chooseSimpleFormat(UV_ACCEPT), JSON)

    def test_poetry(self) -> None:
        """poetry's header, JSON plus a low-q wildcard, selects JSON."""
        self.assertEqual(chooseSimpleFormat(POETRY_ACCEPT), JSON)

    def test_uvFlatIndex(self) -> None:
        """uv's --find-links requests send text/html and get text/html."""
        self.assertEqual(chooseSimpleFormat("text/html"), TEXT_HTML)


class DefaultTests(SynchronousTestCase):
    """
    Requests that express no preference get text/html, for legacy tools.
    """

    def test_noHeader(self) -> None:
        """A missing Accept header means HTML."""
        self.assertEqual(chooseSimpleFormat(None), TEXT_HTML)

    def test_anything(self) -> None:
        """A bare */* means HTML, not JSON."""
        self.assertEqual(chooseSimpleFormat("*/*"), TEXT_HTML)
        self.assertEqual(chooseSimpleFormat(b"*/*"), TEXT_HTML)

    def test_empty(self) -> None:
        """An empty or blank header is treated like a missing one."""
        self.assertEqual(chooseSimpleFormat(""), TEXT_HTML)
        self.assertEqual(chooseSimpleFormat(b"  "), TEXT_HTML)

    def test_garbageOnly(self) -> None:
        """A header with no parseable media range is treated like a missing one."""
        self.assertEqual(chooseSimpleFormat("foo, ;q=1, /"), TEXT_HTML)

    def test_browser(self) -> None:
        """A typical browser header gets text/html."""
        header = (
            "text/html,application/xhtml+xml,application/xml;q=0.9,"
            "image/avif,image/webp,*/*;q=0.8"
        )
        self.assertEqual(chooseSimpleFormat(header), TEXT_HTML)


class ExplicitTypeTests(SynchronousTestCase):
    """
    Each media type, named alone, is answered with itself.
    """

    def test_json(self) -> None:
        """The v1 JSON type selects JSON."""
        self.assertEqual(chooseSimpleFormat(JSON), JSON)

    def test_htmlV1(self) -> None:
        """The v1 HTML type is answered with that type, not text/html."""
        self.assertEqual(chooseSimpleFormat(HTML_V1), HTML_V1)

    def test_latestJSON(self) -> None:
        """The latest+json meta-version is answered with the concrete v1 JSON type."""
        self.assertEqual(
            chooseSimpleFormat("application/vnd.pypi.simple.latest+json"), JSON
        )

    def test_latestHTML(self) -> None:
        """The latest+html meta-version is answered with the concrete v1 HTML type."""
        self.assertEqual(
            chooseSimpleFormat("application/vnd.pypi.simple.latest+html"), HTML_V1
        )

    def test_caseInsensitive(self) -> None:
        """Media types and the q parameter name are matched without regard to case."""
        self.assertEqual(
            chooseSimpleFormat("Application/VND.PyPI.Simple.V1+JSON, text/html;Q=0.5"),
            JSON,
        )

    def test_otherParameters(self) -> None:
        """Media type parameters before q do not hide the type or its q-value."""
        header = "text/html; charset=utf-8; q=0.2, application/vnd.pypi.simple.v1+json;q=0.3"
        self.assertEqual(chooseSimpleFormat(header), JSON)


class QualityTests(SynchronousTestCase):
    """
    q-values decide, not the order inside the header.
    """

    def test_higherQWins(self) -> None:
        """A higher q for HTML beats the preference for named JSON."""
        self.assertEqual(
            chooseSimpleFormat(
                "text/html;q=0.9, application/vnd.pypi.simple.v1+json;q=0.5"
            ),
            TEXT_HTML,
        )

    def test_orderDoesNotMatter(self) -> None:
        """Reordering pip's header does not change the answer."""
        reordered = ", ".join(reversed(PIP_ACCEPT.split(", ")))
        self.assertEqual(chooseSimpleFormat(reordered), JSON)

    def test_zeroExcludes(self) -> None:
        """JSON with q=0 is not acceptable, so HTML is chosen."""
        self.assertEqual(
            chooseSimpleFormat("application/vnd.pypi.simple.v1+json;q=0, text/html"),
            TEXT_HTML,
        )

    def test_zeroBeatsWildcard(self) -> None:
        """A specific q=0 excludes JSON even when */* would accept it."""
        self.assertEqual(
            chooseSimpleFormat("application/vnd.pypi.simple.v1+json;q=0, */*"),
            TEXT_HTML,
        )

    def test_allZero(self) -> None:
        """When every type we serve has q=0, nothing is acceptable."""
        self.assertIsNone(chooseSimpleFormat("*/*;q=0"))

    def test_specificOverridesWildcard(self) -> None:
        """The most specific range decides a type's q, even if a wildcard is higher."""
        header = "*/*;q=1, text/html;q=0.1, application/vnd.pypi.simple.v1+html;q=0.1"
        self.assertEqual(chooseSimpleFormat(header), JSON)

    def test_tieNamedJSON(self) -> None:
        """On a tie between named JSON and named HTML, JSON wins."""
        self.assertEqual(
            chooseSimpleFormat("text/html, application/vnd.pypi.simple.v1+json"), JSON
        )

    def test_tieWildcardOnly(self) -> None:
        """On a tie reached only through wildcards, HTML wins."""
        self.assertEqual(chooseSimpleFormat("application/*, text/*"), TEXT_HTML)

    def test_tieNamedBeatsWildcard(self) -> None:
        """A named HTML type beats JSON reached only through */* at the same q."""
        self.assertEqual(chooseSimpleFormat(f"{HTML_V1}, */*"), HTML_V1)

    def test_applicationWildcard(self) -> None:
        """application/* alone offers no text/html, so the v1 HTML type is used."""
        self.assertEqual(chooseSimpleFormat("application/*"), HTML_V1)

    def test_textWildcard(self) -> None:
        """text/* matches text/html."""
        self.assertEqual(chooseSimpleFormat("text/*"), TEXT_HTML)

    def test_malformedQ(self) -> None:
        """A q that is not a number counts as 1 instead of raising."""
        for bad in ("q=abc", "q=", "q", "q=nan", "q=1.0.0"):
            self.assertEqual(
                chooseSimpleFormat(f"text/html;q=0.5, {JSON};{bad}"), JSON, bad
            )

    def test_outOfRangeQ(self) -> None:
        """q-values outside 0..1 are clamped, so a negative q excludes the type."""
        self.assertEqual(chooseSimpleFormat(f"{JSON};q=-1, text/html;q=0.1"), TEXT_HTML)
        self.assertEqual(chooseSimpleFormat(f"{JSON};q=5, text/html;q=inf"), JSON)

    def test_quotedQ(self) -> None:
        """A quoted q-value is understood."""
        self.assertEqual(chooseSimpleFormat(f'{JSON};q="0.1", text/html'), TEXT_HTML)


class NotAcceptableTests(SynchronousTestCase):
    """
    L{None} tells the caller to answer 406.
    """

    def test_xml(self) -> None:
        """application/xml names nothing we serve."""
        self.assertIsNone(chooseSimpleFormat("application/xml"))

    def test_plainJSON(self) -> None:
        """Plain application/json is not a simple API type."""
        self.assertIsNone(chooseSimpleFormat("application/json"))

    def test_invalidWildcard(self) -> None:
        """A wildcard major type with a concrete subtype is ignored, not matched."""
        self.assertIsNone(chooseSimpleFormat("*/json, image/png"))

    def test_otherTextType(self) -> None:
        """text/plain is not HTML."""
        self.assertIsNone(chooseSimpleFormat("text/plain"))


class CacheTests(SynchronousTestCase):
    """
    Parsed headers are remembered, within a fixed bound.
    """

    def setUp(self) -> None:
        self.saved = dict(negotiation._cache)
        negotiation._cache.clear()
        self.addCleanup(self.restore)

    def restore(self) -> None:
        negotiation._cache.clear()
        negotiation._cache.update(self.saved)

    def test_repeatedAnswerIsStable(self) -> None:
        """Asking twice gives the same answer and caches it once."""
        self.assertEqual(chooseSimpleFormat(UV_ACCEPT), JSON)
        self.assertEqual(chooseSimpleFormat(UV_ACCEPT), JSON)
        self.assertEqual(negotiation._cache, {UV_ACCEPT: JSON})

    def test_cachedNone(self) -> None:
        """A 406 answer is cached as well and stays L{None}."""
        self.assertIsNone(chooseSimpleFormat("image/png"))
        self.assertIsNone(chooseSimpleFormat("image/png"))
        self.assertIn("image/png", negotiation._cache)

    def test_bounded(self) -> None:
        """Many distinct headers never grow the cache beyond its limit."""
        for i in range(negotiation._CACHE_SIZE * 3):
            chooseSimpleFormat(f"text/html;q=0.{i}")
        self.assertEqual(len(negotiation._cache), negotiation._CACHE_SIZE)
        self.assertEqual(chooseSimpleFormat(PIP_ACCEPT), JSON)
        self.assertEqual(len(negotiation._cache), negotiation._CACHE_SIZE)

    def test_longHeaderNotCached(self) -> None:
        """Very long header values are answered but not kept."""
        header = "text/plain, " * 200 + "text/html"
        self.assertEqual(chooseSimpleFormat(header), TEXT_HTML)
        self.assertEqual(negotiation._cache, {})


class WantsJSONAPITests(SynchronousTestCase):
    """
    devpi's JSON views are chosen by the presence of application/json.
    """

    def test_present(self) -> None:
        """devpi-client's header, as text or bytes, asks for the JSON API."""
        self.assertTrue(wantsJSONAPI("application/json"))
        self.assertTrue(wantsJSONAPI(b"text/html, application/json;q=0.5"))

    def test_absent(self) -> None:
        """No header, HTML, or the simple JSON type do not ask for the JSON API."""
        self.assertFalse(wantsJSONAPI(None))
        self.assertFalse(wantsJSONAPI("text/html"))
        self.assertFalse(wantsJSONAPI(JSON))
        self.assertFalse(wantsJSONAPI(b"*/*"))


class HeaderSyntaxTests(SynchronousTestCase):
    """
    werkzeug splits the header by RFC 9110's grammar, where the hand-written
    splitter cut at every comma and accepted spaces around C{=}.
    """

    def test_quotedComma(self) -> None:
        """A comma inside a quoted parameter value does not split the media range."""
        header = f'text/html;x="a,b";q=0.1, {JSON};q=0.5'
        self.assertEqual(chooseSimpleFormat(header), JSON)

    def test_spacesAroundEquals(self) -> None:
        """C{q = 0.3} is no q parameter (the grammar has no spaces there), so the range keeps q=1."""
        self.assertEqual(chooseSimpleFormat(f"{JSON};q=0.5, text/html ; q = 0.3"), TEXT_HTML)
