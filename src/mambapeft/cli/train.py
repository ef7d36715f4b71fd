"""`mambapeft train`: fine-tune with PEFT methods, for every task kind (the built-in language demo without arguments).

The flags are made from the task kinds' config fields (train/config.py holds the shared ones, each kind its own), so a
field is declared, typed, limited and documented once, and the command line, config files and the Python API read
the same options.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..errors import ConfigError
from ..options import field_type
from ..train.tasks import TASKS, kind_of


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser) -> None:
    """One flag per config field of every task kind (defaults None = not given); shared fields once."""
    owners: dict[str, list[str]] = {}
    for task in TASKS.values():
        for f in fields(task.Config):
            owners.setdefault(f.name, []).append(task.name)
    groups = {name: parser.add_argument_group(f"{name} runs only (--task {name})") for name in TASKS}
    done = set()
    for task in TASKS.values():
        for f in fields(task.Config):
            if f.name in done:
                continue
            done.add(f.name)
            shared = len(owners[f.name]) == len(TASKS)
            defaults = {t: getattr(TASKS[t].Config(), f.name) for t in owners[f.name]}
            shown = {t: ("builtin data: " + str(TASKS[t].builtin_defaults[f.name]) + ", else " if f.name in
                         TASKS[t].builtin_defaults else "") + str(v) for t, v in defaults.items()}
            help_text = f.metadata.get("help", "")
            builtin_default = any(f.name in TASKS[t].builtin_defaults for t in owners[f.name])
            if "default_text" in f.metadata:
                help_text += f" (default: {f.metadata['default_text']})"
            elif len(set(map(str, defaults.values()))) == 1 and not builtin_default:
                help_text += f" (default: {next(iter(defaults.values()))})"
            else:
                help_text += " (default: " + "; ".join(f"{t}: {v}" for t, v in shown.items()) + ")"
            target, _ = field_type(task.Config, f.name)
            where = parser if shared else groups[owners[f.name][0]]
            kwargs = dict(default=None, dest=f.name, help=help_text.replace("%", "%%"))
            if target is list:
                where.add_argument(_flag(f.name), nargs="+", metavar="SPEC", **kwargs)
            elif target is bool:
                where.add_argument(_flag(f.name), type=_bool, nargs="?", const=True, metavar="true|false", **kwargs)
            else:
                where.add_argument(_flag(f.name), type=target, choices=f.metadata.get("choices"), **kwargs)


def config_from_args(args):
    """The run config of a command line: the --config file's values, then the flags, then the built-in defaults."""
    from ..train.config import RunConfig

    file_values = RunConfig.from_file(args.config) if args.config else {}
    where = args.config or "the command line"
    task = kind_of(file_values, args.task, where, model=getattr(args, "model", None))
    known = {f.name for f in fields(task.Config)}
    values = {k: v for k, v in file_values.items() if k != "task"}
    for name in {f.name for t in TASKS.values() for f in fields(t.Config)}:
        given = getattr(args, name, None)
        if given is None:
            continue
        if name not in known:
            other = next(t.name for t in TASKS.values() if name in {f.name for f in fields(t.Config)})
            raise ConfigError(f"{_flag(name)} is an option of {other} runs, and this is a {task.name} run "
                              f"(--task {task.name}); drop it, or add --task {other}")
        values[name] = given
    return task, task.resolve(values, where)


def add_parser(commands):
    parser = commands.add_parser(
        "train",
        help="fine-tune a Mamba model with PEFT methods",
        description="Fine-tune with PEFT methods on transformers' Trainer. Without arguments: the built-in tiny Mamba "
        "on the built-in task with lora_p_x, test accuracy before and after (a few minutes on a CPU). "
        "With --model HUB_ID --data commonsense_170k.json --method additional_scan: the paper's recipe. "
        "--task vision: a Vision Mamba on a VTAB-1k task. --task sequence (or --model tiny-s4d): a deep S4D on "
        "sequences. A --config file (JSON or YAML, the same keys as the options) can hold everything; options "
        "given here override it. Everything is checked before the output folder is touched; a folder holding an "
        "earlier run is refused unless --resume or --overwrite. Multi-GPU: `accelerate launch -m mambapeft train ...` "
        "or `torchrun --nproc-per-node N -m mambapeft train ...`.",
    )
    parser.add_argument("--task", choices=tuple(TASKS), default=None,
                        help="language (default): a Mamba LM on instruction data; vision: a Vision Mamba on a VTAB-1k "
                        "task (without other arguments: the built-in tiny Vim on the built-in rotation task); "
                        "sequence: an S4D classifier on sequences (default with an S4D --model such as tiny-s4d; "
                        "without other arguments: tiny-s4d on the built-in pixel-sequence digits)")
    parser.add_argument("--config", help="JSON or YAML file with any of the options below (a run_config.json or "
                        "best_config.json too; its \"task\" key says which kind)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest good "
                        "checkpoint (the settings must be the run's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir (its "
                        "checkpoints, adapter, metrics and results are deleted)")
    add_config_flags(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..train.run import fine_tune

    _, config = config_from_args(args)
    print("config: " + json.dumps({k: v for k, v in config.to_dict().items() if v is not None}))
    fine_tune(config, resume=args.resume, overwrite=args.overwrite)
    return 0
