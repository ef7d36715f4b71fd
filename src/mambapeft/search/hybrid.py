"""HybridPEFT: the paper's two-step search (Algorithm 1) on Optuna, resumable and shared by many workers.

Step 1 switches each method of the space on or off at its smallest setting (TPE over booleans; methods that cannot
be combined are one choice among them, SearchSpace.exclusive_groups, so no trial is spent on a clash) and keeps the
best combination. Step 2 searches, on that combination only, each kept method's hyperparameters plus the choice
"remove one method, or none"; its first trial is exactly step 1's best configuration (Algorithm 1, line 20: the
same methods, options, learning rates and decays, as the trial ran them), so step 2 cannot end below step 1.
Scores are validation scores; test scores are the objective's business for the final best only. Trials may stop
early: Optuna's median, successive-halving or Hyperband pruner (`SearchSettings.pruner`).

Both steps are Optuna studies in one storage (a URL; default a SQLite file in the run folder), named
`<name>-step1` and `<name>-step2`. Any number of worker processes, on one machine or many, may run `run_search`
on the same storage at once. Each running trial sends a heartbeat; a trial whose worker died (killed, machine
lost) is marked failed once its heartbeat is older than the grace period and is retried with the same
parameters, so a restarted search loses no finished trial and leaves none stuck as running. Each step runs exactly
its number of trials (one that two workers start at once is ended as surplus), and a step ends for every worker
only when none of its trials runs, so all build step 2 on the same step 1.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ..config.spec import MethodSpec
from ..errors import ConfigError
from ..methods import REGISTRY
from ..peft import check_combination
from .space import Range, SearchSpace

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
NONE = "none"


class Objective(Protocol):
    """Trains one configuration and returns its mean validation score (higher is better).

    `report(step, score)` passes intermediate validation scores on, for pruning; it raises
    optuna.TrialPruned when the trial should stop. The returned dict has at least "score" and "trainable".
    """

    def __call__(self, specs: list[MethodSpec], report: Callable[[int, float], None], tag: str) -> dict: ...


PRUNERS = ("median", "successive-halving", "hyperband", "none")


@dataclass
class SearchSettings:
    study_name: str = "hybridpeft"
    storage: str = "sqlite:///search.db"
    seed: int | None = 0
    prune: bool = True
    pruner: str = "median"                # how trials stop early (when prune): one of PRUNERS
    heartbeat_interval: int = 30          # seconds between heartbeats of a running trial
    grace_period: int = 120               # a running trial silent this long belongs to a dead worker
    poll_interval: float = 2.0            # how often a worker with nothing to do looks again
    fingerprint: str | None = None        # what the search is (config, budget, space): a worker must match it


def _retry_callback():
    """Retries a dead worker's trial with the same parameters (a new WAITING trial, system attribute "failed_trial"
    naming the dead one). The retry does not inherit the dead worker's name: until the process that picks it up
    names itself, it would look like a trial of a dead process and be failed again. Optuna >= 4.9 names the
    callback RetryHeartbeatStaleTrialCallback; older releases RetryFailedTrialCallback."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry = (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=3)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != WORKER}
        retry(study, trial)
    return callback


POSTGRES_DRIVERS = ("psycopg2", "psycopg")      # in order of preference; `pip install mambapeft[postgres]`: psycopg2


def with_driver(url: str) -> str:
    """A PostgreSQL URL naming no driver (`postgresql://...`) gets the one installed: SQLAlchemy's own default
    changed (psycopg2 up to 2.0, psycopg 3 from 2.1), so the plain URL would otherwise need one or the other."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "postgresql":
        return url
    for driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(driver) is not None:
            return f"postgresql+{driver}://{rest}"
    raise ConfigError("a PostgreSQL storage needs a database driver: pip install psycopg2-binary "
                      "(or the extra mambapeft[postgres])")


def open_storage(settings: SearchSettings) -> RDBStorage:
    url = with_driver(settings.storage)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(10):
        with warnings.catch_warnings():     # heartbeats and the retry callback are marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=settings.heartbeat_interval,
                                  grace_period=settings.grace_period, heartbeat_stale_trial_callback=_retry_callback())
            except ImportError as err:
                raise ConfigError(f"storage {url.partition('://')[0]}://...: its database driver is not installed "
                                  f"({err.__cause__ or err}); for PostgreSQL: pip install psycopg2-binary (or the "
                                  f"extra mambapeft[postgres])") from None
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers started together on an empty database all create Optuna's tables: on PostgreSQL all but
                # one fail ("duplicate key ... pg_type_typname_nsp_index"); a moment later the tables are there
                if attempt == 9:
                    raise
                time.sleep(0.2 + random.random())


def make_pruner(settings: SearchSettings):
    """Median: stop a trial below the median of earlier ones at the same step. Successive halving / Hyperband
    (multi-fidelity): keep only the best fraction of trials at each rung of evaluations, so a fixed time buys more
    trials."""
    name = settings.pruner if settings.prune else "none"
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner {name!r}; one of {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def study_name(name: str, step: int) -> str:
    """The Optuna study of one step of the search `name`: `optuna.load_study(study_name=..., storage=URL)`."""
    return f"{name}-step{step}"


def open_study(settings: SearchSettings, storage, step: int) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=settings.seed, constant_liar=True, multivariate=step == 2)
    pruner = make_pruner(settings)
    return optuna.create_study(study_name=study_name(settings.study_name, step), storage=storage, sampler=sampler,
                               pruner=pruner, direction="maximize", load_if_exists=True)


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


WORKER = "worker"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str) -> bool:
    """Whether the worker "host:pid" ran on this host and no longer runs."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def fail_orphans(study: optuna.Study, grace: float) -> None:
    """Running trials whose process is gone: those with a stale heartbeat (Optuna's own check), those whose worker
    on this host is dead, and those that sent no heartbeat within the grace period (a worker killed while starting
    the trial: Optuna's check skips them). Each is marked failed and retried with the same parameters. Several
    workers may find the same orphan at once: the first marks it, the others leave it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        now = time.time()
        storage = study._storage
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get(WORKER)
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            silent = now - started > grace and not _has_heartbeat(storage, trial._trial_id)
            if not silent and not (worker is not None and _process_gone(worker)):
                continue
            try:
                failed = storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                failed = False                              # another worker failed it first (or it just ended)
            if failed:
                _retry_callback()(study, storage.get_trial(trial._trial_id))


def _has_heartbeat(storage, trial_id: int) -> bool:
    """Whether the trial has sent a heartbeat: a row in the RDB storage's heartbeat table (Optuna has no public
    query for it). The study's storage is a cache around the RDBStorage."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, RDBStorage):
        return True                                      # no heartbeats to look at: leave it to Optuna's check
    with backend.engine.connect() as db:
        row = db.execute(sqlalchemy.text("SELECT 1 FROM trial_heartbeats WHERE trial_id = :id"), {"id": trial_id})
        return row.first() is not None


class SurplusTrial(Exception):
    """A trial started when the step already had its trials (two workers started the last one at once)."""


def check_not_surplus(trial: optuna.Trial, n_trials: int) -> None:
    """Makes the step run exactly `n_trials` trials when workers race: trial numbers order the trials, and a trial
    with `n_trials` earlier ones finished, running or waiting is one too many. It ends at once, failed, before
    any training, with the user attribute "surplus". (A failed trial does not count: its retry takes its place.)"""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING,
                                                                          TrialState.WAITING))
               if t.number < trial.number]
    if len(earlier) >= n_trials:
        trial.set_user_attr("surplus", True)
        raise SurplusTrial(f"trial {trial.number} not run: the step already has its {n_trials} trials")


def run_step(study: optuna.Study, trial_fn, n_trials: int, settings: SearchSettings, progress=None) -> None:
    """Runs trials until the study has `n_trials` finished ones, waiting on other workers' running trials; returns
    once no trial of the step runs or waits, so every worker then reads the same finished step (a retry still
    waiting then is surplus: it ends as such)."""
    shown = None
    while True:
        fail_orphans(study, settings.grace_period)        # dead workers' trials: failed, then retried
        done = _count(study, FINISHED)
        if progress is not None and done != shown:
            progress(done, n_trials)
            shown = done
        waiting = _count(study, (TrialState.WAITING,))
        running = _count(study, (TrialState.RUNNING,))
        if done >= n_trials and not running and not waiting:
            return
        if done + running >= n_trials and not waiting:
            time.sleep(settings.poll_interval)             # others are finishing the last trials
            continue
        study.optimize(lambda trial: _unless_surplus(trial, trial_fn, n_trials), n_trials=1,
                       catch=(SurplusTrial,), gc_after_trial=True)


def _unless_surplus(trial: optuna.Trial, trial_fn, n_trials: int) -> float:
    check_not_surplus(trial, n_trials)
    return trial_fn(trial)


def _reporter(trial: optuna.Trial, prune: bool):
    def report(step: int, score: float) -> None:
        if not math.isfinite(score):
            raise optuna.TrialPruned(f"validation score {score} at step {step}")
        trial.report(score, step)
        if prune and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with validation score {score:.4f}")
    return report


def _evaluate(trial: optuna.Trial, specs: list[MethodSpec], objective: Objective, settings: SearchSettings,
              tag: str) -> float:
    """Scores `specs`; the trial's "config" is what the objective says it ran (learning rates and decays resolved),
    so that step 2 can start from exactly it."""
    trial.set_user_attr("config", [spec.to_dict() for spec in specs])
    trial.set_user_attr("methods", [spec.method for spec in specs])
    result = objective(specs, _reporter(trial, settings.prune), tag=f"{tag}-trial{trial.number}")
    for key, value in result.items():
        if key != "score":
            trial.set_user_attr(key, value)
    return float(result["score"])


# ------------------------------------------------------------------ step 1


def step1_trial(space: SearchSpace, objective: Objective, settings: SearchSettings):
    groups = space.exclusive_groups()
    group_of = {m: (members, allowed) for members, allowed in groups for m in members}

    def trial_fn(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER, worker_id())
        on, asked = set(), set()
        for method in space.step1:
            if method not in group_of:
                if trial.suggest_categorical(f"use:{method}", [False, True]):
                    on.add(method)
                continue
            members, allowed = group_of[method]
            if members[0] in asked:
                continue
            asked.add(members[0])
            labels = ["+".join(subset) or NONE for subset in allowed]
            choice = trial.suggest_categorical("choose:" + "|".join(members), labels)
            on |= set() if choice == NONE else set(choice.split("+"))
        on = [m for m in space.step1 if m in on]
        trial.set_user_attr("methods", on)
        if not on:
            raise optuna.TrialPruned("no method switched on")
        specs = [space.step1_spec(m) for m in on]
        check_combination([REGISTRY[s.method](s.config) for s in specs])     # by construction: cannot clash
        return _evaluate(trial, specs, objective, settings, "step1")
    return trial_fn


def best_combination(study1: optuna.Study) -> list[str]:
    completed = study1.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        raise ConfigError("step 1 finished no trial (all were pruned or failed); nothing to build step 2 on")
    best = max(completed, key=lambda t: (t.value, -t.number))
    return list(best.user_attrs["methods"])


# ------------------------------------------------------------------ step 2


START = "start"            # the user attribute that marks step 2's first trial: step 1's best, exactly


def start_params(space: SearchSpace, config: list[dict]) -> dict:
    """The step-2 parameters of step 1's best configuration (as it ran), for Optuna to record; options that were
    left to the run (None), and values Optuna cannot record in the range (a weight decay of 0 in a log range), are
    not parameters of that trial (it still runs with them: it runs the configuration itself)."""
    params = {"remove": NONE} if space.remove_one and len(config) > 1 else {}
    for spec in config:
        for option, rng in space.ranges(spec["method"]).items():
            if spec.get(option) is not None and rng.can_record(spec[option]):
                params[f"{spec['method']}.{option}"] = spec[option]
    return params


def step2_trial(space: SearchSpace, combination: list[str], objective: Objective, settings: SearchSettings,
                start: list[dict] | None = None, ran: optuna.trial.FrozenTrial | None = None):
    """Step 2's trials. The first is step 1's best configuration, exactly; `ran`, step 1's trial of it, is replayed
    (its score, evaluations and records) instead of training the same configuration with the same seed again."""
    def trial_fn(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER, worker_id())
        if start is not None and trial.user_attrs.get(START):
            with warnings.catch_warnings():       # its values may lie outside the step-2 ranges: recorded as they are
                warnings.simplefilter("ignore")
                for name in start_params(space, start):
                    if name == "remove":
                        trial.suggest_categorical("remove", [NONE, *combination])
                    else:
                        _record(trial, space, name)
            trial.set_user_attr("removed", NONE)
            if ran is not None and ran.user_attrs.get("config") == start:
                return _replay(trial, ran)
            return _evaluate(trial, [MethodSpec.from_dict(c) for c in start], objective, settings, "step2")
        remove = NONE
        if space.remove_one and len(combination) > 1:
            remove = trial.suggest_categorical("remove", [NONE, *combination])
        trial.set_user_attr("removed", remove)
        specs = []
        for method in combination:
            options = dict(space.step1[method])
            for option, value in space.step2.get(method, {}).items():
                rng = Range.of(value)
                options[option] = rng.suggest(trial, f"{method}.{option}") if rng else value
            if method != remove:
                specs.append(MethodSpec.build(method, options))
        return _evaluate(trial, specs, objective, settings, "step2")
    return trial_fn


def _replay(trial: optuna.Trial, ran: optuna.trial.FrozenTrial) -> float:
    """Step 1's trial `ran` as this trial's outcome: its evaluations (which the pruner compares later trials with),
    its records and its score; "replayed" names the trial whose run folder holds the model."""
    for step, value in sorted(ran.intermediate_values.items()):
        trial.report(value, step)
    for key, value in ran.user_attrs.items():
        if key not in (WORKER, "removed"):
            trial.set_user_attr(key, value)
    trial.set_user_attr("replayed", f"step1-trial{ran.number}")
    return float(ran.value)


def _record(trial: optuna.Trial, space: SearchSpace, name: str) -> None:
    """Lets Optuna record an enqueued (fixed) parameter of the start trial with its distribution."""
    method, option = name.split(".", 1)
    space.ranges(method)[option].suggest(trial, name)


# ------------------------------------------------------------------ both


@dataclass
class SearchResult:
    combination: list[str]                 # step 1's best
    best_config: list[dict]                # step 2's best (or step 1's if step 2 has no trials)
    best_score: float
    best_trial: int
    best_step: int


def check_fingerprint(study, settings: SearchSettings) -> None:
    """The first process to open the study records what the search is; a process with other settings is refused."""
    if settings.fingerprint is None:
        return
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", settings.fingerprint)
    elif stored != settings.fingerprint:
        raise ConfigError(f"the study {study.study_name} in this storage belongs to a search with other settings (run "
                          f"config, trial budget, tasks, space or pruner differ), so this process's trials would "
                          f"count as that search's. Start it with the same --config, --space and options as the "
                          f"search it should help, or give another --study-name")


def run_search(space: SearchSpace, objective: Objective, settings: SearchSettings, progress=None,
               after_step1=None) -> SearchResult:
    """Runs (or joins, or resumes) the two-step search; every worker calling this with the same storage helps.
    after_step1(), if given, is called once step 1 is done (the CLI starts the default's run there, where step 2's
    few trials leave a core free)."""
    storage = open_storage(settings)
    study1 = open_study(settings, storage, 1)
    check_fingerprint(study1, settings)
    run_step(study1, step1_trial(space, objective, settings), space.step1_trials, settings,
             progress and (lambda done, total: progress(1, done, total)))
    combination = best_combination(study1)
    if after_step1 is not None:
        after_step1()

    best, step = max(study1.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.value, -t.number)), 1
    start = best.user_attrs["config"]

    study2 = open_study(settings, storage, 2)
    stored = study2.user_attrs.get("combination")
    if stored is None:
        study2.set_user_attr("combination", combination)
        study2.set_user_attr("start", start)
        if space.step2_trials:
            study2.enqueue_trial(start_params(space, start), user_attrs={START: True}, skip_if_exists=True)
    elif stored != combination:
        raise ConfigError(f"the storage's step 2 was built on {stored}, but step 1's best is now {combination}; "
                          f"use a new study name to search again")
    if space.step2_trials:
        run_step(study2, step2_trial(space, combination, objective, settings, study2.user_attrs.get("start", start),
                                     ran=best),
                 space.step2_trials, settings, progress and (lambda done, total: progress(2, done, total)))
        done = study2.get_trials(states=(TrialState.COMPLETE,))
        if done and study2.best_trial.value > best.value:      # a tie keeps step 1's (step 2 started from it)
            best, step = study2.best_trial, 2
    return SearchResult(combination, best.user_attrs["config"], best.value, best.number, step)
