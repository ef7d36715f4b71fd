"""Quiet by default, everything with --verbose.

    note("1 of 64 validation examples ...")     # a data warning: printed once per process, without source lines
    with quiet_third_party():                    # transformers' / peft's expected chatter, silenced unless verbose
        ...

`mambapeft --verbose COMMAND` (or MAMBAPEFT_VERBOSE=1) turns both off: every warning is shown as Python shows it,
with every repeat, and third-party logging keeps its level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

_seen: set[str] = set()


def verbose() -> bool:
    return os.environ.get("MAMBAPEFT_VERBOSE", "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """What `--verbose` sets (inherited by the search's trial processes through the environment)."""
    if on:
        os.environ["MAMBAPEFT_VERBOSE"] = "1"


def note(message: str) -> None:
    """A warning about the user's data or settings: `warning: ...` on stderr, once per process (a search's trials
    load the same data again and again); under --verbose a UserWarning, every time."""
    if verbose():
        warnings.warn(message, UserWarning, stacklevel=3)
        return
    if message in _seen:
        return
    _seen.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_third_party():
    """transformers' and peft's logging below ERROR and their Python warnings, silenced inside (unless verbose)."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("transformers", "peft", "accelerate")]
    levels = [logger.level for logger in loggers]
    try:
        from transformers.utils import logging as hf_logging

        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:
        hf_logging = None
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_level)
