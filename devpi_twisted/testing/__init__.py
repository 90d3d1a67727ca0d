"""Test doubles shipped with the package: in-memory storage and its contract tests."""

from devpi_twisted.testing.memory import MemoryBlobStore, MemoryStorage

__all__ = ["MemoryBlobStore", "MemoryStorage"]
