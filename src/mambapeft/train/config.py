"""Everything a fine-tuning run needs, in one dataclass: read from a JSON/YAML file and the command line.

Defaults are the paper's language recipe (SPEC section 3: max length 256, 3 epochs, 100 warm-up steps then
linear decay, AdamW, fp32, 2,000 examples held out for validation, effective batch 16, loss on prompt and
response). With the built-in data (`data: builtin`) the fields the user did not set take BUILTIN_DEFAULTS,
sized so the default run finishes in a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..methods.base import check_options, option


class RunConfig:
    """What the language and vision run configs share: built from a dict or a JSON/YAML file, options checked."""

    kind = "language"           # "vision" for VisionTrainConfig: named in errors and in run_config.json ("task")

    @classmethod
    def from_dict(cls, data: dict, where: str = "the config"):
        known = {f.name for f in fields(cls)}
        values = dict(data)
        if values.get("task") == cls.kind:
            del values["task"]                     # run_config.json names its kind; the dataclass has no such field
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, known, 1)) else "")
                     for k in unknown]
            flag = "" if cls.kind == "language" else f" --task {cls.kind}"
            raise ConfigError(f"{where} has unknown {cls.kind} keys {', '.join(hints)}; "
                              f"`mambapeft train{flag} --help` lists them")
        if isinstance(values.get("method"), str):
            values["method"] = [values["method"]]
        config = cls(**values)
        config.validate(where)
        return config

    @staticmethod
    def from_file(path) -> dict:
        """The raw dict of a .json or .yaml/.yml run config (validated when merged)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
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


def config_kind(data: dict, requested: str | None = None, where: str = "the config") -> str:
    """'language' or 'vision': the file's "task" key, or the requested one; they must agree when both are given."""
    kind = data.get("task") or requested or "language"
    if kind not in ("language", "vision"):
        raise ConfigError(f"{where}: task must be 'language' or 'vision', not {kind!r}")
    if requested and kind != requested:
        raise ConfigError(f"{where} is a {kind} run config but --task {requested} was given; drop one of them")
    return kind


@dataclass
class TrainConfig(RunConfig):
    model: str = option("builtin", "base model: 'builtin' (the packaged tiny Mamba), a local folder or a hub id")
    tokenizer: str | None = option(None, "tokenizer folder or hub id (default: the model's)")
    data: str = option("builtin", "training data: 'builtin' (the packaged task), a commonsense .json or a .jsonl")
    val_data: str | None = option(None, "validation file (default: val_size examples held out from data)")
    test_data: str | None = option(None, "multiple-choice test file scored before and after training")
    method: list[str] = field(default_factory=lambda: ["lora_p_x"], metadata={
        "help": "PEFT method specs (e.g. lora_p_x:r=64, additional_scan, paper/affix); several make a hybrid"})
    output_dir: str = option("runs/train", "where checkpoints, metrics.jsonl, run_config.json and adapter/ go")
    max_length: int = option(256, "token cut-off; longer examples are truncated (with a warning, counted)", minimum=8)
    val_size: int = option(2000, "examples held out from data for validation when val_data is not given", minimum=0)
    train_on_prompt: bool = option(True, "compute the loss on the prompt too (LLM-Adapters' default), not only the response")
    epochs: float = option(3.0, "training epochs", exclusive_minimum=0)
    max_steps: int = option(-1, "stop after this many optimiser steps (-1: run the epochs)")
    batch_size: int = option(16, "examples per optimiser step (per device x accumulation x devices)", minimum=1)
    micro_batch_size: int = option(4, "examples per forward pass; gradient accumulation makes up batch_size", minimum=1)
    lr: float | None = option(None, "learning rate (default: each method's rate for the model size, paper "
                              "Table 7, else 1e-3; the built-in model's: 3e-2 for the LoRA family, else 3e-3)",
                              exclusive_minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay (methods may set their own)", minimum=0)
    scheduler: str = option("linear", "learning-rate decay after warm-up", choices=("linear", "cosine", "constant"))
    warmup_steps: int = option(100, "linear warm-up steps", minimum=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", minimum=0)
    eval_steps: int = option(200, "evaluate on validation and save a checkpoint every this many steps", minimum=1)
    logging_steps: int = option(10, "log the training loss every this many steps", minimum=1)
    save_total_limit: int = option(2, "checkpoints kept (the best one is always kept)", minimum=1)
    eval_batch_size: int = option(16, "sequences per forward pass when evaluating", minimum=1)
    seed: int = option(42, "seed of the adapter initialisation, data order and dropout")
    bf16: bool | None = option(None, "bfloat16 autocast (default: on for CUDA, off on CPU, which trains in fp32)")


# The built-in demo: small batches, few warm-up steps and more epochs for the 1M-parameter model, the loss on the
# answer only (the 8 labels are the signal; the passages are a few dozen tokens each). Learning rates: the built-in
# model's column of config.presets.LANGUAGE_LR (3e-2 for the LoRA family), else BUILTIN_BASE_LR (3e-3).
BUILTIN_DEFAULTS = dict(test_data="builtin", max_length=192, epochs=8.0, batch_size=8, micro_batch_size=8,
                        warmup_steps=10, eval_steps=42, logging_steps=21, train_on_prompt=False,
                        output_dir="runs/builtin")


def resolve_config(file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Config file values, then command-line overrides (None = not given), then built-in defaults if data is builtin."""
    values = TrainConfig.from_file(file) if file else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if values.get("data", "builtin") == "builtin":
        for key, value in BUILTIN_DEFAULTS.items():
            values.setdefault(key, value)
    return TrainConfig.from_dict(values, where=file or "the command line")
