"""
Names of users, indexes and projects.

User and index names follow devpi's rule (ASCII symbols other than C{-.@_}
are refused, unicode is allowed) with two additions of ours: a name may not be
empty, C{.} or C{..} (it becomes a path segment) and not longer than 200
characters.

Project names and versions have one rule each, here, used by uploads, the
routes, mirrors' project lists and export/import: a project name is ASCII
as PEP 508 says (so look-alikes such as C{\u017fix} or C{\u212aombu}, which
Python's case-insensitive matching would let through, are refused), and a
version is a PEP 440 version written without spaces and at most
L{MAX_VERSION} characters long.  Names are normalised as PEP 503 says and
versions compared in their PEP 440 normal form, via C{packaging}.
"""

import re

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import BadRequest

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


# Explicit ASCII classes: with re.IGNORECASE alone, [A-Z] also matches
# U+017F (long s), U+0131 (dotless i), U+0130 and U+212A (Kelvin sign).
_VALID_PROJECT = re.compile(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]", re.ASCII)

MAX_VERSION = 128
"""The longest version accepted; PEP 440 sets none, file names and paths do."""


def isValidProjectName(name: str) -> bool:
    """Whether C{name} is a valid project name (PEP 508 / core metadata): ASCII only."""
    return isinstance(name, str) and _VALID_PROJECT.fullmatch(name) is not None


def projectNameProblem(name: str, what: str = "project name") -> str | None:
    """Why C{name} is not a valid project name, or C{None} if it is."""
    if isValidProjectName(name):
        return None
    return (f"{what} {name!r} is not a valid project name: use ASCII letters, digits, "
            "'.', '-' and '_', starting and ending with a letter or digit (PEP 508)")


def checkProjectName(name: str) -> str:
    """Return C{name} if L{isValidProjectName}, else raise L{BadRequest} saying why."""
    problem = projectNameProblem(name)
    if problem is not None:
        raise BadRequest(problem)
    return name


def versionProblem(version: str) -> str | None:
    """
    Why C{version} is not acceptable for a release, or C{None} if it is.

    C{packaging} ignores surrounding white space, so that is refused first:
    the version is stored and used in paths exactly as given.
    """
    if not isinstance(version, str) or not version:
        return "version is required"
    if len(version) > MAX_VERSION:
        return f"version is longer than {MAX_VERSION} characters"
    if not version.isascii() or not version.isprintable() or any(c.isspace() for c in version):
        return f"version {version!r} contains white space, control or non-ASCII characters"
    try:
        Version(version)
    except InvalidVersion:
        return f"version {version!r} is not a valid PEP 440 version"
    return None


def checkVersion(version: str) -> str:
    """Return C{version} if it is acceptable for a release, else raise L{BadRequest}."""
    problem = versionProblem(version)
    if problem is not None:
        raise BadRequest(problem)
    return version


def normalizeVersion(version: str) -> str | None:
    """
    The PEP 440 normal form of C{version} (C{"1.0-alpha1"} is C{"1.0a1"}),
    or C{None} if it is not PEP 440.  Two versions name the same release
    when these are equal; C{1} and C{1.0} do not, although they compare
    equal as PEP 440 versions, because file names and URLs spell them apart.
    """
    try:
        return str(Version(version))
    except InvalidVersion:
        return None


def splitIndexName(spec: str) -> tuple[str, str]:
    """Split C{"user/index"} or raise L{BadRequest}."""
    parts = spec.split("/") if isinstance(spec, str) else []
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BadRequest(f"invalid base index spec: {spec!r}")
    return parts[0], parts[1]
