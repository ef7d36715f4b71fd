"""`mambapeft params`: how many parameters a PEFT config trains on an architecture, counted on shapes only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import PeftConfig
from ..model.architectures import from_config
from ..model.summary import count_unique
from ..peft import get_peft_model


def add_parser(commands):
    parser = commands.add_parser(
        "params",
        help="count the parameters a PEFT config trains",
        description="Count trainable parameters of PEFT methods on an architecture (meta device: no weights, "
        "instant even for 2.8b). Percent = trainable / (base + trainable), as the paper's tables count.",
    )
    parser.add_argument("model", nargs="?", help="architecture name, checkpoint folder or hub id (or use --arch)")
    parser.add_argument("--arch", help="architecture name, e.g. mamba-130m, mamba-1.4b, tiny")
    parser.add_argument("--method", "-m", action="append", default=[], metavar="SPEC",
                        help="a method spec such as lora_p_x:r=64,s=0.1 or a preset paper/lora_p_x; repeat for hybrids")
    parser.add_argument("--config", help="a PEFT config JSON file (as written by save_pretrained or the search)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def shapes_model(name: str):
    """A meta-device model for an architecture name, a checkpoint folder or a hub id."""
    from .info import load_shapes

    if Path(name).expanduser().is_dir() or "/" in name:
        return load_shapes(name)[0]
    return from_config(name, device="meta")


def count(model_name: str, specs: list) -> dict:
    arch = model_name.lower()
    peft = get_peft_model(shapes_model(model_name), PeftConfig.parse(specs, arch=arch), arch=arch)
    notes = {str(spec): method.explain_count() for spec, method in zip(peft.peft_config.methods, peft.methods)
             if hasattr(method, "explain_count")}
    peft.on_step_end(sys.maxsize)          # as after every warm-up phase (SDT): count what trains from then on
    counts = peft.parameter_counts()
    per_method = {str(spec): count_unique(t for t in peft._owned[method.name] if t.requires_grad)
                  for spec, method in zip(peft.peft_config.methods, peft.methods)}
    return {"model": model_name, "config": str(peft.peft_config), "per_method": per_method, "notes": notes,
            "base": peft.base_parameter_count, **counts}


def run(args) -> int:
    from ..errors import ConfigError

    model = args.arch or args.model
    if not model:
        raise ConfigError("name the model: mambapeft params --arch mamba-130m --method lora_p_x")
    specs = list(args.method)
    if args.config:
        specs += PeftConfig.load(args.config).methods
    if not specs:
        raise ConfigError("name at least one method: --method lora_p_x:r=64 (see `mambapeft methods`)")
    result = count(model, specs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model} + {result['config']}")
    for spec, n in result["per_method"].items():
        print(f"  {spec:<40} {n:>14,}")
        if spec in result["notes"]:
            print(f"      {result['notes'][spec]}")
    print(f"trainable {result['trainable']:,} of {result['total']:,} ({result['percent']:.2f}%); "
          f"base model {result['base']:,}")
    return 0
