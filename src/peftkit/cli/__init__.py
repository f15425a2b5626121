"""The `peftkit` command line (see `peftkit --help`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
