"""``python -m metering.cli.main`` runs the command (used by tests that spawn it)."""

from metering.cli.app import app

if __name__ == "__main__":
    app()
