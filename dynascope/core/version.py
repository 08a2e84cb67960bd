"""The package's version: one place, read by the package root, the run metadata, the report and the CLI."""

__version__ = "0.1.0"
