"""The ``metering`` command."""

from metering.cli.app import app

__all__ = ["app"]
