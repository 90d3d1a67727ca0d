"""
Who a request acts as: a user, and when it came with an API token, what the
token narrows that user's rights to (README "Tokens").

Pure: the web layer builds an L{Identity} from the credentials; services and
views ask L{Identity.permits} before acting for it.
"""

from dataclasses import dataclass

# The permissions a token can carry (devpi-tokens' names).
UPLOAD = "upload"
PKG_READ = "pkg_read"
DEL_PROJECT = "del_project"
DEL_VERDATA = "del_verdata"
TOXRESULT_UPLOAD = "toxresult_upload"
INDEX_MODIFY = "index_modify"
INDEX_CREATE = "index_create"
INDEX_DELETE = "index_delete"
DEL_ENTRY = "del_entry"
TOKEN_PERMISSIONS = frozenset({UPLOAD, PKG_READ, DEL_PROJECT, DEL_VERDATA, TOXRESULT_UPLOAD, INDEX_MODIFY,
                               INDEX_CREATE, INDEX_DELETE, DEL_ENTRY})


@dataclass(frozen=True)
class TokenScope:
    """
    What an API token allows: C{None} in a field means no restriction of
    that kind.  A token never allows user management (creating tokens,
    changing passwords, users).
    """

    tokenId: str
    allowed: frozenset[str] | None = None
    indexes: frozenset[str] | None = None  # "user/index"
    projects: frozenset[str] | None = None  # normalised project names

    def permits(self, permission: str, index: str | None = None, project: str | None = None) -> bool:
        if permission not in TOKEN_PERMISSIONS:
            return False
        if self.allowed is not None and permission not in self.allowed:
            return False
        if self.indexes is not None and (index is None or index not in self.indexes):
            return False
        if self.projects is not None and project is not None and project not in self.projects:
            return False
        return True


@dataclass(frozen=True)
class Identity:
    """An authenticated requester: C{scope} is set when an API token authenticated it."""

    user: str
    scope: TokenScope | None = None

    def permits(self, permission: str, index: str | None = None, project: str | None = None) -> bool:
        """Whether this identity may use the user's rights for C{permission} there."""
        return self.scope is None or self.scope.permits(permission, index, project)
