"""devpi-twisted: a private and caching Python package index on Twisted."""

__version__ = "0.1.0"
