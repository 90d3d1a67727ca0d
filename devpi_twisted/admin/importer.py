"""
C{devpi-twisted import DIR}: build a new server directory from an export,
ours (L{devpi_twisted.admin.exporter}) or devpi-server's (dumpversion 1 or 2).

The import works like C{devpi-import}:
  - the export is read, migrated (C{md5} and C{hash_spec} folded into
    C{hashes}, C{pypi_whitelist} renamed to C{mirror_whitelist}, an empty
    C{uploadtrigger_jenkins} dropped, tox result hashes of devpi 6.5 to 6.9
    that are really their release file's dropped, versions derived from the
    file names of dumpversion 1) and checked (names, index types) before
    anything is written;
  - users keep their password hashes (devpi's argon2id hashes work as they
    are); C{root} comes from the export when it has one;
  - every file is copied into the blob store and checked against every hash
    the export gives for it: one mismatch fails the whole import; file URLs
    are recomputed from the content's sha256; wheels' METADATA is extracted
    for PEP 658;
  - configuration keys devpi plugins added, which devpi-twisted does not
    know, are dropped with a warning;
  - records that cannot be stored safely (a project name that is not ASCII
    PEP 508, a version or file name that is not one plain path segment, see
    L{devpi_twisted.admin.exporter.recordProblem}) are skipped and listed in the
    summary; they do not stop the import.

Everything is built in a temporary directory that is renamed into place at
the end (as C{init} does), so a failed import leaves no server directory.
"""

import calendar
import copy
import email.utils
import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from twisted.python.filepath import FilePath

from devpi_twisted.services.auth import PasswordHashing
from devpi_twisted.errors import BadRequest, DevpiError, ServerDirError
from devpi_twisted.admin.exporter import EXTRA, recordProblem, safeSegment, versionFromFilename
from devpi_twisted.admin.initstate import PYPI_URL, rootPypiConfig
from devpi_twisted.interfaces import IWriteTransaction
from devpi_twisted.model import indexconfig, keys
from devpi_twisted.model.archive import inspectArchive
from devpi_twisted.model.doczip import DocLimits, checkDocZip
from devpi_twisted.model.names import checkName, normalizeProject
from devpi_twisted.services.fileentries import httpDate, logEntry, newEntry, toxresultRelpath, uploadTime, writeFileEntry
from devpi_twisted.services.releases import docFilename
from devpi_twisted.app.serverdir import checkCanInitialise, initialising
from devpi_twisted.storage import BlobInfo
from devpi_twisted.config import BackendSettings
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.threads import Runner, SynchronousRunner
from devpi_twisted.model.timeutil import isoNow

USER_KEYS = ("pwhash", "created", "modified", "email", "title", "description", "custom_data")
FILE_TYPES = ("releasefile", "doczip", "toxresult")
CHUNK = 1024 * 1024


class ImportFailed(ServerDirError):
    """The export cannot be imported; nothing was created."""


@dataclass
class ImportSummary:
    """What an import did."""

    source: str = ""
    users: list[str] = field(default_factory=list)
    indexes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (projects, files)
    configOnly: list[str] = field(default_factory=list)  # mirrors without files
    files: dict[str, int] = field(default_factory=dict)
    size: int = 0
    unverified: int = 0
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # bad records left out

    def describe(self) -> str:
        lines = [f"  from: {self.source}",
                 f"  users: {len(self.users)} ({', '.join(self.users)})",
                 f"  indexes: {len(self.indexes) + len(self.configOnly)}"]
        for name, (projects, files) in self.indexes.items():
            lines.append(f"    {name}: {projects} projects, {files} files")
        for name in self.configOnly:
            lines.append(f"    {name}: mirror, no cached files")
        total = sum(self.files.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.files.items()))
        lines.append(f"  projects: {sum(p for p, _ in self.indexes.values())}")
        checked = total - self.unverified
        lines.append(f"  files: {total}{f' ({kinds})' if kinds else ''}, {self.size} bytes; "
                     f"{checked} verified against the export's hashes"
                     + (f", {self.unverified} had none to check" if self.unverified else ""))
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  SKIPPED: {s}" for s in self.skipped]
        return "\n".join(lines) + "\n"


# reading and migrating


def _foldHashes(desc: dict[str, Any], where: str) -> None:
    mapping = desc.get("entrymapping")
    if not isinstance(mapping, dict):
        desc["entrymapping"] = mapping = {}
    hashes = dict(mapping.get("hashes") or {})
    if "md5" in mapping:
        hashes.setdefault("md5", mapping.pop("md5"))
    spec = mapping.pop("hash_spec", None)
    if spec:
        name, _, value = str(spec).partition("=")
        if hashes.get(name, value) != value:
            raise ImportFailed(f"{where}: hash_spec {spec} disagrees with hashes {hashes}")
        hashes[name] = value
    extras = desc.get(EXTRA) or {}
    for name, value in (extras.get("hashes") or {}).items():
        if hashes.get(name, value) != value:
            raise ImportFailed(f"{where}: {name} {value} disagrees with {hashes[name]}")
        hashes[name] = value
    mapping["hashes"] = {k: str(v).lower() for k, v in hashes.items()}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """devpi's migrations of an export, in place; returns C{data}."""
    try:
        dumpversion = int(data.get("dumpversion"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        dumpversion = 0
    if dumpversion not in (1, 2):
        raise ImportFailed(f"incompatible dumpversion {data.get('dumpversion')!r}: 1 and 2 are supported")
    if not isinstance(data.get("users"), dict) or not isinstance(data.get("indexes"), dict):
        raise ImportFailed("dataindex.json has no 'users' and 'indexes'")
    for name, index in data["indexes"].items():
        if not isinstance(index, dict) or not isinstance(index.get("indexconfig"), dict):
            raise ImportFailed(f"index {name!r} has no indexconfig")
        config = index["indexconfig"]
        if "uploadtrigger_jenkins" in config and not config["uploadtrigger_jenkins"]:
            del config["uploadtrigger_jenkins"]
        if "pypi_whitelist" in config:
            whitelist = config.pop("pypi_whitelist")
            config.setdefault("mirror_whitelist", whitelist)
        for desc in index.get("files") or []:
            where = f"{name}: {desc.get('relpath')}"
            if not isinstance(desc, dict) or not isinstance(desc.get("relpath"), str):
                raise ImportFailed(f"{name}: a file description without a relpath")
            if dumpversion < 2 or not desc.get("version"):
                desc["version"] = versionFromFilename(desc["relpath"].rsplit("/", 1)[-1])
                if not desc["version"]:
                    raise ImportFailed(f"{where}: no version, and none can be derived from the file name")
            _foldHashes(desc, where)
            if desc.get("for_entrypath"):
                parts = desc["relpath"].split("/")
                if len(parts) == 5 and parts[3].startswith("sha256="):
                    hashes = desc["entrymapping"]["hashes"]
                    if hashes.get("sha256") == parts[3][len("sha256="):]:
                        # devpi 6.5 to 6.9 recorded the release file's hash
                        hashes.clear()
    return data


def readExport(source: FilePath) -> dict[str, Any]:
    """The migrated content of C{source/dataindex.json}."""
    index = source.child("dataindex.json")
    if not source.isdir() or not index.isfile():
        raise ImportFailed(f"{source.path} is not an export: it has no dataindex.json")
    try:
        data = json.loads(index.getContent())
    except ValueError as e:
        raise ImportFailed(f"{index.path} is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ImportFailed(f"{index.path} does not hold a JSON object")
    return migrate(data)


def _parseWhen(when: Any) -> float | None:
    try:
        return float(calendar.timegm(tuple(int(x) for x in when[:6]) + (0, 0, 0)))  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def _uploadSeconds(desc: dict[str, Any], fallback: float) -> float:
    """When the file was uploaded: its first log record, else its Last-Modified."""
    for record in desc.get("log") or []:
        if isinstance(record, dict):
            seconds = _parseWhen(record.get("when"))
            if seconds is not None:
                return seconds
    lastModified = (desc.get("entrymapping") or {}).get("last_modified")
    if lastModified:
        try:
            return email.utils.parsedate_to_datetime(lastModified).timestamp()
        except (TypeError, ValueError):
            pass
    return fallback


def _hasher(name: str) -> Any:
    if name == "blake2b_256":
        return hashlib.blake2b(digest_size=32)
    if name == "md5":
        return hashlib.md5(usedforsecurity=False)
    try:
        return hashlib.new(name)
    except (ValueError, TypeError):
        return None


# the import


class Importer:
    """
    Writes a migrated export into freshly opened storage.

    @param now: the time recorded where the export has none.
    """

    def __init__(self, storage: Any, blobs: Any, source: FilePath, data: dict[str, Any], *,
                 rootPasswordHash: str | None, rootPypi: bool = True, mirrorURL: str = PYPI_URL,
                 cacheExpiry: int = 1800, skipTypes: tuple[str, ...] = (), now: float | None = None) -> None:
        self._storage = storage
        self._blobs = blobs
        self._source = source
        self._data = data
        self._rootPasswordHash = rootPasswordHash
        self._rootPypi = rootPypi
        self._mirrorURL = mirrorURL
        self._cacheExpiry = cacheExpiry
        self._skipTypes = set(skipTypes)
        self._now = time.time() if now is None else now
        self.summary = ImportSummary(source=source.path)
        self._sourceRoot = os.path.realpath(source.path)

    def warn(self, message: str) -> None:
        self.summary.warnings.append(message)

    def _skipped(self, what: str, problem: str | None) -> bool:
        """Whether to skip the record C{what} for C{problem}; report it if so."""
        if problem is not None:
            self.summary.skipped.append(f"{what} not imported: {problem}")
        return problem is not None

    async def _write(self, function: Any) -> Any:
        return await self._storage.write(function)

    # users and indexes

    def _userConfigs(self) -> dict[str, dict[str, Any]]:
        result = {}
        for name, exported in self._data["users"].items():
            try:
                checkName("username", name)
            except BadRequest as e:
                raise ImportFailed(f"user {name!r}: {e.message}")
            if not isinstance(exported, dict):
                raise ImportFailed(f"user {name!r}: the config is not an object")
            unknown = sorted(k for k in exported if k not in USER_KEYS and k not in ("username", "indexes"))
            if unknown:
                self.warn(f"user {name}: dropped keys devpi-twisted does not know: {', '.join(unknown)}")
            config = {k: exported[k] for k in USER_KEYS if exported.get(k) not in (None, "")}
            config.setdefault("created", "1970-01-01T00:00:00Z")
            if "pwhash" in config and not PasswordHashing.isHash(config["pwhash"]):
                self.warn(f"user {name}: the password hash is not argon2 (an old devpi); "
                          f"set a new one with 'devpi-twisted passwd {name}'")
            result[name] = config
        root = result.get("root")
        if root is None:
            root = result["root"] = {"created": isoNow(self._now)}
            if self._rootPasswordHash is None:
                raise ImportFailed("the export has no root user: a password for root is needed")
        if self._rootPasswordHash is not None:
            root["pwhash"] = self._rootPasswordHash
        return result

    def _indexConfigs(self, users: dict[str, Any]) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for name, exported in self._data["indexes"].items():
            user, _, index = name.partition("/")
            config = dict(exported["indexconfig"])
            indexType = config.get("type", indexconfig.STAGE)
            if indexType in self._skipTypes:
                self.warn(f"index {name}: skipped (type {indexType!r})")
                continue
            if name == "root/pypi" and not self._rootPypi:
                continue
            try:
                checkName("indexname", index)
            except BadRequest as e:
                raise ImportFailed(f"index {name!r}: {e.message}")
            if user not in users:
                raise ImportFailed(f"index {name}: its user {user!r} is not in the export")
            if indexType not in indexconfig.INDEX_TYPES:
                raise ImportFailed(
                    f"index {name}: unknown index type {indexType!r} (made by a devpi plugin?); "
                    f"skip such indexes with --skip-import-type {indexType}")
            known = indexconfig.allowedKeys(indexType)
            unknown = sorted(k for k in config if k not in known)
            if unknown:
                self.warn(f"index {name}: dropped keys devpi-twisted does not know: {', '.join(unknown)}")
            merged = indexconfig.defaults(indexType, user, self._cacheExpiry)
            merged.update({k: v for k, v in config.items() if k in known})
            try:
                result[name] = indexconfig.coerce(merged, dropForeign=True)
            except DevpiError as e:
                raise ImportFailed(f"index {name}: {e.message}")
        if "root/pypi" not in result and self._rootPypi and "root/pypi" not in self._data["indexes"]:
            result["root/pypi"] = rootPypiConfig(self._mirrorURL, self._cacheExpiry)
        for name, config in result.items():
            missing = [b for b in config.get("bases", []) if b not in result]
            if missing:
                self.warn(f"index {name}: bases not in the import: {', '.join(missing)} (kept as they are)")
        return result

    # files

    def _sourcePath(self, relpath: str, where: str) -> FilePath:
        parts = relpath.split("/")
        if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ImportFailed(f"{where}: file path {relpath!r} leaves the export directory")
        path = self._source.preauthChild(relpath)
        real = os.path.realpath(path.path)
        if not real.startswith(self._sourceRoot + os.sep):
            raise ImportFailed(f"{where}: file path {relpath!r} leaves the export directory")
        if not path.isfile():
            raise ImportFailed(f"{where}: the file {path.path} is missing")
        return path

    async def _storeBlob(self, path: FilePath, expected: dict[str, str], where: str,
                   inspect: str | None) -> tuple[BlobInfo, dict[str, str], bytes | None]:
        """
        Copy one file into the blob store, checking every hash the export
        gives.  @return: the blob, the verified hashes and, for a wheel, its
            METADATA.
        """
        hashers = {"sha256": hashlib.sha256()}
        for name in expected:
            if name not in hashers:
                hasher = _hasher(name)
                if hasher is None:
                    self.warn(f"{where}: cannot check the {name} hash (unknown algorithm)")
                else:
                    hashers[name] = hasher
        writer = self._blobs.openWriter()
        try:
            with open(path.path, "rb") as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    for hasher in hashers.values():
                        hasher.update(chunk)
                    await writer.write(chunk)
            info = await writer.close()
            digests = {name: h.hexdigest() for name, h in hashers.items()}
            if digests["sha256"] != info.sha256:
                raise ImportFailed(f"{where}: the blob store computed another sha256")
            for name, value in expected.items():
                if name in digests and digests[name] != value:
                    raise ImportFailed(
                        f"{where}: {name} mismatch: the file has {digests[name]}, the export says {value}")
            if not any(name in digests for name in expected):
                self.summary.unverified += 1
            metadata = None
            if inspect is not None:
                try:
                    metadata = (await writer.read(lambda fileobj: inspectArchive(inspect, fileobj))).metadataBytes
                except BadRequest as e:
                    self.warn(f"{where}: no METADATA read ({e.message}); no PEP 658 metadata for it")
            elif path.basename().endswith(".doc.zip"):
                try:
                    await writer.read(lambda fileobj: checkDocZip(fileobj, DocLimits()))
                except DevpiError as e:
                    self.warn(f"{where}: the documentation zip would be refused on upload: {e.message}")
            info = await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        hashes = dict(expected)
        hashes.update({k: v for k, v in digests.items() if k in expected or k == "sha256"})
        self.summary.size += info.size
        return info, hashes, metadata

    async def _fileEntry(self, user: str, index: str, desc: dict[str, Any], project: str, version: str,
                   filename: str, rel: str, versions: dict[str, Any], where: str,
                   isMirror: bool) -> tuple[dict[str, Any], bytes | None]:
        mapping = desc["entrymapping"]
        path = self._sourcePath(desc["relpath"], where)
        wheel = rel == "releasefile" and filename.endswith(".whl") and not isMirror
        blob, hashes, metadata = await self._storeBlob(path, mapping.get("hashes") or {}, where,
                                                 filename if wheel else None)
        extras = desc.get(EXTRA) if isinstance(desc.get(EXTRA), dict) else {}
        log = desc.get("log")
        if not isinstance(log, list):
            log = [logEntry("upload", "<import>", self._now, dst=f"{user}/{index}")]
        seconds = _uploadSeconds(desc, self._now)
        entry = newEntry(user, index, rel, filename, project, version, blob, seconds, log)
        entry["hashes"] = hashes
        entry["upload_time"] = extras.get("upload_time") or uploadTime(seconds)
        entry["last_modified"] = mapping.get("last_modified") or httpDate(self._now)
        entry["yanked"] = extras.get("yanked", False)
        if "requires_python" in extras:
            entry["requires_python"] = extras["requires_python"]
        elif rel == "releasefile":
            entry["requires_python"] = (versions.get(version) or {}).get("requires_python") or None
        if extras.get("attestations"):
            entry["attestations"] = extras["attestations"]
        if isMirror and mapping.get("url"):
            entry["url"] = mapping["url"]
        if metadata is not None:
            entry["core_metadata_sha256"] = hashlib.sha256(metadata).hexdigest()
        return entry, metadata

    async def _importProject(self, user: str, index: str, isMirror: bool, project: str,
                       versions: dict[str, Any], descs: list[dict[str, Any]],
                       projectConfig: dict[str, Any] | None) -> int:
        """Copy one project's files, then write it in one transaction.  @return: files stored."""
        name = f"{user}/{index}"
        versions = {v: dict(m) for v, m in versions.items()}
        display = project
        for metadata in versions.values():
            if isinstance(metadata.get("name"), str) and normalizeProject(metadata["name"]) == project:
                display = metadata["name"]
        entries: list[dict[str, Any]] = []
        coremeta: dict[str, bytes] = {}
        releases: dict[str, dict[str, Any]] = {}
        for desc in sorted(descs, key=lambda d: FILE_TYPES.index(d["type"])):
            rel, version = desc["type"], desc["version"]
            filename = desc["relpath"].rsplit("/", 1)[-1]
            where = f"{name}: {desc['relpath']}"
            if self._skipped(where, recordProblem(project, version, filename)):
                continue
            if isMirror and rel != "releasefile":
                self.warn(f"{where}: a {rel} on a mirror index; not imported")
                continue
            if rel == "doczip":
                filename = docFilename(project, version)
            entry, metadata = await self._fileEntry(user, index, desc, project, version, filename, rel,
                                              versions, where, isMirror)
            if rel == "toxresult":
                forName = str(desc.get("for_entrypath", "")).rsplit("/", 1)[-1]
                release = releases.get(forName)
                if release is None:
                    self.warn(f"{where}: its release file {forName!r} is not in the export; not imported")
                    continue
                entry["for_relpath"] = release["relpath"]
                entry["relpath"] = toxresultRelpath(release["relpath"], filename)
            elif rel == "releasefile":
                releases[filename] = entry
            if metadata is not None:
                coremeta[filename] = metadata
            if not isMirror and version not in versions:
                versions[version] = {"name": display, "version": version}
            entries.append(entry)
            self.summary.files[rel] = self.summary.files.get(rel, 0) + 1

        def _store(txn: IWriteTransaction) -> None:
            if not isMirror:
                txn.set(keys.projectKey(user, index, project), projectConfig or {"name": display})
                for version, metadata in versions.items():
                    txn.set(keys.versionKey(user, index, project, version), metadata)
            for entry in entries:
                writeFileEntry(txn, user, index, entry, coremeta.get(entry["filename"]))

        await self._write(_store)
        return len(entries)

    async def _importIndex(self, name: str, config: dict[str, Any]) -> None:
        user, _, index = name.partition("/")
        exported = self._data["indexes"].get(name) or {}
        isMirror = config["type"] == indexconfig.MIRROR
        projects: dict[str, dict[str, Any]] = {}
        for projectName, versions in (exported.get("projects") or {}).items():
            if not isinstance(versions, dict):
                raise ImportFailed(f"{name}: project {projectName!r} is not an object of versions")
            # The name as exported: a look-alike may normalise to a valid name.
            if self._skipped(f"{name}: project {projectName!r}", recordProblem(projectName)):
                continue
            merged = projects.setdefault(normalizeProject(projectName), {})
            for version, metadata in versions.items():
                if self._skipped(f"{name}: release {projectName} {version!r}",
                                 recordProblem(projectName, version)):
                    continue
                metadata = {k: v for k, v in (metadata or {}).items()
                            if not k.startswith("+") and k != ":action"}
                if not metadata.get("version"):
                    metadata["version"] = version
                metadata.setdefault("name", projectName)
                merged[version] = metadata
        files: dict[str, list[dict[str, Any]]] = {}
        for desc in exported.get("files") or []:
            if desc.get("type") not in FILE_TYPES:
                raise ImportFailed(f"{name}: {desc.get('relpath')}: unknown file type {desc.get('type')!r}")
            projectName = str(desc.get("projectname", ""))
            if self._skipped(f"{name}: {desc['relpath']}", recordProblem(projectName)):
                continue
            files.setdefault(normalizeProject(projectName), []).append(desc)
        extras = exported.get(EXTRA) if isinstance(exported.get(EXTRA), dict) else {}
        await self._importWebhooks(name, extras.get("webhooks"))
        projectConfigs = extras.get("projects") or {}
        count = 0
        names = sorted(set(files) | (set() if isMirror else set(projects)))
        if isMirror and not names:
            self.summary.configOnly.append(name)
            return
        for project in names:
            count += await self._importProject(user, index, isMirror, project, projects.get(project, {}),
                                         files.get(project, []), projectConfigs.get(project))
        await self._importDeleted(name, extras.get("deleted") or [])
        self.summary.indexes[name] = (len(names), count)

    async def _importWebhooks(self, scope: str, hooks: Any) -> None:
        """Webhooks exported with an index (or server-wide), checked as a registration is."""
        from devpi_twisted.errors import BadRequest
        from devpi_twisted.services.webhooks import hookPrefix, validateRegistration

        stored = []
        for hook in hooks if isinstance(hooks, list) else []:
            hookId = hook.get("id") if isinstance(hook, dict) else None
            try:
                valid = validateRegistration({k: hook.get(k) for k in ("url", "secret", "events")})
            except BadRequest as e:
                self.warn(f"{scope}: webhook {hookId!r} not imported: {e.message}")
                continue
            if not isinstance(hookId, str) or not safeSegment(hookId):
                self.warn(f"{scope}: webhook {hookId!r} not imported: bad id")
                continue
            stored.append({**valid, "id": hookId, "created": hook.get("created")})
        if stored:
            await self._write(lambda txn: [txn.set(hookPrefix(scope) + h["id"], h) for h in stored])

    async def _importDeleted(self, name: str, deleted: Any) -> None:
        """The paths of deleted files, which keep answering 410 (our own exports carry them)."""
        user, _, index = name.partition("/")
        if not isinstance(deleted, list):
            raise ImportFailed(f"{name}: the list of deleted files is not a list")
        tombstones = []
        for item in deleted:
            path = item.get("path") if isinstance(item, dict) else None
            parts = path.split("/") if isinstance(path, str) else []
            if len(parts) != 3 or not all(safeSegment(part) for part in parts):
                raise ImportFailed(f"{name}: deleted file path {path!r} cannot be stored")
            project = item.get("project")
            reason = {k: item[k] for k in ("removed_by", "policy", "when")
                      if isinstance(item.get(k), (str, int, float)) and not isinstance(item.get(k), bool)}
            tombstones.append((keys.tombstoneKey(user, index, *parts),
                               {"project": normalizeProject(project) if isinstance(project, str) else None, **reason}))
        if tombstones:
            await self._write(lambda txn: [txn.set(key, value) for key, value in tombstones])

    async def run(self) -> ImportSummary:
        users = self._userConfigs()
        indexes = self._indexConfigs(users)

        def _accounts(txn: IWriteTransaction) -> None:
            for user, config in users.items():
                txn.set(keys.userKey(user), config)
            for name, config in indexes.items():
                user, _, index = name.partition("/")
                txn.set(keys.indexKey(user, index), config)

        await self._write(_accounts)
        self.summary.users = sorted(users)
        from devpi_twisted.services.webhooks import SERVER
        extras = self._data.get(EXTRA)
        await self._importWebhooks(SERVER, extras.get("webhooks") if isinstance(extras, dict) else None)
        for name, config in sorted(indexes.items()):
            await self._importIndex(name, config)
        skipped = sorted(set(self._data["indexes"]) - set(indexes))
        for name in skipped:
            files = self._data["indexes"][name].get("files") or []
            if files:
                self.warn(f"index {name} was not imported, nor its {len(files)} files")
        return self.summary


async def importServerDir(path: FilePath, source: FilePath, backend: BackendSettings = BackendSettings(),
                          rootPassword: str | None = None, rootPypi: bool = True,
                          skipTypes: tuple[str, ...] = (), out: TextIO = sys.stdout,
                          runner: Runner | None = None) -> ImportSummary:
    """
    Create the server directory C{path} (missing or empty) from the export
    in C{source}; report to C{out}.  C{runner} runs the storage's work (by
    default on the calling thread).

    @param rootPassword: root's new password; by default root keeps the one
        from the export (or, if the export has no root, gets a generated one,
        printed once, as with C{init}).
    """
    checkCanInitialise(path)
    data = readExport(source)
    if rootPassword is None and "root" not in data["users"]:
        rootPassword = secrets.token_urlsafe(18)
        out.write("devpi-twisted: the export has no user 'root'; created it with the generated password\n"
                  f"    {rootPassword}\n"
                  "It is shown only this once; change it with 'devpi-twisted passwd root'.\n")
    rootHash = None if rootPassword is None else PasswordHashing().hash(rootPassword)
    with initialising(path, backend) as directory:
        storage, blobs = openBackends(backend, directory, runner or SynchronousRunner())
        try:
            if storage.currentSerial() >= 0:
                raise ServerDirError(
                    f"the {backend.storage} storage already holds a server's state; an import needs it empty"
                )
            importer = Importer(storage, blobs, source, copy.deepcopy(data), rootPasswordHash=rootHash,
                                rootPypi=rootPypi, skipTypes=skipTypes)
            summary = await importer.run()
        finally:
            await storage.close()
    origin = data.get(EXTRA, {}).get("version")
    made = f"devpi-twisted {origin}" if origin else f"devpi-server {data.get('devpi_server', '?')}"
    out.write(f"devpi-twisted: imported {source.path} ({made} export, dumpversion {data['dumpversion']}) "
              f"into {path.path}\n" + summary.describe())
    return summary


