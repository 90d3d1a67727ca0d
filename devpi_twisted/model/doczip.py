"""
Documentation zips: checked once at upload, then served member by member
straight from the stored zip (nothing is unpacked to disk; the reading is
L{devpi_twisted.storage.doczip}'s, this module only decides).

A zip is refused when an entry could escape the documentation root (an
absolute name, C{..}, a drive letter, a backslash path), is a symlink or
another special file, or when the entry count or the total uncompressed size
passes the configured limits (a zip bomb).
"""

import posixpath
import stat
import zipfile
from dataclasses import dataclass
from collections.abc import Iterable
from typing import BinaryIO

from devpi_twisted.errors import BadRequest, TooLarge


@dataclass(frozen=True)
class DocLimits:
    maxEntries: int = 20000
    maxTotalSize: int = 1024 * 1024 * 1024
    maxRatio: int = 200  # uncompressed : compressed, per entry above 1 MiB


def _unsafe(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\0" in name:
        return True
    if len(name) > 1 and name[1] == ":":
        return True
    return any(part == ".." for part in name.split("/"))


def checkDocZip(fileobj: BinaryIO, limits: DocLimits) -> int:
    """
    Refuse an unsafe or oversized documentation zip.

    @return: the number of files it holds.
    @raise BadRequest: not a zip, or an entry is unsafe.
    @raise TooLarge: past the entry or size limits.
    """
    try:
        archive = zipfile.ZipFile(fileobj)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise BadRequest(f"documentation must be a zip file: {e}")
    if len(infos) > limits.maxEntries:
        raise TooLarge(f"documentation zip has {len(infos)} entries, more than the limit of {limits.maxEntries}")
    total = 0
    files = 0
    for info in infos:
        if _unsafe(info.filename):
            raise BadRequest(f"documentation zip entry {info.filename!r} points outside the documentation")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise BadRequest(f"documentation zip entry {info.filename!r} is a link or special file")
        if info.is_dir():
            continue
        files += 1
        total += info.file_size
        if total > limits.maxTotalSize:
            raise TooLarge(f"documentation unpacks to more than the limit of {limits.maxTotalSize} bytes")
        if info.file_size > 1024 * 1024 and info.file_size > limits.maxRatio * max(info.compress_size, 1):
            raise TooLarge(f"documentation zip entry {info.filename!r} is compressed suspiciously well")
    return files


def findDocMember(names: Iterable[str], path: str) -> str | None:
    """
    The name of the member a documentation URL path asks for (a directory
    gives its C{index.html}), among a zip's C{names}, or C{None}.  Pure, so
    the zip is read (off the reactor) by whoever serves it.
    """
    known = set(names)
    path = posixpath.normpath("/" + path).lstrip("/")
    # Tools zip docs either at the top or inside one directory.
    prefixes = [""]
    tops = {n.split("/", 1)[0] for n in known if "/" in n}
    if len(tops) == 1 and not any("/" not in n for n in known if not n.endswith("/")):
        prefixes.append(tops.pop() + "/")
    for prefix in prefixes:
        for candidate in (prefix + path, posixpath.join(prefix + path, "index.html")):
            candidate = candidate.lstrip("/")
            if candidate in known and not candidate.endswith("/"):
                return candidate
    return None
