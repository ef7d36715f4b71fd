"""`mambapeft methods`: every registered PEFT method with its options, defaults and help texts."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

from ..methods import REGISTRY


def add_parser(commands):
    parser = commands.add_parser("methods", help="list the PEFT methods and their options",
                                 description="List every PEFT method with its options, defaults and help texts.")
    parser.add_argument("method", nargs="?", help="show only this method")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def describe(name: str) -> dict:
    cls = REGISTRY[name]
    options = {}
    for f in fields(cls.Config):
        default = f.default if f.default is not MISSING else None
        options[f.name] = {"default": default, "help": f.metadata.get("help", ""),
                           **{k: v for k, v in f.metadata.items() if k != "help"}}
    return {"method": name, "family": cls.family, "description": cls.description,
            "mergeable": cls.mergeable, "options": options}


def run(args) -> int:
    from ..config.spec import MethodSpec

    names = sorted(REGISTRY, key=lambda n: (REGISTRY[n].family, n))
    if args.method:
        MethodSpec.build(args.method, {})                     # unknown id: the error with a suggestion
        names = [args.method]
    described = [describe(n) for n in names]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    family = None
    for d in described:
        if d["family"] != family:
            family = d["family"]
            print(f"\n[{family}]")
        merge = "" if d["mergeable"] else "  (stays unmerged)"
        print(f"  {d['method']:<18} {d['description']}{merge}")
        for option, o in d["options"].items():
            if option in ("lr", "weight_decay") and not args.method:
                continue
            choices = f" {{{', '.join(map(str, o['choices']))}}}" if "choices" in o else ""
            print(f"      {option}={o['default']}{choices}: {o['help']}")
    if not args.method:
        print("\nEvery method also takes lr= and weight_decay= (its own optimiser settings). "
              "Write a spec as id:key=value,key=value, e.g. lora_p_x:r=64,s=0.1")
    return 0
