"""Errors the data service raises for bad input: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class DataError(Exception):
    """Bad input to the data service (a file, an atlas, a config value); the message names it."""
