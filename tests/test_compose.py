"""
The composition root, L{devpi_twisted.app.compose.buildServer}: C{makeService}
builds the server with it, and so do the test harnesses, with production's
limits in place.
"""

import io
import os
import sys
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.app import compose, tap
from devpi_twisted.app.shutdown import WebService
from devpi_twisted.web.server import DevpiSite

from .helpers import APIHarness
from .mirrorharness import TIMEOUT, MirrorHarness
from .releaseharness import PIP_ACCEPT, ServerHarness
from .test_tap import ThreadedMemoryReactor


class MakeServiceFactoryTests(SynchronousTestCase):
    """C{makeService} builds its server with L{compose.buildServer}, over the real collaborators."""

    def setUp(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        self.patch(os, "environ", {})

    def test_makeServiceUsesBuildServer(self) -> None:
        """The site twistd listens with is the one L{compose.buildServer} built."""
        built: list[Any] = []

        def recording(*args: Any, **kwargs: Any) -> Any:
            built.append(compose.buildServer(*args, **kwargs))
            return built[-1]

        self.patch(tap, "buildServer", recording)
        options = tap.Options()
        path = FilePath(os.path.abspath(self.mktemp()))
        options.parseOptions(["--serverdir", path.path, "--root-passwd", "pw"])
        reactor = ThreadedMemoryReactor()
        service = tap.makeService(options, reactor=reactor)
        self.assertEqual(len(built), 1)
        [web] = [child for child in service if isinstance(child, WebService)]
        listeners = list(web.getServiceNamed("listeners"))
        self.assertEqual([listener.factory for listener in listeners], [built[0].site])
        self.assertIs(built[0].mirrors.parent, service)


class HarnessLimitsTests(SynchronousTestCase):
    """The harnesses run production's wiring: upstream limits, site and all."""

    def test_upstreamFetchesCapped(self) -> None:
        """
        At most C{--max-upstream-fetches} (32) requests go upstream at once;
        the next waits for a slot, which a timed-out fetch gives back.
        """
        h = MirrorHarness(self)
        h.fake.hang = True
        pending = [h.begin("GET", f"/root/pypi/+simple/p{i}/", {b"Accept": [PIP_ACCEPT]}) for i in range(33)]
        self.assertEqual(len(h.upstreamPaths()), 32)
        self.assertEqual(h.server.upstreamStats.waiting, 1)
        h.clock.advance(TIMEOUT)
        for _ in range(20):
            h.pump()
        self.assertEqual(len(h.upstreamPaths()), 33)
        h.clock.advance(TIMEOUT)
        for _ in range(20):
            h.pump()
        for d in pending:
            self.assertGreaterEqual(self.successResultOf(d).code, 500)

    def test_siteIsProduction(self) -> None:
        """Raw requests meet the site C{makeService} serves, with the configured limits."""
        h = MirrorHarness(self)
        self.assertIsInstance(h.makeSite(), DevpiSite)
        api = APIHarness(self, maxConnections=7)
        self.assertEqual(api.server.site.limits.maxConnections, 7)

    def test_rawAnswerHeadersOnce(self) -> None:
        """
        An answer the site writes before any resource (413 for a body over
        C{--max-upload-size}) carries devpi's headers, each once.
        """
        h = ServerHarness(self)
        h.build(maxUploadSize=10)
        answer = h.raw(b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": 1234}")
        self.assertEqual(answer.code, 413)
        self.assertEqual(answer.headerValues("X-Content-Type-Options"), ["nosniff"])
        self.assertEqual(answer.headerValues("X-Devpi-Api-Version"), ["2"])
        self.assertEqual(answer.headerValues("X-Devpi-Uuid"), [h.server.nodeinfo["uuid"]])
