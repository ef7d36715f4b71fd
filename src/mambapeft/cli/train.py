"""`mambapeft train`: fine-tune a Mamba language model with PEFT methods (the built-in demo without arguments)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..train.config import BUILTIN_DEFAULTS, TrainConfig, config_kind, resolve_config
from ..train.vision import add_vision_arguments, vision_config_from_args

def add_parser(commands):
    parser = commands.add_parser(
        "train",
        help="fine-tune a Mamba language model with PEFT methods",
        description="Fine-tune with PEFT methods on transformers' Trainer. Without arguments: the built-in tiny Mamba "
        "on the built-in task with lora_p_x, test accuracy before and after (a few minutes on a CPU). "
        "With --model HUB_ID --data commonsense_170k.json --method additional_scan: the paper's recipe. "
        "A --config file (JSON or YAML, the same keys as the options) can hold everything; options given here "
        "override it. The resolved config is written to OUTPUT_DIR/run_config.json. "
        "Multi-GPU: `accelerate launch -m mambapeft train ...` or `torchrun --nproc-per-node N -m mambapeft train ...`.",
    )
    parser.add_argument("--task", choices=("language", "vision"), default=None,
                        help="language (default): a Mamba LM on instruction data; vision: a Vision Mamba on a VTAB-1k "
                        "task (without other arguments: the built-in tiny Vim on the built-in rotation task)")
    parser.add_argument("--config", help="JSON or YAML file with any of the options below (a run_config.json or "
                        "best_config.json too; its \"task\" key says language or vision)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name in BUILTIN_DEFAULTS:
            help_text += f" [built-in data: {BUILTIN_DEFAULTS[f.name]}]"
        default = f.default if f.name != "method" else ["lora_p_x"]
        if "(default" not in help_text:
            help_text += f" (default: {default})"
        if f.name == "method":
            parser.add_argument(flag, nargs="+", default=None, metavar="SPEC", help=help_text)
        elif f.name in ("train_on_prompt", "bf16"):
            parser.add_argument(flag, default=None, type=_bool, metavar="true|false", help=help_text)
        else:
            kind = float if f.name in ("lr", "epochs", "weight_decay", "max_grad_norm") else (
                int if isinstance(f.default, int) else str)
            parser.add_argument(flag, default=None, type=kind, choices=f.metadata.get("choices"), help=help_text)
    vision = parser.add_argument_group("vision (--task vision)")
    add_vision_arguments(vision)
    parser.set_defaults(run=run)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run(args) -> int:
    from ..train.run import fine_tune

    file_values = TrainConfig.from_file(args.config) if args.config else {}
    where = args.config or "the command line"
    if config_kind(file_values, args.task, where) == "vision":
        from ..train.vision import fine_tune_vision

        config = vision_config_from_args(args, file_values, where)
        print("config: " + json.dumps({k: v for k, v in config.to_dict().items() if v is not None}))
        fine_tune_vision(config, resume=args.resume)
        return 0

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = resolve_config(args.config, overrides)
    print("config: " + json.dumps({k: v for k, v in config.to_dict().items() if v is not None}))
    fine_tune(config, resume=args.resume)
    return 0
