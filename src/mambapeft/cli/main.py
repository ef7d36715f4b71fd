"""Entry point of the `mambapeft` command."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from ..errors import MambaPeftError
from ..outputs import disk_error_message
from ..verbosity import set_verbose
from ..version import __version__
from . import convert, eval, info, methods, params, search, train

COMMANDS = (info, methods, params, train, eval, search, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambapeft",
        description="Parameter-efficient fine-tuning of Mamba state-space models (MambaPEFT, ICLR 2025).",
    )
    parser.add_argument("--version", action="version", version=f"mambapeft {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show every warning, with its source, and the "
                        "libraries' own notices (default: each data warning once, expected notices silenced)")
    # the command line as given, set by main(): what `search --jobs N` starts its helper processes with (None when
    # a command's function is called on parsed arguments alone, which then runs in one process)
    parser.set_defaults(argv=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)      # what helper processes are started with
    if args.command is None:
        parser.print_help()
        return 0
    set_verbose(args.verbose)
    try:
        return args.run(args) or 0
    except MambaPeftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:             # `mambapeft info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        message = disk_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as err:            # safetensors reports a full disk as its own error type
        if "No space left on device" not in str(err):
            raise
        print(f"error: {disk_error_message(OSError(errno.ENOSPC, str(err)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
