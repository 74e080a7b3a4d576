"""The one error type the CLI turns into a single line on stderr and exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: printed as one line (no traceback), exit code 2."""
