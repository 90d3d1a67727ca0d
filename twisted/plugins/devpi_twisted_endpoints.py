from devpi_twisted.app.endpoints import reusePortParser

__all__ = ["reusePortParser"]
