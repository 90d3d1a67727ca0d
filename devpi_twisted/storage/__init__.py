"""
The storage service: metadata with a serial and changelog, and a blob store.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChangeRecord:
    """One committed change: what each key became (C{None}: deleted)."""

    serial: int
    time: float
    changes: dict[str, Any] = field(default_factory=dict)


class SerialMismatch(Exception):
    """A change record is not the next one for the store it is applied to."""


class HistoryPruned(Exception):
    """
    A read as of a serial, or the changes after one, asked for history the
    store no longer keeps (L{devpi_twisted.interfaces.IStorage.pruneHistory});
    C{oldest} is the oldest serial it still answers for.
    """

    def __init__(self, serial: int, oldest: int) -> None:
        super().__init__(f"the history before serial {oldest} is pruned (asked for serial {serial})")
        self.serial = serial
        self.oldest = oldest


@dataclass(frozen=True)
class BlobInfo:
    """A written blob: its content address, size and any extra digests."""

    sha256: str
    size: int
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectResult:
    """What one pass of the blob collector did (L{IBlobStore.collect})."""

    retired: int = 0
    restored: int = 0
    deleted: int = 0


def newHashes(extraHashes: tuple[str, ...]) -> dict[str, Any]:
    """Hash objects for sha256 plus the extra names (md5, blake2b_256)."""
    import hashlib

    makers = {
        "sha256": hashlib.sha256,
        "md5": lambda: hashlib.md5(usedforsecurity=False),
        "blake2b_256": lambda: hashlib.blake2b(digest_size=32),
    }
    names = ("sha256", *[n for n in extraHashes if n != "sha256"])
    return {name: makers[name]() for name in names}


BLOB_REF = "+blob"
"""A value that is a dict with this key refers to the blob of that sha256."""


def blobRef(value: Any) -> str | None:
    """The sha256 a stored value refers to, if any."""
    if isinstance(value, dict):
        ref = value.get(BLOB_REF)
        if isinstance(ref, str):
            return ref
    return None


def prefixUpperBound(prefix: str) -> str:
    """The smallest string greater than every string starting with C{prefix}."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
