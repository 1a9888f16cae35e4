"""The package version, in a module of its own (no import cycle through the package)."""

__version__ = "0.1.0"
