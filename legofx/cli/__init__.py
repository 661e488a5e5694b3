"""The ``legofx`` command line: ``run`` (default), ``demo``, ``export``."""

from legofx.cli.main import main

__all__ = ["main"]
