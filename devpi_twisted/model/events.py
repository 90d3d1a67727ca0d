"""
Events: what happened in one committed change, derived from its changelog
record.

A L{devpi_twisted.storage.ChangeRecord} says what each key became; what it
was before (read at the previous serial) tells a creation from a change, an
upload from a yank.  Nothing here does I/O: L{keysToCompare} names the
earlier values needed and L{deriveEvents} turns the record and those values
into L{Event}s, so subscribers and webhooks see the same events on every
node and after every restart.
"""

from dataclasses import dataclass, field
from typing import Any, Mapping

from devpi_twisted.model.timeutil import isoNow

USER_CREATED = "user.created"
USER_CHANGED = "user.changed"
USER_DELETED = "user.deleted"
INDEX_CREATED = "index.created"
INDEX_CHANGED = "index.changed"
INDEX_DELETED = "index.deleted"
FILE_UPLOADED = "file.uploaded"
FILE_REMOVED = "file.removed"
FILE_YANKED = "file.yanked"
FILE_UNYANKED = "file.unyanked"
DOC_UPLOADED = "doc.uploaded"
TOXRESULT_ATTACHED = "toxresult.attached"
MIRROR_FILE_CACHED = "mirror.file_cached"

EVENT_NAMES = (
    USER_CREATED, USER_CHANGED, USER_DELETED,
    INDEX_CREATED, INDEX_CHANGED, INDEX_DELETED,
    FILE_UPLOADED, FILE_REMOVED, FILE_YANKED, FILE_UNYANKED,
    DOC_UPLOADED, TOXRESULT_ATTACHED, MIRROR_FILE_CACHED,
)

#: The kinds of keys events are derived from (see L{devpi_twisted.model.keys}).
_KINDS = ("user/", "index/", "file/")

#: What a new file entry of each C{rel} is (a mirror's entries have none).
_ADDED = {"releasefile": FILE_UPLOADED, "doczip": DOC_UPLOADED, "toxresult": TOXRESULT_ATTACHED}


@dataclass(frozen=True)
class Event:
    """
    One thing that happened, at C{serial}; C{ordinal} numbers the events of
    one serial, so C{(serial, ordinal)} names an event for good.
    """

    name: str
    serial: int
    ordinal: int
    time: float
    user: str | None = None  # the user the event is about, or the index's owner
    index: str | None = None  # the index name (without its user)
    project: str | None = None
    version: str | None = None
    filename: str | None = None
    path: str | None = None  # the file's stable path below the server root
    sha256: str | None = None
    by: str | None = None  # who did it, when the record tells
    extra: dict[str, Any] = field(default_factory=dict)

    def toJSON(self, baseURL: str = "") -> dict[str, Any]:
        """The event as webhooks send it; C{url} is the file's, below C{baseURL}."""
        return {
            "event": self.name,
            "serial": self.serial,
            "time": isoNow(self.time),
            "user": self.user,
            "index": self.index,
            "project": self.project,
            "version": self.version,
            "filename": self.filename,
            "url": f"{baseURL}/{self.path}" if self.path else None,
            "sha256": self.sha256,
            "by": self.by,
            **self.extra,
        }


def keysToCompare(changes: Mapping[str, Any]) -> list[str]:
    """The keys of a record whose earlier value L{deriveEvents} needs."""
    return sorted(key for key in changes if key.startswith(_KINDS))


def _who(entry: Mapping[str, Any]) -> str | None:
    log = entry.get("log") or []
    last = log[-1] if log and isinstance(log[-1], dict) else {}
    who = last.get("who")
    return who if isinstance(who, str) else None


def _fileEvent(name: str, user: str, index: str, entry: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return dict(
        name=name, user=user, index=index, project=entry.get("project"),
        version=entry.get("version") or None, filename=entry.get("filename"),
        path=entry.get("relpath"), sha256=entry.get("sha256"), by=_who(entry), extra=extra,
    )


def _fileEvents(user: str, index: str, new: Any, old: Any) -> list[dict[str, Any]]:
    entry = new if new is not None else old
    if not isinstance(entry, dict):
        return []
    rel = entry.get("rel")
    if new is None:
        return [_fileEvent(FILE_REMOVED, user, index, old, rel=rel or "mirrorfile")]
    added = _ADDED.get(rel) if rel is not None else MIRROR_FILE_CACHED
    if added is None:
        return []
    if old is None or old.get("sha256") != new.get("sha256"):
        return [_fileEvent(added, user, index, new)]
    was, now = old.get("yanked", False), new.get("yanked", False)
    if rel == "releasefile" and bool(was) != bool(now):
        reason = now if isinstance(now, str) else None
        return [_fileEvent(FILE_YANKED if now else FILE_UNYANKED, user, index, new, reason=reason)]
    return []


def _created(new: Any, old: Any, created: str, changed: str, deleted: str) -> str | None:
    if new is None:
        return deleted if old is not None else None
    if old is None:
        return created
    return changed if new != old else None


def deriveEvents(serial: int, when: float, changes: Mapping[str, Any],
                 before: Mapping[str, Any]) -> list["Event"]:
    """
    The events of the change C{serial}: C{changes} is what each key became
    (C{None}: deleted), C{before} what the keys of L{keysToCompare} were.

    The files of an index (or user) deleted in the same change give no
    C{file.removed} events: the deletion of the index says it all.
    """
    deletedIndexes = {key[len("index/"):] for key, value in changes.items()
                      if key.startswith("index/") and value is None}
    deletedUsers = {key[len("user/"):] for key, value in changes.items()
                    if key.startswith("user/") and value is None}
    found: list[dict[str, Any]] = []
    for key in keysToCompare(changes):
        new, old = changes[key], before.get(key)
        kind, _, rest = key.partition("/")
        if kind == "user":
            name = _created(new, old, USER_CREATED, USER_CHANGED, USER_DELETED)
            if name is not None:
                found.append(dict(name=name, user=rest))
        elif kind == "index":
            user, _, index = rest.partition("/")
            name = _created(new, old, INDEX_CREATED, INDEX_CHANGED, INDEX_DELETED)
            if name is not None:
                found.append(dict(name=name, user=user, index=index))
        else:
            parts = rest.split("/")
            if len(parts) < 4:
                continue
            user, index = parts[0], parts[1]
            if f"{user}/{index}" in deletedIndexes or user in deletedUsers:
                continue
            found.extend(_fileEvents(user, index, new, old))
    return [Event(serial=serial, ordinal=n, time=when, **fields) for n, fields in enumerate(found)]
