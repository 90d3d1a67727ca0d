"""Timestamps in the forms devpi's JSON uses."""

import time


def isoNow(seconds: float | None = None) -> str:
    """ISO 8601 UTC with a C{Z}, to the second, as devpi writes C{created}."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds))
