"""The sequence task kind: a deep S4D classifier fine-tuned on sequences, the SDT paper's deep S4 setting.

Recipe (the authors' run_s4_real.py, as benchmarks/s4_pixels.py runs it): AdamW at lr 5e-3 with torch's default
weight decay 0.01, batch 64, a constant rate, no gradient clipping, 40 epochs; a fresh decoder (the head) trained in
every run (`linear_probe` is added unless `full` or `linear_probe` is given), top-1 accuracy.

The default method is the paper's "SDT" row: `sdt` (4 of 64 channels x 1 of 16 states updatable, every channel and
state usable, the output linear's columns of the updatable channels, a one-epoch warm-up run as a run of its own) with
dt, D and the output bias. An `sdt` spec without `warmup_steps` gets a one-epoch warm-up (the authors'; sdt's own
default, 200 steps, is longer than a whole default run here).

Data: the built-in pixel-sequence digits (data/sequences.py: `digits`, digits 5-9 read column by column, the
fine-tuning task of tiny-s4d, which was pretrained on `digits-rows`) or .npz files of sequences and labels. Model:
`tiny-s4d` (built in), a save_s4d folder or an S4D architecture name (random weights), loaded by
model/s4d/loading.py `load_s4d`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..options import option
from .config import RunConfig, default_of
from .tasks import Prepared, TaskKind, task_kind, total_steps
from .vision import _accuracy_metric, _logits_only, with_head

BUILTIN_S4D = "tiny-s4d"
DEFAULT_METHODS = ["sdt:restart=true,channel_fraction=0.0625,state_fraction=0.0625,out_proj=true", "partial_log_dt",
                   "partial_d", "partial_out_bias"]


@dataclass
class SequenceTrainConfig(RunConfig):
    kind = "sequence"

    model: str = default_of("model", BUILTIN_S4D, "(sequence: an S4D classifier: 'tiny-s4d' built in, a save_s4d "
                                 "folder, or an architecture such as s4d-pixels with random weights)")
    method: list[str] = default_of("method", DEFAULT_METHODS,
                                   "(sequence: linear_probe, the head, is added unless full or linear_probe is given; "
                                   "an sdt without warmup_steps warms up for one epoch)")
    output_dir: str = default_of("output_dir", "runs/sequence")
    epochs: float = default_of("epochs", 40.0, "(sequence: the S4 pixel recipe's 40)")
    batch_size: int = default_of("batch_size", 64)
    micro_batch_size: int = default_of("micro_batch_size", 64)
    lr: float = default_of("lr", 5e-3, "(sequence: the authors' 5e-3)")
    weight_decay: float = default_of("weight_decay", 0.01, "(sequence: torch's AdamW default, as the authors)")
    scheduler: str = default_of("scheduler", "constant")
    max_grad_norm: float = default_of("max_grad_norm", 0.0)
    logging_steps: int = default_of("logging_steps", 20)
    eval_batch_size: int = default_of("eval_batch_size", 256)
    # one thread: the 34k-parameter model's small FFTs and matmuls gain nothing from two (measured on 2 cores: the
    # default run 47 s of CPU at one thread, 247 s at two on a loaded machine)
    threads: int = default_of("threads", 1, "(sequence: 1)")
    data: str = option("digits", "training data: 'digits' (built in: 8x8 digits 5-9 as 64-pixel column sequences), "
                       "'digits-rows' (digits 0-4 by rows) or a .npz with 'sequences' (n, L) or (n, L, features) and "
                       "integer 'labels' (n,)")
    val_data: str | None = option(None, "validation .npz (default: val_fraction of data held out)")
    test_data: str | None = option(None, "test .npz or built-in task, scored before and after training (default for "
                                   "built-in data: its test half)")
    val_fraction: float = option(0.1, "fraction of data held out for validation (best checkpoint) when val_data is "
                                 "not given; 0: none, the last checkpoint is kept", minimum=0, exclusive_maximum=1)
    data_seed: int = option(0, "seed of the built-in tasks' train / test split and of the validation hold-out",
                            minimum=0)
    num_classes: int | None = option(None, "classes of the task (default: the largest label + 1; every label is "
                                     "checked against it)", minimum=1)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", minimum=0)
    eval_epochs: float = option(5.0, "evaluate (with validation data) and save a checkpoint every this many epochs",
                                exclusive_minimum=0)


# the built-in demo: all of the digits task's training half (448 sequences), no validation, as the benchmark
BUILTIN_SEQUENCE_DEFAULTS = dict(val_fraction=0.0)


def sequence_methods(methods: list[str], steps_per_epoch: int, log=print) -> list[str]:
    """The methods plus the head (see vision's `with_head`), and a one-epoch warm-up for an sdt that names none."""
    out = []
    for spec in methods:
        name, _, options = spec.partition(":")
        if name == "sdt" and "warmup_steps=" not in options:
            log(f"note: sdt warms up for one epoch ({steps_per_epoch} steps); set sdt:warmup_steps=N to change it")
            spec = f"sdt:warmup_steps={steps_per_epoch}" + (f",{options}" if options else "")
        out.append(spec)
    return with_head(out, log, why="the task's fresh decoder is always trained, as the SDT authors train theirs")


@torch.no_grad()
def accuracy(model, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` over a SequenceDataset (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(dataset), batch_size):
        logits = model(inputs=dataset.x[i: i + batch_size].to(device)).logits           # (b, classes)
        correct += (logits.argmax(-1).cpu() == dataset.y[i: i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(dataset)


def prepare_sequence_data(config: SequenceTrainConfig, log=print):
    """(train, validation or None, test or None, classes), SequenceDatasets, every file checked."""
    from ..data.sequences import SequenceDataset, load_sequences, split_sequences

    train = load_sequences(config.data, "train", config.data_seed, "data")
    val = load_sequences(config.val_data, "test", config.data_seed, "val_data") if config.val_data else None
    if val is None and config.val_fraction > 0:
        train, val = split_sequences(*train, config.data_seed, config.val_fraction)
        if len(val[1]) == 0:
            log(f"note: val_fraction {config.val_fraction} of {len(train[1])} sequences is none; no validation")
            val = None
    test = load_sequences(config.test_data, "test", config.data_seed, "test_data") if config.test_data else None
    parts = {"data": train, "val_data": val, "test_data": test}
    parts = {k: v for k, v in parts.items() if v is not None}
    if len(train[1]) == 0:
        raise ConfigError(f"data {config.data}: no training sequences")
    shape = tuple(train[0].shape[1:])
    for key, (x, _) in parts.items():
        if x.shape[2] != shape[1]:
            raise ConfigError(f"{key} {getattr(config, key)}: {x.shape[2]} features per step, but data has "
                              f"{shape[1]}")
    classes = config.num_classes or 1 + max(int(y.max()) for _, y in parts.values() if len(y))
    for key, (_, y) in parts.items():
        if len(y) and int(y.max()) >= classes:
            raise ConfigError(f"{key} {getattr(config, key)}: label {int(y.max())} is out of range for {classes} "
                              f"classes (num_classes); labels are 0 .. num_classes - 1")
    datasets = [SequenceDataset(*part) if part is not None else None for part in (train, val, test)]
    return (*datasets, classes)


def check_model_fits(model, config: SequenceTrainConfig, train) -> None:
    c = model.config
    if getattr(c, "form", None) != "classifier":
        raise ConfigError(f"{config.model} is an S4D of form {c.form!r} (a sequence-to-sequence stack without a "
                          f"decoder); the sequence task classifies: use a classifier such as tiny-s4d or s4d-pixels")
    features = train.x.shape[2]
    if c.d_input != features:
        raise ConfigError(f"{config.model} reads {c.d_input} features per step (d_input), but data {config.data} has "
                          f"{features}")


@task_kind
class SequenceTask(TaskKind):
    name = "sequence"
    Config = SequenceTrainConfig
    builtin_defaults = BUILTIN_SEQUENCE_DEFAULTS
    # the search's built-in demo: 20 epochs a trial (with a 20% validation hold-out; the final run: the full recipe)
    search_builtin_trial = dict(epochs=20.0, eval_epochs=5.0, save_total_limit=1)
    search_builtin_methods = ("lora_out_proj", "lora_ssm", "partial_d", "partial_log_dt", "partial_out_bias", "sdt")
    search_builtin_lr = {"log": [1e-3, 2e-2]}
    # S4D's own methods join the paper space's (they are not in it: it serves Mamba and Vim), at their smallest
    search_extra_step1 = {"lora_ssm": {"r": 1}, "partial_log_dt": {"weight_decay": 1e-3},
                          "partial_out_bias": {"weight_decay": 1e-3}}

    def is_builtin(self, values: dict) -> bool:
        from ..data.sequences import BUILTIN_TASKS

        return values.get("data", "digits") in BUILTIN_TASKS

    def resolve(self, values=None, where="the command line"):
        values = {k: v for k, v in (values or {}).items() if v is not None}
        if values.get("model") == "builtin":
            values["model"] = BUILTIN_S4D
        if self.is_builtin(values):
            values.setdefault("test_data", values.get("data", "digits"))
        return super().resolve(values, where)

    def is_builtin_model(self, config) -> bool:
        from ..data.sequences import BUILTIN_TASKS

        return config.model == BUILTIN_S4D and config.data in BUILTIN_TASKS

    def prepare(self, config: SequenceTrainConfig, log=print) -> Prepared:
        from ..config import PeftConfig
        from ..data.sequences import collate_sequences
        train_set, val_set, test_set, classes = prepare_sequence_data(config, log)
        model = self.load_model(config.model, seed=config.seed)
        check_model_fits(model, config, train_set)
        torch.manual_seed(config.seed)
        model.reset_head(classes)                 # always a fresh head for the task, even with the same class count
        model.config.l_max = train_set.x.shape[1]  # the task's length: SDT's horizon
        log(f"data: {config.data}, {len(train_set)} training sequences of length {train_set.x.shape[1]}, "
            f"{len(val_set) if val_set else 0} validation, {len(test_set) if test_set else 0} test; {classes} classes")
        steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
        methods = sequence_methods(config.method, steps_per_epoch, log)
        return Prepared(
            model=model, peft_config=PeftConfig.parse(methods), train_set=train_set, val_set=val_set,
            trainer_kwargs=dict(data_collator=collate_sequences, compute_metrics=_accuracy_metric,
                                preprocess_logits_for_metrics=_logits_only),
            lr=config.lr, warmup_steps=config.warmup_steps,
            eval_steps=max(1, min(round(config.eval_epochs * steps_per_epoch),        # at least once: at the end
                                  total_steps(config, len(train_set)))), metric="eval_acc",
            describe={"model": config.model, "data": config.data, "classes": classes,
                      "length": train_set.x.shape[1]},
            test=test_set)

    def score_test(self, model, prepared: Prepared, config: SequenceTrainConfig) -> dict:
        if prepared.test is None:
            return {}
        return {"acc": accuracy(model, prepared.test, config.eval_batch_size), "n": len(prepared.test)}

    def search_trial_values(self, values: dict, with_test: bool) -> dict:
        if with_test:
            return values
        hold_out = values.get("val_fraction") or (0.0 if values.get("val_data") else 0.2)
        return {**values, "test_data": None, "val_fraction": hold_out}


def load_for_eval(model: str, adapter: str | None = None):
    """The S4D `model` with `adapter` (a sequence run's adapter/ or checkpoint) attached, in eval mode: the base gets
    the adapter's class count (its head is in the adapter, as every sequence run trains one)."""
    from pathlib import Path

    from ..model.s4d import load_s4d
    from ..peft import PeftModel, read_adapter_config

    classes = None
    if adapter:
        classes = read_adapter_config(Path(adapter))["base_model"]["architecture"].get("num_classes")
    base = load_s4d(model, num_classes=classes)
    return PeftModel.from_pretrained(base, adapter).eval() if adapter else base


def evaluate(model: str, adapter: str | None, tasks: list[str], *, batch_size: int = 256, limit: int | None = None,
             data_seed: int = 0) -> dict:
    """{task: {"acc", "n"}}: top-1 accuracy on each task's test sequences (a built-in task's test half, or a whole
    .npz), every task checked against the model before any is scored."""
    from ..data.sequences import SequenceDataset, load_sequences

    net = load_for_eval(model, adapter)
    base = net.base_model if hasattr(net, "base_model") else net
    c = base.config
    if c.form != "classifier":
        raise ConfigError(f"{model} is an S4D of form {c.form!r}: it has no classes to score")
    sets = {}
    for task in tasks:
        x, y = load_sequences(task, "test", data_seed, "task")
        if x.shape[2] != c.d_input:
            raise ConfigError(f"task {task}: {x.shape[2]} features per step, but {model} reads {c.d_input}")
        if len(y) and int(y.max()) >= c.num_classes:
            raise ConfigError(f"task {task}: label {int(y.max())} is out of range for the model's {c.num_classes} "
                              f"classes")
        sets[task] = SequenceDataset(x[:limit], y[:limit])
    return {task: {"acc": accuracy(net, data, batch_size), "n": len(data)} for task, data in sets.items()}
