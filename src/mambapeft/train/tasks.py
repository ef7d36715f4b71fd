"""Task kinds: what a kind of fine-tuning (language, vision, ...) supplies to the one run pipeline (train/run.py).

A task kind owns its config class (train/config.py's shared fields plus its own), its built-in defaults, how it
loads the model and the data, how it scores the test set, and the search's built-in demo. `train`, `eval` and
`search` look the kind up here by name: adding a kind is a `TaskKind` subclass registered with `@task_kind`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from .config import RunConfig

TASKS: dict[str, TaskKind] = {}


def task_kind(cls):
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str | None) -> TaskKind:
    """The task kind called `name` (default: language)."""
    name = name or "language"
    if name not in TASKS:
        raise ConfigError(f"unknown task kind {name!r}; one of {', '.join(TASKS)}")
    return TASKS[name]


def default_task_for(model: str | None) -> str | None:
    """The task kind a model's family serves first (tiny-vim: vision), when its name says the family by itself."""
    from ..model.registry import claimed_family

    family = claimed_family(model) if isinstance(model, str) and model else None
    return family.tasks[0] if family is not None and family.tasks else None


def kind_of(data: dict, requested: str | None = None, where: str = "the config", model: str | None = None) -> TaskKind:
    """The kind a config file declares ("task" key) or the one requested; they must agree when both are given.
    Neither given: the kind the model's family serves (`model`, or the config's), else language."""
    declared = data.get("task")
    if not declared and not requested:
        requested = default_task_for(model or data.get("model"))
    if declared is not None and declared not in TASKS:
        raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}, not {declared!r}")
    if declared and requested and declared != requested:
        raise ConfigError(f"{where} is a {declared} run config but --task {requested} was given; drop one of them")
    return get_task(declared or requested)


@dataclass
class Prepared:
    """Everything a run needs, loaded and checked before its folder is touched."""

    model: Any                         # the base model (no methods attached yet)
    peft_config: Any                   # the PeftConfig to attach
    train_set: Any
    val_set: Any = None
    trainer_kwargs: dict = field(default_factory=dict)   # data_collator, compute_metrics, mc_items, ...
    lr: float = 1e-3                   # the run's learning rate (methods may carry their own)
    warmup_steps: int = 0
    eval_steps: int = 1
    metric: str = "eval_loss"
    describe: dict = field(default_factory=dict)          # what results.json says about the data
    test: Any = None                   # what score_test takes


class TaskKind:
    """One kind of fine-tuning. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    Config: ClassVar[type[RunConfig]]
    builtin_defaults: ClassVar[dict] = {}
    # the search's built-in demo: the trial budget, the methods of its restricted space, its trial counts
    search_builtin_trial: ClassVar[dict] = {}
    search_builtin_recipe: ClassVar[dict] = {}      # the built-in demo's full recipe where it differs from train's
    search_builtin_trials: ClassVar[tuple[int, int]] = (5, 3)     # the built-in demo's step 1 and step 2 trials
    search_builtin_methods: ClassVar[tuple[str, ...]] = ()
    search_vision_methods: ClassVar[bool] = False     # whether the paper space's vision-only methods apply
    search_extra_step1: ClassVar[dict] = {}           # methods outside the paper space added to it (method -> step 1)

    def is_builtin(self, values: dict) -> bool:
        """Whether `values` describe the built-in demo (which gets `builtin_defaults` for fields not given)."""
        return False

    def shapes_model(self, config: RunConfig):
        """A meta-device model (shapes only) of `config.model`, for the search's applicability checks."""
        from ..model.factory import shapes_model

        return shapes_model(config.model)[0]

    def resolve(self, values: dict | None = None, where: str = "the command line") -> RunConfig:
        """Given values (None = not given), then the built-in defaults when the run is the built-in demo."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        if self.is_builtin(values):
            for key, value in self.builtin_defaults.items():
                values.setdefault(key, value)
        if "output_dir" not in values:
            values["output_dir"] = self.default_output_dir(values)
        return self.Config.from_dict(values, where=where)

    def default_output_dir(self, values: dict) -> str:
        """runs/MODEL-METHOD[+METHOD...] (plus the data when it is not the built-in task's): a run's folder is named
        after what it is, so runs of other models or methods never meet in one folder."""
        defaults = self.Config()
        model = str(values.get("model", defaults.model)).rstrip("/\\")
        name = Path(model).name.removesuffix(".pth") or "model"
        methods = values.get("method", defaults.method)
        methods = [methods] if isinstance(methods, (str, dict)) else list(methods)
        ids = [str(m.get("method", "method") if isinstance(m, dict) else m).partition(":")[0].rsplit("/", 1)[-1]
               for m in methods]
        parts = [name, *self.output_dir_data(values), "+".join(dict.fromkeys(ids))]
        return "runs/" + re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(p for p in parts if p))

    def output_dir_data(self, values: dict) -> list[str]:
        """What names the data in the default output folder ([] for the built-in task)."""
        return []

    def prepare(self, config: RunConfig, log=print) -> Prepared:
        """Loads and checks the model, data and methods of `config`; writes nothing."""
        raise NotImplementedError

    def load_model(self, name: str, **options):
        """The pretrained model `name`, whose family must serve this kind of run (checked before loading)."""
        from ..model.registry import family_of

        family = family_of(name)
        if self.name not in family.tasks:
            serves = " / ".join(family.tasks) or "no"
            raise ConfigError(f"--model {name} is a {family.title} model, for {serves} runs, and this is a {self.name} "
                              f"run; pass --task {family.tasks[0] if family.tasks else '...'} or a {self.name} model")
        return family.load(name, **options)

    def score_test(self, model, prepared: Prepared, config: RunConfig) -> dict:
        """Test scores of `model` ({"acc": ..., ...}); {} when the run has no test set."""
        raise NotImplementedError

    def search_trial_values(self, values: dict, with_test: bool) -> dict:
        """A search trial's config values (with_test False) or the final run's (True)."""
        return values


def total_steps(config: RunConfig, examples: int) -> int:
    """Optimiser steps the Trainer will run: max_steps, or epochs x updates per epoch (as transformers counts)."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(examples / config.micro_batch_size)
    per_epoch = max(1, batches // (config.batch_size // config.micro_batch_size))
    return math.ceil(config.epochs * per_epoch)
