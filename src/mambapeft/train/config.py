"""What every fine-tuning run is configured by: one dataclass per task kind, the shared fields declared once here.

A task kind (train/tasks.py) subclasses `RunConfig`, adds the fields only it has and gives the shared ones its own
defaults with `default_of` (the help text and limits stay those written here). Values come from a JSON/YAML file,
the command line or a dict, are converted to the field's type and checked against its limits before anything runs:
a wrong type, a non-finite number or an out-of-range value is a ConfigError naming the file (or the command line)
and the option.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from ..errors import ConfigError, did_you_mean
from ..options import check_options, convert, field_type, option, parse_config_text

SEED_MAX = 2**32 - 1


@dataclass
class RunConfig:
    """The fields every task kind shares. `kind` names the task kind in errors and in run_config.json ("task")."""

    kind: ClassVar[str] = "language"

    model: str = option("builtin", "base model: a built-in name, a local folder or a hub id")
    method: list[str] = field(default_factory=lambda: ["lora_p_x"], metadata={
        "help": "PEFT method specs (e.g. lora_p_x:r=64, additional_scan, paper/affix); several make a hybrid"})
    output_dir: str = option("runs/train", "where checkpoints, metrics.jsonl, run_config.json and adapter/ go",
                             default_text="runs/MODEL-METHOD, named after the run: the model, the data unless "
                             "built in, the methods; e.g. runs/tiny-mamba2-state_offset")
    epochs: float = option(3.0, "training epochs", exclusive_minimum=0)
    max_steps: int = option(-1, "stop after this many optimiser steps (-1: run the epochs)", minimum=1, allow=(-1,))
    batch_size: int = option(16, "examples per optimiser step (per device x accumulation x devices)", minimum=1)
    micro_batch_size: int = option(4, "examples per forward pass; gradient accumulation makes up batch_size", minimum=1)
    lr: float | None = option(None, "learning rate (default: the task's; see `mambapeft train --help`)",
                              exclusive_minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay (methods may set their own)", minimum=0)
    flat_decay: bool = option(True, "the run's weight decay on biases and 1-D tensors too (false: the official vision "
                              "recipe's bias_decay_mult = flat_decay_mult = 0)")
    scheduler: str = option("linear", "learning-rate decay after warm-up", choices=("linear", "cosine", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", minimum=0)
    logging_steps: int = option(10, "log the training loss every this many steps", minimum=1)
    save_total_limit: int = option(2, "checkpoints kept (the best one is always kept)", minimum=1)
    eval_batch_size: int = option(16, "sequences or images per forward pass when evaluating", minimum=1)
    seed: int = option(42, "seed of the adapter initialisation, data order and dropout", minimum=0, maximum=SEED_MAX)
    threads: int = option(0, "torch CPU threads (0: torch's default)", minimum=0)
    bf16: bool | None = option(None, "bfloat16 autocast (default: on for CUDA, off on CPU, which trains in fp32)")
    gradient_checkpointing: bool = option(False, "keep only each block's input for the backward pass and recompute "
                                          "the block there: activation memory of one block instead of all, for one "
                                          "more forward pass of compute")
    base_dtype: str = option("float32", "store the frozen base weights in this type and compute in float32, "
                             "widening layer by layer as they are used; trained tensors stay float32. bfloat16 / "
                             "float16: the linear layers, embedding and head. int8 / int4 (NF4, QLoRA's; needs "
                             "mambapeft[quant]): weight-only quantization of the linear layers except out_proj, "
                             "x_proj, dt_proj (read raw by the fused CUDA kernels), the embedding and the head, which "
                             "stay float32; merging dequantizes",
                             choices=("float32", "bfloat16", "float16", "int8", "int4"))

    # fields a resumed run may change (the others define the run and must match its run_config.json)
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("epochs", "max_steps", "logging_steps", "save_total_limit",
                                                    "eval_batch_size", "threads", "output_dir",
                                                    "gradient_checkpointing")

    @classmethod
    def from_dict(cls, data: dict, where: str = "the config"):
        """Values converted to each field's type and checked; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        values = dict(data)
        if values.get("task") == cls.kind:
            del values["task"]                     # run_config.json names its kind; the dataclass has no such field
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
            raise ConfigError(f"{where} has unknown {cls.kind} keys {', '.join(hints)}; "
                              f"`mambapeft train --task {cls.kind} --help` lists them")
        converted = {}
        for name, value in values.items():
            target, nullable = field_type(cls, name)
            converted[name] = convert(value, target, nullable, f"{where}: {name}")
        config = cls(**converted)
        config.validate(where)
        return config

    @staticmethod
    def from_file(path) -> dict:
        """The raw dict of a .json or .yaml/.yml run config (validated when built)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r})"
                              ) from None
        try:
            data = parse_config_text(text, path)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of option names to values")
        return data

    def validate(self, where: str = "the config") -> None:
        check_options(self, where)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"{where}: batch_size {self.batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if not self.method:
            raise ConfigError(f"{where}: name at least one PEFT method (e.g. lora_p_x)")

    def to_dict(self) -> dict:
        """The fields plus the run's kind under "task", as run_config.json and best_config.json hold them."""
        return {"task": self.kind, **asdict(self)}

    def differences(self, saved: dict) -> list[str]:
        """What differs from a saved run_config.json in the fields that define the run. A field the saved file lacks
        (written by an older version, before the field existed) counts as its default, which that run used."""
        mine = self.to_dict()
        defaults = type(self)().to_dict()
        saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        return [f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(mine) | set(saved))
                if k not in self.RESUMABLE_CHANGES and mine.get(k) != saved.get(k)]


def default_of(name: str, default, help_suffix: str = ""):
    """A shared field of RunConfig with another default (its help text and limits are RunConfig's)."""
    base = next(f for f in fields(RunConfig) if f.name == name)
    meta = dict(base.metadata)
    if help_suffix:
        meta["help"] = f"{meta['help']} {help_suffix}"
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
