from devpi_twisted.app.endpoints import reusePortParser
from devpi_twisted.app.tlsdir import tlsDirectoryParser

__all__ = ["reusePortParser", "tlsDirectoryParser"]
