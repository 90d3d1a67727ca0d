"""
Private indexes through the real web resource, in memory: uploads, stored
files, the simple API (PEP 503 / 691 / 592 / 658 / 700 / 792), index
inheritance, yanking, project status, devpi's project JSON and deletions.

The server is wired as C{makeService} wires it (see L{tests.releaseharness})
over L{MemoryStorage} and L{MemoryBlobStore}; uploads are the bytes twine
sends (L{tests.distbuilder}).  Tests that must see exactly what went over the
wire (no C{Content-Encoding}, the 413 of the body limit) use a raw HTTP
connection to a L{Site} instead of a client.
"""

import hashlib
import re
from html.parser import HTMLParser
from typing import Any, Callable
from urllib.parse import unquote, urljoin, urlsplit

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from devpi_twisted.model.inheritance import Stage, contributingStages, resolutionOrder
from devpi_twisted.services.fileentries import uploadTime
from devpi_twisted.web.limits import limitedRequestFactory

from .distbuilder import Dist, attestationFor, buildSdist, buildWheel, uploadBody
from .releaseharness import (
    BASE,
    BROWSER_AGENT,
    JSON_TYPE,
    PIP_ACCEPT,
    PIP_AGENT,
    POETRY_ACCEPT,
    START_TIME,
    UV_ACCEPT,
    UV_AGENT,
    Answer,
    ServerHarness,
    basic,
)

UPLOAD_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
JSON_ACCEPT = {b"Accept": [b"application/json"]}


class PageParser(HTMLParser):
    """The links, meta tags and paragraphs of a simple page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[dict[str, str | None], str]] = []
        self.meta: dict[str, str | None] = {}
        self.paragraphs: list[str] = []
        self._open: str | None = None
        self._attrs: dict[str, str | None] = {}
        self._text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "meta":
            values = dict(attrs)
            if values.get("name"):
                self.meta[values["name"]] = values.get("content")  # type: ignore[index]
        if tag in ("a", "p"):
            self._open, self._attrs, self._text = tag, dict(attrs), []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._open:
            return
        if tag == "a":
            self.links.append((self._attrs, "".join(self._text)))
        else:
            self.paragraphs.append("".join(self._text))
        self._open = None

    def link(self, filename: str) -> dict[str, str | None]:
        """The attributes of the link whose text is C{filename}."""
        for attrs, text in self.links:
            if text == filename:
                return attrs
        raise AssertionError(f"no link for {filename}")


def rawGet(path: str, *headers: str, method: str = "GET") -> bytes:
    """A raw HTTP/1.1 request asking to close the connection afterwards."""
    lines = [f"{method} {path} HTTP/1.1", "Host: devpi.test", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Case(SynchronousTestCase):
    """A harness with C{alice/dev} (volatile) and C{alice/prod} (not volatile)."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")
        self.h.createIndex("alice", "prod", volatile=False)

    def snapshot(self) -> tuple[int, set[str]]:
        """The storage serial and the stored blobs."""
        return self.h.storage.currentSerial(), set(self.h.blobs.blobs)

    def assertRefused(self, answer: Answer, code: int, fragment: str,
                      before: tuple[int, set[str]]) -> None:
        """
        C{answer} is an error C{code} whose message (in the body and in the
        reason phrase) contains C{fragment}, and nothing was stored.
        """
        self.assertEqual(answer.code, code, answer.body)
        message = answer.json["message"]
        self.assertIn(fragment, message)
        self.assertIn(fragment.encode("ascii"), answer.phrase)
        self.assertEqual(self.snapshot(), before)

    def page(self, stage: str, project: str, headers: Any = None) -> PageParser:
        return PageParser(self.h.simpleHTML(stage, project, headers).text)


class UploadTests(_Case):
    """What a good upload does, and re-uploads under the same file name."""

    def test_success(self) -> None:
        """A twine upload of a wheel answers 200 with an empty body."""
        answer = self.h.upload("alice/dev", buildWheel())
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.body, b"")
        self.assertEqual(answer.header("Content-Length"), "0")

    def test_postWithoutSlash(self) -> None:
        """The upload URL also works without the trailing slash, with no redirect."""
        wheel = buildWheel()
        answer = self.h.post("/alice/dev", uploadBody(wheel), self.h.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename)["hashes"],
                         {"sha256": wheel.sha256})

    def test_stored(self) -> None:
        """An uploaded wheel and sdist are listed on the simple page with their facts."""
        wheel = buildWheel(requiresPython=">=3.8")
        sdist = buildSdist(requiresPython=">=3.8")
        before = self.h.storage.currentSerial()
        self.h.mustUpload("alice/dev", wheel)
        self.h.mustUpload("alice/dev", sdist)
        self.assertEqual(self.h.storage.currentSerial(), before + 2)
        self.assertEqual(self.h.blobs.blobs[wheel.sha256], wheel.data)
        self.assertEqual(self.h.blobs.blobs[sdist.sha256], sdist.data)
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertEqual(page["versions"], ["1.0"])
        byName = {f["filename"]: f for f in page["files"]}
        self.assertEqual(sorted(byName), sorted([wheel.filename, sdist.filename]))
        for dist in (wheel, sdist):
            entry = byName[dist.filename]
            self.assertEqual(entry["hashes"], {"sha256": dist.sha256})
            self.assertEqual(entry["size"], dist.size)
            self.assertEqual(entry["requires-python"], ">=3.8")
            self.assertEqual(self.h.get(self.h.fileURL("alice/dev", "demo-pkg", dist.filename)).body,
                             dist.data)
        html = self.page("alice/dev", "demo-pkg")
        self.assertEqual(sorted(text for _, text in html.links), sorted([wheel.filename, sdist.filename]))

    def test_identicalReuploadNonVolatile(self) -> None:
        """Uploading the same bytes again to a non-volatile index is a 200 no-op."""
        wheel = buildWheel()
        self.h.mustUpload("alice/prod", wheel)
        etag = self.h.get("/alice/prod/+simple/demo-pkg/").header("ETag")
        before = self.snapshot()
        answer = self.h.upload("alice/prod", wheel)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.h.get("/alice/prod/+simple/demo-pkg/").header("ETag"), etag)

    def test_identicalReuploadVolatile(self) -> None:
        """Uploading the same bytes again to a volatile index changes nothing either."""
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel)
        url = self.h.fileURL("alice/dev", "demo-pkg", wheel.filename)
        before = self.snapshot()
        self.h.mustUpload("alice/dev", wheel)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.h.fileURL("alice/dev", "demo-pkg", wheel.filename), url)

    def test_conflictNonVolatile(self) -> None:
        """Other bytes under a stored name on a non-volatile index: 409 "File already exists"."""
        first = buildWheel(summary="first")
        second = buildWheel(summary="second")
        self.assertEqual(first.filename, second.filename)
        self.assertNotEqual(first.sha256, second.sha256)
        self.h.mustUpload("alice/prod", first)
        before = self.snapshot()
        answer = self.h.upload("alice/prod", second)
        self.assertEqual(answer.code, 409, answer.body)
        self.assertTrue(answer.json["message"].startswith("File already exists"), answer.json)
        self.assertTrue(answer.phrase.startswith(b"File already exists"), answer.phrase)
        self.assertEqual(self.snapshot(), before)
        entry = self.h.fileEntry("alice/prod", "demo-pkg", first.filename)
        self.assertEqual(entry["hashes"]["sha256"], first.sha256)

    def test_volatileReplaces(self) -> None:
        """On a volatile index other bytes replace the file under a new URL; the old URL is gone."""
        first = buildWheel(summary="first")
        second = buildWheel(summary="second")
        self.h.mustUpload("alice/dev", first)
        oldURL = self.h.fileURL("alice/dev", "demo-pkg", first.filename)
        self.h.mustUpload("alice/dev", second)
        files = self.h.fileEntries("alice/dev", "demo-pkg")
        self.assertEqual([f["hashes"]["sha256"] for f in files], [second.sha256])
        newURL = self.h.fileURL("alice/dev", "demo-pkg", second.filename)
        self.assertNotEqual(newURL, oldURL)
        self.assertEqual(self.h.get(newURL).body, second.data)
        self.assertEqual(self.h.get(oldURL).code, 410)

    def test_displayNameNormalised(self) -> None:
        """A project uploaded as C{Demo_Pkg} is stored and listed under C{demo-pkg}."""
        wheel = buildWheel(name="Demo_Pkg")
        self.h.mustUpload("alice/dev", wheel)
        self.assertEqual(self.h.simpleJSON("alice/dev", "demo-pkg")["name"], "demo-pkg")
        self.assertEqual(self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename)["hashes"]["sha256"],
                         wheel.sha256)
        listing = self.h.get("/alice/dev/+simple/", {b"Accept": [PIP_ACCEPT]}).json["projects"]
        self.assertEqual(len(listing), 1)
        self.assertEqual(self.h.get("/alice/dev/+simple/Demo_Pkg/").code, 302)

    def test_partWithoutContentType(self) -> None:
        """A content part without its own Content-Type (uv publish) is accepted."""
        wheel = buildWheel()
        answer = self.h.upload("alice/dev", wheel, partContentType=None)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.h.get(self.h.fileURL("alice/dev", "demo-pkg", wheel.filename)).body,
                         wheel.data)

    def test_emptyRequiresPython(self) -> None:
        """uv's empty requires_python counts as absent: no requires-python on the page."""
        sdist = buildSdist()
        self.h.mustUpload("alice/dev", sdist, requiresPython="", partContentType=None)
        entry = self.h.fileEntry("alice/dev", "demo-pkg", sdist.filename)
        self.assertNotIn("requires-python", entry)
        self.assertNotIn("data-requires-python", self.page("alice/dev", "demo-pkg").link(sdist.filename))

    def test_md5DigestAccepted(self) -> None:
        """A correct md5_digest (as poetry sends it) is accepted."""
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel, md5=wheel.md5)
        self.assertEqual(len(self.h.fileEntries("alice/dev", "demo-pkg")), 1)

    def test_attestationsAccepted(self) -> None:
        """An upload with a well-formed attestations field is accepted and the file stored."""
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel, attestations=[attestationFor(wheel)])
        self.assertEqual(self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename)["hashes"]["sha256"],
                         wheel.sha256)

    def test_provenanceWhenAttested(self) -> None:
        """A file uploaded with attestations has an absolute provenance URL that serves them."""
        wheel = buildWheel()
        attestation = attestationFor(wheel)
        self.h.mustUpload("alice/dev", wheel, attestations=[attestation])
        entry = self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename)
        provenance = entry.get("provenance")
        self.assertIsInstance(provenance, str)
        self.assertTrue(provenance.startswith(BASE + "/"), provenance)
        link = self.page("alice/dev", "demo-pkg").link(wheel.filename)
        self.assertEqual(link["data-provenance"], provenance)
        answer = self.h.get(provenance)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "application/vnd.pypi.integrity.v1+json")
        self.assertEqual(answer.json["version"], 1)
        bundles = answer.json["attestation_bundles"]
        self.assertEqual(bundles[0]["attestations"], [attestation])

    def test_attestationsAboutAnotherFile(self) -> None:
        """Attestations naming another file or digest are refused and nothing is stored."""
        wheel = buildWheel()
        for attestation in (attestationFor(wheel, filename="other-1.0.tar.gz"),
                            attestationFor(wheel, sha256="0" * 64)):
            before = self.snapshot()
            answer = self.h.upload("alice/dev", wheel, attestations=[attestation])
            self.assertRefused(answer, 400, "Invalid attestations", before)

    def test_malformedAttestations(self) -> None:
        """An attestations field that is not a JSON array of attestations is refused."""
        wheel = buildWheel()
        for value in ("not json", '{"version": 1}', "[1]", '[{"version": 1}]'):
            before = self.snapshot()
            answer = self.h.upload("alice/dev", wheel, extra=[("attestations", value)])
            self.assertEqual(answer.code, 400, value)
            self.assertIn("attestations", answer.json["message"])
            self.assertEqual(self.snapshot(), before)

    def test_noAttestationsNoProvenance(self) -> None:
        """A file uploaded without attestations advertises no provenance."""
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel)
        self.assertIsNone(self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename).get("provenance"))
        self.assertNotIn("data-provenance", self.page("alice/dev", "demo-pkg").link(wheel.filename))

    def test_metadataFromForm(self) -> None:
        """The form's metadata becomes the release's versiondata."""
        wheel = buildWheel(requiresDist=["attrs>=20", "idna"], summary="Demo summary")
        self.h.mustUpload("alice/dev", wheel)
        data = self.h.get("/alice/dev/demo-pkg/1.0", JSON_ACCEPT).json["result"]
        self.assertEqual(data["summary"], "Demo summary")
        self.assertEqual(data["requires_dist"], ["attrs>=20", "idna"])
        self.assertEqual(data["name"], "demo-pkg")
        self.assertEqual(data["version"], "1.0")

    def test_submitRegisters(self) -> None:
        """C{:action=submit} registers a release without files."""
        answer = self.h.post("/alice/dev/", uploadBody(None, action="submit", name="demo-pkg", version="2.0"),
                             self.h.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(answer.body, b"")
        config = self.h.get("/alice/dev/demo-pkg", JSON_ACCEPT).json["result"]
        self.assertEqual(list(config), ["2.0"])
        self.assertEqual(config["2.0"]["+links"], [])
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertEqual((page["versions"], page["files"]), (["2.0"], []))

    def test_submitNeedsRights(self) -> None:
        """C{:action=submit} by a user without upload rights is refused and stores nothing."""
        before = self.snapshot()
        answer = self.h.post("/alice/dev/", uploadBody(None, action="submit", name="demo-pkg", version="2.0"),
                             self.h.bob)
        self.assertEqual(answer.code, 403)
        self.assertEqual(self.snapshot(), before)


class UploadRightsTests(_Case):
    """Who may upload to an index."""

    def assertUploads(self, stage: str, auth: Any) -> None:
        wheel = buildWheel()
        self.h.mustUpload(stage, wheel, auth)
        self.assertEqual(self.h.fileEntry(stage, "demo-pkg", wheel.filename)["hashes"]["sha256"], wheel.sha256)

    def test_owner(self) -> None:
        """The index owner may upload."""
        self.assertUploads("alice/dev", self.h.alice)

    def test_root(self) -> None:
        """root may upload to any index."""
        self.assertUploads("alice/dev", self.h.root)

    def test_aclUser(self) -> None:
        """A user named in acl_upload may upload."""
        self.h.modifyIndex("alice", "dev", ["acl_upload+=bob"])
        self.assertUploads("alice/dev", self.h.bob)

    def test_aclAuthenticated(self) -> None:
        """C{:AUTHENTICATED:} in acl_upload lets any logged-in user upload."""
        self.h.modifyIndex("alice", "dev", ["acl_upload=:AUTHENTICATED:"])
        self.assertUploads("alice/dev", self.h.carol)

    def test_otherUserForbidden(self) -> None:
        """Another user gets 403 and nothing is stored."""
        before = self.snapshot()
        answer = self.h.upload("alice/dev", buildWheel(), self.h.bob)
        self.assertEqual(answer.code, 403)
        self.assertIn("bob", answer.json["message"])
        self.assertEqual(self.snapshot(), before)

    def test_aclAuthenticatedNotAnonymous(self) -> None:
        """C{:AUTHENTICATED:} does not let anonymous upload."""
        self.h.modifyIndex("alice", "dev", ["acl_upload=:AUTHENTICATED:"])
        before = self.snapshot()
        self.assertEqual(self.h.upload("alice/dev", buildWheel(), {}).code, 401)
        self.assertEqual(self.snapshot(), before)

    def test_anonymous(self) -> None:
        """An upload without credentials gets 401 with a Basic challenge."""
        before = self.snapshot()
        answer = self.h.upload("alice/dev", buildWheel(), {})
        self.assertEqual(answer.code, 401)
        self.assertTrue(answer.header("WWW-Authenticate").startswith("Basic"))
        self.assertTrue(answer.json["message"])
        self.assertEqual(self.snapshot(), before)

    def test_wrongPassword(self) -> None:
        """An upload with a wrong password gets 401 with a Basic challenge."""
        before = self.snapshot()
        answer = self.h.upload("alice/dev", buildWheel(), basic("alice", "wrong"))
        self.assertEqual(answer.code, 401)
        self.assertTrue(answer.header("WWW-Authenticate").startswith("Basic"))
        self.assertEqual(self.snapshot(), before)

    def test_mirrorRefused(self) -> None:
        """Uploads to a mirror index are refused, even for root."""
        before = self.snapshot()
        answer = self.h.upload("root/pypi", buildWheel(), self.h.root)
        self.assertEqual(answer.code, 404)
        self.assertIn("mirror", answer.json["message"])
        self.assertEqual(self.snapshot(), before)

    def test_unknownIndex(self) -> None:
        """Uploads to an index that does not exist get 404."""
        before = self.snapshot()
        self.assertEqual(self.h.upload("alice/nope", buildWheel(), self.h.alice).code, 404)
        self.assertEqual(self.snapshot(), before)


class BadUploadTests(_Case):
    """Every refused upload answers 400 naming the problem and stores nothing."""

    def refuse(self, dist: Dist, fragment: str, stage: str = "alice/dev", **options: Any) -> None:
        before = self.snapshot()
        answer = self.h.upload(stage, dist, **options)
        self.assertRefused(answer, 400, fragment, before)
        project = self.h.get(f"/{stage}/+simple/demo-pkg/")
        self.assertEqual(project.code, 404)

    def test_wrongVersionInFilename(self) -> None:
        """A file name without the form's version is refused."""
        self.refuse(buildWheel(), "does not contain version '2.0'", version="2.0")

    def test_filenameNotMatchingName(self) -> None:
        """A file name of another project is refused."""
        self.refuse(buildWheel(), "does not match project name 'other'", name="other")

    def test_invalidArchiveName(self) -> None:
        """A file that is no archive type is refused."""
        self.refuse(buildSdist(), "is not a valid archive name", filename="demo_pkg-1.0.txt")

    def test_invalidWheelFilename(self) -> None:
        """A wheel name without its tags is refused."""
        self.refuse(buildWheel(), "invalid wheel filename", filename="demo_pkg-1.0-py3.whl")

    def test_corruptWheel(self) -> None:
        """A wheel that is not a zip archive is refused."""
        self.refuse(buildWheel(), "is not a valid wheel", content=b"this is not a zip file")

    def test_wheelWithoutMetadata(self) -> None:
        """A wheel without its .dist-info/METADATA is refused."""
        self.refuse(buildWheel(omit=["METADATA"]), "METADATA")

    def test_wheelWithoutWheelFile(self) -> None:
        """A wheel without its .dist-info/WHEEL is refused."""
        self.refuse(buildWheel(omit=["WHEEL"]), "WHEEL is missing")

    def test_wheelMetadataNameDisagrees(self) -> None:
        """A wheel whose METADATA names another project is refused."""
        self.refuse(buildWheel(metadataName="other-pkg"), "metadata name 'other-pkg'")

    def test_wheelMetadataVersionDisagrees(self) -> None:
        """A wheel whose METADATA has another version is refused."""
        self.refuse(buildWheel(metadataVersion="9.9"), "metadata version '9.9'")

    def test_sdistPkgInfoDisagrees(self) -> None:
        """An sdist whose PKG-INFO names another project or version is refused."""
        self.refuse(buildSdist(metadataName="other-pkg"), "metadata name 'other-pkg'")
        self.refuse(buildSdist(metadataVersion="9.9"), "metadata version '9.9'")

    def test_badSha256(self) -> None:
        """A sha256_digest that does not match the bytes is refused."""
        self.refuse(buildWheel(), "digest supplied does not match", sha256="0" * 64)

    def test_malformedSha256(self) -> None:
        """A sha256_digest that is not 64 hex characters is refused."""
        self.refuse(buildWheel(), "sha256_digest is not a valid hex digest", sha256="xyz")

    def test_badBlake2(self) -> None:
        """A blake2_256_digest that does not match the bytes is refused."""
        self.refuse(buildWheel(), "digest supplied does not match", blake2_256="f" * 64)

    def test_badMd5(self) -> None:
        """An md5_digest that does not match the bytes is refused."""
        self.refuse(buildWheel(), "digest supplied does not match", md5="0" * 32)

    def test_missingContent(self) -> None:
        """A file_upload without a content part is refused."""
        self.refuse(buildWheel(), "content file field not found", withContent=False)

    def test_unknownAction(self) -> None:
        """An unknown :action is refused."""
        self.refuse(buildWheel(), "action 'frobnicate' not supported", action="frobnicate")

    def test_missingAction(self) -> None:
        """A form without :action is refused."""
        self.refuse(buildWheel(), ":action", action=None)

    def test_missingName(self) -> None:
        """A file_upload without a name is refused."""
        self.refuse(buildWheel(), "name is required", drop=["name"])

    def test_missingVersion(self) -> None:
        """A file_upload without a version is refused."""
        self.refuse(buildWheel(), "version is required", drop=["version"])

    def test_protocolVersion2(self) -> None:
        """protocol_version 2 is refused."""
        self.refuse(buildWheel(), "Unknown protocol version", protocolVersion="2")

    def test_strictRefusesZipSdist(self) -> None:
        """An index with pypi_strict refuses a .zip sdist, which others accept."""
        self.h.createIndex("alice", "strict", pypi_strict=True)
        sdist = buildSdist(zipFormat=True)
        self.refuse(sdist, "invalid file extension", stage="alice/strict")
        self.h.mustUpload("alice/dev", sdist)

    def test_strictRefusesLocalVersion(self) -> None:
        """An index with pypi_strict refuses a local version, which others accept."""
        self.h.createIndex("alice", "strict", pypi_strict=True)
        wheel = buildWheel(version="1.0+cpu")
        self.refuse(wheel, "local version", stage="alice/strict")
        self.h.mustUpload("alice/dev", wheel)
        self.assertEqual(self.h.simpleJSON("alice/dev", "demo-pkg")["versions"], ["1.0+cpu"])

    def test_refusedAfterGoodUpload(self) -> None:
        """A refused upload next to stored releases changes nothing about them."""
        wheel = buildWheel()
        self.h.mustUpload("alice/dev", wheel)
        etag = self.h.get("/alice/dev/+simple/demo-pkg/").header("ETag")
        before = self.snapshot()
        answer = self.h.upload("alice/dev", buildWheel(version="1.1"), sha256="0" * 64)
        self.assertRefused(answer, 400, "digest", before)
        self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/").header("ETag"), etag)


class UploadLimitTests(_Case):
    """The request body limit of C{limitedRequestFactory}, on a real L{Site} connection."""

    def limitedSite(self, limit: int) -> Any:
        site = self.h.makeSite()
        site.requestFactory = limitedRequestFactory(limit, [(b"X-Devpi-Api-Version", b"2")])
        return site

    def uploadRequest(self, body: bytes, contentType: bytes) -> bytes:
        auth = basic("alice", "alicepw")[b"Authorization"][0]
        return (
            b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nContent-Type: " + contentType + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body

    def test_tooLarge(self) -> None:
        """A body whose Content-Length exceeds the limit gets 413 and nothing is stored."""
        upload = uploadBody(buildWheel())
        before = self.snapshot()
        answer = self.h.raw(self.uploadRequest(upload.body, upload.contentType),
                            self.limitedSite(len(upload.body) - 1))
        self.assertEqual(answer.code, 413)
        self.assertIn(b"limit", answer.phrase)
        self.assertIn(b"--max-upload-size", answer.body)
        self.assertEqual(answer.header("X-Devpi-Api-Version"), "2")
        self.assertTrue(answer.closed)
        self.assertEqual(self.snapshot(), before)

    def test_tooLargeChunked(self) -> None:
        """A chunked body that grows past the limit gets 413."""
        data = b"x" * 5000
        auth = basic("alice", "alicepw")[b"Authorization"][0]  # else the upload gate answers 401 first
        request = (
            b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nConnection: close\r\nAuthorization: " + auth +
            b"\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
        )
        before = self.snapshot()
        answer = self.h.raw(request, self.limitedSite(1000))
        self.assertEqual(answer.code, 413)
        self.assertEqual(self.snapshot(), before)

    def test_refusedRequestNotProcessed(self) -> None:
        """A request refused with 413 never reaches its view, even when its chunked body ends."""
        self.h.mustUpload("alice/dev", buildWheel())
        auth = basic("alice", "alicepw")[b"Authorization"][0]
        data = b"x" * 5000
        request = (
            b"DELETE /alice/dev/demo-pkg HTTP/1.1\r\nHost: devpi.test\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
        )
        before = self.snapshot()
        answer = self.h.raw(request, self.limitedSite(1000))
        self.assertEqual(answer.code, 413)
        self.assertEqual(self.h.rawWritten.count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/").code, 200)

    def test_withinLimit(self) -> None:
        """A body exactly at the limit is uploaded normally."""
        wheel = buildWheel()
        upload = uploadBody(wheel)
        answer = self.h.raw(self.uploadRequest(upload.body, upload.contentType),
                            self.limitedSite(len(upload.body)))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.h.fileEntry("alice/dev", "demo-pkg", wheel.filename)["size"], wheel.size)


class FileTests(_Case):
    """Serving stored files and their core metadata."""

    def setUp(self) -> None:
        super().setUp()
        self.wheel = buildWheel(requiresPython=">=3.8")
        self.sdist = buildSdist()
        self.h.mustUpload("alice/dev", self.wheel)
        self.h.mustUpload("alice/dev", self.sdist)
        self.wheelURL = self.h.fileURL("alice/dev", "demo-pkg", self.wheel.filename)
        self.sdistURL = self.h.fileURL("alice/dev", "demo-pkg", self.sdist.filename)

    def test_urlLayout(self) -> None:
        """Files live at C{/user/index/+f/<sha256[:3]>/<sha256[3:16]>/<filename>}."""
        sha = self.wheel.sha256
        self.assertEqual(self.wheelURL, f"{BASE}/alice/dev/+f/{sha[:3]}/{sha[3:16]}/{self.wheel.filename}")

    def test_get(self) -> None:
        """GET gives the exact bytes with type, length, strong ETag and immutable caching."""
        for dist, url, contentType in ((self.wheel, self.wheelURL, "application/zip"),
                                       (self.sdist, self.sdistURL, "application/gzip")):
            answer = self.h.get(url)
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.body, dist.data)
            self.assertEqual(answer.header("Content-Type"), contentType)
            self.assertEqual(answer.header("Content-Length"), str(dist.size))
            etag = answer.header("ETag")
            self.assertRegex(etag, r'^"[^"]+"$')
            cacheControl = answer.header("Cache-Control")
            self.assertIn("immutable", cacheControl)
            self.assertRegex(cacheControl, r"max-age=\d{8,}")
            self.assertEqual(answer.header("Accept-Ranges"), "bytes")
            self.assertIsNotNone(answer.header("Last-Modified"))

    def test_noContentEncoding(self) -> None:
        """A .tar.gz goes out as it is, without Content-Encoding, even when gzip is accepted."""
        path = urlsplit(self.sdistURL).path
        answer = self.h.raw(rawGet(path, "Accept-Encoding: gzip, deflate"))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.headerValues("Content-Encoding"), [])
        self.assertEqual(answer.body, self.sdist.data)
        self.assertEqual(answer.header("Content-Length"), str(self.sdist.size))

    def test_head(self) -> None:
        """HEAD answers the same headers as GET and no body."""
        get = self.h.get(self.wheelURL)
        head = self.h.head(self.wheelURL)
        self.assertEqual(head.code, 200)
        self.assertEqual(head.body, b"")
        for name in ("Content-Type", "ETag", "Cache-Control", "Last-Modified", "Accept-Ranges"):
            self.assertEqual(head.header(name), get.header(name), name)

    def test_headOnTheWire(self) -> None:
        """On the wire, HEAD carries the file's Content-Length and not a byte of body."""
        answer = self.h.raw(rawGet(urlsplit(self.wheelURL).path, method="HEAD"))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Length"), str(self.wheel.size))
        self.assertEqual(answer.body, b"")

    def test_rangeFirstBytes(self) -> None:
        """C{Range: bytes=0-9} answers 206 with the first ten bytes."""
        answer = self.h.get(self.wheelURL, {b"Range": [b"bytes=0-9"]})
        self.assertEqual(answer.code, 206)
        self.assertEqual(answer.body, self.wheel.data[:10])
        self.assertEqual(answer.header("Content-Range"), f"bytes 0-9/{self.wheel.size}")
        self.assertEqual(answer.header("Content-Length"), "10")

    def test_rangeOpenEnded(self) -> None:
        """C{Range: bytes=5-} answers 206 with everything from byte 5."""
        size = self.wheel.size
        answer = self.h.get(self.wheelURL, {b"Range": [b"bytes=5-"]})
        self.assertEqual(answer.code, 206)
        self.assertEqual(answer.body, self.wheel.data[5:])
        self.assertEqual(answer.header("Content-Range"), f"bytes 5-{size - 1}/{size}")

    def test_rangeSuffix(self) -> None:
        """C{Range: bytes=-5} answers 206 with the last five bytes."""
        size = self.wheel.size
        answer = self.h.get(self.wheelURL, {b"Range": [b"bytes=-5"]})
        self.assertEqual(answer.code, 206)
        self.assertEqual(answer.body, self.wheel.data[-5:])
        self.assertEqual(answer.header("Content-Range"), f"bytes {size - 5}-{size - 1}/{size}")

    def test_rangePastEnd(self) -> None:
        """A range that starts at or past the end answers 416 with C{Content-Range: bytes */N}."""
        size = self.wheel.size
        for spec in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}"):
            answer = self.h.get(self.wheelURL, {b"Range": [spec.encode("ascii")]})
            self.assertEqual(answer.code, 416, spec)
            self.assertEqual(answer.header("Content-Range"), f"bytes */{size}")
            self.assertNotEqual(answer.body, self.wheel.data)

    def test_ifRangeCurrent(self) -> None:
        """C{If-Range} with the current ETag keeps the range."""
        etag = self.h.get(self.wheelURL).header("ETag").encode("ascii")
        answer = self.h.get(self.wheelURL, {b"Range": [b"bytes=0-9"], b"If-Range": [etag]})
        self.assertEqual(answer.code, 206)
        self.assertEqual(answer.body, self.wheel.data[:10])

    def test_ifRangeOther(self) -> None:
        """C{If-Range} with another ETag gets the whole file with 200."""
        answer = self.h.get(self.wheelURL, {b"Range": [b"bytes=0-9"], b"If-Range": [b'"other"']})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.wheel.data)
        self.assertIsNone(answer.header("Content-Range"))

    def test_ifNoneMatch(self) -> None:
        """C{If-None-Match} with the ETag answers 304 with the ETag and no body or Content-Type."""
        etag = self.h.get(self.wheelURL).header("ETag")
        answer = self.h.raw(rawGet(urlsplit(self.wheelURL).path, f"If-None-Match: {etag}"))
        self.assertEqual(answer.code, 304)
        self.assertEqual(answer.header("ETag"), etag)
        self.assertEqual(answer.body, b"")
        self.assertEqual(answer.headerValues("Content-Type"), [])

    def test_encodedPlus(self) -> None:
        """The file URL works with C{+f} written as C{%2Bf}."""
        answer = self.h.get(self.wheelURL.replace("/+f/", "/%2Bf/"))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.wheel.data)

    def test_coreMetadata(self) -> None:
        """C{<wheel>.metadata} is the byte-exact METADATA whose sha256 the pages advertise."""
        answer = self.h.get(self.wheelURL + ".metadata")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.wheel.metadata)
        digest = hashlib.sha256(answer.body).hexdigest()
        entry = self.h.fileEntry("alice/dev", "demo-pkg", self.wheel.filename)
        self.assertEqual(entry["core-metadata"], {"sha256": digest})
        link = self.page("alice/dev", "demo-pkg").link(self.wheel.filename)
        self.assertEqual(link["data-core-metadata"], f"sha256={digest}")
        self.assertIn("immutable", answer.header("Cache-Control"))

    def test_sdistHasNoMetadataFile(self) -> None:
        """C{<sdist>.metadata} is 404, and the pages do not advertise one."""
        self.assertEqual(self.h.get(self.sdistURL + ".metadata").code, 404)
        self.assertIs(self.h.fileEntry("alice/dev", "demo-pkg", self.sdist.filename)["core-metadata"], False)
        self.assertNotIn("data-core-metadata", self.page("alice/dev", "demo-pkg").link(self.sdist.filename))

    def test_unknownFile(self) -> None:
        """A file URL that names nothing stored answers 404."""
        self.assertEqual(self.h.get("/alice/dev/+f/abc/0123456789abc/demo_pkg-9.9.tar.gz").code, 404)
        wrongHash = self.wheelURL.replace(self.wheel.sha256[:3], "000", 1)
        self.assertEqual(self.h.get(wrongHash).code, 404)
        self.assertEqual(self.h.get("/alice/prod" + urlsplit(self.wheelURL).path[len("/alice/dev"):]).code, 404)

    def test_jsonMeta(self) -> None:
        """A file URL asked for JSON answers releasefilemeta."""
        answer = self.h.get(self.wheelURL, JSON_ACCEPT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "releasefilemeta")
        meta = answer.json["result"]
        self.assertEqual(meta["hash_spec"], f"sha256={self.wheel.sha256}")
        self.assertEqual(meta["hashes"]["sha256"], self.wheel.sha256)
        self.assertEqual((meta["project"], meta["version"]), ("demo-pkg", "1.0"))
        self.assertTrue(meta["last_modified"])


def resolve(page: str, href: str) -> str:
    """A link of a page as pip resolves it: against the page URL, without the fragment."""
    return urljoin(page, href).split("#")[0]


class SimpleAPITests(_Case):
    """Project lists and project pages in HTML and JSON."""

    def setUp(self) -> None:
        super().setUp()
        self.wheel = buildWheel(requiresPython=">=3.8")
        self.sdist = buildSdist()
        self.h.mustUpload("alice/dev", self.wheel)
        self.h.mustUpload("alice/dev", self.sdist)

    def test_noAcceptIsHTML(self) -> None:
        """Without Accept the project page is HTML 1.4 with one link per file."""
        answer = self.h.get("/alice/dev/+simple/demo-pkg/")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "text/html")
        self.assertTrue(answer.text.startswith("<!DOCTYPE html>"))
        page = PageParser(answer.text)
        self.assertEqual(page.meta["pypi:repository-version"], "1.4")
        self.assertEqual(sorted(t for _, t in page.links), sorted([self.wheel.filename, self.sdist.filename]))

    def test_clientsGetJSON(self) -> None:
        """pip's, uv's and poetry's exact Accept headers get the JSON page."""
        for accept in (PIP_ACCEPT, UV_ACCEPT, POETRY_ACCEPT):
            answer = self.h.get("/alice/dev/+simple/demo-pkg/", {b"Accept": [accept]})
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
            self.assertEqual(answer.json["name"], "demo-pkg")
            self.assertEqual(answer.json["meta"]["api-version"], "1.4")

    def test_projectList(self) -> None:
        """The project list comes as HTML without Accept and as JSON for pip."""
        html = self.h.get("/alice/dev/+simple/")
        self.assertEqual(html.header("Content-Type"), "text/html")
        links = PageParser(html.text).links
        self.assertEqual([(a["href"], t) for a, t in links], [("demo-pkg/", "demo-pkg")])
        self.assertEqual(self.h.get(resolve(html.url, "demo-pkg/")).code, 200)
        answer = self.h.get("/alice/dev/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        self.assertEqual(answer.json["projects"], [{"name": "demo-pkg"}])
        self.assertEqual(answer.json["meta"]["api-version"], "1.4")

    def test_notAcceptable(self) -> None:
        """C{Accept: application/xml} gets 406 with a JSON message."""
        for path in ("/alice/dev/+simple/demo-pkg/", "/alice/dev/+simple/"):
            answer = self.h.get(path, {b"Accept": [b"application/xml"]})
            self.assertEqual(answer.code, 406)
            self.assertEqual(answer.header("Content-Type"), "application/json")
            self.assertIn("application/vnd.pypi.simple.v1+json", answer.json["message"])

    def test_varyAccept(self) -> None:
        """Every negotiated page says it varies by Accept."""
        for path in ("/alice/dev/+simple/demo-pkg/", "/alice/dev/+simple/"):
            for accept in (None, PIP_ACCEPT):
                headers = {b"Accept": [accept]} if accept else None
                vary = self.h.get(path, headers).header("Vary")
                self.assertIn("accept", [v.strip().lower() for v in vary.split(",")])

    def test_etagAnd304(self) -> None:
        """Pages have strong ETags, different per representation; a match answers a bare 304."""
        html = self.h.get("/alice/dev/+simple/demo-pkg/")
        json = self.h.get("/alice/dev/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertRegex(html.header("ETag"), r'^"[^"]+"$')
        self.assertNotEqual(html.header("ETag"), json.header("ETag"))
        raw = self.h.raw(rawGet("/alice/dev/+simple/demo-pkg/", f"Accept: {PIP_ACCEPT.decode()}",
                                f"If-None-Match: {json.header('ETag')}"))
        self.assertEqual(raw.code, 304)
        self.assertEqual(raw.header("ETag"), json.header("ETag"))
        self.assertEqual(raw.headerValues("Content-Type"), [])
        self.assertEqual(raw.body, b"")
        self.assertIn("Accept", raw.header("Vary"))
        self.assertIsNotNone(raw.header("Cache-Control"))
        stale = self.h.get("/alice/dev/+simple/demo-pkg/", {b"If-None-Match": [b'"stale"']})
        self.assertEqual(stale.code, 200)
        self.assertEqual(stale.body, html.body)

    def assertPageChanges(self, change: Callable[[], Any]) -> None:
        """C{change} gives both representations new ETags and a higher X-PyPI-Last-Serial."""
        before = [self.h.get("/alice/dev/+simple/demo-pkg/", h) for h in (None, {b"Accept": [PIP_ACCEPT]})]
        change()
        after = [self.h.get("/alice/dev/+simple/demo-pkg/", h) for h in (None, {b"Accept": [PIP_ACCEPT]})]
        for old, new in zip(before, after):
            self.assertNotEqual(old.header("ETag"), new.header("ETag"))
            self.assertGreater(int(new.header("X-PyPI-Last-Serial")), int(old.header("X-PyPI-Last-Serial")))
            self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/", {
                b"If-None-Match": [old.header("ETag").encode()]}).code, 200)

    def test_changesAfterUpload(self) -> None:
        """An upload changes the page's ETag and serial."""
        self.assertPageChanges(lambda: self.h.mustUpload("alice/dev", buildWheel(version="1.1")))

    def test_changesAfterYank(self) -> None:
        """A yank and an unyank each change the page's ETag and serial."""
        self.assertPageChanges(lambda: self.h.request(
            "PATCH", "/alice/dev/demo-pkg/1.0", self.h.alice, json={"yanked": True}))
        self.assertPageChanges(lambda: self.h.request(
            "PATCH", "/alice/dev/demo-pkg/1.0", self.h.alice, json={"yanked": False}))

    def test_changesAfterDelete(self) -> None:
        """Deleting a file changes the page's ETag and serial."""
        url = self.h.fileURL("alice/dev", "demo-pkg", self.sdist.filename)
        self.assertPageChanges(lambda: self.assertEqual(
            self.h.request("DELETE", url, self.h.alice).code, 200))

    def test_serialHeader(self) -> None:
        """Pages carry X-PyPI-Last-Serial, the serial in JSON meta too."""
        answer = self.h.get("/alice/dev/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        serial = int(answer.header("X-PyPI-Last-Serial"))
        self.assertEqual(answer.json["meta"]["_last-serial"], serial)
        self.assertEqual(serial, self.h.storage.currentSerial())
        self.assertIsNotNone(self.h.get("/alice/dev/+simple/").header("X-PyPI-Last-Serial"))

    def test_jsonFileFields(self) -> None:
        """Every JSON file object has what pip and uv need, in the shapes they accept."""
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertNotIn("dist-info-metadata", page)
        expectedTime = uploadTime(START_TIME)
        self.assertRegex(expectedTime, UPLOAD_TIME)
        byName = {f["filename"]: f for f in page["files"]}
        for dist in (self.wheel, self.sdist):
            entry = byName[dist.filename]
            self.assertNotIn("?", entry["url"])
            self.assertNotIn("#", entry["url"])
            self.assertEqual(unquote(entry["url"].rsplit("/", 1)[1]), dist.filename)
            self.assertRegex(entry["hashes"]["sha256"], SHA256_HEX)
            self.assertEqual(entry["hashes"]["sha256"], dist.sha256)
            self.assertIs(type(entry["size"]), int)
            self.assertEqual(entry["size"], dist.size)
            self.assertIs(entry["yanked"], False)
            self.assertRegex(entry["upload-time"], UPLOAD_TIME)
            self.assertEqual(entry["upload-time"], expectedTime)
            self.assertNotIn("dist-info-metadata", entry)
            self.assertNotIn(None, entry.values())
        self.assertEqual(byName[self.wheel.filename]["requires-python"], ">=3.8")
        self.assertNotIn("requires-python", byName[self.sdist.filename])
        self.assertIsInstance(byName[self.wheel.filename]["core-metadata"], dict)
        self.assertIs(byName[self.sdist.filename]["core-metadata"], False)

    def test_htmlLinks(self) -> None:
        """Every HTML link ends in C{#sha256=}, escapes requires-python and names the file."""
        answer = self.h.simpleHTML("alice/dev", "demo-pkg")
        self.assertIn('data-requires-python="&gt;=3.8"', answer.text)
        page = PageParser(answer.text)
        for dist in (self.wheel, self.sdist):
            attrs = page.link(dist.filename)
            href = attrs["href"]
            self.assertTrue(href.endswith(f"#sha256={dist.sha256}"), href)
            self.assertEqual(unquote(urlsplit(href).path.rsplit("/", 1)[1]), dist.filename)
            self.assertNotIn("?", href)
            self.assertNotIn("data-yanked", attrs)
        self.assertEqual(page.link(self.wheel.filename)["data-requires-python"], ">=3.8")
        self.assertIn("data-core-metadata", page.link(self.wheel.filename))

    def test_versions(self) -> None:
        """C{versions} lists each version once, in order."""
        self.h.mustUpload("alice/dev", buildWheel(version="1.1"))
        self.h.mustUpload("alice/dev", buildWheel(version="0.9"))
        self.assertEqual(self.h.simpleJSON("alice/dev", "demo-pkg")["versions"], ["0.9", "1.0", "1.1"])

    def test_unknownProject(self) -> None:
        """An unknown project is 404 in every representation, not 403 and not an empty 200."""
        for headers in (None, {b"Accept": [PIP_ACCEPT]}, {b"User-Agent": [PIP_AGENT]}):
            answer = self.h.get("/alice/dev/+simple/nope/", headers)
            self.assertEqual(answer.code, 404)
            self.assertTrue(answer.json["message"])

    def test_unknownIndex(self) -> None:
        """Pages of an index that does not exist are 404."""
        self.assertEqual(self.h.get("/alice/nope/+simple/demo-pkg/").code, 404)
        self.assertEqual(self.h.get("/alice/nope/+simple/").code, 404)

    def test_nonNormalisedRedirects(self) -> None:
        """Non-normalised project names redirect to the normalised page."""
        for name in ("Demo_Pkg", "demo.pkg", "DEMO--pkg"):
            for headers in (None, {b"User-Agent": [PIP_AGENT], b"Accept": [PIP_ACCEPT]}):
                answer = self.h.get(f"/alice/dev/+simple/{name}/", headers)
                self.assertIn(answer.code, (301, 302, 308), name)
                target = resolve(answer.url, answer.header("Location"))
                self.assertEqual(target, f"{BASE}/alice/dev/+simple/demo-pkg/")
                self.assertEqual(self.h.get(target, headers).code, 200)

    def test_noSlashBrowserRedirects(self) -> None:
        """A browser asking without the trailing slash is redirected to the slash form."""
        for path in ("/alice/dev/+simple", "/alice/dev/+simple/demo-pkg"):
            answer = self.h.get(path, {b"User-Agent": [BROWSER_AGENT]})
            self.assertEqual(answer.code, 301, path)
            self.assertEqual(resolve(answer.url, answer.header("Location")), BASE + path + "/")

    def test_noSlashInstallerDirect(self) -> None:
        """pip and uv get the page without the trailing slash directly, with working links."""
        for agent in (PIP_AGENT, UV_AGENT):
            answer = self.h.get("/alice/dev/+simple/demo-pkg", {b"User-Agent": [agent]})
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.header("Content-Type"), "text/html")
            self.assertLinksServeFiles(answer)
            listing = self.h.get("/alice/dev/+simple", {b"User-Agent": [agent]})
            self.assertEqual(listing.code, 200)
            self.assertIn("demo-pkg", [t for _, t in PageParser(listing.text).links])

    def test_installerOnIndexURL(self) -> None:
        """An installer using C{/user/index/} as its index URL gets simple pages there."""
        listing = self.h.get("/alice/dev/", {b"User-Agent": [PIP_AGENT]})
        self.assertEqual(listing.code, 200)
        self.assertEqual(listing.header("Content-Type"), "text/html")
        href = PageParser(listing.text).links[0][0]["href"]
        project = self.h.get(resolve(listing.url, href), {b"User-Agent": [PIP_AGENT]})
        self.assertEqual(project.url, f"{BASE}/alice/dev/demo-pkg/")
        self.assertEqual(project.code, 200)
        self.assertLinksServeFiles(project)
        json = self.h.get("/alice/dev/demo-pkg/", {b"User-Agent": [UV_AGENT], b"Accept": [UV_ACCEPT]})
        self.assertEqual(json.header("Content-Type"), JSON_TYPE)
        self.assertLinksServeFiles(json)

    def assertLinksServeFiles(self, answer: Answer) -> None:
        """Each file link of the page, resolved against the page URL, serves bytes of that hash."""
        if answer.header("Content-Type") == JSON_TYPE:
            links = [(f["url"], f["hashes"]["sha256"]) for f in answer.json["files"]]
        else:
            links = [(a["href"], a["href"].split("#sha256=")[1]) for a, _ in PageParser(answer.text).links]
        self.assertEqual(len(links), 2)
        for href, sha in links:
            served = self.h.get(resolve(answer.url, href))
            self.assertEqual(served.code, 200, href)
            self.assertEqual(hashlib.sha256(served.body).hexdigest(), sha)

    def test_relativeLinksResolve(self) -> None:
        """Links on the HTML and JSON pages resolve to URLs that serve the files."""
        self.assertLinksServeFiles(self.h.get("/alice/dev/+simple/demo-pkg/"))
        self.assertLinksServeFiles(self.h.get("/alice/dev/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]}))
        self.assertLinksServeFiles(self.h.get("/alice/dev/+simple/demo-pkg", {
            b"Accept": [UV_ACCEPT], b"User-Agent": [UV_AGENT]}))

    def test_headPage(self) -> None:
        """HEAD on a page answers 200 with the negotiated type and no body."""
        answer = self.h.head("/alice/dev/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        self.assertEqual(answer.body, b"")


class InheritanceTests(_Case):
    """alice/dev <- alice/staging <- alice/qa: what each index serves."""

    def setUp(self) -> None:
        super().setUp()
        self.h.createIndex("alice", "staging", bases=["alice/dev"])
        self.h.createIndex("alice", "qa", bases=["alice/staging"])

    def test_inheritsBaseFiles(self) -> None:
        """An index serves its own files and its base's, each from where it is stored."""
        base = buildWheel(version="1.0")
        own = buildWheel(version="1.1")
        self.h.mustUpload("alice/dev", base)
        self.h.mustUpload("alice/staging", own)
        page = self.h.simpleJSON("alice/staging", "demo-pkg")
        self.assertEqual(page["versions"], ["1.0", "1.1"])
        urls = {f["filename"]: self.h.fileURL("alice/staging", "demo-pkg", f["filename"]) for f in page["files"]}
        self.assertTrue(urls[base.filename].startswith(f"{BASE}/alice/dev/+f/"))
        self.assertTrue(urls[own.filename].startswith(f"{BASE}/alice/staging/+f/"))
        self.assertEqual(self.h.get(urls[base.filename]).body, base.data)
        self.assertEqual(self.h.get(urls[own.filename]).body, own.data)
        self.assertEqual([f["filename"] for f in self.h.fileEntries("alice/dev", "demo-pkg")], [base.filename])

    def test_thirdLevel(self) -> None:
        """An index two levels down sees every level's files."""
        self.h.mustUpload("alice/dev", buildWheel(version="1.0"))
        self.h.mustUpload("alice/staging", buildWheel(version="1.1"))
        self.h.mustUpload("alice/qa", buildWheel(version="1.2"))
        self.assertEqual(self.h.simpleJSON("alice/qa", "demo-pkg")["versions"], ["1.0", "1.1", "1.2"])
        self.assertEqual(self.h.simpleJSON("alice/staging", "demo-pkg")["versions"], ["1.0", "1.1"])
        self.assertLinksWork("alice/qa", 3)

    def assertLinksWork(self, stage: str, count: int) -> None:
        files = self.h.fileEntries(stage, "demo-pkg")
        self.assertEqual(len(files), count)
        for entry in files:
            served = self.h.get(self.h.fileURL(stage, "demo-pkg", entry["filename"]))
            self.assertEqual(hashlib.sha256(served.body).hexdigest(), entry["hashes"]["sha256"])

    def test_projectOnlyInBase(self) -> None:
        """A project only the base holds is listed and served by the inheriting index."""
        self.h.mustUpload("alice/dev", buildWheel())
        listing = self.h.get("/alice/qa/+simple/", {b"Accept": [PIP_ACCEPT]}).json
        self.assertEqual(listing["projects"], [{"name": "demo-pkg"}])
        self.assertLinksWork("alice/qa", 1)

    def test_firstIndexWins(self) -> None:
        """When two indexes hold the same file name, the first in resolution order wins."""
        inBase = buildWheel(summary="in dev")
        inStaging = buildWheel(summary="in staging")
        self.h.mustUpload("alice/dev", inBase)
        self.h.mustUpload("alice/staging", inStaging)
        for stage in ("alice/staging", "alice/qa"):
            files = self.h.fileEntries(stage, "demo-pkg")
            self.assertEqual([f["hashes"]["sha256"] for f in files], [inStaging.sha256])
        self.assertEqual([f["hashes"]["sha256"] for f in self.h.fileEntries("alice/dev", "demo-pkg")],
                         [inBase.sha256])

    def test_noStaleCacheAfterBaseUpload(self) -> None:
        """After an upload to a base, the inheriting index's cached page shows it at once."""
        self.h.mustUpload("alice/dev", buildWheel(version="1.0"))
        first = self.h.get("/alice/qa/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(self.h.get("/alice/qa/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]}).body, first.body)
        self.h.mustUpload("alice/dev", buildWheel(version="1.1"))
        second = self.h.get("/alice/qa/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(second.json["versions"], ["1.0", "1.1"])
        self.assertNotEqual(second.header("ETag"), first.header("ETag"))

    def test_noStaleProjectList(self) -> None:
        """A new project in a base appears in the inheriting index's cached list at once."""
        self.h.mustUpload("alice/dev", buildWheel())
        self.assertEqual(len(self.h.get("/alice/qa/+simple/", {b"Accept": [PIP_ACCEPT]}).json["projects"]), 1)
        self.h.mustUpload("alice/dev", buildWheel(name="other-pkg"))
        names = [p["name"] for p in self.h.get("/alice/qa/+simple/", {b"Accept": [PIP_ACCEPT]}).json["projects"]]
        self.assertEqual(sorted(names), ["demo-pkg", "other-pkg"])

    def test_noStaleCacheAfterBasesChange(self) -> None:
        """Changing an index's bases changes what its cached page shows."""
        self.h.createIndex("bob", "extra")
        self.h.mustUpload("bob/extra", buildWheel(version="3.0"), self.h.bob)
        self.h.mustUpload("alice/staging", buildWheel(version="1.1"))
        self.assertEqual(self.h.simpleJSON("alice/staging", "demo-pkg")["versions"], ["1.1"])
        self.h.modifyIndex("alice", "staging", ["bases+=bob/extra"])
        self.assertEqual(self.h.simpleJSON("alice/staging", "demo-pkg")["versions"], ["1.1", "3.0"])

    def test_uploadToBaseNotToInheritor(self) -> None:
        """A file uploaded to the inheriting index is not visible in its base."""
        self.h.mustUpload("alice/qa", buildWheel())
        self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/").code, 404)
        self.assertEqual(self.h.get("/alice/staging/+simple/demo-pkg/").code, 404)


def configs(table: dict[str, dict[str, Any]]) -> Callable[[str, str], dict[str, Any] | None]:
    """A C{configOf} over C{{"user/index": config}}."""
    return lambda user, index: table.get(f"{user}/{index}")


def stage(**config: Any) -> dict[str, Any]:
    """A private index's config."""
    config.setdefault("type", "stage")
    return config


MIRROR = {"type": "mirror"}


class ResolutionOrderTests(SynchronousTestCase):
    """L{resolutionOrder}: devpi's breadth-first walk with mirrors last."""

    def order(self, table: dict[str, dict[str, Any]], start: str = "u/a") -> list[str]:
        user, index = start.split("/")
        return [s.name for s in resolutionOrder(user, index, configs(table))]

    def test_chain(self) -> None:
        """A chain of bases is walked in order."""
        table = {"u/a": stage(bases=["u/b"]), "u/b": stage(bases=["u/c"]), "u/c": stage()}
        self.assertEqual(self.order(table), ["u/a", "u/b", "u/c"])

    def test_breadthFirst(self) -> None:
        """Bases are walked breadth first, in the order they are listed."""
        table = {
            "u/a": stage(bases=["u/b", "u/c"]),
            "u/b": stage(bases=["u/d"]),
            "u/c": stage(bases=["u/e"]),
            "u/d": stage(),
            "u/e": stage(),
        }
        self.assertEqual(self.order(table), ["u/a", "u/b", "u/c", "u/d", "u/e"])

    def test_mirrorsLast(self) -> None:
        """Mirror bases move to the end, in the order they were found."""
        table = {
            "u/a": stage(bases=["root/pypi", "u/b"]),
            "u/b": stage(bases=["u/m2", "u/c"]),
            "u/c": stage(),
            "root/pypi": MIRROR,
            "u/m2": MIRROR,
        }
        self.assertEqual(self.order(table), ["u/a", "u/b", "u/c", "root/pypi", "u/m2"])

    def test_diamond(self) -> None:
        """A base reached twice appears once, where it was first reached."""
        table = {
            "u/a": stage(bases=["u/b", "u/c"]),
            "u/b": stage(bases=["u/d"]),
            "u/c": stage(bases=["u/d"]),
            "u/d": stage(bases=["root/pypi"]),
            "root/pypi": MIRROR,
        }
        self.assertEqual(self.order(table), ["u/a", "u/b", "u/c", "u/d", "root/pypi"])

    def test_missingBase(self) -> None:
        """A base that does not exist is skipped."""
        table = {"u/a": stage(bases=["u/gone", "u/b"]), "u/b": stage(bases=["x/gone"])}
        self.assertEqual(self.order(table), ["u/a", "u/b"])

    def test_missingIndex(self) -> None:
        """An index that does not exist has an empty order."""
        self.assertEqual(self.order({}, "u/nope"), [])

    def test_cycle(self) -> None:
        """A cycle of bases ends the walk instead of looping."""
        table = {"u/a": stage(bases=["u/b"]), "u/b": stage(bases=["u/a"])}
        self.assertEqual(self.order(table), ["u/a", "u/b"])

    def test_mirrorItself(self) -> None:
        """A mirror's own order is just itself."""
        self.assertEqual(self.order({"root/pypi": MIRROR}, "root/pypi"), ["root/pypi"])

    def test_configsCarried(self) -> None:
        """Each stage in the order carries its config."""
        table = {"u/a": stage(bases=["root/pypi"]), "root/pypi": MIRROR}
        order = resolutionOrder("u", "a", configs(table))
        self.assertEqual([(s.user, s.index, s.isMirror) for s in order],
                         [("u", "a", False), ("root", "pypi", True)])


class ShadowingTests(SynchronousTestCase):
    """L{contributingStages}: private projects hide mirrors unless whitelisted."""

    def stages(self, *specs: tuple[str, dict[str, Any]]) -> list[Stage]:
        return [Stage(*name.split("/"), config) for name, config in specs]

    def split(self, order: list[Stage], held: set[str], project: str = "demo-pkg") -> tuple[list[str], list[str]]:
        contributing, hidden = contributingStages(order, project, lambda s: s.name in held)
        return [s.name for s in contributing], [s.name for s in hidden]

    def test_privateHidesMirror(self) -> None:
        """A project the private index holds hides the mirror's releases of it."""
        order = self.stages(("u/a", stage()), ("root/pypi", MIRROR))
        self.assertEqual(self.split(order, {"u/a"}), (["u/a"], ["root/pypi"]))

    def test_privateBaseHidesMirror(self) -> None:
        """A project a private base holds hides the mirror too."""
        order = self.stages(("u/a", stage()), ("u/b", stage()), ("root/pypi", MIRROR))
        self.assertEqual(self.split(order, {"u/b"}), (["u/a", "u/b"], ["root/pypi"]))

    def test_notPrivate(self) -> None:
        """A project no private index holds comes from the mirror."""
        order = self.stages(("u/a", stage()), ("root/pypi", MIRROR))
        self.assertEqual(self.split(order, set()), (["u/a", "root/pypi"], []))

    def test_whitelisted(self) -> None:
        """A project named in mirror_whitelist is merged with the mirror."""
        order = self.stages(("u/a", stage(mirror_whitelist=["demo-pkg"])), ("root/pypi", MIRROR))
        self.assertEqual(self.split(order, {"u/a"}), (["u/a", "root/pypi"], []))
        self.assertEqual(self.split(order, {"u/a"}, "other"), (["u/a"], ["root/pypi"]))

    def test_wildcard(self) -> None:
        """C{*} in mirror_whitelist lets every project merge."""
        order = self.stages(("u/a", stage(mirror_whitelist=["*"])), ("root/pypi", MIRROR))
        self.assertEqual(self.split(order, {"u/a"}, "anything"), (["u/a", "root/pypi"], []))

    def test_inheritanceIntersection(self) -> None:
        """With intersection, a base's whitelist counts only if every index lists the name."""
        order = self.stages(
            ("u/a", stage(mirror_whitelist=[], mirror_whitelist_inheritance="intersection")),
            ("u/b", stage(mirror_whitelist=["demo-pkg"])),
            ("root/pypi", MIRROR),
        )
        self.assertEqual(self.split(order, {"u/b"}), (["u/a", "u/b"], ["root/pypi"]))

    def test_inheritanceUnion(self) -> None:
        """With union, a base's whitelist is enough."""
        order = self.stages(
            ("u/a", stage(mirror_whitelist=[], mirror_whitelist_inheritance="union")),
            ("u/b", stage(mirror_whitelist=["demo-pkg"])),
            ("root/pypi", MIRROR),
        )
        self.assertEqual(self.split(order, {"u/b"}), (["u/a", "u/b", "root/pypi"], []))

    def test_empty(self) -> None:
        """An empty order contributes nothing."""
        self.assertEqual(self.split([], set()), ([], []))


class ShadowingPageTests(_Case):
    """What the pages say about hidden mirrors."""

    NOTICE = "mirror_whitelist"

    def setUp(self) -> None:
        super().setUp()
        self.h.createIndex("alice", "shadow", bases=["root/pypi"])
        self.wheel = buildWheel()
        self.h.mustUpload("alice/shadow", self.wheel)

    def test_hiddenMirrorMentioned(self) -> None:
        """A browser page of a private project says that root/pypi's releases are left out."""
        page = self.page("alice/shadow", "demo-pkg")
        notices = [p for p in page.paragraphs if self.NOTICE in p]
        self.assertEqual(len(notices), 1)
        self.assertIn("root/pypi", notices[0])
        self.assertEqual([t for _, t in page.links], [self.wheel.filename])

    def test_installerPageHasNoNotice(self) -> None:
        """Installers get the plain page without the notice."""
        answer = self.h.get("/alice/shadow/+simple/demo-pkg/", {b"User-Agent": [PIP_AGENT]})
        self.assertNotIn(self.NOTICE, answer.text)
        self.assertNotIn(self.NOTICE, self.h.get("/alice/shadow/+simple/demo-pkg/",
                                                 {b"Accept": [PIP_ACCEPT]}).text)

    def test_whitelistedNoNotice(self) -> None:
        """Once the project (or C{*}) is whitelisted the notice is gone."""
        self.h.modifyIndex("alice", "shadow", ["mirror_whitelist+=demo-pkg"])
        self.assertNotIn(self.NOTICE, self.h.simpleHTML("alice/shadow", "demo-pkg").text)
        self.h.modifyIndex("alice", "shadow", ["mirror_whitelist=*"])
        self.assertNotIn(self.NOTICE, self.h.simpleHTML("alice/shadow", "demo-pkg").text)
        self.h.modifyIndex("alice", "shadow", ["mirror_whitelist=other"])
        self.assertIn(self.NOTICE, self.h.simpleHTML("alice/shadow", "demo-pkg").text)

    def test_noMirrorNoNotice(self) -> None:
        """An index without mirror bases has nothing to hide and says nothing."""
        self.h.mustUpload("alice/dev", buildWheel())
        self.assertNotIn(self.NOTICE, self.h.simpleHTML("alice/dev", "demo-pkg").text)


class YankTests(_Case):
    """PEP 592 yanking with PATCH."""

    def setUp(self) -> None:
        super().setUp()
        self.wheel = buildWheel()
        self.sdist = buildSdist()
        self.h.mustUpload("alice/dev", self.wheel)
        self.h.mustUpload("alice/dev", self.sdist)

    def yank(self, value: Any, path: str = "/alice/dev/demo-pkg/1.0", auth: Any = "alice") -> Answer:
        headers = self.h.alice if auth == "alice" else auth
        return self.h.request("PATCH", path, headers, json={"yanked": value})

    def states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        json = {f["filename"]: f["yanked"] for f in self.h.fileEntries("alice/dev", "demo-pkg")}
        page = self.page("alice/dev", "demo-pkg")
        html = {text: attrs.get("data-yanked", "<absent>") for attrs, text in page.links}
        return json, html

    def test_yankWithReason(self) -> None:
        """Yanking with a reason shows the reason in JSON and in data-yanked."""
        self.assertEqual(self.yank("broken build").code, 200)
        json, html = self.states()
        self.assertEqual(set(json.values()), {"broken build"})
        self.assertEqual(set(html.values()), {"broken build"})

    def test_yankWithoutReason(self) -> None:
        """Yanking with C{true} shows C{true} in JSON and an empty data-yanked."""
        self.assertEqual(self.yank(True).code, 200)
        json, html = self.states()
        self.assertEqual(set(json.values()), {True})
        self.assertEqual(set(html.values()), {""})
        self.assertIn('data-yanked=""', self.h.simpleHTML("alice/dev", "demo-pkg").text)

    def test_unyank(self) -> None:
        """Yanking with C{false} unyanks."""
        self.yank("oops")
        self.assertEqual(self.yank(False).code, 200)
        json, html = self.states()
        self.assertEqual(set(json.values()), {False})
        self.assertEqual(set(html.values()), {"<absent>"})

    def test_neverEmptyString(self) -> None:
        """An empty reason is not written as C{""} in JSON (uv would read it as yanked)."""
        self.yank(True)
        self.yank("")
        json, _ = self.states()
        self.assertNotIn("", json.values())

    def test_yankOneFile(self) -> None:
        """PATCH on a file URL yanks only that file."""
        url = self.h.fileURL("alice/dev", "demo-pkg", self.wheel.filename)
        self.assertEqual(self.yank("bad wheel", path=url).code, 200)
        json, html = self.states()
        self.assertEqual(json, {self.wheel.filename: "bad wheel", self.sdist.filename: False})
        self.assertEqual(html, {self.wheel.filename: "bad wheel", self.sdist.filename: "<absent>"})

    def test_yankedFileStillServed(self) -> None:
        """A yanked file can still be downloaded (for exact pins)."""
        self.yank(True)
        url = self.h.fileURL("alice/dev", "demo-pkg", self.wheel.filename)
        self.assertEqual(self.h.get(url).body, self.wheel.data)

    def test_anonymous(self) -> None:
        """Yanking without credentials is 401 and changes nothing."""
        before = self.snapshot()
        answer = self.yank(True, auth={})
        self.assertEqual(answer.code, 401)
        self.assertTrue(answer.header("WWW-Authenticate").startswith("Basic"))
        self.assertEqual(self.snapshot(), before)

    def test_noRights(self) -> None:
        """Yanking by a user without upload rights is 403 and changes nothing."""
        before = self.snapshot()
        self.assertEqual(self.yank(True, auth=self.h.bob).code, 403)
        url = self.h.fileURL("alice/dev", "demo-pkg", self.wheel.filename)
        self.assertEqual(self.yank(True, path=url, auth=self.h.bob).code, 403)
        self.assertEqual(self.snapshot(), before)

    def test_unknownVersion(self) -> None:
        """Yanking a version that has no files is 404."""
        self.assertEqual(self.yank(True, path="/alice/dev/demo-pkg/9.9").code, 404)

    def test_badValue(self) -> None:
        """A yanked value that is no bool or string is 400."""
        before = self.snapshot()
        self.assertEqual(self.yank(5).code, 400)
        self.assertEqual(self.h.request("PATCH", "/alice/dev/demo-pkg/1.0", self.h.alice,
                                        json={"other": 1}).code, 400)
        self.assertEqual(self.snapshot(), before)


class ProjectStatusTests(_Case):
    """PEP 792 project status markers with PATCH."""

    def setUp(self) -> None:
        super().setUp()
        self.wheel = buildWheel()
        self.h.mustUpload("alice/dev", self.wheel)

    def setStatus(self, status: Any, reason: str | None = None, auth: Any = None) -> Answer:
        body = {"status": status}
        if reason is not None:
            body["reason"] = reason
        return self.h.request("PATCH", "/alice/dev/demo-pkg", auth or self.h.alice, json=body)

    def test_archived(self) -> None:
        """An archived project shows its status, keeps its files and takes no uploads."""
        self.assertEqual(self.setStatus("archived", "moved to new-pkg").code, 200)
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertEqual(page["project-status"], {"status": "archived", "reason": "moved to new-pkg"})
        self.assertEqual(len(page["files"]), 1)
        html = self.page("alice/dev", "demo-pkg")
        self.assertEqual(html.meta["pypi:project-status"], "archived")
        self.assertEqual(html.meta["pypi:project-status-reason"], "moved to new-pkg")
        before = self.snapshot()
        self.assertRefused(self.h.upload("alice/dev", buildWheel(version="1.1")), 400, "archived", before)

    def test_quarantined(self) -> None:
        """A quarantined project lists no files and takes no uploads."""
        self.assertEqual(self.setStatus("quarantined").code, 200)
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertEqual(page["project-status"], {"status": "quarantined"})
        self.assertEqual(page["files"], [])
        html = self.page("alice/dev", "demo-pkg")
        self.assertEqual(html.links, [])
        self.assertEqual(html.meta["pypi:project-status"], "quarantined")
        before = self.snapshot()
        self.assertRefused(self.h.upload("alice/dev", buildWheel(version="1.1")), 400, "quarantined", before)

    def test_deprecated(self) -> None:
        """A deprecated project shows its status and still takes uploads."""
        self.assertEqual(self.setStatus("deprecated").code, 200)
        self.h.mustUpload("alice/dev", buildWheel(version="1.1"))
        page = self.h.simpleJSON("alice/dev", "demo-pkg")
        self.assertEqual(page["project-status"]["status"], "deprecated")
        self.assertEqual(len(page["files"]), 2)

    def test_backToActive(self) -> None:
        """Setting C{active} again clears the marker and allows uploads."""
        self.setStatus("archived")
        self.assertEqual(self.setStatus("active").code, 200)
        self.assertNotIn("project-status", self.h.simpleJSON("alice/dev", "demo-pkg"))
        self.h.mustUpload("alice/dev", buildWheel(version="1.1"))

    def test_statusChangesPage(self) -> None:
        """A status change gives the page a new ETag."""
        etag = self.h.get("/alice/dev/+simple/demo-pkg/").header("ETag")
        self.setStatus("archived")
        self.assertNotEqual(self.h.get("/alice/dev/+simple/demo-pkg/").header("ETag"), etag)

    def test_badStatus(self) -> None:
        """An unknown status is 400 and changes nothing."""
        before = self.snapshot()
        answer = self.setStatus("retired")
        self.assertEqual(answer.code, 400)
        self.assertIn("archived", answer.json["message"])
        self.assertEqual(self.snapshot(), before)

    def test_noRights(self) -> None:
        """Setting a status without upload rights is 403."""
        before = self.snapshot()
        self.assertEqual(self.setStatus("archived", auth=self.h.bob).code, 403)
        self.assertEqual(self.snapshot(), before)

    def test_unknownProject(self) -> None:
        """Setting the status of an unknown project is 404."""
        answer = self.h.request("PATCH", "/alice/dev/nope", self.h.alice, json={"status": "archived"})
        self.assertEqual(answer.code, 404)


class ProjectJSONTests(_Case):
    """devpi's C{projectconfig} and C{versiondata} views."""

    def setUp(self) -> None:
        super().setUp()
        self.h.createIndex("alice", "staging", bases=["alice/dev"])
        self.wheel = buildWheel(version="1.0")
        self.own = buildWheel(version="1.1")
        self.h.mustUpload("alice/dev", self.wheel)
        self.h.mustUpload("alice/staging", self.own)

    def test_projectconfig(self) -> None:
        """GET /user/index/project with JSON Accept lists versions with absolute +links."""
        answer = self.h.get("/alice/dev/demo-pkg", JSON_ACCEPT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "projectconfig")
        result = answer.json["result"]
        self.assertEqual(list(result), ["1.0"])
        (link,) = result["1.0"]["+links"]
        sha = self.wheel.sha256
        self.assertEqual(link["rel"], "releasefile")
        self.assertEqual(link["href"], f"{BASE}/alice/dev/+f/{sha[:3]}/{sha[3:16]}/{self.wheel.filename}")
        self.assertEqual(link["hash_spec"], f"sha256={sha}")
        self.assertEqual(link["log"][0]["what"], "upload")
        self.assertEqual(link["log"][0]["who"], "alice")
        self.assertEqual(link["log"][0]["dst"], "alice/dev")
        self.assertEqual(len(link["log"][0]["when"]), 6)
        self.assertEqual(self.h.get(link["href"]).body, self.wheel.data)

    def test_inherited(self) -> None:
        """The project config of an inheriting index includes its bases' versions."""
        result = self.h.get("/alice/staging/demo-pkg", JSON_ACCEPT).json["result"]
        self.assertEqual(sorted(result), ["1.0", "1.1"])
        self.assertTrue(result["1.0"]["+links"][0]["href"].startswith(f"{BASE}/alice/dev/+f/"))

    def test_ignoreBases(self) -> None:
        """C{?ignore_bases} restricts the project config to the index itself."""
        result = self.h.get("/alice/staging/demo-pkg?ignore_bases", JSON_ACCEPT).json["result"]
        self.assertEqual(sorted(result), ["1.1"])
        self.h.mustUpload("alice/dev", buildWheel(name="base-only"))
        self.assertEqual(self.h.get("/alice/staging/base-only?ignore_bases", JSON_ACCEPT).code, 404)
        self.assertEqual(self.h.get("/alice/staging/base-only", JSON_ACCEPT).code, 200)

    def test_versiondata(self) -> None:
        """GET /user/index/project/version answers versiondata, inherited."""
        answer = self.h.get("/alice/staging/demo-pkg/1.0", JSON_ACCEPT)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["type"], "versiondata")
        self.assertEqual(answer.json["result"]["version"], "1.0")
        self.assertEqual(answer.json["result"]["+links"][0]["hash_spec"], f"sha256={self.wheel.sha256}")

    def test_needsJSONAccept(self) -> None:
        """The project view without a JSON Accept is 415 (a browser gets a page: tests.test_webui)."""
        for headers in (None, {b"Accept": [b"*/*"]}, {b"Accept": [b"application/xml"]}):
            self.assertEqual(self.h.get("/alice/dev/demo-pkg", headers).code, 415)

    def test_unknown(self) -> None:
        """Unknown projects and versions are 404."""
        self.assertEqual(self.h.get("/alice/dev/nope", JSON_ACCEPT).code, 404)
        self.assertEqual(self.h.get("/alice/dev/demo-pkg/9.9", JSON_ACCEPT).code, 404)
        self.assertEqual(self.h.get("/alice/nope/demo-pkg", JSON_ACCEPT).code, 404)


class DeleteTests(_Case):
    """Deleting projects, versions and files."""

    def setUp(self) -> None:
        super().setUp()
        self.wheel = buildWheel(version="1.0")
        self.sdist = buildSdist(version="1.0")
        self.newer = buildWheel(version="1.1")
        for stage in ("alice/dev", "alice/prod"):
            for dist in (self.wheel, self.sdist, self.newer):
                self.h.mustUpload(stage, dist)

    def urls(self, stage: str) -> dict[str, str]:
        return {f["filename"]: self.h.fileURL(stage, "demo-pkg", f["filename"])
                for f in self.h.fileEntries(stage, "demo-pkg")}

    def delete(self, path: str, auth: Any = None) -> Answer:
        return self.h.request("DELETE", path, self.h.alice if auth is None else auth)

    def test_deleteFile(self) -> None:
        """Deleting a file on a volatile index answers 200; its URL is gone (410)."""
        urls = self.urls("alice/dev")
        answer = self.delete(urls[self.wheel.filename])
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.h.get(urls[self.wheel.filename]).code, 410)
        self.assertEqual(sorted(self.urls("alice/dev")), sorted([self.sdist.filename, self.newer.filename]))
        self.assertEqual(self.h.get(urls[self.sdist.filename]).body, self.sdist.data)

    def test_deleteLastFileOfVersion(self) -> None:
        """Deleting the last file of a version removes the version."""
        urls = self.urls("alice/dev")
        self.delete(urls[self.wheel.filename])
        self.assertEqual(self.h.simpleJSON("alice/dev", "demo-pkg")["versions"], ["1.0", "1.1"])
        self.assertEqual(self.delete(urls[self.sdist.filename]).code, 200)
        self.assertEqual(self.h.simpleJSON("alice/dev", "demo-pkg")["versions"], ["1.1"])
        self.assertEqual(self.h.get("/alice/dev/demo-pkg/1.0", JSON_ACCEPT).code, 404)
        self.assertEqual(self.delete(urls[self.newer.filename]).code, 200)
        self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/").code, 404)

    def test_deleteVersion(self) -> None:
        """Deleting a version removes its files, whose URLs answer 410."""
        urls = self.urls("alice/dev")
        self.assertEqual(self.delete("/alice/dev/demo-pkg/1.0").code, 200)
        self.assertEqual(sorted(self.urls("alice/dev")), [self.newer.filename])
        self.assertEqual(self.h.get(urls[self.wheel.filename]).code, 410)
        self.assertEqual(self.h.get(urls[self.sdist.filename]).code, 410)
        self.assertEqual(self.h.get("/alice/dev/demo-pkg/1.0", JSON_ACCEPT).code, 404)

    def test_deleteProject(self) -> None:
        """Deleting a project removes its page and files."""
        urls = self.urls("alice/dev")
        self.assertEqual(self.delete("/alice/dev/demo-pkg").code, 200)
        self.assertEqual(self.h.get("/alice/dev/+simple/demo-pkg/").code, 404)
        self.assertEqual(self.h.get("/alice/dev/+simple/", {b"Accept": [PIP_ACCEPT]}).json["projects"], [])
        for url in urls.values():
            self.assertEqual(self.h.get(url).code, 410)
        self.assertEqual(len(self.urls("alice/prod")), 3)

    def test_nonVolatileRefused(self) -> None:
        """A non-volatile index refuses deletes with 403 and keeps everything."""
        urls = self.urls("alice/prod")
        before = self.snapshot()
        for path in (urls[self.wheel.filename], "/alice/prod/demo-pkg/1.0", "/alice/prod/demo-pkg"):
            answer = self.delete(path)
            self.assertEqual(answer.code, 403, path)
            self.assertIn("non-volatile", answer.json["message"])
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.h.get(urls[self.wheel.filename]).body, self.wheel.data)

    def test_forceFile(self) -> None:
        """C{?force} deletes a file on a non-volatile index."""
        url = self.urls("alice/prod")[self.wheel.filename]
        self.assertEqual(self.delete(url + "?force").code, 200)
        self.assertEqual(self.h.get(url).code, 410)

    def test_forceVersion(self) -> None:
        """C{?force} deletes a version on a non-volatile index."""
        self.assertEqual(self.delete("/alice/prod/demo-pkg/1.0?force").code, 200)
        self.assertEqual(self.h.simpleJSON("alice/prod", "demo-pkg")["versions"], ["1.1"])

    def test_forceProject(self) -> None:
        """C{?force} (with or without a value) deletes a project on a non-volatile index."""
        self.assertEqual(self.delete("/alice/prod/demo-pkg?force=1").code, 200)
        self.assertEqual(self.h.get("/alice/prod/+simple/demo-pkg/").code, 404)
        self.h.mustUpload("alice/prod", buildWheel(version="2.0"))
        self.assertEqual(self.delete("/alice/prod/demo-pkg?force").code, 200)
        self.assertEqual(self.h.get("/alice/prod/+simple/demo-pkg/").code, 404)

    def test_rights(self) -> None:
        """Deleting without upload rights is 403, anonymously 401."""
        url = self.urls("alice/dev")[self.wheel.filename]
        before = self.snapshot()
        for path in (url, "/alice/dev/demo-pkg/1.0", "/alice/dev/demo-pkg"):
            self.assertEqual(self.delete(path, self.h.bob).code, 403, path)
            self.assertEqual(self.delete(path, {}).code, 401, path)
        self.assertEqual(self.snapshot(), before)

    def test_unknown(self) -> None:
        """Deleting what does not exist is 404; deleting a deleted file is 410."""
        self.assertEqual(self.delete("/alice/dev/nope").code, 404)
        self.assertEqual(self.delete("/alice/dev/demo-pkg/9.9").code, 404)
        self.assertEqual(self.delete("/alice/dev/+f/abc/0123456789abc/demo_pkg-9.9.tar.gz").code, 404)
        url = self.urls("alice/dev")[self.wheel.filename]
        self.delete(url)
        self.assertEqual(self.delete(url).code, 410)

    def test_reuploadAfterDelete(self) -> None:
        """After a file is deleted on a volatile index the same file can be uploaded again."""
        url = self.urls("alice/dev")[self.wheel.filename]
        self.delete(url)
        self.h.mustUpload("alice/dev", self.wheel)
        self.assertEqual(self.h.get(self.urls("alice/dev")[self.wheel.filename]).body, self.wheel.data)


class CachedAnswersFirstTests(SynchronousTestCase):
    """The shortcut that answers cached project pages before routing."""

    class Views:
        def __init__(self, answer: bytes | None) -> None:
            self.answer = answer
            self.asked: list[tuple[str, str, str]] = []

        def cachedProject(self, request: Any, user: str, index: str, project: str) -> bytes | None:
            self.asked.append((user, index, project))
            return self.answer

    class Routed(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.rendered: list[bytes] = []

        def render(self, request: Any) -> bytes:
            self.rendered.append(request.path)
            return b"routed"

    def render(self, answer: bytes | None, path: bytes, method: bytes = b"GET") -> tuple[bytes, Any, Any]:
        from twisted.web.test.requesthelper import DummyRequest

        from devpi_twisted.web.pages import CachedAnswersFirst

        views, routed = self.Views(answer), self.Routed()
        request = DummyRequest([])
        request.path, request.method = path, method
        return CachedAnswersFirst(routed, views).render(request), views, routed

    def test_cachedPageSkipsRouting(self) -> None:
        """A cached page of .../+simple/<project>/ is answered without touching the routes."""
        body, views, routed = self.render(b"page", b"/alice/dev/+simple/demo-pkg/")
        self.assertEqual((body, views.asked, routed.rendered), (b"page", [("alice", "dev", "demo-pkg")], []))

    def test_missGoesToRoutes(self) -> None:
        """Without a cached page the request is routed as usual."""
        body, _, routed = self.render(None, b"/alice/dev/+simple/demo-pkg/")
        self.assertEqual((body, routed.rendered), (b"routed", [b"/alice/dev/+simple/demo-pkg/"]))

    def test_otherRequestsGoToRoutes(self) -> None:
        """Other paths, escaped segments, no trailing slash and other methods never take the shortcut."""
        for path, method in [(b"/alice/dev/+simple/", b"GET"), (b"/alice/dev/+simple/Demo%5Fpkg/", b"GET"),
                             (b"/alice/dev/+simple/demo-pkg", b"GET"), (b"/alice/dev/+simple/demo-pkg/", b"POST"),
                             (b"/alice/+simple/+simple/x/", b"GET")]:
            body, views, routed = self.render(b"page", path, method)
            self.assertEqual((body, views.asked), (b"routed", []), path)
