"""One exception type for everything a user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class FslmError(Exception):
    """A problem with the user's input (file, flag, field), worded so they can fix it."""

    exit_code = 2
