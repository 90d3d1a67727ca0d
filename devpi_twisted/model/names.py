"""
Names of users, indexes and projects.

User and index names follow devpi's rule (ASCII symbols other than C{-.@_}
are refused, unicode is allowed) with two additions of ours: a name may not be
empty, C{.} or C{..} (it becomes a path segment) and not longer than 200
characters.  Project names are normalised as PEP 503 says, via C{packaging}.
"""

import re

from packaging.utils import canonicalize_name

from ..errors import BadRequest

_FORBIDDEN = re.compile(r"[\x00-\x20\x7f!\"#$%&'()*+,/:;<=>?\[\\\]^`{|}~]")
_MAX_NAME = 200


def checkName(kind: str, name: str) -> str:
    """
    Return C{name} if it may name a user or an index, else raise L{BadRequest}.

    @param kind: C{"username"} or C{"indexname"}, used in the message.
    """
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{kind} must not be empty")
    if name in (".", ".."):
        raise BadRequest(f"{kind} {name!r} is not allowed")
    if len(name) > _MAX_NAME:
        raise BadRequest(f"{kind} is longer than {_MAX_NAME} characters")
    if _FORBIDDEN.search(name):
        raise BadRequest(
            f"{kind} {name!r} contains characters that aren't allowed. "
            "Any ascii symbol besides -.@_ is blocked."
        )
    return name


def normalizeProject(name: str) -> str:
    """PEP 503 normalisation: runs of C{-_.} become C{-}, lower case."""
    return str(canonicalize_name(name))


_VALID_PROJECT = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)


def isValidProjectName(name: str) -> bool:
    """Whether C{name} is a valid project name (PEP 508 / core metadata)."""
    return bool(_VALID_PROJECT.match(name))


def splitIndexName(spec: str) -> tuple[str, str]:
    """Split C{"user/index"} or raise L{BadRequest}."""
    parts = spec.split("/") if isinstance(spec, str) else []
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BadRequest(f"invalid base index spec: {spec!r}")
    return parts[0], parts[1]
