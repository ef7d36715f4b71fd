"""Entry point of the `mambapeft` command."""

from __future__ import annotations

import argparse
import sys

from ..errors import MambaPeftError
from ..version import __version__
from . import convert, eval, info, methods, params, search, train

COMMANDS = (info, methods, params, train, eval, search, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambapeft",
        description="Parameter-efficient fine-tuning of Mamba state-space models (MambaPEFT, ICLR 2025).",
    )
    parser.add_argument("--version", action="version", version=f"mambapeft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except MambaPeftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
