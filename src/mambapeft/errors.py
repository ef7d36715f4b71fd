"""Errors meant for the user: each message says what is wrong and how to fix it.

The command line prints these without a traceback (exit code 2); anything else that escapes is a bug in mambapeft.
"""

from __future__ import annotations

import difflib


class MambaPeftError(Exception):
    """Base of the errors whose message is written for the user."""


class CheckpointError(MambaPeftError):
    """A checkpoint folder, file or hub id that cannot be loaded."""


class ConfigError(MambaPeftError, ValueError):
    """A configuration that does not describe something mambapeft can build."""


class NotApplicable(ConfigError):
    """A method that has no meaning on this model family; the message gives the reason."""


class RunFolderError(MambaPeftError):
    """A run folder that holds another run, or that another process is writing."""


def did_you_mean(name: str, known, cutoff: float = 0.5) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
