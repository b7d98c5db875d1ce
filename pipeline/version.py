"""The package version (its own module, so that anything can read it without the API facade)."""

__version__ = "0.1.0"
