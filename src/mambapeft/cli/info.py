"""`mambapeft info MODEL_OR_ARCH`: the architecture and its parameter counts, without loading weights."""

from __future__ import annotations

import json

from ..model.factory import ALL_ARCHITECTURES, BUILTIN_NAMES, shapes_model
from ..model.s4d import DeepS4D
from ..model.summary import architecture_summary, count_unique
from ..model.vim import VisionMamba
from ..model.vmamba import VMamba


def add_parser(commands):
    parser = commands.add_parser(
        "info",
        help="show a model's architecture and parameter counts",
        description="Show the architecture and parameter counts of a named architecture "
        f"({', '.join(ALL_ARCHITECTURES)}), a built-in model "
        f"({', '.join(BUILTIN_NAMES)}), a local checkpoint folder or a "
        "Hugging Face hub id. Reads only the config.",
    )
    parser.add_argument("model", nargs="?", default="tiny", help="architecture name, folder or hub id (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def vim_summary(model: VisionMamba) -> dict:
    c = model.config
    mixer = model.layers[0].mixer
    per_layer = count_unique(model.layers[0].parameters())
    return {
        "model_type": "vim", "d_model": c.d_model, "depth": c.depth, "img_size": c.img_size,
        "patch_size": c.patch_size, "stride": c.stride, "tokens": c.num_patches + 1, "num_classes": c.num_classes,
        "d_inner": mixer.d_inner, "d_state": mixer.d_state, "dt_rank": mixer.dt_rank, "d_conv": mixer.d_conv,
        "parameters": {
            "total": count_unique(model.parameters()),
            "patch_embed": count_unique(model.patch_embed.parameters()),
            "cls_token": model.cls_token.numel(), "pos_embed": model.pos_embed.numel(),
            "per_layer": per_layer, "layers": per_layer * c.depth,
            "norm_f": model.norm_f.weight.numel(), "head": count_unique(model.head.parameters()),
        },
    }


def vmamba_summary(model: VMamba) -> dict:
    c = model.config
    return {
        "model_type": "vmamba", "embed_dim": c.embed_dim, "depths": list(c.depths), "dims": c.dims,
        "d_state": c.d_state, "ssm_ratio": c.ssm_ratio, "num_classes": c.num_classes,
        "drop_path_rate": c.drop_path_rate,
        "parameters": {
            "total": count_unique(model.parameters()),
            "without_head": count_unique(model.parameters()) - count_unique(model.classifier.head.parameters()),
            "patch_embed": count_unique(model.patch_embed.parameters()),
            **{f"stage_{i}": count_unique(stage.parameters()) for i, stage in enumerate(model.layers)},
            "classifier_norm": count_unique(model.classifier.norm.parameters()),
            "head": count_unique(model.classifier.head.parameters()),
        },
    }


def run(args) -> int:
    model, source = shapes_model(args.model)
    if isinstance(model, DeepS4D):
        return s4d_info(args, model, source)
    if isinstance(model, VMamba):
        summary = {"model": args.model, "source": source, **vmamba_summary(model)}
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        print(f"{args.model}: {source}")
        print("  " + "   ".join(f"{k} {summary[k]}" for k in ("embed_dim", "depths", "d_state", "ssm_ratio",
                                                             "num_classes", "drop_path_rate")))
        for key, value in summary["parameters"].items():
            print(f"  {key:<16} {value:,}")
        return 0
    if isinstance(model, VisionMamba):
        summary = {"model": args.model, "source": source, **vim_summary(model)}
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        print(f"{args.model}: {source}")
        print("  " + "   ".join(f"{k} {summary[k]}" for k in ("d_model", "depth", "img_size", "patch_size", "stride",
                                                             "tokens", "num_classes")))
        print("  " + "   ".join(f"{k} {summary[k]}" for k in ("d_inner", "d_state", "dt_rank", "d_conv"))
              + "   bidirectional (v2), class token in the middle")
        for key, value in summary["parameters"].items():
            print(f"  {key:<12} {value:,}")
        return 0
    summary = {"model": args.model, "source": source, **architecture_summary(model)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    p = summary["parameters"]
    parts = " · ".join(f"{k} {v:,}" for k, v in p["per_layer_parts"].items())
    yes = {True: "yes", False: "no"}
    print(f"{args.model}: {source}")
    print(f"  model_type   {summary['model_type']}")
    print(f"  d_model {summary['d_model']}   n_layer {summary['n_layer']}   vocab {summary['vocab_size']}")
    if summary["model_type"] == "mamba2":
        print(f"  d_inner (E) {summary['d_inner']}   heads (H) {summary['num_heads']} x head_dim (P) "
              f"{summary['head_dim']}   groups (G) {summary['n_groups']}   d_state (N) {summary['d_state']}   "
              f"d_conv (K) {summary['d_conv']}")
    else:
        print(f"  d_inner (E) {summary['d_inner']}   d_state (N) {summary['d_state']}   "
              f"dt_rank (R) {summary['dt_rank']}   d_conv (K) {summary['d_conv']}")
    print(f"  bias: in/out_proj {yes[summary['use_bias']]}, conv1d {yes[summary['use_conv_bias']]};  "
          f"lm_head tied to embeddings: {yes[summary['tie_word_embeddings']]}")
    print(f"parameters     {p['total']:,}")
    print(f"  embeddings   {p['embeddings']:,}")
    print(f"  per layer    {p['per_layer']:,}  ({parts})")
    print(f"  all layers   {p['layers']:,}")
    print(f"  norm_f       {p['norm_f']:,}")
    print(f"  lm_head      {'tied' if summary['tie_word_embeddings'] else format(p['lm_head'], ',')}")
    return 0


def s4d_info(args, model: DeepS4D, source: str) -> int:
    summary = {"model": args.model, "source": source, **model.summary()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.model}: {source}")
    print("  " + "   ".join(f"{k} {summary[k]}" for k in ("form", "d_model", "n_layers", "d_state", "l_max", "A_init")))
    for key, value in summary["parameters"].items():
        print(f"  {key:<12} {value:,}")
    return 0
