# -*- test-case-name: tests.test_upstreampage -*-
"""
PEP 691 JSON project pages.

Pure code: no I/O, no Twisted.
"""

import json
from typing import Any

from devpi_twisted.model.upstream.common import (
    UpstreamLink,
    UpstreamPageError,
    UpstreamProject,
    checkMajor,
    distributionVersion,
    fragmentHashes,
    linkOf,
    resolveHTTP,
    sortedVersions,
    uniqueLinks,
    validDigest,
    validHashes,
    validStatus,
)


def _jsonSize(value: Any) -> int | None:
    """A JSON C{size}: a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _jsonYanked(value: Any) -> bool | str:
    """
    JSON C{yanked}: a reason string, C{true}, or not yanked.  The empty
    string means not yanked, as pip reads it; anything else truthy counts
    as yanked, because a mirror must never lose a yank.
    """
    if isinstance(value, str):
        return value if value else False
    return bool(value)


def parseJSONPage(body: bytes, pageURL: str, project: str) -> UpstreamProject:
    try:
        document = json.loads(body)
    except ValueError as e:
        raise UpstreamPageError(f"the page is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(document, dict):
        raise UpstreamPageError("the JSON page is not an object")
    meta = document.get("meta")
    if not isinstance(meta, dict):
        raise UpstreamPageError("the JSON page has no meta object")
    checkMajor(meta.get("api-version"), "meta.api-version")
    files = document.get("files")
    if not isinstance(files, list):
        raise UpstreamPageError("the JSON page has no files list")

    links = []
    for entry in files:
        if isinstance(entry, dict):
            link = _jsonLink(entry, pageURL, project)
            if link is not None:
                links.append(link)
    unique = uniqueLinks(links)

    versions = document.get("versions")
    if isinstance(versions, list):
        versions = tuple(dict.fromkeys(v for v in versions if isinstance(v, str) and v))
    else:
        versions = sortedVersions({link.version for link in unique if link.version})

    projectStatus = document.get("project-status")
    if not isinstance(projectStatus, dict):
        # The spec's worked example once put it under meta.
        projectStatus = meta.get("project-status")
    status, reason = (
        validStatus(projectStatus.get("status"), projectStatus.get("reason"))
        if isinstance(projectStatus, dict) else (None, None)
    )
    return UpstreamProject(project, unique, versions, status, reason)


def _jsonCoreMetadata(entry: dict) -> str | bool:
    """The C{core-metadata} value, or its deprecated aliases."""
    for key in ("core-metadata", "dist-info-metadata", "data-dist-info-metadata"):
        if key in entry:
            value = entry[key]
            break
    else:
        return False
    if value is True:
        return True
    if isinstance(value, dict):
        return validDigest("sha256", value.get("sha256")) or True
    return False


def _jsonLink(entry: dict, pageURL: str, project: str) -> UpstreamLink | None:
    filename = entry.get("filename")
    url = entry.get("url")
    if not isinstance(filename, str) or not isinstance(url, str):
        return None
    matches, version = distributionVersion(filename, project)
    if not matches:
        return None
    resolved = resolveHTTP(pageURL, url)
    if resolved is None:
        return None
    url, fragment = resolved
    hashes = entry.get("hashes")
    hashes = validHashes(hashes.items()) if isinstance(hashes, dict) else {}
    for name, digest in fragmentHashes(fragment).items():
        hashes.setdefault(name, digest)
    return linkOf(
        filename, url, pageURL, hashes, version,
        requiresPython=entry.get("requires-python"),
        yanked=_jsonYanked(entry.get("yanked")),
        size=_jsonSize(entry.get("size")),
        uploadTime=entry.get("upload-time"),
        coreMetadata=_jsonCoreMetadata(entry),
        provenance=entry.get("provenance"),
    )
