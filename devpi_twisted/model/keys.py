"""
The layout of keys in the storage service.

Keys start with their kind, so one prefix scan lists one kind of thing:
  - C{user/<user>}: a user's config (with its password hash);
  - C{index/<user>/<index>}: an index config;
  - C{project/<user>/<index>/<project>}, C{version/...}, C{file/...}: the
    contents of an index (added by the upload code).
"""

USER = "user/"
INDEX = "index/"
INDEX_CONTENT_KINDS = ("project/", "version/", "file/", "simple/")


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
