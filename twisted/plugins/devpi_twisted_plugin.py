from twisted.application.service import ServiceMaker

devpi = ServiceMaker(
    "devpi-twisted",
    "devpi_twisted.tap",
    "A private and caching Python package index (devpi-compatible).",
    "devpi",
)
