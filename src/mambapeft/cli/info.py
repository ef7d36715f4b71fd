"""`mambapeft info MODEL_OR_ARCH`: the architecture and its parameter counts, without loading weights."""

from __future__ import annotations

import json

from ..model.registry import all_architectures, builtin_names


def add_parser(commands):
    parser = commands.add_parser(
        "info",
        help="show a model's architecture and parameter counts",
        description="Show the architecture and parameter counts of a named architecture "
        f"({', '.join(all_architectures())}), a built-in model "
        f"({', '.join(builtin_names())}), a local checkpoint folder or a "
        "Hugging Face hub id. Reads only the config.",
    )
    parser.add_argument("model", nargs="?", default="tiny", help="architecture name, folder or hub id (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..model.factory import shapes_model
    from ..model.registry import family_of_model

    model, source = shapes_model(args.model)
    family = family_of_model(model)
    summary = {"model": args.model, "source": source, **family.summary(model)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.model}: {source}")
    for line in family.summary_lines(summary):
        print(line)
    return 0
