"""Timestamps in the forms devpi's JSON uses."""

import calendar
import time


def isoNow(seconds: float | None = None) -> str:
    """ISO 8601 UTC with a C{Z}, to the second, as devpi writes C{created}."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds))


def parseIsoSeconds(text: str) -> int | None:
    """Unix time of C{YYYY-MM-DDTHH:MM:SS} (UTC), to the second; C{None} if it is not one."""
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
