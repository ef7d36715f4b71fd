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
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..config.spec import MethodSpec
from ..errors import ConfigError, did_you_mean
from ..methods import REGISTRY
from ..options import field_type, parse_config_text

RANGE_KINDS = ("int", "float", "log", "choice")


@dataclass(frozen=True)
class Range:
    """A step-2 option: {"int": [lo, hi]}, {"float": [lo, hi]}, {"log": [lo, hi]} or {"choice": [...]}; the one place
    these are read (checked, sampled with Optuna, clipped to, and their middle taken)."""

    kind: str
    bounds: tuple

    @staticmethod
    def of(value) -> Range | None:
        """The range a step-2 value describes, or None for a fixed value."""
        if not isinstance(value, dict):
            return None
        kind, bounds = next(iter(value.items()))
        return Range(kind, tuple(bounds))

    def suggest(self, trial, name: str):
        lo, hi = (self.bounds + (None, None))[:2]
        if self.kind == "int":
            return trial.suggest_int(name, int(lo), int(hi))
        if self.kind == "float":
            return trial.suggest_float(name, lo, hi)
        if self.kind == "log":
            return trial.suggest_float(name, lo, hi, log=True)
        return trial.suggest_categorical(name, list(self.bounds))

    def clip(self, value):
        """`value` moved into the range (the nearest end; a choice not offered becomes the first choice)."""
        if self.kind == "choice":
            return value if value in self.bounds else self.bounds[0]
        lo, hi = self.bounds
        value = min(max(value, lo), hi)
        return int(round(value)) if self.kind == "int" else value

    def middle(self):
        """The range's middle (geometric for log ranges), for an option that has no value yet."""
        if self.kind == "choice":
            return self.bounds[0]
        lo, hi = self.bounds
        mid = math.sqrt(lo * hi) if self.kind == "log" else (lo + hi) / 2
        return int(round(mid)) if self.kind == "int" else mid

    def can_record(self, value) -> bool:
        """Whether Optuna can record `value` as this range's parameter (a log range cannot hold 0, a choice only its
        choices; other values outside the range are recorded as they are)."""
        if self.kind == "choice":
            return value in self.bounds
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return value > 0 if self.kind == "log" else True

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.bounds
        return value is not None and self.bounds[0] <= value <= self.bounds[1]


def step1_settings() -> dict[str, dict]:
    """Every registered method's step-1 setting (its smallest, Table 9), in registry order."""
    return {name: dict(cls.search_step1) for name, cls in REGISTRY.items() if cls.search_step1 is not None}


@dataclass
class SearchSpace:
    step1: dict[str, dict]                # method -> fixed options
    step2: dict[str, dict]                # method -> option -> value or range
    step1_trials: int = 100
    step2_trials: int = 100
    remove_one: bool = True

    # -------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, data, source: str = "the search space") -> SearchSpace:
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
    def load(cls, path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no search-space file {path}")
        text = path.read_text()
        try:
            data = parse_config_text(text, path)
        except ConfigError:
            raise
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
            known = {f.name for f in fields(REGISTRY[method].Config)}
            for option, value in options.items():
                if option not in known:
                    raise ConfigError(f"{where}: {method} has no option {option!r}{did_you_mean(option, known)}")
                _check_range(method, option, value, field_type(REGISTRY[method].Config, option)[0], f"{where}.{option}")

    # -------------------------------------------------------------- using

    def step1_spec(self, method: str) -> MethodSpec:
        return MethodSpec.build(method, self.step1[method])

    def exclusive_groups(self) -> list[tuple[list[str], list[tuple[str, ...]]]]:
        """Step-1 methods that cannot be combined, grouped: (members, the allowed subsets of them).

        Two methods clash when they would change the same thing exclusively (their declared targets: sdt and
        partial_a both tune A_log; DoRA needs the X rows alone). Each group of clashing methods becomes one choice
        in step 1 ("what tunes A_log: none / partial_a / sdt") instead of independent on/off switches, so no
        sampled combination can clash and no trial is spent on one. A group's options are every subset of it in
        which no two methods clash (for a group of two: none, one, or the other).
        """
        from itertools import combinations

        methods = {m: REGISTRY[m](self.step1_spec(m).config) for m in self.step1}
        clashes = {m: {o for o in methods if o != m and (methods[m].clash(methods[o]) or methods[o].clash(methods[m]))}
                   for m in methods}
        groups, seen = [], set()
        for start in methods:
            if start in seen or not clashes[start]:
                continue
            members, todo = [], [start]
            while todo:
                m = todo.pop()
                if m not in seen:
                    seen.add(m)
                    members.append(m)
                    todo += sorted(clashes[m] - seen)
            members = [m for m in methods if m in members]               # the space's order
            allowed = [subset for k in range(len(members) + 1) for subset in combinations(members, k)
                       if not any(b in clashes[a] for a, b in combinations(subset, 2))]
            groups.append((members, allowed))
        return groups

    def ranges(self, method: str) -> dict[str, Range]:
        """The step-2 ranges of `method` (fixed step-2 values are not ranges)."""
        return {option: r for option, value in self.step2.get(method, {}).items() if (r := Range.of(value))}

    def restricted_to(self, methods) -> SearchSpace:
        """The same space with only `methods` (e.g. those a model supports)."""
        keep = [m for m in self.step1 if m in set(methods)]
        return SearchSpace({m: self.step1[m] for m in keep}, {m: v for m, v in self.step2.items() if m in keep},
                           self.step1_trials, self.step2_trials, self.remove_one)


def paper_space(vision: bool = True, step1_trials: int = 100, step2_trials: int = 100) -> SearchSpace:
    """The default space, from the registry: Table 9's methods at its settings (plus sdt and any method that declares
    `search_step1`); for language models without the vision-only methods."""
    step1 = {m: v for m, v in step1_settings().items() if vision or not REGISTRY[m].search_vision_only}
    step2 = {m: copy.deepcopy(REGISTRY[m].search_step2) for m in step1 if REGISTRY[m].search_step2}
    return SearchSpace(step1, step2, step1_trials, step2_trials, True)


def _check_method(method: str, where: str) -> None:
    if method not in REGISTRY:
        raise ConfigError(f"{where}: unknown method {method!r}{did_you_mean(method, REGISTRY)}")
    if method == "full":
        raise ConfigError(f"{where}: full fine-tuning cannot be part of a hybrid; leave it out of the search")


def _check_range(method, option, value, target, where):
    if not isinstance(value, dict):
        _build(method, {option: value}, where)
        return
    if len(value) != 1 or next(iter(value)) not in RANGE_KINDS:
        raise ConfigError(f"{where}: a range is one of {{\"int\": [lo, hi]}}, {{\"float\": [lo, hi]}}, "
                          f"{{\"log\": [lo, hi]}}, {{\"choice\": [...]}}; got {value!r}")
    kind, bounds = next(iter(value.items()))
    if not isinstance(bounds, list) or not bounds:
        give = "the choices" if kind == "choice" else "[lo, hi]"
        raise ConfigError(f"{where}: the {kind} range is empty; give {give}")
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
