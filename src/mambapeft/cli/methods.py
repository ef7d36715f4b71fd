"""`mambapeft methods`: every registered PEFT method with its options, the model families it applies to (and why
not, where it does not), and whether it merges into the weights."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

from ..errors import NotApplicable
from ..methods import REGISTRY


def add_parser(commands):
    parser = commands.add_parser("methods", help="list the PEFT methods, their options and the models they apply to",
                                 description="List every PEFT method with its options, defaults and help texts, and "
                                 "on which model families it applies (with the reason where it does not).")
    parser.add_argument("method", nargs="?", help="show only this method (with the reasons it does not apply)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def applicability() -> dict[str, dict[str, str | None]]:
    """method -> family -> None (applies) or the reason it does not, tried on each family's small model (meta)."""
    from ..model.factory import from_config
    from ..model.registry import FAMILIES
    from ..peft import get_peft_model

    table: dict[str, dict[str, str | None]] = {name: {} for name in REGISTRY}
    for family, record in FAMILIES.items():
        for name, cls in REGISTRY.items():
            spec = cls.examples[0].spec if cls.examples else name
            try:
                get_peft_model(from_config(record.check_architecture, device="meta"), [spec])
                table[name][family] = None
            except NotApplicable as err:
                table[name][family] = str(err).split(" models: ", 1)[-1]
    return table


def describe(name: str, applies: dict[str, str | None]) -> dict:
    cls = REGISTRY[name]
    options = {}
    for f in fields(cls.Config):
        default = f.default if f.default is not MISSING else None
        options[f.name] = {"default": default, "help": f.metadata.get("help", ""),
                           **{k: v for k, v in f.metadata.items() if k != "help"}}
    return {"method": name, "category": cls.category, "description": cls.description, "mergeable": cls.mergeable,
            "why_not_mergeable": cls.why_not_mergeable or None, "applies_to": applies, "options": options}


def run(args) -> int:
    from ..config.spec import MethodSpec

    names = sorted(REGISTRY, key=lambda n: (REGISTRY[n].category, n))
    if args.method:
        MethodSpec.build(args.method, {})                     # unknown id: the error with a suggestion
        names = [args.method]
    table = applicability()
    described = [describe(n, table[n]) for n in names]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    families = list(next(iter(table.values())))
    category = None
    print(f"{'':22}{'  '.join(families)}    (x: applies, -: not applicable; `mambapeft methods ID` says why)")
    for d in described:
        if d["category"] != category:
            category = d["category"]
            print(f"\n[{category}]")
        marks = "  ".join(("x" if d["applies_to"][f] is None else "-").center(len(f)) for f in families)
        merge = "" if d["mergeable"] else "  (stays unmerged)"
        print(f"  {d['method']:<20}{marks}    {d['description']}{merge}")
        if args.method:
            for f, why in d["applies_to"].items():
                if why is not None:
                    print(f"      not on {f}: {why}")
            if d["why_not_mergeable"]:
                print(f"      stays unmerged: {d['why_not_mergeable']}")
        for option, o in d["options"].items():
            if option in ("lr", "weight_decay") and not args.method:
                continue
            choices = f" {{{', '.join(map(str, o['choices']))}}}" if "choices" in o else ""
            print(f"      {option}={o['default']}{choices}: {o['help']}")
    if not args.method:
        print("\nEvery method also takes lr= and weight_decay= (its own optimiser settings). "
              "Write a spec as id:key=value,key=value, e.g. lora_p_x:r=64,s=0.1")
        print_placements()
    return 0


def print_placements() -> None:
    """The placement presets of hybrid models (config/presets.py), with the hybrids' default."""
    from ..config.presets import PLACEMENT_PRESETS
    from ..model.registry import FAMILIES

    hybrids = [name for name, f in FAMILIES.items() if f.default_method]
    print(f"\nPlacement presets (hybrid models: {', '.join(hybrids)}; refused on models of SSM layers only):")
    for name, specs in PLACEMENT_PRESETS.items():
        print(f"  {name:<22}{' + '.join(specs)}")
    usual = ("placement/both",)
    others = "".join(f"; {name}: {' + '.join(f.default_method)}" for name, f in FAMILIES.items()
                     if f.default_method and f.default_method != usual)
    print(f"  a hybrid run without --method uses {' + '.join(usual)}{others} (every layer type trains); MoE "
          f"experts only with lora_experts")
