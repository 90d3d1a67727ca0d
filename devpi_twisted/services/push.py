"""
Pushing a release from one index to another (devpi-client's C{push}).

An internal push copies the release's metadata, files, tox results and
documentation into the target index in one transaction: the blobs are
content-addressed, so nothing is copied on disk.  A push from a mirror
fetches the files that are not cached yet first.  The target's rules hold:
upload rights, 409 for other bytes under a name on a non-volatile index (the
same bytes are fine, unlike devpi), and volatile replacement.

An external push uploads the files to another index's legacy upload URL
(e.g. PyPI) with the credentials given, streaming each file from disk.  A
client aims that request, so only an authenticated user may cause it, and it
goes through L{PushClient}: bounded in time and reply size, no redirects, and
errors that tell the client nothing about the network behind this server.
"""

import base64
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from treq.multipart import MultiPartProducer

from devpi_twisted.errors import BadRequest, NotFound, Unauthorized
from devpi_twisted.interfaces import IBlobStore, IReadView, IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.acl import mayUpload
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.model.inheritance import Stage
from devpi_twisted.model.names import isValidProjectName, normalizeProject, splitIndexName
from devpi_twisted.services.fileentries import (
    coreMetadata, existingFile, logEntry, projectEntries, removeFileEntry, toxresultRelpath, writeFileEntry,
)
from devpi_twisted.services.releases import indexConfig
from devpi_twisted.storage.readers import ReaderBodyProducer

log = Logger()

_KEYS = {"name", "version", "targetindex", "no_docs", "only_docs", "posturl", "username", "password",
         "register_project"}
_RELS = ("releasefile", "doczip", "toxresult")

CONNECT_TIMEOUT = 10.0
TOTAL_TIMEOUT = 300.0  # one request, its file upload included
MAX_REPLY = 64 * 1024
PIECE_SIZE = 64 * 1024  # of a pushed file, read as the connection takes it
#: What the client is told when an external push got no usable answer: the
#: same words whatever went wrong (refused, timed out, unknown host, TLS), so
#: the answer cannot be used to probe the network behind this server.
PUSH_FAILED = "no answer from the upload URL (the details are in the server's log)"


def _selected(entry: dict[str, Any], noDocs: bool, onlyDocs: bool) -> bool:
    rel = entry.get("rel", "releasefile")
    if onlyDocs:
        return rel == "doczip"
    if noDocs:
        return rel != "doczip"
    return True


class _Capped(Protocol):
    """Collects at most C{limit} bytes of a reply body, then drops the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        # cancelled (the deadline passed): drop the connection
        self.done: Deferred[bytes] = Deferred(lambda _: self.transport.stopProducing())
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self._limit - self._size
        self._chunks.append(data[:room])
        self._size += min(len(data), room)
        if self._size >= self._limit:
            self.done.callback(b"".join(self._chunks))
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class PushClient:
    """
    The outbound requests of external pushes: the agent given follows no
    redirects and has a connect timeout; here each request gets a total
    deadline and at most C{maxReply} bytes of its reply are read.
    """

    def __init__(self, agent: IAgent, reactor: IReactorTime, timeout: float = TOTAL_TIMEOUT,
                 maxReply: int = MAX_REPLY) -> None:
        self._agent = agent
        self._reactor = reactor
        self._timeout = timeout
        self._maxReply = maxReply
        #: Drives the multipart encoder of request bodies on this client's reactor.
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def post(self, url: bytes, headers: Headers, body: IBodyProducer) -> "Deferred[tuple[IResponse, bytes]]":
        """@return: the response and the start of its body; fails on any error or after the deadline."""
        d = Deferred.fromCoroutine(self._post(url, headers, body))
        d.addTimeout(self._timeout, self._reactor)
        return d

    async def _post(self, url: bytes, headers: Headers, body: IBodyProducer) -> tuple[IResponse, bytes]:
        response = await self._agent.request(b"POST", url, headers, body)
        reader = _Capped(self._maxReply)
        response.deliverBody(reader)
        return response, await reader.done


def pushClient(reactor: Any, timeout: float = TOTAL_TIMEOUT, maxReply: int = MAX_REPLY) -> PushClient:
    """The client of external pushes: certificates checked, C{CONNECT_TIMEOUT}, and no redirect followed."""
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(), connectTimeout=CONNECT_TIMEOUT)
    return PushClient(agent, reactor, timeout, maxReply)


class Pusher:
    def __init__(self, storage: IStorage, blobs: IBlobStore, mirrors: Any, client: PushClient | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._blobs = blobs
        self._mirrors = mirrors
        self._client = client
        self._clock = clock

    async def push(self, requester: str | None, user: str, index: str, body: Any) -> tuple[int, list[Any]]:
        """@return: C{(http status, actionlog)}."""
        if not isinstance(body, dict):
            raise BadRequest("push needs a JSON object with 'name', 'version' and 'targetindex' or 'posturl'")
        unknown = sorted(set(body) - _KEYS)
        if unknown:
            raise BadRequest(f"unknown additional options: {', '.join(unknown)}")
        name, version = body.get("name"), body.get("version")
        if not isinstance(name, str) or not isValidProjectName(name) or not isinstance(version, str) or not version:
            raise BadRequest("push needs a valid 'name' and 'version'")
        noDocs, onlyDocs = bool(body.get("no_docs")), bool(body.get("only_docs"))
        if noDocs and onlyDocs:
            raise BadRequest("'no_docs' and 'only_docs' cannot both be set")
        if "targetindex" not in body and requester is None:
            # Every index here is readable by anyone; an outside request is
            # caused only by someone this server knows.
            raise Unauthorized("pushing to an external URL needs an authenticated user")
        project = normalizeProject(name)
        source = await self._storage.read(lambda view: Stage(user, index, indexConfig(view, user, index)))
        metadata, entries = await self._release(source, project, version)
        entries = [e for e in entries if _selected(e, noDocs, onlyDocs)]
        if not entries:
            raise NotFound(f"no release/files found for {name} {version}")
        if "targetindex" in body:
            return 200, await self._pushInternal(requester, source, body["targetindex"], project, version,
                                                 metadata, entries)
        return await self._pushExternal(body, metadata, entries)

    async def _release(self, source: Stage, project: str, version: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if source.isMirror:
            if self._mirrors is None:
                raise NotFound(f"there are no files for {project} {version} on stage {source.name}")
            entries = await self._mirrors.releaseEntries(source, project, version)
            if not entries:
                raise BadRequest(f"there are no files for {project} {version} on stage {source.name}")
            requires = next((e.get("requires_python") for e in entries if e.get("requires_python")), None)
            metadata = {"name": project, "version": version}
            if requires:
                metadata["requires_python"] = requires
            return metadata, entries

        def _read(view: IReadView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            metadata = view.get(keys.versionKey(source.user, source.index, project, version))
            if metadata is None:
                raise BadRequest(f"there are no files for {project} {version} on stage {source.name}")
            entries = [e for e in projectEntries(view, source.user, source.index, project)
                       if e["version"] == version and e.get("rel", "releasefile") in _RELS]
            return metadata, entries

        return await self._storage.read(_read)

    async def _pushInternal(self, requester: str | None, source: Stage, target: Any, project: str, version: str,
                            metadata: dict[str, Any], entries: list[dict[str, Any]]) -> list[Any]:
        if not isinstance(target, str):
            raise BadRequest("targetindex not in format user/index")
        try:
            tuser, tindex = splitIndexName(target)
        except BadRequest:
            raise BadRequest("targetindex not in format user/index")
        now = self._clock()

        def _copy(txn: IWriteTransaction) -> list[Any]:
            config = txn.get(keys.indexKey(tuser, tindex))
            if config is None:
                raise NotFound(f"target index {target} does not exist")
            if config.get("type") == MIRROR:
                raise BadRequest(f"cannot push to mirror index {target}")
            if not mayUpload(requester, tuser, config):
                raise Unauthorized(f"user {requester!r} cannot upload to {target!r}")
            actions: list[Any] = []
            projectKey = keys.projectKey(tuser, tindex, project)
            projectConfig = txn.get(projectKey) or {"name": metadata.get("name") or project}
            status = (projectConfig.get("status") or {}).get("status")
            if status in ("archived", "quarantined"):
                raise BadRequest(f"project {project!r} is {status} on {target} and takes no uploads")
            txn.set(projectKey, projectConfig)
            txn.set(keys.versionKey(tuser, tindex, project, version),
                    {k: v for k, v in metadata.items() if not k.startswith("+")})
            actions.append([200, "register", project, version, "->", target])
            renamed: dict[str, str] = {}
            pushLog = logEntry("push", requester, now, src=source.name, dst=target)
            ordered = sorted(entries, key=lambda e: e.get("rel") == "toxresult")
            for entry in ordered:
                rel = entry.get("rel", "releasefile")
                existing = existingFile(txn, config, tuser, tindex, project, entry["filename"], entry["sha256"])
                overwrite = []
                if existing is not None:
                    if existing["sha256"] == entry["sha256"]:
                        renamed[entry["relpath"]] = existing["relpath"]
                        actions.append([200, f"store_{rel}", f"{existing['relpath']} (already there)"])
                        continue
                    removeFileEntry(txn, tuser, tindex, existing)
                    overwrite = [_overwriteEntry(existing, now)]
                copy = dict(entry)
                copy.pop("url", None)
                copy["log"] = overwrite + [e for e in entry.get("log", []) if e.get("what") != "overwrite"] + [pushLog]
                wheelMetadata = None
                if rel == "toxresult":
                    release = renamed.get(entry.get("for_relpath", ""))
                    if release is None:
                        continue
                    copy["for_relpath"] = release
                    copy["relpath"] = toxresultRelpath(release, entry["filename"])
                else:
                    copy["relpath"] = keys.fileRelpath(tuser, tindex, entry["sha256"], entry["filename"])
                    wheelMetadata = coreMetadata(txn, source.user, source.index, project, entry["filename"])
                writeFileEntry(txn, tuser, tindex, copy, wheelMetadata)
                renamed[entry["relpath"]] = copy["relpath"]
                if rel == "doczip":
                    actions.append([200, "store_doczip", project, version, "->", target])
                else:
                    actions.append([200, f"store_{rel}", copy["relpath"]])
            return actions

        _, actions = await self._storage.write(_copy)
        log.info("pushed {project} {version} from {source} to {target} by {who}",
                 project=project, version=version, source=source.name, target=target, who=requester)
        return actions

    async def _pushExternal(self, body: dict[str, Any], metadata: dict[str, Any],
                            entries: list[dict[str, Any]]) -> tuple[int, list[Any]]:
        posturl, username, password = body.get("posturl"), body.get("username"), body.get("password")
        if not isinstance(posturl, str) or not posturl.startswith(("http://", "https://")):
            raise BadRequest("push needs 'targetindex' or an http(s) 'posturl'")
        if self._client is None:
            raise BadRequest("pushing to external indexes is not enabled")
        auth = b"Basic " + base64.b64encode(f"{username or ''}:{password or ''}".encode("utf-8"))
        actions: list[Any] = []
        fields = [(k, v) for k, v in metadata.items() if not k.startswith("+") and v not in ("", [], None)]
        if body.get("register_project"):
            status, _ = await self._post(posturl, auth, fields + [(":action", "submit")], None)
            actions.append([status, "register", metadata.get("name"), metadata.get("version")])
        for entry in entries:
            rel = entry.get("rel", "releasefile")
            if rel == "toxresult":
                continue
            extra = [(":action", "doc_upload")] if rel == "doczip" else [
                (":action", "file_upload"), ("protocol_version", "1"), ("sha256_digest", entry["sha256"]),
                ("filetype", "bdist_wheel" if entry["filename"].endswith(".whl") else "sdist"),
                ("pyversion", "source" if not entry["filename"].endswith(".whl") else entry["filename"].split("-")[-3]),
            ]
            filename = f"{metadata.get('name')}.zip" if rel == "doczip" else entry["filename"]
            status, text = await self._post(posturl, auth, fields + extra, (filename, entry))
            if rel == "doczip":
                actions.append([status, "docfile", metadata.get("name")])
            else:
                actions.append([status, "upload", entry["relpath"], "" if status in (200, 201) else text])
        ok = actions and actions[-1][0] in (200, 201)
        return (200 if ok else 502), actions

    async def _post(self, url: str, auth: bytes, fields: list[tuple[str, Any]],
                    file: tuple[str, dict[str, Any]] | None) -> tuple[int, str]:
        assert self._client is not None
        form: list[tuple[str, Any]] = [
            (key, str(item)) for key, value in fields for item in (value if isinstance(value, list) else [value])
        ]
        reader = None
        if file is not None:
            filename, entry = file
            reader = await self._blobs.open(entry["sha256"])
            if reader is None:
                raise NotFound(f"content of {entry['filename']} is missing on this server")
            form.append(("content", (filename, "application/octet-stream", ReaderBodyProducer(reader, PIECE_SIZE))))
        # treq's encoder streams the file part from the blob as the connection takes it.
        producer = MultiPartProducer(form, cooperator=self._client.cooperator)
        headers = Headers({
            b"Authorization": [auth],
            b"Content-Type": [b"multipart/form-data; boundary=" + producer.boundary],
            b"User-Agent": [b"devpi-twisted push"],
        })
        try:
            response, reply = await self._client.post(url.encode("utf-8"), headers, producer)
        except Exception as e:
            log.warn("external push to {url} failed: {error}", url=url, error=repr(e))
            return -1, PUSH_FAILED
        finally:
            if reader is not None:
                await reader.close()
        if response.code in (200, 201):
            return response.code, ""
        log.warn("external push to {url} answered {code}: {reply!r}", url=url, code=response.code,
                 reply=reply[:2000].decode("utf-8", "replace"))
        return response.code, _statusLine(response)


def _overwriteEntry(replaced: dict[str, Any], now: float) -> dict[str, Any]:
    """devpi's record of a replaced file: the how-many-th replacement under this name it is (an
    upload's record without a count is one)."""
    count = sum(e.get("count", 1) for e in replaced.get("log", []) if e.get("what") == "overwrite")
    return logEntry("overwrite", None, now, count=count + 1)


def _statusLine(response: IResponse) -> str:
    """What the client learns of a refusal: its status line, in printable ASCII (PyPI puts its reason there)."""
    phrase = response.phrase.decode("ascii", "replace") if isinstance(response.phrase, bytes) else ""
    phrase = "".join(c if c.isprintable() else "?" for c in phrase)[:200]
    return f"HTTP {response.code} {phrase}".rstrip()
