"""The package version (reports and results carry it)."""

__version__ = "0.1.0"
