"""
The interface's own stylesheet and script, served under C{/+static/} with
their content hash in the name, so they may be cached for a year.
"""

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from twisted.web.iweb import IRequest

from devpi_twisted.errors import NotFound
from devpi_twisted.web.responses import withLength

_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}
IMMUTABLE = b"public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    name: str  # the URL name: "ui.<hash>.css"
    body: bytes
    contentType: bytes

    @property
    def url(self) -> str:
        return f"/+static/{self.name}"


def _load(filename: str) -> Asset:
    body = files("devpi_twisted.web.ui").joinpath("static", filename).read_bytes()
    stem, dot, ext = filename.rpartition(".")
    digest = hashlib.sha256(body).hexdigest()[:12]
    return Asset(f"{stem}.{digest}.{ext}", body, _TYPES["." + ext])


class StaticAssets:
    """The assets, read once from the package."""

    def __init__(self) -> None:
        self.css = _load("ui.css")
        self.js = _load("copy.js")
        self._byName = {asset.name: asset for asset in (self.css, self.js)}

    def render(self, request: IRequest, name: str) -> bytes:
        asset = self._byName.get(name)
        if asset is None:
            raise NotFound(f"no static file {name!r}")
        request.setHeader(b"Content-Type", asset.contentType)
        request.setHeader(b"Cache-Control", IMMUTABLE)
        return withLength(request, asset.body)
