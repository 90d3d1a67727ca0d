"""
Which indexes restrict reading (C{acl_read}), kept in memory for the read
gate (L{devpi_twisted.web.readgate}) and the listings, current through
C{storage.subscribe}, so deciding for a public index costs no storage read.
"""

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from devpi_twisted.interfaces import IReadView, IStorage
from devpi_twisted.model import keys
from devpi_twisted.model.acl import isPublic
from devpi_twisted.storage import ChangeRecord

log = Logger()


class ReadRules:
    """
    The C{acl_read} of every restricted index, by C{(user, index)}, kept
    current from storage's change notifications.  Public indexes (most)
    are not in it at all.
    """

    def __init__(self, storage: IStorage) -> None:
        self._storage = storage
        self.restricted: dict[tuple[str, str], dict[str, Any]] = {}
        self.loaded = False
        self._waiting: list[Deferred[None]] = []
        self._pending: list[ChangeRecord] | None = None
        storage.subscribe(self._changed)
        self.load().addErrback(lambda f: log.failure("loading the indexes' read ACLs (retried on use)", f))

    def load(self) -> "Deferred[None]":
        """
        Read every index's C{acl_read} (once; callers meanwhile wait for the
        same read).  Changes told during the read are applied after it.
        """
        if self.loaded:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        if self._pending is None:
            self._pending = []
            Deferred.fromCoroutine(self._load())
        return waiting

    async def _load(self) -> None:
        try:
            found = await self._storage.read(_restrictedIndexes)
        except Exception:
            failure = Failure()
            waiting, self._waiting, self._pending = self._waiting, [], None
            for d in waiting:
                d.errback(failure)
            return
        self.restricted = found
        pending, self._pending = self._pending or [], None
        for record in pending:
            self._apply(record)
        self.loaded = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _changed(self, record: ChangeRecord) -> None:
        if self._pending is not None:
            self._pending.append(record)
        self._apply(record)

    def _apply(self, record: ChangeRecord) -> None:
        for key, value in record.changes.items():
            if not key.startswith(keys.INDEX):
                continue
            user, _, index = key[len(keys.INDEX):].partition("/")
            if not index or "/" in index:
                continue
            if value is None or isPublic(value):
                self.restricted.pop((user, index), None)
            else:
                self.restricted[(user, index)] = {"acl_read": list(value.get("acl_read", ()))}

    def isRestricted(self, user: str, index: str) -> bool:
        """Whether C{user/index} has an C{acl_read} that leaves some out (only once loaded)."""
        return (user, index) in self.restricted


def _restrictedIndexes(view: IReadView) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for key, config in view.items(keys.INDEX):
        user, _, index = key[len(keys.INDEX):].partition("/")
        if index and "/" not in index and config is not None and not isPublic(config):
            found[(user, index)] = {"acl_read": list(config.get("acl_read", ()))}
    return found
