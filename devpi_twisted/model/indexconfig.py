"""
Index configurations: defaults, coercion of client values, and PATCH edits.

devpi-client sends values as strings (C{"volatile": "True"},
C{"bases": "a/b,c/d"}) and edits as C{"key+=value"} lists; this module turns
all of that into one canonical dict, or a L{BadRequest} naming every problem.
"""

from typing import Any
from urllib.parse import urlsplit

from devpi_twisted.errors import BadRequest
from devpi_twisted.model.names import normalizeProject, splitIndexName
from devpi_twisted.model.retention import SETTINGS as RETENTION_KEYS, coerceSetting

STAGE = "stage"
MIRROR = "mirror"
INDEX_TYPES = (STAGE, MIRROR)

ANONYMOUS = ":ANONYMOUS:"
AUTHENTICATED = ":AUTHENTICATED:"

_COMMON_KEYS = {"type", "volatile", "title", "description", "custom_data", "acl_read"}
_STAGE_KEYS = _COMMON_KEYS | {
    "bases",
    "acl_upload",
    "acl_toxresult_upload",
    "mirror_whitelist",
    "mirror_whitelist_inheritance",
    "pypi_strict",
    *RETENTION_KEYS,
}
_MIRROR_KEYS = _COMMON_KEYS | {
    "mirror_url",
    "mirror_cache_expiry",
    "mirror_no_project_list",
    "mirror_use_external_urls",
    "mirror_ignore_serial_header",
    "mirror_web_url_fmt",
    "mirror_provides_core_metadata",
    "mirror_cache_max_size",
}
_BOOL_KEYS = {
    "volatile",
    "pypi_strict",
    "mirror_no_project_list",
    "mirror_use_external_urls",
    "mirror_ignore_serial_header",
    "mirror_provides_core_metadata",
}
_LIST_KEYS = {"bases", "acl_upload", "acl_toxresult_upload", "acl_read", "mirror_whitelist"}
_FREE_KEYS = {"title", "description", "custom_data", "mirror_web_url_fmt"}


def allowedKeys(indexType: str) -> set[str]:
    """The configuration keys an index of this type knows."""
    return _MIRROR_KEYS if indexType == MIRROR else _STAGE_KEYS


def defaults(indexType: str, owner: str, mirrorCacheExpiry: int) -> dict[str, Any]:
    """The configuration of a new index before the client's values apply."""
    if indexType == MIRROR:
        return {
            "type": MIRROR,
            "volatile": True,
            "mirror_cache_expiry": mirrorCacheExpiry,
        }
    return {
        "type": STAGE,
        "volatile": True,
        "bases": [],
        "acl_upload": [owner],
        "acl_toxresult_upload": [ANONYMOUS],
        "mirror_whitelist": [],
        "mirror_whitelist_inheritance": "intersection",
    }


def parseBool(value: Any) -> bool:
    """JSON booleans, or true/false/yes/no/1/0 in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off", ""):
            return False
    raise BadRequest(f"Unknown boolean value {value!r}.")


def parseList(value: Any) -> list[str]:
    """A JSON list or a comma-separated string; empty parts are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise BadRequest(f"expected a list or a comma-separated string, got {value!r}")
    result = []
    for item in items:
        if not isinstance(item, str):
            raise BadRequest(f"list items must be strings, got {item!r}")
        item = item.strip()
        if item and item not in result:
            result.append(item)
    return result


def _principal(name: str) -> str:
    upper = name.upper()
    if upper in (ANONYMOUS, AUTHENTICATED):
        return upper
    return name


def _checkMirrorURL(url: Any) -> str:
    if not isinstance(url, str):
        raise BadRequest("'mirror_url' option must be a URL.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("'mirror_url' option must be a URL.")
    return url


def mirrorBaseURL(config: dict[str, Any]) -> str:
    """
    The URL of a mirror's project list, which its project pages are below.

    C{mirror_url} is kept as the user gave it (devpi shows it so); upstream
    is asked with a trailing slash either way, as devpi does.
    """
    url = config["mirror_url"]
    return url if url.endswith("/") else url + "/"


def coerce(config: dict[str, Any], *, dropForeign: bool) -> dict[str, Any]:
    """
    Check and normalise every value of C{config}, which has C{type} set.

    @param dropForeign: drop keys of the other index type silently (devpi
        does so for stage keys given to a mirror) instead of refusing them.
    @raise BadRequest: with all problems joined by C{", "}.
    """
    indexType = config.get("type")
    if indexType not in INDEX_TYPES:
        raise BadRequest(f"unknown index type {indexType!r}")
    allowed = allowedKeys(indexType)
    known = _STAGE_KEYS | _MIRROR_KEYS
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        args = ", ".join(f"{k}={config[k]}" for k in unknown)
        raise BadRequest(f"indexconfig got unexpected keyword arguments: {args}")
    problems: list[str] = []
    result: dict[str, Any] = {}
    for key, value in config.items():
        if key not in allowed:
            if dropForeign:
                continue
            problems.append(f"{key!r} does not apply to an index of type {indexType!r}")
            continue
        try:
            result[key] = _coerceValue(key, value)
        except BadRequest as e:
            problems.append(e.message)
            continue
        if key == "mirror_cache_max_size" and result[key] is None:
            del result[key]  # unset: no limit
    if problems:
        raise BadRequest(", ".join(problems))
    return result


def _coerceValue(key: str, value: Any) -> Any:
    if key == "type" or key in _FREE_KEYS:
        return value
    if key in _BOOL_KEYS:
        return parseBool(value)
    if key in _LIST_KEYS:
        items = parseList(value)
        if key == "bases":
            for item in items:
                splitIndexName(item)
        elif key == "mirror_whitelist":
            items = [i if i == "*" else normalizeProject(i) for i in items]
        else:
            items = [_principal(i) for i in items]
        return _dedupe(items)
    if key == "mirror_whitelist_inheritance":
        if not isinstance(value, str) or value.lower() not in ("intersection", "union"):
            raise BadRequest("'mirror_whitelist_inheritance' must be 'intersection' or 'union'")
        return value.lower()
    if key in RETENTION_KEYS:
        return coerceSetting(key, value)
    if key == "mirror_url":
        return _checkMirrorURL(value)
    if key == "mirror_cache_expiry":
        try:
            seconds = int(value)
        except (TypeError, ValueError):
            raise BadRequest(f"'mirror_cache_expiry' must be a number of seconds, got {value!r}")
        if seconds < 0:
            raise BadRequest("'mirror_cache_expiry' must not be negative")
        return seconds
    if key == "mirror_cache_max_size":
        return _cacheSize(value)
    raise AssertionError(key)  # pragma: no cover


def _cacheSize(value: Any) -> int | None:
    """Bytes a mirror may cache; C{None} (also C{""} from devpi-client's C{key=}): no limit."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        value = "not a number"
    try:
        size = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise BadRequest(f"'mirror_cache_max_size' must be a number of bytes, got {value!r}")
    if size <= 0:
        raise BadRequest("'mirror_cache_max_size' must be a positive number of bytes (leave it unset for no limit)")
    return size


def _dedupe(items: list[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def applyEdits(current: dict[str, Any], edits: list[Any]) -> dict[str, Any]:
    """
    Apply devpi-client's C{key=value}, C{key+=value}, C{key-=value} and
    C{key-=} edits to a copy of C{current}.
    """
    result = dict(current)
    indexType = current["type"]
    for edit in edits:
        if not isinstance(edit, str) or "=" not in edit:
            raise BadRequest(f"invalid modification {edit!r}, expected key=value")
        key, value = edit.split("=", 1)
        if key.endswith("+"):
            key = key[:-1]
            _checkListKey(key, indexType)
            items = _currentList(result, key)
            for item in parseList(value):
                if item not in items:
                    items.append(item)
            result[key] = items
        elif key.endswith("-"):
            key = key[:-1]
            if value == "":
                if key in defaults(indexType, "", 0) or key == "type":
                    raise BadRequest("Default values can't be removed.")
                result.pop(key, None)
                continue
            _checkListKey(key, indexType)
            items = _currentList(result, key)
            for item in parseList(value):
                candidates = [i for i in items if _sameItem(key, i, item)]
                if not candidates:
                    raise BadRequest(f"The {key!r} setting doesn't have value {item!r}")
                for c in candidates:
                    items.remove(c)
            result[key] = items
        else:
            result[key] = value
    return result


def _currentList(config: dict[str, Any], key: str) -> list[str]:
    """
    A list setting as edits start from: an absent C{acl_read} means
    everyone may read, so C{acl_read+=carol} keeps C{:ANONYMOUS:}.
    """
    if key == "acl_read" and key not in config:
        return [ANONYMOUS]
    return list(config.get(key) or [])


def _sameItem(key: str, stored: str, given: str) -> bool:
    if key == "mirror_whitelist" and given != "*":
        return stored == normalizeProject(given)
    if key in ("acl_upload", "acl_toxresult_upload", "acl_read"):
        return stored == _principal(given)
    return stored == given


def _checkListKey(key: str, indexType: str) -> None:
    if key not in _LIST_KEYS or key not in allowedKeys(indexType):
        raise BadRequest(f"{key!r} is not a list setting of this index")
