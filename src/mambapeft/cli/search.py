"""`mambapeft search`: the HybridPEFT search (without arguments: a short search on the built-in model and task;
with --task vision, on the built-in tiny Vim and rotation task)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..errors import ConfigError

# The built-in demo: a handful of trials of a short training each, well under 10 minutes on two CPU cores. 80 steps
# is about where PEFT on the built-in model starts to beat chance (lora_p_x: ~35% validation after 84 steps), and
# step 2's rates are Table 9's range moved up 10x, to where the built-in model's rates lie (config.presets).
BUILTIN_RUN = dict(max_steps=80, eval_steps=40, warmup_steps=5, logging_steps=20, save_total_limit=1)
BUILTIN_LR_RANGE = {"log": [1e-3, 5e-2]}
BUILTIN_METHODS = ("lora_p_x", "lora_in_proj", "lora_out_proj", "lora_p_b", "partial_a", "partial_conv1d",
                   "additional_scan", "affix", "sdt")
# The built-in vision demo: tiny-vim on digits_rotation, 5 epochs a trial (about 20 s each on two CPU cores).
BUILTIN_VISION_RUN = dict(epochs=5.0, warmup_epochs=1.0, eval_epochs=1.0, save_total_limit=1)
BUILTIN_VISION_METHODS = ("lora_p_x", "lora_in_proj", "lora_out_proj", "partial_a", "partial_d", "partial_cls_token",
                          "partial_pos_embed", "additional_scan", "affix", "sdt")


def add_parser(commands):
    parser = commands.add_parser(
        "search",
        help="search the best hybrid of PEFT methods (paper Algorithm 1)",
        description="Two-step HybridPEFT search with Optuna's TPE: step 1 switches methods on and off at their "
        "smallest setting, step 2 tunes the best combination's hyperparameters and may remove one method. Trials are "
        "scored on validation data only; the final best is retrained and scored on the test data. Without arguments: "
        "a short search on the built-in model and task. Several processes given the same --storage (a SQLite file, "
        "or a PostgreSQL URL for many machines) work on one study together; a killed search resumes when rerun.",
    )
    parser.add_argument("--task", choices=("language", "vision"), default=None,
                        help="language (default) or vision (Vim on VTAB-1k tasks: trials train on train800 and are "
                        "scored on val200; the final run trains on train800val200 and reports test)")
    parser.add_argument("--config", help="a run config (JSON/YAML, the keys of `mambapeft train`) for every trial; "
                        "an extra key 'tasks' lists per-task overrides ({data, val_data, test_data}, or for vision "
                        "{vtab_task, data_root}) to average over")
    parser.add_argument("--space", help="search-space file (JSON/YAML; schema in the README). Default: the paper's "
                        "Table 9 space (a short one for the built-in task)")
    parser.add_argument("--output-dir", default="runs/search", help="run folder: storage, trials, report, best config")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT_DIR/search.db)")
    parser.add_argument("--study-name", default="hybridpeft", help="study name inside the storage")
    parser.add_argument("--step1-trials", type=int, help="override the space's step-1 trial count")
    parser.add_argument("--step2-trials", type=int, help="override the space's step-2 trial count")
    parser.add_argument("--no-prune", action="store_true", help="do not stop hopeless trials early")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (each extra worker offsets it)")
    parser.add_argument("--worker", action="store_true", help="only help run trials: no report, no final run")
    parser.add_argument("--no-final", action="store_true", help="skip retraining the best configuration on the test data")
    parser.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    parser.add_argument("--grace", type=int, default=120, help="seconds of silence after which a running trial "
                        "counts as dead and is retried")
    parser.set_defaults(run=run)


def load_run_config(path: str | None, task: str | None = None):
    """(base run config, task overrides) from a run config file, or the built-in demo's (language or vision)."""
    from ..train.config import TrainConfig, config_kind, resolve_config
    from ..train.vision import resolve_vision_config

    raw = TrainConfig.from_file(path) if path else {}
    kind = config_kind(raw, task, path or "the command line")
    tasks = raw.pop("tasks", []) or []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ConfigError(f"{path}: 'tasks' must be a list of objects such as {{\"data\": \"a.json\"}}")
    if kind == "vision":
        return resolve_vision_config(raw if path else dict(BUILTIN_VISION_RUN), where=path or "the built-in demo"), tasks
    return resolve_config(None, raw if path else dict(BUILTIN_RUN)), tasks


def default_space(base):
    from ..search.space import paper_space

    vision = base.kind == "vision"
    space = paper_space(vision=vision)
    if vision and base.model == "tiny-vim" and base.data_root is None:
        space = space.restricted_to(BUILTIN_VISION_METHODS)
        space.step1_trials, space.step2_trials = 5, 3
    elif not vision and base.data == "builtin" and base.model == "builtin":
        space = space.restricted_to(BUILTIN_METHODS)
        space.step1_trials, space.step2_trials = 5, 3
        for ranges in space.step2.values():
            if "lr" in ranges:
                ranges["lr"] = dict(BUILTIN_LR_RANGE)
    return space


def check_space_fits_model(space, base) -> None:
    """Attaches every step-1 method to the model (a shapes-only copy for language): a method it lacks fails now."""
    from ..assets import BUILTIN_MODEL
    from ..cli.params import shapes_model
    from ..peft import get_peft_model

    if base.kind == "vision":
        import copy

        from ..model.vim_loading import load_vim

        name, loaded = base.model, load_vim(base.model)
        build = lambda: copy.deepcopy(loaded)                              # noqa: E731
    else:
        name = str(BUILTIN_MODEL) if base.model == "builtin" else base.model
        build = lambda: shapes_model(name)                                 # noqa: E731
    for method in space.step1:
        try:
            get_peft_model(build(), [space.step1_spec(method)])
        except ConfigError as err:
            raise ConfigError(f"search space: step1.methods.{method} does not fit {name}: {err}") from None


def run(args) -> int:
    from ..search.hybrid import SearchSettings, open_storage, open_study, run_search
    from ..search.objective import TrainingObjective, final_config
    from ..search.report import write_report
    from ..search.space import SearchSpace
    from ..train.run import fine_tune
    from ..train.vision import fine_tune_vision

    out = Path(args.output_dir)
    base, tasks = load_run_config(args.config, args.task)
    space = SearchSpace.load(args.space) if args.space else default_space(base)
    if args.step1_trials is not None:
        space.step1_trials = args.step1_trials
    if args.step2_trials is not None:
        space.step2_trials = args.step2_trials
    space.validate(args.space or "the default search space")
    check_space_fits_model(space, base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_space.json").write_text(json.dumps(space.to_dict(), indent=2) + "\n")

    storage_url = args.storage or f"sqlite:///{(out / 'search.db').resolve()}"
    seed = args.seed + (os.getpid() % 10_000 if args.worker else 0)
    settings = SearchSettings(study_name=args.study_name, storage=storage_url, seed=seed, prune=not args.no_prune,
                              heartbeat_interval=args.heartbeat, grace_period=args.grace)
    objective = TrainingObjective(base, tasks, out)
    print(f"search: {len(space.step1)} methods, {space.step1_trials} + {space.step2_trials} trials; "
          f"storage {storage_url} (study {args.study_name}); worker {socket.gethostname()}:{os.getpid()}")

    def progress(step, done, total):
        print(f"step {step}: {done}/{total} trials finished", flush=True)

    result = run_search(space, objective, settings, progress=progress)
    print(f"step 1 kept: {' + '.join(result.combination)}")
    print(f"best (step {result.best_step}, trial {result.best_trial}): validation {result.best_score:.4f} with "
          + " + ".join(c["method"] for c in result.best_config))
    if args.worker:
        return 0

    storage = open_storage(settings)
    report = write_report(out / "report", {step: open_study(settings, storage, step) for step in (1, 2)})
    best_task = tasks[0] if tasks else {}
    final = final_config(objective, result.best_config, best_task, out / "final")
    config_file = out / "best_config.json"
    config_file.write_text(json.dumps(final.to_dict(), indent=2) + "\n")
    print(f"best configuration: {config_file} (mambapeft train --config {config_file})")
    if not args.no_final:
        results = (fine_tune_vision if base.kind == "vision" else fine_tune)(final)
        if "fine_tuned" in results:
            validation = results.get("best_validation")
            print("final: " + (f"validation {validation:.4f}, " if validation is not None else "")
                  + f"test accuracy {results['fine_tuned']['acc']:.1%}")
    print(f"report: {report}/trials.md, {report}/importances.json, {report}/history.png, {report}/pareto.png")
    return 0
