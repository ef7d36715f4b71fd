"""`mambapeft eval MODEL [--adapter DIR] --tasks ...`: multiple-choice accuracy, built in or through the harness."""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(commands):
    parser = commands.add_parser(
        "eval",
        help="evaluate a model (and adapter) on multiple-choice tasks",
        description="Evaluate a Mamba model, optionally with a PEFT adapter. A task is 'builtin' (the built-in task's "
        "test split), a local multiple-choice file (.jsonl of question/choices/gold, or commonsense .json), both "
        "scored here by log-likelihood (acc, acc_norm as lm-evaluation-harness defines them), or an "
        "lm-evaluation-harness task name (boolq, piqa, social_iqa, hellaswag, winogrande, arc_easy, arc_challenge, "
        "openbookqa, ... or a task defined by a YAML file under --include-path; needs the lm-eval extra). "
        "An S4D model (tiny-s4d, a save_s4d folder) is scored by top-1 accuracy on sequence tasks: 'builtin' (= "
        "digits, the built-in task's test half), digits-rows, or a .npz of sequences and labels.",
    )
    parser.add_argument("model", nargs="?", default="builtin",
                        help="'builtin', a folder or a hub id (default: builtin)")
    parser.add_argument("--adapter", help="a PEFT adapter folder (from `mambapeft train`: OUTPUT_DIR/adapter)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    parser.add_argument("--tasks", default="builtin", help="comma-separated tasks (default: builtin)")
    parser.add_argument("--include-path", help="folder of lm-evaluation-harness task YAML files")
    parser.add_argument("--limit", type=int, help="score only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sequence scored (cut on the left)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.set_defaults(run=run)


REMAINING = "remaining_adapter"          # what `mambapeft merge` leaves beside the weights when some methods stay


def load_model(model: str, adapter: str | None):
    """The model, with `adapter`; a merged folder's remaining adapter (methods that cannot merge) is loaded with it,
    and refused beside another --adapter (one model carries one set of methods)."""
    from ..errors import ConfigError
    from ..model.registry import family_of
    from ..peft import PeftModel
    from .convert import load_base

    family = family_of(model)
    if "language" not in family.tasks:
        raise ConfigError(f"{model} is a {family.title} model: `mambapeft eval` scores language models on "
                          f"multiple-choice tasks; a {family.tasks[0]} run reports its test accuracy in "
                          f"OUTPUT_DIR/results.json (mambapeft train --task {family.tasks[0]})")
    remaining = Path(model).expanduser() / REMAINING
    if remaining.is_dir():
        if adapter:
            raise ConfigError(f"{model} is a merged model whose {REMAINING}/ holds methods that could not merge; "
                              f"they are part of the model, so another --adapter cannot go on it. Evaluate {model} "
                              f"without --adapter, or merge both adapters' training into one run")
        print(f"loading {remaining} (the methods that could not merge; see {Path(model) / 'MERGE_NOTE.txt'})")
        adapter = str(remaining)
    base = load_base(model, Path(adapter) if adapter else None)
    return PeftModel.from_pretrained(base, adapter).eval() if adapter else base


def check_args(args) -> None:
    """Every option checked before anything is loaded or scored."""
    from ..errors import ConfigError

    for name in ("batch_size", "max_length", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.output:
        from ..outputs import check_writable

        folder = Path(args.output).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--output {args.output}: the folder {folder} does not exist; create it first")
        check_writable(args.output, "--output", folder=False)
        if Path(args.output).exists() and not os.access(args.output, os.W_OK):
            raise ConfigError(f"--output {args.output}: this process may not write that file; choose another")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        raise ConfigError("--tasks names no task; e.g. --tasks builtin or --tasks boolq,piqa")


def run(args) -> int:
    from ..assets import BUILTIN_NAME, builtin_split
    from ..data.multiple_choice import load_mc_items
    from ..evaluation.multiple_choice import score_items
    from ..model.registry import claimed_family
    from ..train.language import check_vocabulary, load_tokenizer

    check_args(args)
    family = claimed_family(args.model)
    if family is not None and "sequence" in family.tasks:
        return run_sequence(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    local = [t for t in tasks if t == BUILTIN_NAME or Path(t).suffix in (".json", ".jsonl")]
    harness = [t for t in tasks if t not in local]
    local_items = {t: load_mc_items(builtin_split("test") if t == BUILTIN_NAME else t)[: args.limit] for t in local}
    if harness:
        from ..evaluation.harness import check_tasks

        check_tasks(harness, include_path=args.include_path)
    model = load_model(args.model, args.adapter)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_vocabulary(tokenizer, model.base_model if hasattr(model, "base_model") else model)
    results = {}
    for task in local:
        items = local_items[task]
        scores = score_items(model, tokenizer, items, batch_size=args.batch_size, max_length=args.max_length)
        results[task] = {"acc": scores["acc"], "acc_norm": scores["acc_norm"], "n": scores["n"]}
    if harness:
        from ..evaluation.harness import MambaPeftLM, run_harness

        lm = MambaPeftLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        out = run_harness(lm, harness, include_path=args.include_path, limit=args.limit)
        for task, metrics in out["results"].items():
            results[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return report(results, args.output)


def run_sequence(args) -> int:
    """An S4D classifier (and a sequence run's adapter) on sequence tasks: top-1 accuracy."""
    from ..errors import ConfigError
    from ..train.sequence import evaluate

    if args.tokenizer or args.include_path:
        raise ConfigError("--tokenizer and --include-path are for language models; an S4D model reads sequences")
    tasks = ["digits" if t.strip() == "builtin" else t.strip() for t in args.tasks.split(",") if t.strip()]
    return report(evaluate(args.model, args.adapter, tasks, batch_size=args.batch_size, limit=args.limit),
                  args.output)


def report(results: dict, output: str | None) -> int:
    for task, metrics in results.items():
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"{task}: {shown}")
    if output:
        from ..train.run_folder import write_atomic

        write_atomic(Path(output), json.dumps(results, indent=2) + "\n")
    return 0
