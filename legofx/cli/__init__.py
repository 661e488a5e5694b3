"""The ``legofx`` command line: ``run`` (default), ``report``, ``export``, ``demo``."""

from legofx.cli.main import main

__all__ = ["main"]
