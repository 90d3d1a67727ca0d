"""
Releases of private indexes: storing uploaded files, yanking, statuses and
deletions, each as one storage transaction.

The checks that depend on what is stored (the same file name with other
bytes, a volatile index, an archived project) run inside the transaction, so
concurrent uploads cannot both win.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from devpi_twisted.errors import BadRequest, Forbidden, Gone, NotFound
from devpi_twisted.interfaces import IReadView, IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.acl import mayUpload
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.model.names import checkProjectName, checkVersion
from devpi_twisted.services.fileentries import (
    existingFile, fileEntry, logEntry, lookupFile, newEntry, projectEntries, removeFileEntry, toxresultRelpath,
    writeFileEntry,
)
from devpi_twisted.model.inheritance import isPublicOrder
from devpi_twisted.services.simple import Restricted, orderOf, readerFor
from devpi_twisted.storage import BlobInfo

PROJECT_STATUSES = ("active", "archived", "quarantined", "deprecated")


@dataclass(frozen=True)
class UploadedFile:
    """A checked upload, its blob committed, ready to be recorded."""

    filename: str
    project: str  # normalised
    displayName: str
    version: str
    metadata: dict[str, Any]
    presentKeys: frozenset[str]
    blob: BlobInfo
    coreMetadata: bytes | None = None
    attestations: list[Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


def indexConfig(view: IReadView, user: str, index: str) -> dict[str, Any]:
    config = view.get(keys.indexKey(user, index))
    if config is None:
        raise NotFound(f"The stage {user}/{index} could not be found.")
    return config


def checkUploadRights(view: IReadView, requester: str | None, user: str, index: str) -> dict[str, Any]:
    """The index config, if C{requester} may change its releases."""
    from devpi_twisted.errors import Unauthorized

    config = indexConfig(view, user, index)
    if config.get("type") == MIRROR:
        raise NotFound(f"cannot submit to mirror index {user}/{index}")
    if not mayUpload(requester, user, config):
        if requester is None:
            error = Unauthorized("no valid credentials, log in to upload")
            error.challenge = True  # type: ignore[attr-defined]
            raise error
        raise Forbidden(f"user {requester!r} has no permission to upload to {user}/{index}")
    return config


class Releases:
    """Changes to the releases of private indexes."""

    def __init__(self, storage: IStorage, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._clock = clock

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    async def checkCanUpload(self, requester: str | None, user: str, index: str) -> dict[str, Any]:
        return await self._storage.read(lambda view: checkUploadRights(view, requester, user, index))

    async def storeFile(self, requester: str | None, user: str, index: str, upload: UploadedFile) -> bool:
        """
        Record an uploaded file.

        @return: C{True} if stored, C{False} when the identical file was
            there already (an idempotent re-upload).
        """
        checkRelease(upload.project, upload.version)
        now = self._clock()

        def _store(txn: IWriteTransaction) -> bool:
            config = checkUploadRights(txn, requester, user, index)
            project = upload.project
            projectKey = keys.projectKey(user, index, project)
            projectConfig = txn.get(projectKey) or {"name": upload.displayName}
            checkTakesUploads(projectConfig, project)
            existing = existingFile(txn, config, user, index, project, upload.filename, upload.blob.sha256)
            log = [logEntry("upload", requester, now, dst=f"{user}/{index}")] + list(upload.log)
            if existing is not None:
                if existing["sha256"] == upload.blob.sha256:
                    return False
                removeFileEntry(txn, user, index, existing)
                log.append(logEntry("overwrite", requester, now))
            txn.set(projectKey, projectConfig)
            versionKey = keys.versionKey(user, index, project, upload.version)
            metadata = txn.get(versionKey)
            if metadata is None:
                metadata = dict(upload.metadata)
            else:
                metadata.update({k: v for k, v in upload.metadata.items() if k in upload.presentKeys})
            metadata["name"] = metadata.get("name") or upload.displayName
            metadata["version"] = upload.version
            txn.set(versionKey, metadata)
            extra: dict[str, Any] = {"requires_python": upload.metadata.get("requires_python") or None}
            if upload.coreMetadata is not None:
                import hashlib

                extra["core_metadata_sha256"] = hashlib.sha256(upload.coreMetadata).hexdigest()
            if upload.attestations:
                extra["attestations"] = upload.attestations
            writeFileEntry(txn, user, index, newEntry(
                user, index, "releasefile", upload.filename, project, upload.version, upload.blob, now, log, **extra,
            ), upload.coreMetadata)
            return True

        _, stored = await self._storage.write(_store)
        return stored

    async def checkNoConflict(self, user: str, index: str, project: str, filename: str, sha256: str) -> None:
        """Refuse early, before the blob is committed, what L{storeFile} would refuse."""

        def _check(view: IReadView) -> None:
            config = indexConfig(view, user, index)
            checkTakesUploads(view.get(keys.projectKey(user, index, project)) or {}, project)
            existingFile(view, config, user, index, project, filename, sha256)

        await self._storage.read(_check)

    async def register(self, requester: str | None, user: str, index: str, project: str,
                       displayName: str, version: str, metadata: dict[str, Any]) -> None:
        """The legacy C{:action=submit}: set a release's metadata without a file."""
        checkRelease(project, version)

        def _register(txn: IWriteTransaction) -> None:
            checkUploadRights(txn, requester, user, index)
            projectKey = keys.projectKey(user, index, project)
            txn.set(projectKey, txn.get(projectKey) or {"name": displayName})
            txn.set(keys.versionKey(user, index, project, version), dict(metadata, version=version))

        await self._storage.write(_register)

    async def setYanked(self, requester: str | None, user: str, index: str, project: str,
                        version: str | None, filename: str | None, yanked: Any) -> int:
        """
        Yank (C{True} or a reason) or unyank (C{False}) a version's files or
        one file.  @return: how many files changed.
        """
        if yanked == "" or yanked is None:
            yanked = False
        if not isinstance(yanked, (bool, str)):
            raise BadRequest("'yanked' must be true, false or a reason")

        def _yank(txn: IWriteTransaction) -> int:
            checkUploadRights(txn, requester, user, index)
            entries = [
                (k, e) for k, e in txn.items(keys.filesPrefix(user, index, project))
                if e.get("rel", "releasefile") == "releasefile"
                and (version is None or e["version"] == version)
                and (filename is None or e["filename"] == filename)
            ]
            if not entries:
                raise NotFound(f"no files of {project} {version or filename} on {user}/{index}")
            changed = 0
            for key, entry in entries:
                if entry.get("yanked", False) != yanked:
                    entry["yanked"] = yanked
                    txn.set(key, entry)
                    changed += 1
            return changed

        _, changed = await self._storage.write(_yank)
        return changed

    async def setStatus(self, requester: str | None, user: str, index: str, project: str,
                        status: Any, reason: Any) -> None:
        """Set a project's PEP 792 status."""
        if status not in PROJECT_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(PROJECT_STATUSES)}")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("status reason must be a string")

        def _status(txn: IWriteTransaction) -> None:
            checkUploadRights(txn, requester, user, index)
            key = keys.projectKey(user, index, project)
            config = txn.get(key)
            if config is None:
                raise NotFound(f"no project {project!r}")
            if status == "active" and not reason:
                config.pop("status", None)
            else:
                config["status"] = {"status": status, **({"reason": reason} if reason else {})}
            txn.set(key, config)

        await self._storage.write(_status)

    async def deleteProject(self, requester: str | None, user: str, index: str, project: str, force: bool) -> None:
        def _delete(txn: IWriteTransaction) -> None:
            config = checkUploadRights(txn, requester, user, index)
            if txn.get(keys.projectKey(user, index, project)) is None:
                raise NotFound("project not found")
            if not config.get("volatile", True) and not force:
                raise Forbidden(f"project {project!r} is on non-volatile index {user}/{index}")
            for entry in projectEntries(txn, user, index, project):
                removeFileEntry(txn, user, index, entry)
            for key, _ in txn.items(keys.versionsPrefix(user, index, project)):
                txn.delete(key)
            txn.delete(keys.projectKey(user, index, project))

        await self._storage.write(_delete)

    async def deleteVersion(self, requester: str | None, user: str, index: str, project: str,
                            version: str, force: bool) -> None:
        def _delete(txn: IWriteTransaction) -> None:
            config = checkUploadRights(txn, requester, user, index)
            if txn.get(keys.versionKey(user, index, project, version)) is None:
                raise NotFound(f"The version {version} of project {project} does not exist.")
            if not config.get("volatile", True) and not force:
                raise Forbidden("cannot delete version on non-volatile index")
            removeVersion(txn, user, index, project, version)

        await self._storage.write(_delete)

    async def deleteFile(self, requester: str | None, user: str, index: str, relpath: str, force: bool) -> str:
        def _delete(txn: IWriteTransaction) -> str:
            config = checkUploadRights(txn, requester, user, index)
            entry = lookupFile(txn, user, index, relpath)
            if not config.get("volatile", True) and not force:
                raise Forbidden("cannot delete version on non-volatile index")
            removeFileEntry(txn, user, index, entry)
            project, version = entry["project"], entry["version"]
            remaining = [e for e in projectEntries(txn, user, index, project) if e["version"] == version]
            if not remaining:
                txn.delete(keys.versionKey(user, index, project, version))
                _dropEmptyProject(txn, user, index, project)
            return entry["relpath"]

        _, relpath = await self._storage.write(_delete)
        return relpath


def checkRelease(project: str, version: str) -> None:
    """
    @raise BadRequest: a new release would be stored under a project name or
        version the one rule of L{devpi_twisted.model.names} refuses (both
        become storage keys and export paths).
    """
    checkProjectName(project)
    checkVersion(version)


def checkTakesUploads(projectConfig: dict[str, Any], project: str) -> None:
    """@raise BadRequest: the project's PEP 792 status refuses uploads."""
    status = (projectConfig.get("status") or {}).get("status", "active")
    if status in ("archived", "quarantined"):
        raise BadRequest(f"project {project!r} is {status} and takes no uploads")


def removeVersion(txn: IWriteTransaction, user: str, index: str, project: str, version: str,
                  reason: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """
    Remove a version with all its files (tombstones with C{reason}), and the
    project when it was its last, in the caller's transaction.
    @return: the removed file entries.
    """
    removed = [entry for entry in projectEntries(txn, user, index, project) if entry["version"] == version]
    for entry in removed:
        removeFileEntry(txn, user, index, entry, reason)
    txn.delete(keys.versionKey(user, index, project, version))
    _dropEmptyProject(txn, user, index, project)
    return removed


def _dropEmptyProject(txn: IWriteTransaction, user: str, index: str, project: str) -> None:
    if not txn.items(keys.versionsPrefix(user, index, project)):
        txn.delete(keys.projectKey(user, index, project))


def latestVersion(view: IReadView, user: str, index: str, project: str) -> str | None:
    """The highest version registered for C{project} on this index itself."""
    from packaging.version import InvalidVersion, Version

    versions = [m["version"] for _, m in view.items(keys.versionsPrefix(user, index, project))]
    if not versions:
        return None

    def order(v: str) -> tuple[int, Any]:
        try:
            return (1, Version(v))
        except InvalidVersion:
            return (0, v)

    return max(versions, key=order)


def docFilename(project: str, version: str) -> str:
    return f"{project}-{version}.doc.zip"


class Documentation:
    """Documentation zips and tox results, stored as file entries of a release."""

    def __init__(self, storage: IStorage, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._clock = clock

    async def docVersion(self, user: str, index: str, project: str, version: str | None) -> str:
        if version:
            return version

        def _latest(view: IReadView) -> str | None:
            return latestVersion(view, user, index, project)

        latest = await self._storage.read(_latest)
        if latest is None:
            raise BadRequest(f"doczip has no version and {project!r} has no releases to derive one from")
        return latest

    async def checkNoConflict(self, user: str, index: str, project: str, version: str, sha256: str) -> None:
        def _check(view: IReadView) -> None:
            existingFile(view, indexConfig(view, user, index), user, index, project,
                         docFilename(project, version), sha256)

        await self._storage.read(_check)

    async def storeDoc(self, requester: str | None, user: str, index: str, project: str, displayName: str,
                       version: str, blob: BlobInfo, log: list[dict[str, Any]] | None = None) -> bool:
        """Record a documentation zip for a release (registering the release if needed)."""
        now = self._clock()
        filename = docFilename(project, version)

        def _store(txn: IWriteTransaction) -> bool:
            config = checkUploadRights(txn, requester, user, index)
            existing = existingFile(txn, config, user, index, project, filename, blob.sha256)
            if existing is not None:
                if existing["sha256"] == blob.sha256:
                    return False
                removeFileEntry(txn, user, index, existing)
            projectKey = keys.projectKey(user, index, project)
            txn.set(projectKey, txn.get(projectKey) or {"name": displayName})
            versionKey = keys.versionKey(user, index, project, version)
            if txn.get(versionKey) is None:
                txn.set(versionKey, {"name": displayName, "version": version})
            writeFileEntry(txn, user, index, newEntry(
                user, index, "doczip", filename, project, version, blob, now,
                [logEntry("upload", requester, now, dst=f"{user}/{index}")] + list(log or []),
            ))
            return True

        _, stored = await self._storage.write(_store)
        return stored

    async def findDoc(self, user: str, index: str, project: str, version: str,
                      identify: Any = None) -> dict[str, Any] | None:
        """
        The doczip entry of a release (C{version} may be C{latest} or
        C{stable}), looking through the index's private stages in order:
        those the requester may read (C{identify} finds who asks, called
        only when a stage is restricted; without it, anonymous).
        """

        def _find(view: IReadView, readable: Any = None) -> Any:
            order = orderOf(view, user, index)
            if readable is None and not isPublicOrder(order):
                return Restricted(order)
            if readable is not None:
                order = orderOf(view, user, index, readable)
            for stage in order:
                if stage.isMirror:
                    continue
                wanted = version
                if version in ("latest", "stable"):
                    wanted = latestVersion(view, stage.user, stage.index, project)
                    if wanted is None:
                        continue
                entry = fileEntry(view, stage.user, stage.index, project, docFilename(project, wanted))
                if entry is not None:
                    return entry
            return None

        found = await self._storage.read(_find)
        if isinstance(found, Restricted):
            readable = await readerFor(identify)
            found = await self._storage.read(lambda view: _find(view, readable))
        return found

    async def checkToxresultRights(self, requester: str | None, user: str, index: str, relpath: str) -> dict[str, Any]:
        from devpi_twisted.model.acl import matchesPrincipals

        def _check(view: IReadView) -> dict[str, Any]:
            config = indexConfig(view, user, index)
            if not (requester in (user, "root") or matchesPrincipals(requester, config.get("acl_toxresult_upload", ()))):
                raise Forbidden(
                    "No permission to upload tox results. You can use the devpi test --no-upload option to skip the upload."
                )
            try:
                release = lookupFile(view, user, index, relpath)
            except (NotFound, Gone):
                release = None
            if release is None or release.get("rel", "releasefile") != "releasefile":
                raise NotFound(f"no release file found at {relpath}")
            return release

        return await self._storage.read(_check)

    async def storeToxresult(self, requester: str | None, user: str, index: str, release: dict[str, Any],
                             blob: BlobInfo, log: list[dict[str, Any]] | None = None,
                             filename: str | None = None) -> str:
        """Attach a tox result to a release file.  @return: its relpath."""
        now = self._clock()

        def _store(txn: IWriteTransaction) -> str:
            existing = {e["filename"] for e in projectEntries(txn, user, index, release["project"])}
            name = filename
            if name is None or name in existing:
                stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
                n = 0
                while f"{release['filename']}.toxresult-{stamp}-{n}" in existing:
                    n += 1
                name = f"{release['filename']}.toxresult-{stamp}-{n}"
            entry = newEntry(
                user, index, "toxresult", name, release["project"], release["version"], blob, now,
                [logEntry("upload", requester, now, dst=f"{user}/{index}")] + list(log or []),
                for_relpath=release["relpath"],
            )
            entry["relpath"] = toxresultRelpath(release["relpath"], name)
            writeFileEntry(txn, user, index, entry)
            return entry["relpath"]

        _, relpath = await self._storage.write(_store)
        return relpath
