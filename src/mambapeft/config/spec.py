"""Method specs and PEFT configs: what to attach, as text, dicts or JSON.

A method spec is a method id plus options, written `lora_p_x:r=64,s=0.1` or as the dict
{"method": "lora_p_x", "r": 64, "s": 0.1}. A PEFT config is a list of specs, any combination (a hybrid);
each spec may carry its own lr and weight_decay. Names of the form `paper/...` and `placement/...` are presets
(presets.py) that expand to one or more specs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, did_you_mean
from ..methods import REGISTRY, MethodConfig
from ..options import build_options, parse_json
from .presets import all_presets, is_preset, preset_name, size_lr, size_rank


@dataclass
class MethodSpec:
    method: str
    config: MethodConfig
    preset: str | None = None        # the `paper/...` or `placement/...` preset it came from, if any

    @classmethod
    def build(cls, method: str, options: dict) -> MethodSpec:
        if method not in REGISTRY:
            raise ConfigError(
                f"unknown method {method!r}{did_you_mean(method, REGISTRY)}; `mambapeft methods` lists them")
        return cls(method, build_options(REGISTRY[method].Config, options, method))

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """`id` or `id:key=value,key=value`."""
        method, _, rest = text.strip().partition(":")
        options = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"cannot read {item!r} in {text!r}: write options as key=value, separated by commas")
            if key.strip() in options:
                raise ConfigError(f"{text!r} gives {key.strip()!r} twice; the last value would silently win. Keep one")
            options[key.strip()] = value.strip()
        return cls.build(method.strip(), options)

    @classmethod
    def from_dict(cls, data: dict) -> MethodSpec:
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(f"a method spec must be an object with a 'method' key, got {data!r}")
        options = {k: v for k, v in data.items() if k != "method"}
        return cls.build(data["method"], options)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self.config)}

    def __str__(self) -> str:
        defaults = asdict(type(self.config)())
        values = asdict(self.config)
        order = [k for k in values if k not in ("lr", "weight_decay")] + ["lr", "weight_decay"]   # optimiser last
        changed = [f"{k}={values[k]}" for k in order if values[k] != defaults[k]]
        return self.method + (":" + ",".join(changed) if changed else "")


def expand_preset(name: str, arch: str | None = None, *, size_rates: bool = True) -> list[MethodSpec]:
    """`paper/<row>` or `placement/<where>` -> method specs, with the per-size learning rate (and SLL rank) when
    `arch` is known. size_rates=False leaves out the per-size rates (not a rate the preset's own text sets): a run
    given a learning rate of its own (--lr) uses it, rather than silently keeping the size's."""
    presets = all_presets()
    key = name.removeprefix("paper/")
    if key not in presets:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(key, presets)}; presets: "
                          + ", ".join(preset_name(k) for k in presets))
    specs = []
    for text in presets[key]:
        spec = MethodSpec.parse(text)
        spec.preset = name
        if spec.config.lr is None and size_rates:
            spec.config.lr = size_lr(spec.method, arch, spec.config)
        if (rank := size_rank(spec.method, arch)) is not None:
            spec.config.r = rank
        specs.append(spec)
    return specs


def fill_size_rates(config: PeftConfig, arch: str | None) -> PeftConfig:
    """Without a run learning rate: every method with a rate for this model size (Table 7) gets it."""
    for spec in config.methods:
        if spec.config.lr is None:
            spec.config.lr = size_lr(spec.method, arch, spec.config)
    return config


@dataclass
class PeftConfig:
    """The methods to attach: any combination, each at most once."""

    methods: list[MethodSpec]

    @classmethod
    def parse(cls, items, arch: str | None = None, *, size_rates: bool = True) -> PeftConfig:
        """From spec strings, dicts, presets (`paper/...`) or a mix; `arch` picks presets' per-size settings (their
        learning rates only with size_rates: a run with its own --lr passes False)."""
        if isinstance(items, (str, dict, MethodSpec)):
            items = [items]
        specs = []
        for item in items:
            if isinstance(item, MethodSpec):
                specs.append(item)
            elif isinstance(item, dict):
                specs.append(MethodSpec.from_dict(item))
            elif isinstance(item, str) and is_preset(item):
                specs.extend(expand_preset(item.strip(), arch, size_rates=size_rates))
            elif isinstance(item, str):
                specs.append(MethodSpec.parse(item))
            else:
                raise ConfigError(f"cannot read a method spec from {item!r}")
        if not specs:
            raise ConfigError("the PEFT config names no method; give at least one (e.g. lora_p_x)")
        return cls(specs)

    def to_dict(self) -> dict:
        return {"methods": [spec.to_dict() for spec in self.methods]}

    @classmethod
    def from_dict(cls, data) -> PeftConfig:
        if isinstance(data, dict):
            if "methods" not in data:
                raise ConfigError("a PEFT config must be an object with a 'methods' list")
            data = data["methods"]
        if not isinstance(data, list):
            raise ConfigError(f"'methods' must be a list of method specs, got {type(data).__name__}")
        return cls.parse(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PeftConfig:
        try:
            data = parse_json(text, "the PEFT config")
        except json.JSONDecodeError as err:
            raise ConfigError(f"the PEFT config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> PeftConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no PEFT config file {path}")
        try:
            return cls.from_json(path.read_text())
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def __str__(self) -> str:
        return " + ".join(str(spec) for spec in self.methods)
