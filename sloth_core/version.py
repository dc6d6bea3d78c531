"""sloth_core's version (a leaf: the tuning cache records it without importing the package's API)."""

__version__ = "0.1.0"
