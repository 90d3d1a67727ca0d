"""
Who may do what: pure decisions over a requester and the objects involved.

C{requester} is the authenticated user name, or C{None} for anonymous.  C{root}
is the administrator and may do everything but delete itself.
C{restrictModify} is the C{--restrict-modify} list (C{None}: devpi's defaults).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from devpi_twisted.model.identity import PKG_READ, Identity
from devpi_twisted.model.indexconfig import ANONYMOUS, AUTHENTICATED

ROOT = "root"


def matchesPrincipals(requester: str | None, principals: Iterable[str]) -> bool:
    """Whether C{requester} is named by a devpi ACL list."""
    for principal in principals:
        if principal == ANONYMOUS:
            return True
        if principal == AUTHENTICATED and requester is not None:
            return True
        if requester is not None and principal == requester:
            return True
    return False


@dataclass(frozen=True)
class Policy:
    """The server-wide settings that shape permissions."""

    restrictModify: tuple[str, ...] | None = None
    mirrorCreators: str = "root"  # "root" or "users"

    def _restricted(self, requester: str | None) -> bool | None:
        """C{None} when unrestricted, else whether the requester is listed."""
        if self.restrictModify is None:
            return None
        return requester == ROOT or matchesPrincipals(requester, self.restrictModify)

    def mayCreateUser(self, requester: str | None) -> bool:
        listed = self._restricted(requester)
        return True if listed is None else listed

    def mayModifyUser(self, requester: str | None, target: str, passwordOnly: bool) -> bool:
        if requester is None:
            return False
        if requester == target and (passwordOnly or self.restrictModify is None):
            return True
        if requester == ROOT:
            return True
        listed = self._restricted(requester)
        return bool(listed)

    def mayDeleteUser(self, requester: str | None, target: str) -> bool:
        if requester is None or target == ROOT:
            return False
        listed = self._restricted(requester)
        if listed is None:
            return requester in (ROOT, target)
        return listed and requester != target

    def mayManageIndex(self, requester: str | None, owner: str) -> bool:
        """Create, modify or delete an index of C{owner}."""
        if requester is None:
            return False
        listed = self._restricted(requester)
        if listed is None:
            return requester in (ROOT, owner)
        return listed

    def mayConfigureMirror(self, requester: str | None) -> bool:
        """Create a mirror index or point one at a URL: the server will fetch from it."""
        return requester == ROOT or (self.mirrorCreators == "users" and requester is not None)


def mayUpload(requester: str | None, owner: str, config: dict[str, Any]) -> bool:
    """The owner, root and whoever C{acl_upload} names may upload."""
    if requester is not None and requester in (owner, ROOT):
        return True
    return matchesPrincipals(requester, config.get("acl_upload", ()))


def isPublic(config: dict[str, Any]) -> bool:
    """Whether everyone may read the index (C{acl_read} absent, the default, or naming C{:ANONYMOUS:})."""
    return ANONYMOUS in config.get("acl_read", (ANONYMOUS,))


def mayRead(requester: str | None, owner: str, config: dict[str, Any]) -> bool:
    """
    Whether C{requester} may read the index (its pages, files, docs, JSON):
    the owner and root always may, then whoever C{acl_read} names.
    """
    if isPublic(config):
        return True
    if requester is not None and requester in (owner, ROOT):
        return True
    return matchesPrincipals(requester, config.get("acl_read", ()))


def identityMayRead(identity: Identity | None, owner: str, index: str, config: dict[str, Any]) -> bool:
    """
    L{mayRead} for an L{Identity}: an API token must also allow
    C{pkg_read} on the index, unless everyone may read it anyway.
    """
    if isPublic(config):
        return True
    if identity is None:
        return False
    if not identity.permits(PKG_READ, f"{owner}/{index}"):
        return False
    return mayRead(identity.user, owner, config)
