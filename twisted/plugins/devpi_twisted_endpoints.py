from devpi_twisted.endpoints import reusePortParser

__all__ = ["reusePortParser"]
