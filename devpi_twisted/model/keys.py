"""
The layout of keys in the storage service.

Keys start with their kind, so one prefix scan lists one kind of thing:
  - C{user/<user>}: a user's config (with its password hash);
  - C{index/<user>/<index>}: an index config;
  - C{project/<user>/<index>/<project>}: a project (display name, status);
  - C{version/<user>/<index>/<project>/<version>}: a release's metadata;
  - C{file/<user>/<index>/<project>/<filename>}: a file entry, referring to
    its blob;
  - C{coremeta/<user>/<index>/<project>/<filename>}: a wheel's METADATA;
  - C{path/<user>/<index>/<h3>/<h13>/<filename>}: which file entry a stable
    file URL (C{+f/<h3>/<h13>/<filename>}) names;
  - C{deleted/<user>/<index>/<h3>/<h13>/<filename>}: a deleted file, so its
    URL answers 410 Gone rather than 404;
  - C{token/<user>/<id>}: an API token's record (its key, restrictions);
  - C{tokenuse/<user>/<id>}: when it was last used (written in batches).
Project names in keys are normalised.
"""

USER = "user/"
INDEX = "index/"
TOKEN = "token/"
TOKEN_USE = "tokenuse/"
INDEX_CONTENT_KINDS = (
    "project/", "version/", "file/", "coremeta/", "path/", "simple/", "deleted/", "mirrornames/",
)


def userKey(user: str) -> str:
    return f"{USER}{user}"


def indexKey(user: str, index: str) -> str:
    return f"{INDEX}{user}/{index}"


def userIndexesPrefix(user: str) -> str:
    return f"{INDEX}{user}/"


def indexContentPrefixes(user: str, index: str) -> list[str]:
    """Every prefix under which an index keeps its projects, versions and files."""
    return [f"{kind}{user}/{index}/" for kind in INDEX_CONTENT_KINDS]


def projectsPrefix(user: str, index: str) -> str:
    return f"project/{user}/{index}/"


def projectKey(user: str, index: str, project: str) -> str:
    return f"project/{user}/{index}/{project}"


def versionKey(user: str, index: str, project: str, version: str) -> str:
    return f"version/{user}/{index}/{project}/{version}"


def versionsPrefix(user: str, index: str, project: str) -> str:
    return f"version/{user}/{index}/{project}/"


def fileKey(user: str, index: str, project: str, filename: str) -> str:
    return f"file/{user}/{index}/{project}/{filename}"


def filesPrefix(user: str, index: str, project: str) -> str:
    return f"file/{user}/{index}/{project}/"


def coreMetadataKey(user: str, index: str, project: str, filename: str) -> str:
    return f"coremeta/{user}/{index}/{project}/{filename}"


def fileRelpath(user: str, index: str, sha256: str, filename: str) -> str:
    """The stable path of a file below the server root, as devpi lays it out."""
    return f"{user}/{index}/+f/{sha256[:3]}/{sha256[3:16]}/{filename}"


def pathKey(user: str, index: str, h3: str, h13: str, filename: str) -> str:
    return f"path/{user}/{index}/{h3}/{h13}/{filename}"


def parseKey(key: str) -> tuple[str, str, str, str | None]:
    """C{(kind, user, index, project-or-None)} of an index content or config key."""
    kind, _, rest = key.partition("/")
    parts = rest.split("/")
    if kind == "index":
        return kind, parts[0], parts[1] if len(parts) > 1 else "", None
    if kind in ("project", "version", "file", "coremeta", "simple") and len(parts) >= 3:
        return kind, parts[0], parts[1], parts[2]
    return kind, parts[0] if parts else "", parts[1] if len(parts) > 1 else "", None


def tombstoneKey(user: str, index: str, h3: str, h13: str, filename: str) -> str:
    return f"{tombstonePrefix(user, index)}{h3}/{h13}/{filename}"


def tombstonePrefix(user: str, index: str) -> str:
    return f"deleted/{user}/{index}/"


def tokenKey(user: str, tokenId: str) -> str:
    return f"{TOKEN}{user}/{tokenId}"


def tokensPrefix(user: str) -> str:
    return f"{TOKEN}{user}/"


def tokenUseKey(user: str, tokenId: str) -> str:
    return f"{TOKEN_USE}{user}/{tokenId}"


def tokenUsePrefix(user: str) -> str:
    return f"{TOKEN_USE}{user}/"
