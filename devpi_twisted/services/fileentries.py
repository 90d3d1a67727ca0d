"""
File entries: the stored record of a release file, documentation zip or tox
result, and the keys that go with it.

An entry lives under its project (C{file/...}); its stable URL
(C{+f/<h3>/<h13>/<filename>}) is found through a path pointer
(C{path/...}); a wheel's METADATA may sit beside it (C{coremeta/...}); a
deleted file leaves a tombstone (C{deleted/...}) so its URL answers 410.
Upload, push, documentation, tox results, the mirror and import all write
entries here, inside the caller's transaction, so each change stays one
serial.
"""

import base64
import time
from collections.abc import Iterable
from typing import Any

from devpi_twisted.errors import Conflict, Gone, NotFound
from devpi_twisted.interfaces import IReadView, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.storage import BLOB_REF, BlobInfo

#: Kinds of keys whose change can alter what a stored file's URL answers.
_FILE_PATH_KINDS = frozenset({"file", "path", "deleted", "index", "user"})


def uploadTime(seconds: float) -> str:
    """RFC 3339 UTC with microseconds, as PEP 700 wants C{upload-time}."""
    micros = int(round((seconds % 1) * 1_000_000)) % 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def httpDate(seconds: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def logEntry(what: str, who: str | None, seconds: float, **extra: Any) -> dict[str, Any]:
    """A devpi-style log record of what happened to a file."""
    entry = {"what": what, "who": who, "when": list(time.gmtime(seconds)[:6])}
    entry.update(extra)
    return entry


def newEntry(user: str, index: str, rel: str, filename: str, project: str, version: str,
             blob: BlobInfo, now: float, log: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A new entry for a committed blob, at its content-addressed path in C{user/index}."""
    entry: dict[str, Any] = {
        "rel": rel,
        "filename": filename,
        "project": project,
        "version": version,
        "sha256": blob.sha256,
        "hashes": dict(blob.hashes) or {"sha256": blob.sha256},
        "size": blob.size,
        BLOB_REF: blob.sha256,
        "relpath": keys.fileRelpath(user, index, blob.sha256, filename),
        "upload_time": uploadTime(now),
        "last_modified": httpDate(now),
        "yanked": False,
        "log": log,
    }
    entry.update(extra)
    return entry


def toxresultRelpath(releaseRelpath: str, filename: str) -> str:
    """Where a tox result lives: in its release file's directory, as with devpi."""
    return releaseRelpath.rsplit("/", 1)[0] + "/" + filename


def _pathParts(relpath: str) -> list[str]:
    """C{[h3, h13, filename]} of a stable path (unhashed mirror links: C{nohash/<url hash>})."""
    return relpath.split("/+f/", 1)[1].split("/", 2)


def writeFileEntry(txn: IWriteTransaction, user: str, index: str, entry: dict[str, Any],
                   coreMetadata: bytes | None = None) -> None:
    """
    Write a file entry and the pointer its stable path is found by (and a
    wheel's METADATA when given), in the caller's transaction.
    """
    project, filename = entry["project"], entry["filename"]
    fileKey = keys.fileKey(user, index, project, filename)
    txn.set(fileKey, entry)
    txn.set(keys.pathKey(user, index, *_pathParts(entry["relpath"])), {"file": fileKey})
    if coreMetadata is not None:
        txn.set(keys.coreMetadataKey(user, index, project, filename),
                {"data": base64.b64encode(coreMetadata).decode("ascii")})


def removeFileEntry(txn: IWriteTransaction, user: str, index: str, entry: dict[str, Any],
                    reason: dict[str, Any] | None = None) -> None:
    """
    Delete a file entry with its pointer and METADATA, leaving a tombstone at
    its path; C{reason} (L{removalReason}) goes into the tombstone, so the
    410 can say why.
    """
    filename, project = entry["filename"], entry["project"]
    # The stable path names the directory (a tox result sits in its release's).
    h3, h13, name = _pathParts(entry["relpath"])
    txn.delete(keys.fileKey(user, index, project, filename))
    txn.delete(keys.coreMetadataKey(user, index, project, filename))
    txn.delete(keys.pathKey(user, index, h3, h13, name))
    txn.set(keys.tombstoneKey(user, index, h3, h13, name), {"project": project, **(reason or {})})


def removalReason(by: str, policy: str, when: float) -> dict[str, Any]:
    """What a tombstone records of a removal that was not a plain deletion (by a retention policy)."""
    return {"removed_by": by, "policy": policy, "when": when}


def goneMessage(tombstone: dict[str, Any]) -> str:
    """The message of a deleted file's 410."""
    if tombstone.get("removed_by") == "retention" and isinstance(tombstone.get("when"), (int, float)):
        day = time.strftime("%Y-%m-%d", time.gmtime(tombstone["when"]))
        return f"removed by retention policy of {tombstone.get('policy')} on {day}"
    return "file existed, deleted in later serial"


def forgetFileEntry(txn: IWriteTransaction, user: str, index: str, entry: dict[str, Any]) -> None:
    """
    Delete a file entry and its pointer, leaving no tombstone: a mirror file
    evicted from its cache is "not fetched yet" again, not gone (its
    METADATA stays, it is small and the same next time).
    """
    txn.delete(keys.fileKey(user, index, entry["project"], entry["filename"]))
    txn.delete(keys.pathKey(user, index, *_pathParts(entry["relpath"])))


def fileEntry(view: IReadView, user: str, index: str, project: str, filename: str) -> dict[str, Any] | None:
    """The entry stored under this project and file name, if any."""
    return view.get(keys.fileKey(user, index, project, filename))


def projectEntries(view: IReadView, user: str, index: str, project: str) -> list[dict[str, Any]]:
    """Every file entry of a project on this index itself."""
    return [entry for _, entry in view.items(keys.filesPrefix(user, index, project))]


def coreMetadata(view: IReadView, user: str, index: str, project: str, filename: str) -> bytes | None:
    """A wheel's stored METADATA, if any."""
    stored = view.get(keys.coreMetadataKey(user, index, project, filename))
    return None if stored is None else base64.b64decode(stored["data"])


def existingFile(view: IReadView, config: dict[str, Any], user: str, index: str, project: str,
                 filename: str, sha256: str) -> dict[str, Any] | None:
    """
    The stored entry under this file name, if any.

    @raise Conflict: other bytes are stored under the name and the index is
        not volatile.
    """
    existing = fileEntry(view, user, index, project, filename)
    if existing is not None and existing["sha256"] != sha256 and not config.get("volatile", True):
        raise Conflict(
            f"File already exists: {filename!r} is in the non-volatile index "
            f"{user}/{index} with other content (sha256 {existing['sha256']})"
        )
    return existing


def lookupFile(view: IReadView, user: str, index: str, relpath: str) -> dict[str, Any]:
    """
    The file entry a C{+f/<h3>/<h13>/<filename>} path names.

    @raise Gone: it was deleted.  @raise NotFound: it never existed here.
    """
    parts = relpath.split("/")
    if len(parts) == 3:
        pointer = view.get(keys.pathKey(user, index, *parts))
        if pointer is not None:
            entry = view.get(pointer["file"])
            if entry is not None:
                return entry
        tombstone = view.get(keys.tombstoneKey(user, index, *parts))
        if tombstone is not None:
            raise Gone(goneMessage(tombstone))
    raise NotFound("no such file")


def altersFilePaths(changedKeys: Iterable[str]) -> bool:
    """Whether a change (its keys) may alter what some stored file's URL answers."""
    return any(keys.parseKey(key)[0] in _FILE_PATH_KINDS for key in changedKeys)
