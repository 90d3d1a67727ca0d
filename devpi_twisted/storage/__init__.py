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


@dataclass(frozen=True)
class BlobInfo:
    """A blob made durable under its content address."""

    sha256: str
    size: int


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
