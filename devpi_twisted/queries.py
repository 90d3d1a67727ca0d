"""
Read-side views of releases in devpi's JSON shapes (C{projectconfig},
C{versiondata} with C{+links}), over an index's resolution order.
"""

from typing import Any

from .errors import NotFound
from .interfaces import IReadView
from .model import keys
from .model.inheritance import Stage, contributingStages
from .simple import orderOf

_LIST_DEFAULTS = (
    "platform", "classifiers", "supported_platform", "provides", "requires", "obsoletes",
    "project_urls", "provides_dist", "obsoletes_dist", "requires_dist", "requires_external",
    "provides_extras", "dynamic", "license_file",
)


def linkOf(entry: dict[str, Any], baseURL: str) -> dict[str, Any]:
    link = {
        "rel": entry.get("rel", "releasefile"),
        "hash_spec": f"sha256={entry['sha256']}",
        "hashes": {"sha256": entry["sha256"], **entry.get("hashes", {})},
        "href": f"{baseURL}/{entry['relpath']}",
        "log": entry.get("log", []),
    }
    if entry.get("yanked"):
        link["yanked"] = entry["yanked"]
    if entry.get("for_relpath"):
        link["for_href"] = f"{baseURL}/{entry['for_relpath']}"
    return link


def _versionData(metadata: dict[str, Any], links: list[dict[str, Any]]) -> dict[str, Any]:
    data = dict(metadata)
    for key in _LIST_DEFAULTS:
        data.setdefault(key, [])
    data["+links"] = links
    return data


def _stageVersions(view: IReadView, stage: Stage, project: str, baseURL: str) -> dict[str, dict[str, Any]]:
    versions: dict[str, dict[str, Any]] = {}
    links: dict[str, list[dict[str, Any]]] = {}
    for _, entry in view.items(keys.filesPrefix(stage.user, stage.index, project)):
        links.setdefault(entry["version"], []).append(linkOf(entry, baseURL))
    for _, metadata in view.items(keys.versionsPrefix(stage.user, stage.index, project)):
        version = metadata["version"]
        versions[version] = _versionData(metadata, links.get(version, []))
    return versions


def projectConfig(view: IReadView, user: str, index: str, project: str, baseURL: str,
                  ignoreBases: bool) -> dict[str, Any]:
    """C{GET /user/index/project}: every version the index serves, with links."""
    order = orderOf(view, user, index)
    if ignoreBases:
        order = order[:1]

    def holds(stage: Stage) -> bool:
        return view.get(keys.projectKey(stage.user, stage.index, project)) is not None

    contributing, _ = contributingStages(order, project, holds)
    result: dict[str, dict[str, Any]] = {}
    found = False
    for stage in contributing:
        if stage.isMirror or not holds(stage):
            continue
        found = True
        for version, data in _stageVersions(view, stage, project, baseURL).items():
            if version in result:
                result[version].setdefault("+shadowing", []).append(data)
            else:
                result[version] = data
    if not found:
        raise NotFound(f"no project {project!r}")
    return result


def versionData(view: IReadView, user: str, index: str, project: str, version: str,
                baseURL: str) -> dict[str, Any]:
    """C{GET /user/index/project/version}, inherited."""
    versions = projectConfig(view, user, index, project, baseURL, ignoreBases=False)
    if version not in versions:
        raise NotFound(f"The version {version} of project {project} does not exist.")
    return versions[version]


def fileMeta(entry: dict[str, Any]) -> dict[str, Any]:
    """C{releasefilemeta}: the entry as devpi shows it for a JSON file request."""
    return {
        "last_modified": entry.get("last_modified"),
        "hash_spec": f"sha256={entry['sha256']}",
        "hashes": {"sha256": entry["sha256"], **entry.get("hashes", {})},
        "project": entry["project"],
        "version": entry["version"],
        "size": entry["size"],
    }
