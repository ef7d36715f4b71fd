"""Errors meant for the user: each message says what is wrong and how to fix it.

The command line prints these without a traceback; anything else that escapes is a bug in mambapeft.
"""


class MambaPeftError(Exception):
    """Base of the errors whose message is written for the user."""


class CheckpointError(MambaPeftError):
    """A checkpoint folder, file or hub id that cannot be loaded."""


class ConfigError(MambaPeftError, ValueError):
    """A configuration that does not describe something mambapeft can build."""
