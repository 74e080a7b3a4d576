"""Errors that mean bad input or a run that cannot go on; the CLI prints them as one line, exit code 2."""

from __future__ import annotations


class ConfigError(Exception):
    """A config key, type or value is wrong; the message names the key and what is allowed."""


class RunError(Exception):
    """A run cannot start or continue (missing checkpoint, unreachable service); the message says why."""
