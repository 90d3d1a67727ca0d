"""
C{devpi-twisted export DIR}: the whole state of a stopped server in
devpi-server's export layout (dumpversion 2), which C{devpi-import} and
C{devpi-twisted import} both read.

C{DIR/dataindex.json} holds users (with their password hashes), indexes with
their configuration, every release's metadata and a description of every
file; the files are laid out as devpi lays them out:

  - release files: C{USER/INDEX/PROJECT/VERSION/FILENAME};
  - documentation zips: C{USER/INDEX/PROJECT-VERSION.doc.zip};
  - tox results: C{USER/INDEX/PROJECT/sha256=<release sha256>/FILENAME}.

What devpi has no place for (PEP 592 yanking, PEP 792 project status, PEP 740
attestations, upload times with microseconds, hashes other than sha256 and
md5) goes under C{"devpi_twisted"} keys, which devpi's import ignores, so a
round trip through devpi-twisted keeps them and devpi can still read the
export.

L{planExport} is pure (a read view in, the JSON and a list of files to copy
out); L{exportServerDir} runs it on a locked, stopped server directory.

Records that older versions let in and that cannot be written safely (a
project name that is not ASCII PEP 508, a version or file name that is not
one plain path segment, such as C{1.0/../../tmp/pwn}) are left out and
listed in the summary (L{recordProblem}); they never stop the export, and
nothing is written outside the export directory.  Versions that are merely
not PEP 440 (legacy releases, devpi's own exports) are kept.
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, TextIO

from twisted.internet.defer import maybeDeferred
from twisted.python.filepath import FilePath

from devpi_twisted import __version__
from devpi_twisted.errors import ServerDirError
from devpi_twisted.interfaces import IReadView
from devpi_twisted.model import keys
from devpi_twisted.model.distfile import splitArchiveName
from devpi_twisted.model.indexconfig import MIRROR
from devpi_twisted.model.names import isValidProjectName
from devpi_twisted.app.serverdir import ServerDir, builtInPlace
from devpi_twisted.config import BackendSettings
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.readers import RunFile, blockingFile
from devpi_twisted.storage.threads import Runner, SynchronousRunner

DUMPVERSION = "2"
EXTRA = "devpi_twisted"
"""The key of what devpi-twisted keeps beyond devpi's export format."""

DEVPI_HASHES = ("sha256", "md5")
"""Hash names devpi-server's import can check (it looks them up in hashlib by name)."""

_REL_ORDER = {"releasefile": 0, "toxresult": 1, "doczip": 2}


class ExportError(ServerDirError):
    """The state cannot be exported as it is; the message says why."""


@dataclass
class ExportSummary:
    """What an export wrote."""

    users: list[str] = field(default_factory=list)
    indexes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (projects, files)
    files: dict[str, int] = field(default_factory=dict)  # type: count
    configOnly: list[str] = field(default_factory=list)  # mirrors without their files
    size: int = 0
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # bad records left out

    def describe(self) -> str:
        lines = [f"  users: {len(self.users)} ({', '.join(self.users)})",
                 f"  indexes: {len(self.indexes) + len(self.configOnly)}"]
        for name, (projects, files) in self.indexes.items():
            lines.append(f"    {name}: {projects} projects, {files} files")
        for name in self.configOnly:
            lines.append(f"    {name}: mirror, configuration only (see --include-mirrored-files)")
        total = sum(self.files.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.files.items()))
        lines.append(f"  projects: {sum(p for p, _ in self.indexes.values())}")
        lines.append(f"  files: {total}{f' ({kinds})' if kinds else ''}, {self.size} bytes")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  SKIPPED: {s}" for s in self.skipped]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class FileCopy:
    """One file of the export: where it goes below DIR and which blob it is."""

    relpath: str
    sha256: str
    size: int


def versionFromFilename(filename: str) -> str | None:
    """The version a distribution (or C{.doc.zip}) file name carries, as devpi derives it."""
    if ".toxresult-" in filename:  # a tox result is named after its release file
        filename = filename.split(".toxresult-", 1)[0]
    if filename.endswith(".doc.zip"):
        stem = filename[: -len(".doc.zip")]
    elif filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return parts[1] if len(parts) >= 5 else None
    else:
        split = splitArchiveName(filename)
        if split is None:
            return None
        stem = split[0]
    if "-" not in stem:
        return None
    return stem.rsplit("-", 1)[1] or None


def safeSegment(value: Any) -> bool:
    """Whether C{value} can be one path segment of the export."""
    return (
        isinstance(value, str) and value not in ("", ".", "..")
        and "/" not in value and "\\" not in value and value.isprintable()
    )


def recordProblem(project: Any, version: Any = None, filename: Any = None) -> str | None:
    """
    Why a stored (or exported) record of C{project}, C{version} and
    C{filename} cannot be exported or imported, or C{None} if it can.
    Only what is given is checked.
    """
    if not (safeSegment(project) and isValidProjectName(project)):
        return f"project name {project!r} is not a valid project name (ASCII, PEP 508)"
    if version is not None and not safeSegment(version):
        return f"version {version!r} of {project} is not a plain path segment"
    if filename is not None and not safeSegment(filename):
        return f"file name {filename!r} of {project} is not a plain path segment"
    return None


def _fileOrder(entry: dict[str, Any]) -> tuple[str, str, int, str]:
    return (entry["project"], entry.get("version") or "", _REL_ORDER.get(entry.get("rel", "releasefile"), 3),
            entry["filename"])


def _fileExtras(entry: dict[str, Any]) -> dict[str, Any]:
    extras: dict[str, Any] = {"upload_time": entry.get("upload_time"), "yanked": entry.get("yanked", False)}
    if "requires_python" in entry:
        extras["requires_python"] = entry["requires_python"]
    hashes = entry.get("hashes") or {}
    if any(name not in DEVPI_HASHES for name in hashes):
        extras["hashes"] = dict(hashes)
    if entry.get("attestations"):
        extras["attestations"] = entry["attestations"]
    return extras


def _dumpIndex(view: IReadView, user: str, index: str, isMirror: bool, dumped: dict[str, Any],
               copies: list[FileCopy], warnings: list[str], skipped: list[str]) -> None:
    name = f"{user}/{index}"
    projects: dict[str, dict[str, Any]] = {}
    projectConfigs: dict[str, Any] = {}

    def bad(what: str, problem: str | None) -> bool:
        if problem is not None:
            skipped.append(f"{name}: {what} not exported: {problem}")
        return problem is not None

    prefix = keys.projectsPrefix(user, index)
    for key, config in view.items(prefix):
        project = key[len(prefix):]
        if not bad(f"project {project!r}", recordProblem(project)):
            projectConfigs[project] = config
    versionsPrefix = f"version/{user}/{index}/"
    for key, metadata in view.items(versionsPrefix):
        project, _, version = key[len(versionsPrefix):].partition("/")
        if bad(f"release {project!r} {version!r}", recordProblem(project, version)):
            continue
        projects.setdefault(project, {})[version] = {k: v for k, v in metadata.items() if not k.startswith("+")}
    entries = [entry for _, entry in view.items(f"file/{user}/{index}/")]
    byRelpath = {entry["relpath"]: entry for entry in entries}
    files = []
    for entry in sorted(entries, key=_fileOrder):
        rel = entry.get("rel", "releasefile")
        project, filename, sha = entry["project"], entry["filename"], entry["sha256"]
        version = entry.get("version") or versionFromFilename(filename) or "0"
        if bad(f"file {filename!r}", recordProblem(project, version, filename)):
            continue
        desc: dict[str, Any] = {"type": rel, "projectname": project, "version": version}
        if rel == "releasefile":
            path = f"{name}/{project}/{version}/{filename}"
        elif rel == "doczip":
            path = f"{name}/{project}-{version}.doc.zip"
        elif rel == "toxresult":
            release = byRelpath.get(entry.get("for_relpath", ""))
            if release is None:
                warnings.append(f"{name}: tox result {filename} has no release file any more; not exported")
                continue
            path = f"{name}/{project}/sha256={release['sha256']}/{filename}"
            desc["for_entrypath"] = release["relpath"]
        else:
            warnings.append(f"{name}: file {filename} of unknown kind {rel!r}; not exported")
            continue
        hashes = entry.get("hashes") or {"sha256": sha}
        mapping: dict[str, Any] = {
            "last_modified": entry.get("last_modified"),
            "hash_spec": f"sha256={sha}",
            "hashes": {k: v for k, v in hashes.items() if k in DEVPI_HASHES} or {"sha256": sha},
            "project": project,
            "version": version,
        }
        if entry.get("url"):
            mapping["url"] = entry["url"]
        desc.update({"relpath": path, "entrymapping": mapping, "log": entry.get("log") or []})
        desc[EXTRA] = _fileExtras(entry)
        files.append(desc)
        copies.append(FileCopy(path, sha, entry.get("size", 0)))
        if isMirror:
            # devpi's import of mirrored files looks up each file's version.
            versions = projects.setdefault(project, {})
            versions.setdefault(version, {"name": project, "version": version})
        elif version not in projects.get(project, {}):
            projects.setdefault(project, {})[version] = {"name": projectConfigs.get(project, {}).get("name", project),
                                                         "version": version}
    dumped["projects"] = {p: dict(sorted(v.items())) for p, v in sorted(projects.items())}
    dumped["files"] = files
    extras: dict[str, Any] = {}
    if projectConfigs:
        extras["projects"] = projectConfigs
    deleted = _deletedPaths(view, user, index, set(byRelpath), skipped)
    if deleted:
        extras["deleted"] = deleted
    if extras:
        dumped[EXTRA] = extras


REMOVAL_FIELDS = ("removed_by", "policy", "when")


def _deletedPaths(view: IReadView, user: str, index: str, live: set[str],
                  skipped: list[str]) -> list[dict[str, Any]]:
    """
    The stable paths of deleted files (C{<h3>/<h13>/<filename>}), so they
    answer 410, not 404, after an import; devpi has no place for them.
    """
    prefix = keys.tombstonePrefix(user, index)
    deleted = []
    for key, value in view.items(prefix):
        path = key[len(prefix):]
        parts = path.split("/")
        if len(parts) != 3 or not all(safeSegment(part) for part in parts):
            skipped.append(f"{user}/{index}: deleted file path {path!r} not exported: not three plain segments")
            continue
        if f"{user}/{index}/+f/{path}" not in live:
            # Why it went (a retention policy, L{removalReason}) travels with it.
            deleted.append({"path": path, "project": value.get("project"),
                            **{k: value[k] for k in REMOVAL_FIELDS if k in value}})
    return sorted(deleted, key=lambda d: d["path"])


def exportedWebhooks(view: IReadView, scope: str | None) -> list[dict[str, Any]]:
    """The webhooks of an index (or server-wide ones: C{None}), secrets included; devpi ignores them."""
    from devpi_twisted.services.webhooks import SERVER, hookPrefix

    return [hook for _, hook in view.items(hookPrefix(scope or SERVER))]


def planExport(view: IReadView, includeMirrored: bool = False, warnings: list[str] | None = None,
               skipped: list[str] | None = None) -> tuple[dict[str, Any], list[FileCopy]]:
    """
    The C{dataindex.json} content of the state in C{view}, and the files to
    copy beside it.  Mirror indexes are exported with their configuration
    only, unless C{includeMirrored}.  Records that cannot be exported
    (L{recordProblem}) are left out and described in C{skipped}.
    """
    warnings = [] if warnings is None else warnings
    skipped = [] if skipped is None else skipped
    users = {}
    for key, config in view.items(keys.USER):
        name = key[len(keys.USER):]
        users[name] = dict(config, username=name)
    indexes: dict[str, Any] = {}
    copies: list[FileCopy] = []
    for key, config in view.items(keys.INDEX):
        user, _, index = key[len(keys.INDEX):].partition("/")
        dumped: dict[str, Any] = {"indexconfig": config}
        indexes[f"{user}/{index}"] = dumped
        isMirror = config.get("type") == MIRROR
        if not (isMirror and not includeMirrored):
            _dumpIndex(view, user, index, isMirror, dumped, copies, warnings, skipped)
        hooks = exportedWebhooks(view, f"{user}/{index}")
        if hooks:
            dumped.setdefault(EXTRA, {})["webhooks"] = hooks
    data = {
        "dumpversion": DUMPVERSION,
        "pythonversion": list(sys.version_info),
        EXTRA: {"version": __version__, **({"webhooks": serverHooks} if (serverHooks := exportedWebhooks(view, None)) else {})},
        "users": users,
        "indexes": indexes,
    }
    return data, copies


def checkExportTarget(target: FilePath) -> None:
    if target.exists() and (not target.isdir() or target.listdir()):
        raise ExportError(f"export directory {target.path} must not exist or be empty")


def _copyOut(source: BinaryIO, destination: FilePath) -> int:
    """Write a blob's file out; the bytes written."""
    destination.parent().makedirs(ignoreExistingDirectory=True)
    with source, open(destination.path, "wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    return destination.getsize()


async def writeExport(storage: Any, blobs: Any, target: FilePath, includeMirrored: bool = False,
                      progress: Callable[[str], None] = lambda line: None,
                      runFile: RunFile = maybeDeferred) -> ExportSummary:
    """
    Export the state of C{storage} and C{blobs} into C{target}, which must
    be missing or empty; C{runFile} runs the file copies (a storage
    runner's).

    The export is built in a temporary sibling directory and renamed into
    place, so a failed export leaves nothing at C{target}.
    """
    checkExportTarget(target)
    summary = ExportSummary()
    data, copies = await storage.read(
        lambda view: planExport(view, includeMirrored, summary.warnings, summary.skipped))
    with builtInPlace(target, "export") as building:
        for copy in copies:
            reader = await blobs.open(copy.sha256)
            if reader is None:
                raise ExportError(f"the content of {copy.relpath} (sha256 {copy.sha256}) is missing")
            source = await blockingFile(reader, runFile)
            summary.size += await runFile(_copyOut, source, building.preauthChild(copy.relpath))
            progress(f"wrote {copy.relpath}")
        with open(building.child("dataindex.json").path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    summary.users = sorted(data["users"])
    for name, dumped in data["indexes"].items():
        if "files" not in dumped:
            summary.configOnly.append(name)
            continue
        files = dumped["files"]
        summary.indexes[name] = (len(dumped.get("projects", {})), len(files))
        for desc in files:
            summary.files[desc["type"]] = summary.files.get(desc["type"], 0) + 1
    return summary


async def exportServerDir(path: FilePath, target: FilePath, includeMirrored: bool = False,
                          out: TextIO = sys.stdout, runner: Runner | None = None,
                          backend: BackendSettings | None = None) -> ExportSummary:
    """
    Export the stopped server directory at C{path} into C{target}; report
    to C{out}.  C{runner} runs the storage's work (by default on the
    calling thread); C{backend} reaches its storage (default: the embedded
    one), and must be the one the directory was made with.
    """
    serverdir = ServerDir(path)
    serverdir.checkFormat()
    checkExportTarget(target)
    serverdir.lockForMaintenance()
    try:
        settings = serverdir.checkBackend(backend or BackendSettings())
        runner = runner or SynchronousRunner()
        storage, blobs = openBackends(settings, path, runner)
        try:
            summary = await writeExport(storage, blobs, target, includeMirrored, runFile=runner.runFile)
        finally:
            await storage.close()
    finally:
        serverdir.unlock()
    out.write(f"devpi-twisted: exported {path.path} to {target.path}\n" + summary.describe())
    return summary
