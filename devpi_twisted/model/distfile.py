"""
Release file names and upload form checks; the reading of an archive's own
metadata is in L{devpi_twisted.model.archive}.

Everything here is pure: nothing touches the network or the disk.

The default checks are devpi's (section 7 of the devpi protocol notes); the
stricter PyPI rules live in L{checkStrict} and are for indexes that opt in.
"""

from __future__ import annotations

import re

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.names import normalizeVersion, projectNameProblem, versionProblem

__all__ = [
    "ARCHIVE_SUFFIXES",
    "archiveSuffix",
    "checkDigests",
    "checkFilename",
    "checkStrict",
    "fileType",
    "oneLine",
    "parseUploadMetadata",
    "presentMetadataKeys",
    "splitArchiveName",
]

# Longest first, so ".tar.bz2" wins over ".bz2".  devpi accepts all of these;
# the legacy ones (PEP 527) are only refused by checkStrict.
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz",
    ".tar.bz2",
    ".whl",
    ".tgz",
    ".zip",
    ".exe",
    ".egg",
    ".rpm",
    ".deb",
    ".dmg",
    ".msi",
    ".bz2",
)

_FILE_TYPES = {
    ".whl": "bdist_wheel",
    ".tar.gz": "sdist",
    ".tgz": "sdist",
    ".tar.bz2": "sdist",
    ".zip": "sdist",
    ".bz2": "sdist",
    ".egg": "bdist_egg",
    ".exe": "bdist_wininst",
    ".msi": "bdist_msi",
    ".rpm": "bdist_rpm",
    ".dmg": "bdist_dmg",
    ".deb": "bdist_deb",
}

# One path segment on every common file system (an export writes it as one).
MAX_FILENAME = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION_ESCAPE = re.compile(r"[^\w\d.]+")


def splitArchiveName(filename: str) -> tuple[str, str] | None:
    """
    Split C{filename} into stem and archive suffix (as spelt in the name).

    @return: C{None} if the name has no known archive suffix or nothing
        before it.
    """
    lowered = filename.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], filename[-len(suffix):]
    return None


def oneLine(error: BaseException) -> str:
    """An exception's text fit for a reason phrase."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def archiveSuffix(filename: str) -> str:
    """The lower-cased archive suffix, or L{BadRequest}."""
    split = splitArchiveName(filename)
    if split is None:
        raise BadRequest(f"{filename!r} is not a valid archive name")
    return split[1].lower()


def checkFilename(filename: str, name: str | None, version: str | None) -> None:
    """
    Check that an uploaded file's name is safe and names C{name}'s release
    C{version}, as the packaging specifications define file names.

    Wheels are parsed with C{packaging}; other archives must be
    C{<name>-<version><suffix>}, where the name part normalises (PEP 503) to
    the project's and, for sdists, the version part is the release's version
    (as given, escaped with C{_} or in its PEP 440 normal form, compared
    normalised); legacy built archives (eggs, installers) may go on after
    the version with C{-} or a C{.} that does not begin another version
    part (C{demo-1.0-py3.9.egg}, C{demo-1.0.win32.exe}).  Versions are the
    same when their normal forms are (L{normalizeVersion}), so C{1} does
    not name a file of C{1.0}.

    The order is devpi's, so a name that breaks several rules gets the same
    message as from devpi: version, archive type, project name; then the
    exact match of name and version.

    @raise BadRequest: the name is unsafe or does not fit C{name}/C{version}.
    """
    if not filename:
        raise BadRequest("filename must not be empty")
    if "/" in filename or "\\" in filename or _CONTROL.search(filename):
        raise BadRequest(f"{filename!r} is not a plain file name")
    if filename.startswith("."):
        raise BadRequest(f"{filename!r} must not start with '.'")
    if len(filename.encode("utf-8")) > MAX_FILENAME:
        raise BadRequest(f"filename is longer than {MAX_FILENAME} bytes")
    spellings = _versionSpellings(version) if version is not None else set()
    if version is not None and not any(s in filename for s in spellings):
        raise BadRequest(f"filename {filename!r} does not contain version {version!r}")
    split = splitArchiveName(filename)
    if split is None:
        raise BadRequest(f"{filename!r} is not a valid archive name")
    stem, suffix = split
    suffix = suffix.lower()
    if suffix == ".whl":
        _checkWheelFilename(filename, name, version)
        return
    if name is None:
        return
    project = canonicalize_name(name)
    rests = [stem[i + 1:] for i, c in enumerate(stem) if c == "-" and canonicalize_name(stem[:i]) == project]
    if not rests:
        raise BadRequest(f"filename {filename!r} does not match project name {name!r}")
    if version is None:
        return
    exact = _FILE_TYPES[suffix] == "sdist"
    if not any(_namesVersion(rest, version, spellings, exact) for rest in rests):
        raise BadRequest(
            f"filename {filename!r} does not match version {version!r}: it names another version")


def _checkWheelFilename(filename: str, name: str | None, version: str | None) -> None:
    try:
        wheelName, wheelVersion, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename as e:
        raise BadRequest(f"invalid wheel filename {filename!r}: {oneLine(e)}") from None
    if name is not None and wheelName != canonicalize_name(name):
        raise BadRequest(f"filename {filename!r} does not match project name {name!r}")
    if version is not None and str(wheelVersion) != normalizeVersion(version):
        raise BadRequest(
            f"wheel version {str(wheelVersion)!r} in {filename!r} does not match version {version!r}")


def _versionSpellings(version: str) -> set[str]:
    """How a file name may spell C{version}: as given, escaped, normalised."""
    spellings = {version, _VERSION_ESCAPE.sub("_", version)}
    normal = normalizeVersion(version)
    if normal is not None:
        spellings |= {normal, _VERSION_ESCAPE.sub("_", normal)}
    return spellings


def _namesVersion(rest: str, version: str, spellings: set[str], exact: bool) -> bool:
    """
    Whether C{rest}, what follows C{<name>-} in a file name's stem, is
    C{version}; unless C{exact}, C{rest} may go on after it with C{-}, or
    with C{.} and no digit (C{1.0.win32}, but not C{1} in C{1.0}).
    """
    if rest in spellings:
        return True
    normal = normalizeVersion(version)
    if exact:
        return normal is not None and normalizeVersion(rest) == normal
    for spelling in spellings:
        after = rest[len(spelling):] if rest.startswith(spelling) else None
        if after and (after[0] == "-" or (after[0] == "." and not after[1:2].isdigit())):
            return True
    return False


def fileType(filename: str) -> str:
    """
    The distutils-style file type of C{filename}, as PyPI's C{filetype}.

    @raise BadRequest: not an archive name devpi accepts.
    """
    return _FILE_TYPES[archiveSuffix(filename)]


_DIGESTS = (
    ("md5_digest", "md5", 32),
    ("sha256_digest", "sha256", 64),
    ("blake2_256_digest", "blake2b_256", 64),
)
_HEX = re.compile(r"[0-9a-fA-F]+")


def checkDigests(form: dict[str, str], computed: dict[str, str]) -> None:
    """
    Compare the digests a client sent with those of the bytes we received.

    @param form: the upload form's single values.
    @param computed: hex digests under C{"md5"}, C{"sha256"}, C{"blake2b_256"}.
    @raise BadRequest: a digest is malformed or does not match.
    """
    supplied: list[tuple[str, str]] = []
    for formKey, computedKey, length in _DIGESTS:
        value = (form.get(formKey) or "").strip()
        if not value:
            continue
        if len(value) != length or not _HEX.fullmatch(value):
            raise BadRequest(f"{formKey} is not a valid hex digest of {length} characters")
        supplied.append((value.lower(), computedKey))
    for value, computedKey in supplied:
        if value != computed[computedKey].lower():
            raise BadRequest(
                "The digest supplied does not match a digest calculated from the uploaded file.")


def checkStrict(filename: str, name: str, version: str) -> None:
    """
    PyPI's stricter rules, for indexes that turn them on.

    Only C{.whl} and C{.tar.gz} (PEP 527 / PEP 715), no local versions, and
    sdists named exactly as PEP 625 says.

    @raise BadRequest: naming the rule that is broken.
    """
    lowered = filename.lower()
    if not (lowered.endswith(".whl") or lowered.endswith(".tar.gz")):
        raise BadRequest(
            f"invalid file extension of {filename!r}: only .whl and .tar.gz "
            "are allowed on this index (PEP 527, PEP 715)")
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise BadRequest(f"version {version!r} is not a valid PEP 440 version") from None
    if parsed.local is not None:
        raise BadRequest(f"local version {version!r} is not allowed on this index")
    if lowered.endswith(".tar.gz"):
        expected = f"{canonicalize_name(name).replace('-', '_')}-{parsed}.tar.gz"
        if filename != expected:
            raise BadRequest(
                f"sdist filename {filename!r} is not normalised, it must be {expected!r} (PEP 625)")


_SINGLE_KEYS = (
    "name", "version", "metadata_version", "summary", "home_page", "author",
    "author_email", "maintainer", "maintainer_email", "license",
    "license_expression", "description", "keywords", "download_url",
    "comment", "requires_python", "description_content_type",
)
_LIST_KEYS = (
    "platform", "classifiers", "supported_platform", "provides", "requires",
    "obsoletes", "project_urls", "provides_dist", "obsoletes_dist",
    "requires_dist", "requires_external", "provides_extras", "dynamic",
    "license_file",
)
# Form spellings that go under another key; these optional keys only appear
# in the result when the form has values for them.
_LIST_ALIASES = {
    "provides_extra": "provides_extras",
    "import_name": "import_names",
    "import_names": "import_names",
    "import_namespace": "import_namespaces",
    "import_namespaces": "import_namespaces",
}
_OPTIONAL_LIST_KEYS = ("import_names", "import_namespaces")


def presentMetadataKeys(fields: dict[str, list[str]]) -> set[str]:
    """
    The metadata keys the form actually carries (aliases resolved).

    devpi lets an upload to a registered version overwrite only these.
    """
    known = set(_SINGLE_KEYS) | set(_LIST_KEYS)
    present = {key for key in fields if key in known}
    present |= {_LIST_ALIASES[key] for key in fields if key in _LIST_ALIASES}
    return present


def parseUploadMetadata(fields: dict[str, list[str]]) -> dict[str, object]:
    """
    Build devpi's metadata dict from an upload form's fields.

    Single keys take the last value sent (as devpi's WebOb does), missing
    ones become C{""}; list keys keep every value.  C{UNKNOWN} (old
    distutils) counts as empty and empty values are dropped from lists.
    Unknown fields are ignored.

    @raise BadRequest: bad protocol version, NUL bytes, or an invalid
        name (not ASCII PEP 508) or version (not PEP 440, see
        L{devpi_twisted.model.names.versionProblem}).
    """
    for key, values in fields.items():
        for value in values:
            if "\x00" in value:
                raise BadRequest(f"form field {key!r} contains a NUL byte")
    protocol = [v for v in fields.get("protocol_version", []) if v.strip()]
    if protocol and protocol[-1].strip() != "1":
        raise BadRequest("Unknown protocol version")

    def clean(value: str) -> str:
        return "" if value == "UNKNOWN" else value

    metadata: dict[str, object] = {}
    for key in _SINGLE_KEYS:
        values = fields.get(key)
        metadata[key] = clean(values[-1]) if values else ""
    lists: dict[str, list[str]] = {key: [] for key in _LIST_KEYS + _OPTIONAL_LIST_KEYS}
    for formKey, values in fields.items():
        target = _LIST_ALIASES.get(formKey, formKey)
        if target in lists:
            lists[target].extend(v for v in map(clean, values) if v)
    for key in _LIST_KEYS:
        metadata[key] = lists[key]
    for key in _OPTIONAL_LIST_KEYS:
        if lists[key]:
            metadata[key] = lists[key]

    name = metadata["name"]
    version = metadata["version"]
    assert isinstance(name, str) and isinstance(version, str)
    if not name:
        raise BadRequest("invalid metadata: name is required")
    problem = projectNameProblem(name, "name") or versionProblem(version)
    if problem is not None:
        raise BadRequest(f"invalid metadata: {problem}")
    return metadata
