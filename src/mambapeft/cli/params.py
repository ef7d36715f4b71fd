"""`mambapeft params`: how many parameters a PEFT config trains on an architecture, counted on shapes only."""

from __future__ import annotations

import json

from ..config import PeftConfig
from ..errors import ConfigError
from ..peft import count_parameters


def add_parser(commands):
    parser = commands.add_parser(
        "params",
        help="count the parameters a PEFT config trains",
        description="Count trainable parameters of PEFT methods on an architecture (meta device: no weights, "
        "instant even for 2.8b). Percent = trainable / (base + trainable), as the paper's tables count.",
    )
    parser.add_argument("model", nargs="?", help="architecture name, built-in model (builtin, tiny-vim), checkpoint "
                        "folder or hub id (or use --arch)")
    parser.add_argument("--arch", help="the same as MODEL, e.g. mamba-130m, mamba-1.4b, vim-small, builtin")
    parser.add_argument("--method", "-m", action="append", default=[], metavar="SPEC",
                        help="a method spec such as lora_p_x:r=64,s=0.1 or a preset paper/lora_p_x; repeat for hybrids")
    parser.add_argument("--config", help="a PEFT config JSON file (as written by save_pretrained or the search)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    model = args.arch or args.model
    if not model:
        raise ConfigError("name the model: mambapeft params --arch mamba-130m --method lora_p_x")
    specs = list(args.method)
    if args.config:
        specs += PeftConfig.load(args.config).methods
    if not specs:
        raise ConfigError("name at least one method: --method lora_p_x:r=64 (see `mambapeft methods`)")
    result = count_parameters(model, specs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model} + {result['config']}")
    for spec, n in result["per_method"].items():
        print(f"  {spec:<40} {n:>14,}")
        if spec in result["notes"]:
            print(f"      {result['notes'][spec]}")
    for kind, entry in result.get("per_layer_type", {}).items():
        where = f"   in {entry['layers']} of {entry['of']} {kind} parts" if "layers" in entry else ""
        print(f"  [{kind}]{'':<{38 - len(kind)}} {entry['trainable']:>14,}{where}")
    print(f"trainable {result['trainable']:,} of {result['total']:,} ({result['percent']:.2f}%); "
          f"base model {result['base']:,}")
    return 0
