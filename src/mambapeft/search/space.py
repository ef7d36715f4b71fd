"""The HybridPEFT search space (paper Algorithm 1, Table 9), read from JSON or YAML and checked up front.

Schema:

    {
      "step1": {                         # on/off per method, each at its smallest setting
        "trials": 100,
        "methods": {"lora_p_x": {"r": 8, "s": 0.1}, "partial_a": {"weight_decay": 1e-3}, ...}
      },
      "step2": {                         # hyperparameters of the methods step 1 kept
        "trials": 100,
        "remove_one": true,              # also choose "remove one method, or none"
        "methods": {"lora_p_x": {"r": {"int": [4, 16]}, "s": {"log": [0.01, 1]},
                                 "lr": {"log": [1e-4, 5e-3]}, "weight_decay": {"log": [1e-6, 1e-3]}}, ...}
      }
    }

A step-1 option is a fixed value. A step-2 option is a fixed value or a range: {"int": [lo, hi]},
{"float": [lo, hi]}, {"log": [lo, hi]} (log-uniform) or {"choice": [a, b, ...]}. A kept method without a
step-2 entry keeps its step-1 settings. Every method, option and range is checked against the method
registry before anything trains; a message names the offending entry.
"""

from __future__ import annotations

import copy
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from ..config.spec import MethodSpec, _suggest
from ..errors import ConfigError
from ..methods import REGISTRY

RANGE_KINDS = ("int", "float", "log", "choice")

# Table 9, step 1: the smallest setting of each method (vision names; partial tuning decays 1e-3)
PAPER_STEP1 = {
    "partial_cls_token": {"weight_decay": 1e-3},
    "partial_bias": {"weight_decay": 1e-3},
    "partial_pos_embed": {"weight_decay": 1e-3},
    "partial_d": {"weight_decay": 1e-3},
    "partial_a": {"weight_decay": 1e-3},
    "partial_conv1d": {"weight_decay": 1e-3},
    "prompt": {"n": 1},
    "affix": {"n": 1},
    "additional_scan": {"n": 1},
    "parallel_adapter": {"dim": 8, "s": 0.1},
    "lora_embed": {"r": 8, "s": 0.1},
    "lora_x_proj": {"r": 8, "s": 0.1},
    "lora_dt_proj": {"r": 4, "s": 0.1},
    "lora_out_proj": {"r": 8, "s": 0.1},
    "lora_in_proj": {"r": 8, "s": 0.1},
    "lora_p_dt": {"r": 4, "s": 0.1},
    "lora_p_b": {"r": 4, "s": 0.1},
    "lora_p_c": {"r": 4, "s": 0.1},
    "lora_p_x": {"r": 8, "s": 0.1},
    "lora_p_z": {"r": 8, "s": 0.1},
    # beyond Table 9: Sparse Dimension Tuning (the second reference paper), its warm-up short enough for short trials
    "sdt": {"warmup_steps": 10},
}
_LR = {"log": [1e-4, 5e-3]}
_LORA = {"r": {"int": [4, 16]}, "s": {"log": [1e-2, 1.0]}, "lr": _LR, "weight_decay": {"log": [1e-6, 1e-3]}}
_PARTIAL = {"lr": _LR, "weight_decay": {"log": [1e-5, 1e-2]}}
# Table 9, step 2 (its ranges for the eight methods it lists; the same kinds of range for the others)
PAPER_STEP2 = {
    **{name: copy.deepcopy(_PARTIAL) for name in PAPER_STEP1 if name.startswith("partial_")},
    **{name: copy.deepcopy(_LORA) for name in PAPER_STEP1 if name.startswith("lora_")},
    "lora_p_b": {**copy.deepcopy(_LORA), "r": {"int": [4, 12]}},
    "prompt": {"n": {"int": [1, 3]}, "lr": _LR, "weight_decay": {"log": [1e-6, 1e-3]}},
    "affix": {"n": {"int": [1, 3]}, "lr": _LR, "weight_decay": {"log": [1e-6, 1e-3]}},
    "additional_scan": {"n": {"int": [1, 6]}, "lr": _LR, "weight_decay": {"log": [1e-6, 1e-3]}},
    "parallel_adapter": {"dim": {"int": [4, 16]}, "s": {"log": [1e-2, 1.0]}, "lr": _LR,
                         "weight_decay": {"log": [1e-6, 1e-3]}},
    "sdt": {"channel_fraction": {"log": [0.005, 0.1]}, "state_fraction": {"float": [0.1, 0.5]}, "lr": _LR},
}
VISION_ONLY = ("partial_cls_token", "partial_pos_embed")


@dataclass
class SearchSpace:
    step1: dict[str, dict]                # method -> fixed options
    step2: dict[str, dict]                # method -> option -> value or range
    step1_trials: int = 100
    step2_trials: int = 100
    remove_one: bool = True

    # -------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, data, source: str = "the search space") -> "SearchSpace":
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be an object with 'step1' and 'step2'")
        unknown = set(data) - {"step1", "step2"}
        if unknown:
            raise ConfigError(f"{source}: unknown section {sorted(unknown)[0]!r}; the sections are step1 and step2")
        step1, step2 = data.get("step1", {}), data.get("step2", {})
        for name, section in (("step1", step1), ("step2", step2)):
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: {name} must be an object")
            extra = set(section) - {"trials", "methods", "remove_one"}
            if extra:
                raise ConfigError(f"{source}: {name} has an unknown key {sorted(extra)[0]!r}")
        space = cls(
            step1=copy.deepcopy(step1.get("methods", {})),
            step2=copy.deepcopy(step2.get("methods", {})),
            step1_trials=_trials(step1.get("trials", 100), f"{source}: step1.trials"),
            step2_trials=_trials(step2.get("trials", 100), f"{source}: step2.trials", allow_zero=True),
            remove_one=_bool(step2.get("remove_one", True), f"{source}: step2.remove_one"),
        )
        space.validate(source)
        return space

    @classmethod
    def load(cls, path) -> "SearchSpace":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no search-space file {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # json or yaml syntax
            raise ConfigError(f"{path} cannot be read as {path.suffix.lstrip('.') or 'JSON'}: {err}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict:
        return {"step1": {"trials": self.step1_trials, "methods": self.step1},
                "step2": {"trials": self.step2_trials, "remove_one": self.remove_one, "methods": self.step2}}

    # -------------------------------------------------------------- checking

    def validate(self, source: str = "the search space") -> None:
        if not self.step1:
            raise ConfigError(f"{source}: step1.methods is empty; list the methods to switch on and off")
        for method, options in self.step1.items():
            where = f"{source}: step1.methods.{method}"
            _check_method(method, where)
            if not isinstance(options, dict):
                raise ConfigError(f"{where} must be an object of fixed options, e.g. {{\"r\": 8}}")
            for option, value in options.items():
                if isinstance(value, dict):
                    raise ConfigError(f"{where}.{option}: step 1 takes fixed values, not ranges")
            _build(method, options, where)                          # types and limits
        for method, options in self.step2.items():
            where = f"{source}: step2.methods.{method}"
            _check_method(method, where)
            if method not in self.step1:
                raise ConfigError(f"{where}: {method} is not among step1's methods, so step 2 can never use it")
            if not isinstance(options, dict):
                raise ConfigError(f"{where} must be an object of options")
            hints = typing.get_type_hints(REGISTRY[method].Config)
            known = {f.name for f in fields(REGISTRY[method].Config)}
            for option, value in options.items():
                if option not in known:
                    raise ConfigError(f"{where}: {method} has no option {option!r}{_suggest(option, known)}")
                _check_range(method, option, value, hints[option], f"{where}.{option}")

    # -------------------------------------------------------------- using

    def step1_spec(self, method: str) -> MethodSpec:
        return MethodSpec.build(method, self.step1[method])

    def restricted_to(self, methods) -> "SearchSpace":
        """The same space with only `methods` (e.g. those a model supports)."""
        keep = [m for m in self.step1 if m in set(methods)]
        return SearchSpace({m: self.step1[m] for m in keep}, {m: v for m, v in self.step2.items() if m in keep},
                           self.step1_trials, self.step2_trials, self.remove_one)


def paper_space(vision: bool = True, step1_trials: int = 100, step2_trials: int = 100) -> SearchSpace:
    """Table 9's space plus sdt; for language models without the vision-only methods."""
    step1 = {m: dict(v) for m, v in PAPER_STEP1.items() if vision or m not in VISION_ONLY}
    step2 = {m: copy.deepcopy(v) for m, v in PAPER_STEP2.items() if m in step1}
    return SearchSpace(step1, step2, step1_trials, step2_trials, True)


def _check_method(method: str, where: str) -> None:
    if method not in REGISTRY:
        raise ConfigError(f"{where}: unknown method {method!r}{_suggest(method, REGISTRY)}")
    if method == "full":
        raise ConfigError(f"{where}: full fine-tuning cannot be part of a hybrid; leave it out of the search")


def _check_range(method, option, value, annotation, where):
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    target = args[0]
    if not isinstance(value, dict):
        _build(method, {option: value}, where)
        return
    if len(value) != 1 or next(iter(value)) not in RANGE_KINDS:
        raise ConfigError(f"{where}: a range is one of {{\"int\": [lo, hi]}}, {{\"float\": [lo, hi]}}, "
                          f"{{\"log\": [lo, hi]}}, {{\"choice\": [...]}}; got {value!r}")
    kind, bounds = next(iter(value.items()))
    if not isinstance(bounds, list) or not bounds:
        raise ConfigError(f"{where}: the {kind} range is empty; give {'the choices' if kind == 'choice' else '[lo, hi]'}")
    if kind == "choice":
        for choice in bounds:
            _build(method, {option: choice}, where)
        return
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise ConfigError(f"{where}: a {kind} range is [lo, hi] with two numbers, got {bounds!r}")
    lo, hi = bounds
    if lo > hi:
        raise ConfigError(f"{where}: the range [{lo}, {hi}] is empty (lo > hi)")
    if kind == "int" and target is not int:
        raise ConfigError(f"{where}: {option} is a {target.__name__}, so an int range does not fit; use float or log")
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}: an int range needs whole numbers, got {bounds!r}")
    if kind in ("float", "log") and target is not float:
        raise ConfigError(f"{where}: {option} is a {target.__name__}, so a {kind} range does not fit"
                          + ("; use int" if target is int else ""))
    if kind == "log" and lo <= 0:
        raise ConfigError(f"{where}: a log range needs lo > 0, got {lo}")
    for bound in (lo, hi):                      # both ends must be settings the method accepts
        _build(method, {option: int(bound) if kind == "int" else bound}, where)


def _build(method: str, options: dict, where: str) -> MethodSpec:
    try:
        return MethodSpec.build(method, options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _trials(value, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{where} must be a whole number >= {0 if allow_zero else 1}, got {value!r}")
    return value


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value
