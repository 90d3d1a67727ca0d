# -*- test-case-name: tests.test_retention -*-
"""
Retention policies of private indexes: which versions a policy selects for
removal, and by which rules.  Pure: the caller reads the facts (versions,
upload times, downloads) and removes what is selected.

A policy is up to four rules, each an index setting, each unset by default:
  - C{retention_keep_latest} N: the version is not among the N newest of
    its project (yanked versions rank after every other, so they go first);
  - C{retention_max_age_days} D: the version is older than D days;
  - C{retention_prerelease_max_age_days} D: the version is a pre- or dev
    release (PEP 440) older than D days;
  - C{retention_not_downloaded_days} D: none of the version's files was
    downloaded for D days (a file never downloaded counts from its upload).

A version is selected only when every rule that is set allows it, and the
newest version of a project (the newest not yanked, if any is not) never
is, so a policy cannot empty a project.  A version's age counts from the
newest upload of its release files (a re-upload makes it young again); a
version without files has no age, so age and download rules keep it.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.timeutil import parseIsoSeconds

KEEP_LATEST = "retention_keep_latest"
MAX_AGE = "retention_max_age_days"
PRERELEASE_MAX_AGE = "retention_prerelease_max_age_days"
NOT_DOWNLOADED = "retention_not_downloaded_days"
#: The index settings of a policy, in the order rules are reported.
SETTINGS = (KEEP_LATEST, MAX_AGE, PRERELEASE_MAX_AGE, NOT_DOWNLOADED)
DAY = 86400.0


def coerceSetting(key: str, value: Any) -> int:
    """
    A retention setting as stored: a non-negative integer (devpi-client sends
    strings).  @raise BadRequest: anything else.
    """
    if isinstance(value, bool):
        raise BadRequest(f"{key!r} must be a non-negative integer, got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise BadRequest(f"{key!r} must be a non-negative integer, got {value!r}")
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise BadRequest(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Policy:
    """The rules that are set (C{None}: unset)."""

    keepLatest: int | None = None
    maxAgeDays: int | None = None
    prereleaseMaxAgeDays: int | None = None
    notDownloadedDays: int | None = None

    @property
    def isSet(self) -> bool:
        return any(v is not None for v in (self.keepLatest, self.maxAgeDays, self.prereleaseMaxAgeDays,
                                          self.notDownloadedDays))

    @property
    def rules(self) -> list[str]:
        """The settings of the rules that are set."""
        values = (self.keepLatest, self.maxAgeDays, self.prereleaseMaxAgeDays, self.notDownloadedDays)
        return [name for name, value in zip(SETTINGS, values) if value is not None]


def policyOf(config: Mapping[str, Any]) -> Policy:
    """The policy an index configuration sets (mirrors have none)."""
    if config.get("type", "stage") != "stage":
        return Policy()
    return Policy(*(config.get(name) for name in SETTINGS))


@dataclass(frozen=True)
class VersionFacts:
    """
    What the rules look at of one version.

    @ivar uploaded: the newest upload time of its release files (unix
        time), C{None} when it has none.
    @ivar lastUse: per file, when it was last downloaded, or uploaded when
        never downloaded; empty when it has no files.
    @ivar yanked: it has release files and all of them are yanked.
    """

    version: str
    uploaded: float | None
    lastUse: tuple[float, ...] = ()
    yanked: bool = False


def parseUploadTime(text: Any) -> float | None:
    """Unix time of a PEP 700 C{upload-time} (C{2024-01-02T03:04:05.678901Z}); C{None} if unreadable."""
    if not isinstance(text, str) or len(text) < 19:
        return None
    seconds = parseIsoSeconds(text[:19])
    if seconds is None:
        return None
    fraction = text[19:].rstrip("Z")
    if fraction.startswith(".") and fraction[1:].isdigit():
        return seconds + float(fraction)
    return float(seconds)


def versionOrder(version: str) -> tuple[int, Any]:
    """A sort key: PEP 440 order, versions that are not PEP 440 lowest."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)


def isPrerelease(version: str) -> bool:
    """A pre- or dev release (PEP 440); a version that is not PEP 440 is not."""
    try:
        return Version(version).is_prerelease
    except InvalidVersion:
        return False


def ranking(versions: Iterable[VersionFacts]) -> list[VersionFacts]:
    """Newest first, every yanked version after every other."""
    return sorted(versions, key=lambda v: (not v.yanked, versionOrder(v.version)), reverse=True)


def _older(timestamp: float | None, days: int, now: float) -> bool:
    return timestamp is not None and now - timestamp > days * DAY


def select(policy: Policy, versions: Iterable[VersionFacts], now: float) -> list[tuple[VersionFacts, list[str]]]:
    """
    The versions of one project the policy removes, newest first, each with
    the rules that allowed it (every rule that is set).
    """
    if not policy.isSet:
        return []
    ranked = ranking(versions)
    selected = []
    for rank, facts in enumerate(ranked):
        if rank == 0:
            continue  # the newest version stays, whatever the rules say
        if policy.keepLatest is not None and rank < policy.keepLatest:
            continue
        if policy.maxAgeDays is not None and not _older(facts.uploaded, policy.maxAgeDays, now):
            continue
        if policy.prereleaseMaxAgeDays is not None and not (
                isPrerelease(facts.version) and _older(facts.uploaded, policy.prereleaseMaxAgeDays, now)):
            continue
        if policy.notDownloadedDays is not None and not (
                facts.lastUse and all(_older(t, policy.notDownloadedDays, now) for t in facts.lastUse)):
            continue
        selected.append((facts, policy.rules))
    return selected
