from twisted.application.service import ServiceMaker

devpi = ServiceMaker(
    "devpi-twisted",
    "devpi_twisted.app.tap",
    "A private and caching Python package index (devpi-compatible).",
    "devpi",
)
