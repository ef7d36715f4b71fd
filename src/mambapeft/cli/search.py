"""`mambapeft search`: the HybridPEFT search (without arguments: a short search on the built-in model and task; with
--task vision, on the built-in tiny Vim and rotation task)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from ..config.spec import MethodSpec, PeftConfig
from ..errors import ConfigError, RunFolderError
from ..train.tasks import TASKS

SEARCH_CONFIG = "search_config.json"
SEARCH_SPACE = "search_space.json"
SEARCH_OUTPUTS = ("search.db", "trials", "report", "final", "baseline", "best_config.json", SEARCH_CONFIG,
                  SEARCH_SPACE)


def add_parser(commands):
    parser = commands.add_parser(
        "search",
        help="search the best hybrid of PEFT methods (paper Algorithm 1)",
        description="Two-step HybridPEFT search with Optuna's TPE: step 1 switches methods on and off at their "
        "smallest setting, step 2 tunes the best combination's hyperparameters and may remove one method. Trials are "
        "scored on validation data only; the final best is retrained and scored on the test data. Without arguments: "
        "a short search on the built-in model and task. Several processes given the same --storage (a SQLite file, "
        "or a PostgreSQL URL for many machines) work on one study together; a killed search resumes when rerun with "
        "the same settings. A folder holding a search with other settings is refused unless --overwrite.",
    )
    parser.add_argument("--task", choices=tuple(TASKS), default=None,
                        help="language (default), vision (Vim or VMamba on VTAB-1k tasks: trials train on train800 "
                        "and are scored on val200; the final run trains on train800val200 and reports test) or "
                        "sequence (an S4D on sequences; trials hold 20%% of the training data out for validation)")
    parser.add_argument("--config", help="a run config (JSON/YAML, the keys of `mambapeft train`): the full recipe the "
                        "winner is trained with; an extra key 'trial' holds the trial budget's overrides (e.g. "
                        "{max_steps: 80, eval_steps: 40}), and 'tasks' lists per-task overrides ({data, val_data, "
                        "test_data}, or for vision {vtab_task, data_root}) to average over")
    parser.add_argument("--model", help="the model to search on, replacing the config's (e.g. tiny-vmamba: the "
                        "built-in vision demo on the built-in VMamba instead of tiny-vim)")
    parser.add_argument("--trial-steps", type=int, help="optimiser steps of one trial (the trial budget; the final "
                        "run keeps the config's full recipe)")
    parser.add_argument("--space", help="search-space file (JSON/YAML; schema in docs/search.md). Default: the paper's "
                        "Table 9 space (a short one for the built-in task)")
    parser.add_argument("--output-dir", default=None,
                        help="run folder: storage, trials, report, best config (default: runs/search, or "
                             "runs/search-vision for vision, so the two demos do not meet)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUTPUT_DIR/search.db)")
    parser.add_argument("--study-name", default="hybridpeft", help="study name inside the storage")
    parser.add_argument("--step1-trials", type=int, help="override the space's step-1 trial count")
    parser.add_argument("--step2-trials", type=int, help="override the space's step-2 trial count")
    parser.add_argument("--pruner", choices=("median", "successive-halving", "hyperband", "none"), default=None,
                        help="how hopeless trials stop early: median (stop below the median of earlier trials at the "
                        "same step), successive-halving or hyperband (multi-fidelity: keep the best half at each "
                        "evaluation, so a fixed time buys more trials), none (default: the task's demo choice, "
                        "else median)")
    parser.add_argument("--no-prune", action="store_true", help="do not stop trials early (= --pruner none)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (each extra worker offsets it)")
    parser.add_argument("--worker", action="store_true", help="only help run trials: no report, no final run")
    # set by --jobs for the helpers it starts: a fixed seed offset, so a search with --jobs samples the same
    # configurations on every run (a worker started by hand offsets its seed by its process id)
    parser.add_argument("--helper-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes that run trials side by side on this machine, sharing its cores (each gets "
                        "cores / jobs torch threads; the winner's and the default's final runs then also run side by "
                        "side). Small models train faster this way than with more threads in one process. Default: "
                        "2 for the built-in demos on a machine with 2 or more cores, else 1")
    parser.add_argument("--no-final", action="store_true",
                        help="skip retraining the best configuration on the test data")
    parser.add_argument("--no-baseline", action="store_true", help="skip training the task's default method with the "
                        "same final recipe (the comparison the summary line shows)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier search in --output-dir")
    parser.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    parser.add_argument("--grace", type=int, default=120, help="seconds of silence after which a running trial "
                        "counts as dead and is retried")
    parser.set_defaults(run=run)


def load_run_config(path: str | None, task: str | None = None, trial_steps: int | None = None,
                    model: str | None = None):
    """(task kind, the full recipe's run config, the trial budget's overrides, task overrides) from a run config file,
    or the built-in demo's."""
    from ..train.config import RunConfig
    from ..train.tasks import kind_of

    raw = RunConfig.from_file(path) if path else {}
    where = path or "the built-in demo"
    kind = kind_of(raw, task, path or "the command line", model=model)
    tasks = raw.pop("tasks", []) or []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ConfigError(f"{where}: 'tasks' must be a list of objects such as {{\"data\": \"a.json\"}}")
    trial = raw.pop("trial", None) if path else dict(kind.search_builtin_trial)
    if trial is not None and not isinstance(trial, dict):
        raise ConfigError(f"{where}: 'trial' must be an object of run options for the trials, e.g. {{max_steps: 80}}")
    trial = dict(trial or {})
    if trial_steps is not None:
        trial["max_steps"] = trial_steps
        if "eval_steps" in kind.Config.__dataclass_fields__:
            trial.setdefault("eval_steps", max(1, trial_steps // 2))
    raw.pop("task", None)
    if model is not None:
        raw["model"] = model
    if not path:
        raw.update(kind.search_builtin_recipe)
    base = kind.resolve(raw, where=where)
    kind.Config.from_dict({**base.to_dict(), **trial}, where=f"{where}: trial")          # the budget is checked too
    return kind, base, trial, tasks


def default_methods(kind, base) -> list[str]:
    """What `mambapeft train` runs on the searched model without --method, the baseline the winner is compared with:
    the task's default, or where the model's family has its own the family's (a hybrid's `placement/both`: every
    layer type; the task's lora_p_x alone would leave its attention and MLPs untrained)."""
    if kind.name == "language":
        from ..train.language import family_default_method

        if methods := family_default_method(base.model):
            return list(methods)
    return list(kind.Config().method)


def default_space(kind, base, log=print):
    """The paper's space from the registry, less the methods that do not apply to the model's family (partial_norm
    outside Mamba-2, say); the built-in demos search a restricted space with few trials."""
    from ..errors import NotApplicable
    from ..methods import REGISTRY
    from ..peft import get_peft_model
    from ..search.space import paper_space

    space = paper_space(vision=kind.search_vision_methods)
    for method, step1 in kind.search_extra_step1.items():      # a kind's methods outside the paper space (S4D's)
        space.step1[method] = dict(step1)
        if REGISTRY[method].search_step2:
            space.step2[method] = dict(REGISTRY[method].search_step2)
    model = kind.shapes_model(base)
    skipped = []
    for method in space.step1:
        try:
            get_peft_model(model, [space.step1_spec(method)])
        except NotApplicable:
            skipped.append(method)
    if skipped:
        log(f"search space: {', '.join(skipped)} left out (not applicable to {base.model}; `mambapeft methods` "
            f"says why)")
        space = space.restricted_to([m for m in space.step1 if m not in skipped])
    if kind.is_builtin_model(base):
        space = space.restricted_to(kind.search_builtin_methods)
        space.step1_trials, space.step2_trials = kind.search_builtin_trials
        lr_range = getattr(kind, "search_builtin_lr", None)
        for ranges in space.step2.values():
            if lr_range and "lr" in ranges:
                ranges["lr"] = dict(lr_range)
    return space


def check_space_fits_model(space, base) -> None:
    """Attaches every step-1 method to a shapes-only copy of the model: a method it lacks fails now."""
    from ..peft import get_peft_model
    from ..train.tasks import get_task

    for method in space.step1:
        try:
            get_peft_model(get_task(base.kind).shapes_model(base), [space.step1_spec(method)])
        except ConfigError as err:
            raise ConfigError(f"search space: step1.methods.{method} does not fit {base.model}: {err}") from None


def check_trial_budget(space, trial: dict) -> None:
    """Every method the search may try must fit a trial's budget (SDT's warm-up must be shorter than a trial): step 1's
    settings, and step 2's with each option at the end of its range that needs the most steps."""
    from ..methods import REGISTRY
    from ..search.space import Range

    steps = trial.get("max_steps")
    if steps in (None, -1):
        return
    candidates = [(method, dict(options), "step1") for method, options in space.step1.items()]
    for method, ranges in space.step2.items():
        options = dict(space.step1.get(method, {}))
        for option, value in ranges.items():
            if option in ("lr", "weight_decay"):
                continue
            found = Range.of(value)
            if found is None:
                options[option] = value
            elif found.kind != "choice":
                options[option] = found.bounds[1]
        candidates.append((method, options, "step2"))
    for method, options, step in candidates:
        try:
            spec = MethodSpec.build(method, options)
            REGISTRY[method](spec.config).check_training(steps)
        except ConfigError as err:
            raise ConfigError(f"a trial runs {steps} optimiser steps (--trial-steps or the config's trial section), "
                              f"too few for the search space's {step}.methods.{method}: {err}. Give trials more "
                              f"steps, or shorten that method's warm-up in the space (--space)") from None


STORAGE_BACKENDS = ("sqlite", "postgresql", "mysql")


def check_storage(url: str) -> None:
    """The --storage URL before anything is written: a scheme Optuna supports, its driver installed, a SQLite file
    that can be created, a server that answers."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from ..outputs import check_writable
    from ..search.hybrid import with_driver

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {url!r} is not a database URL; e.g. sqlite:///search.db or "
                          f"postgresql+psycopg2://user:password@host/database") from None
    if parsed.get_backend_name() not in STORAGE_BACKENDS:
        raise ConfigError(f"--storage {shown_url(url)}: unknown database {parsed.get_backend_name()!r}; Optuna's "
                          f"storages here are {', '.join(f'{b}://' for b in STORAGE_BACKENDS)}")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            check_writable(parsed.database, "--storage", folder=False)
            if Path(parsed.database).exists() and not os.access(parsed.database, os.W_OK):
                raise ConfigError(f"--storage {url}: this process may not write {parsed.database}")
        return
    try:
        engine = sqlalchemy.create_engine(with_driver(url), connect_args={"connect_timeout": 10})
    except (NoSuchModuleError, ImportError) as err:
        raise ConfigError(f"--storage {shown_url(url)}: its database driver is not installed ({err}); for "
                          f"PostgreSQL: pip install psycopg2-binary (or the extra mambapeft[postgres])") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0][:300]
        raise ConfigError(f"--storage {shown_url(url)}: cannot connect to the database ({reason}). Start the server "
                          f"or fix the URL (host, port, user, password, database name)") from None
    finally:
        engine.dispose()


def settings_fingerprint(settings: dict) -> str:
    """What a search is (run config, trial budget, tasks, space, pruner): stored in the study, so a worker started with
    other settings is refused instead of joining."""
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def ready_folder(out: Path, settings: dict, overwrite: bool, log=print) -> None:
    """Refuses a folder holding a search with other settings (unless --overwrite); the same settings resume it."""
    saved_file = out / SEARCH_CONFIG
    if saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text())
        except ValueError:
            saved = None
        if saved != settings and not overwrite:
            changed = sorted(k for k in set(settings) | set(saved or {}) if (saved or {}).get(k) != settings.get(k))
            raise RunFolderError(
                f"{out} holds a search with other settings ({', '.join(changed)} differ). Rerun it with the same "
                f"settings to resume it, replace it with --overwrite, or choose another --output-dir")
        if saved != settings:
            log(f"--overwrite: removing the earlier search in {out}")
            for name in SEARCH_OUTPUTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif overwrite:
        for name in SEARCH_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    from ..train.run_folder import write_atomic

    write_atomic(saved_file, json.dumps(settings, indent=2) + "\n")


def run(args) -> int:
    from ..outputs import check_writable
    from ..search.hybrid import SearchSettings, open_storage, open_study, run_search, study_name
    from ..search.objective import TrainingObjective, final_config
    from ..search.report import write_report
    from ..search.space import SearchSpace
    from ..train.run_folder import FolderLock, write_atomic
    from ..verbosity import quiet_third_party

    kind, base, trial, tasks = load_run_config(args.config, args.task, args.trial_steps, args.model)
    out = Path(args.output_dir or default_output_dir(kind))
    space = SearchSpace.load(args.space) if args.space else default_space(kind, base)
    if args.step1_trials is not None:
        space.step1_trials = args.step1_trials
    if args.step2_trials is not None:
        space.step2_trials = args.step2_trials
    space.validate(args.space or "the default search space")
    check_space_fits_model(space, base)
    check_trial_budget(space, trial)
    check_writable(out, "--output-dir", folder=True)

    storage_url = args.storage or f"sqlite:///{(out / 'search.db').resolve()}"
    check_storage(storage_url)
    seed = args.seed
    if args.worker:         # a helper of --jobs: its index; a worker started by hand: its process id
        seed += args.helper_index if args.helper_index is not None else os.getpid() % 10_000
    pruner = "none" if args.no_prune else args.pruner or getattr(kind, "search_builtin_pruner", "median")
    described = {"base": base.to_dict(), "trial": trial, "tasks": tasks, "space": space.to_dict(),
                 "study_name": args.study_name, "pruner": pruner}
    settings = SearchSettings(study_name=args.study_name, storage=storage_url, seed=seed, prune=pruner != "none",
                              pruner=pruner, heartbeat_interval=args.heartbeat, grace_period=args.grace,
                              fingerprint=settings_fingerprint(described))
    jobs = search_jobs(args.jobs, builtin=args.config is None) if args.argv is not None else 1
    if jobs > 1 and not base.threads:           # not part of what the search is: left out of the fingerprint
        base.threads = max(1, (os.cpu_count() or 1) // jobs)
    lock = FolderLock(out, "search folder")
    if not args.worker:                 # workers join the main process's search; two main processes may not
        lock.acquire()
        try:
            ready_folder(out, described, args.overwrite)
        except BaseException:
            lock.release()
            raise
    with lock:
        if not args.worker:
            write_atomic(out / SEARCH_SPACE, json.dumps(space.to_dict(), indent=2) + "\n")
        else:
            out.mkdir(parents=True, exist_ok=True)
        objective = TrainingObjective(base, tasks, out, trial=trial)
        print(f"search: {len(space.step1)} methods, {space.step1_trials} + {space.step2_trials} trials "
              f"({budget_text({**base.to_dict(), **trial})} each, pruner {pruner}); "
              + ("trials run the full recipe, so the winner's run is its trial's" if trial_is_recipe(trial, base)
                 else f"the winner then trains with the full recipe ({budget_text(base)})")
              + f"; storage {shown_url(storage_url)} (studies {study_name(args.study_name, 1)}, "
              f"{study_name(args.study_name, 2)}); worker {worker()}", flush=True)

        def progress(step, done, total):
            print(f"step {step}: {done}/{total} trials finished", flush=True)

        best_task = tasks[0] if tasks else {}
        baseline = None
        if not (args.worker or args.no_final or args.no_baseline):
            default = [spec.to_dict() for spec in PeftConfig.parse(default_methods(kind, base)).methods]
            baseline = final_config(objective, default, best_task, out / "baseline")
        helpers = [] if args.worker else start_helpers(args.argv, jobs - 1, out, base.threads)
        # side by side, the default's full-recipe run needs nothing from the search: it runs beside step 2, whose
        # few trials (the first is step 1's best, replayed) leave a process free, and not in step 1, where it
        # would be one process more than the cores
        started: dict = {}

        def start_default():
            started["pool"], started["run"] = start_final_run(baseline, "baseline")

        try:
            result = run_search(space, objective, settings, progress=progress,
                                after_step1=start_default if baseline is not None and jobs > 1 else None)
            wait_for_helpers(helpers)
        finally:
            for helper in helpers:
                if helper.poll() is None:
                    helper.terminate()
            pool, default_run = started.get("pool"), started.get("run")
            if pool is not None and sys.exc_info()[0] is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        print(f"step 1 kept: {' + '.join(result.combination)}")
        print(f"best (step {result.best_step}, trial {result.best_trial}): validation {result.best_score:.4f} with "
              + " + ".join(c["method"] for c in result.best_config))
        if args.worker:
            return 0

        storage = open_storage(settings)
        with quiet_third_party():           # Optuna's notices on a small study's importances are expected
            report = write_report(out / "report", {step: open_study(settings, storage, step) for step in (1, 2)})
        final = final_config(objective, result.best_config, best_task, out / "final")
        config_file = out / "best_config.json"
        write_atomic(config_file, json.dumps(ready_to_train(final), indent=2) + "\n")
        print(f"best configuration: {config_file} (mambapeft train --config {config_file})")
        summary = {"trial_budget": trial, "final_recipe": budget_text(base), "pruner": pruner,
                   "winner": {"methods": [c["method"] for c in result.best_config], "search_validation":
                              result.best_score}}
        if not args.no_final:
            trial_run = winner_trial_run(objective, result, final, out, len(tasks))
            winner_scores = reuse_trial_run(trial_run, final) if trial_run else final_scores(final, "final")
            if default_run is not None:
                baseline_scores = default_run.result()
                pool.shutdown()
            else:
                baseline_scores = baseline and final_scores(baseline, "baseline")
            summary["winner"].update(winner_scores)
            if baseline is not None:
                summary["default"] = {"methods": default_methods(kind, base), **baseline_scores}
                summary["kept"] = kept(summary)
                if summary["kept"] == "default":        # chosen on validation only: the test set stays unseen
                    write_atomic(config_file, json.dumps(ready_to_train(baseline), indent=2) + "\n")
            print(summary_line(summary))
        write_atomic(report / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"report: {report}/trials.md, {report}/summary.json, {report}/importances.json, {report}/history.png, "
              f"{report}/pareto.png")
    return 0


def search_jobs(jobs: int | None, builtin: bool) -> int:
    """How many processes run trials: as asked, else 2 for a built-in demo where there are two cores to share."""
    if jobs is not None:
        if jobs < 1:
            raise ConfigError(f"--jobs {jobs}: give 1 or more processes")
        return jobs
    return 2 if builtin and (os.cpu_count() or 1) >= 2 else 1


def start_helpers(argv: list[str], count: int, out: Path, threads: int) -> list[subprocess.Popen]:
    """`count` worker processes (`mambapeft ... search --worker`, the same arguments) on this search's storage; each
    writes its output to OUTPUT_DIR/workers/ and ends when the search's steps are done."""
    if count < 1:
        return []
    logs = out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    helpers = []
    for i in range(count):
        with open(logs / f"worker-{i + 1}.log", "w") as log:
            command = [sys.executable, "-m", "mambapeft", *argv, "--worker", "--helper-index", str(i + 1)]
            helpers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env))
    print(f"{count} helper process{'es' if count > 1 else ''} run trials beside this one ({threads} thread"
          f"{'s' if threads > 1 else ''} each; their output: {logs}/)", flush=True)
    return helpers


def wait_for_helpers(helpers: list[subprocess.Popen]) -> None:
    """The steps are done for every process once run_search returns; a helper that failed is named (its trials were
    retried or counted by the others, so the search's result stands)."""
    for i, helper in enumerate(helpers):
        if helper.wait() != 0:
            print(f"note: helper process {i + 1} ended with exit code {helper.returncode} (see its log in "
                  f"workers/worker-{i + 1}.log); the other processes ran its trials", flush=True)


def start_final_run(config, what: str):
    """(pool, future): `config`'s full-recipe run in a fresh process, started now."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return pool, pool.submit(final_scores, config, what)


def trial_is_recipe(trial: dict, base) -> bool:
    """Whether the trial budget changes nothing of the full recipe (the built-in language demo's trials)."""
    values = base.to_dict()
    return all(values.get(key) == value for key, value in trial.items())


def winner_trial_run(objective, result, final, out: Path, n_tasks: int) -> Path | None:
    """The winner's trial run folder where that trial trained exactly what the final run would (same recipe, seed
    and methods, on the one task; only the test set differs): training it again would repeat it."""
    if n_tasks > 1:
        return None
    folder = out / "trials" / f"step{result.best_step}-trial{result.best_trial}" / "task0"
    specs = [MethodSpec.from_dict(c) for c in result.best_config]
    as_trial = objective.task_config(specs, {}, folder, with_test=False).to_dict()
    as_final = final.to_dict()
    same = all(as_trial.get(k) == v for k, v in as_final.items() if k not in ("output_dir", "test_data"))
    return folder if same and (folder / "adapter").is_dir() and (folder / "results.json").is_file() else None


def reuse_trial_run(folder: Path, config) -> dict:
    """The winner's final run as its trial ran it: the trial's folder becomes final/ and its adapter is scored on
    the test set, as `final_scores` reports a run it trained."""
    from ..outputs import atomic_folder
    from ..peft import PeftModel
    from ..train.tasks import get_task

    out = Path(config.output_dir)
    task = get_task(config.kind)
    prepared = task.prepare(config, lambda *_: None)
    with atomic_folder(out, overwrite=True, option="the search's final/ folder") as staging:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        results = json.loads((staging / "results.json").read_text())
        model = PeftModel.from_pretrained(prepared.model, staging / "adapter").eval()
        results.update(fine_tuned=task.score_test(model, prepared, config),
                       trained_as=str(folder.relative_to(out.parent)))
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return reported_scores(results, config, "final")


def ready_to_train(config) -> dict:
    """best_config.json: the run config without its output_dir (the search's own final/ folder, which holds that
    run), so `mambapeft train --config best_config.json` trains into a folder named after the run."""
    return {k: v for k, v in config.to_dict().items() if k != "output_dir"}


def default_output_dir(kind) -> str:
    """runs/search for language, runs/search-<kind> otherwise: the language and vision demos, run one after the
    other with no arguments, must not find each other's search in their folder (which is refused)."""
    return "runs/search" if kind.name == "language" else f"runs/search-{kind.name}"


def shown_url(url: str) -> str:
    """The storage URL as printed, in the form optuna and optuna-dashboard accept (a PostgreSQL URL names its
    driver: postgresql+psycopg2://...); a password in it is masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from ..search.hybrid import with_driver

    try:
        full = with_driver(url)
    except ConfigError:
        full = url
    try:
        return make_url(full).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def budget_text(values) -> str:
    """How long a run trains, in words: "80 steps" / "8.0 epochs"."""
    values = values if isinstance(values, dict) else values.to_dict()
    if values.get("max_steps", -1) not in (None, -1):
        return f"{values['max_steps']} steps"
    return f"{values['epochs']} epochs" if "epochs" in values else "the base run's length"


def final_scores(config, what: str) -> dict:
    """Trains `config` (the full recipe) and returns its validation and test scores."""
    from ..train.run import fine_tune

    return reported_scores(fine_tune(config, overwrite=True, log=lambda *_: None), config, what)


def reported_scores(results: dict, config, what: str) -> dict:
    """A final run's validation and test scores from its results, printed on one line."""
    scores = {"validation": results.get("best_validation"), "steps": results.get("steps"),
              "test": (results.get("fine_tuned") or {}).get("acc")}
    val, test = scores["validation"], scores["test"]
    source = f"; the trial's run, {results['trained_as']}" if "trained_as" in results else ""
    print(f"{what} ({scores['steps']} steps, {' + '.join(config.method)}{source}): "
          + (f"validation {val:.4f}, " if val is not None else "")
          + (f"test accuracy {test:.1%}" if test is not None else "no test set"))
    return scores


def kept(summary: dict) -> str:
    """Which of the search's winner and the default (both trained with the full recipe) the search hands back: the
    one with the higher validation score (a tie keeps the winner). Short trials rank configurations by how fast they
    learn; the full recipe can reverse that order, and a search should never hand back what its own validation
    shows to be worse than not searching."""
    winner, default = summary["winner"].get("validation"), summary["default"].get("validation")
    return "default" if winner is not None and default is not None and default > winner else "winner"


def summary_line(summary: dict) -> str:
    def scores(entry):
        val, test = entry.get("validation"), entry.get("test")
        return (f"validation {val:.1%}" if val is not None else "no validation") + (
            f", test {test:.1%}" if test is not None else "")

    line = f"summary: search winner {' + '.join(summary['winner']['methods'])}: {scores(summary['winner'])}"
    if "default" in summary:
        line += (f"; the default {' + '.join(summary['default']['methods'])} with the same recipe: "
                 f"{scores(summary['default'])}")
    if summary.get("kept") == "default":
        line += "; the default scored higher on validation, so best_config.json holds the default"
    return line
