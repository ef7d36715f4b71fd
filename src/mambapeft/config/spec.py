"""Method specs and PEFT configs: what to attach, as text, dicts or JSON.

A method spec is a method id plus options, written `lora_p_x:r=64,s=0.1` or as the dict
{"method": "lora_p_x", "r": 64, "s": 0.1}. A PEFT config is a list of specs, any combination (a hybrid);
each spec may carry its own lr and weight_decay. Names of the form `paper/...` are presets (presets.py)
that expand to one or more specs.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ConfigError
from ..methods import REGISTRY, MethodConfig


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(method: str, option: str, value, annotation):
    """Text or JSON value -> the option's type (int, float, bool, str, or None where allowed)."""
    args = typing.get_args(annotation)
    allowed = [a for a in args if a is not type(None)] or [annotation]
    target = allowed[0]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in args:
            return None
        raise ConfigError(f"{method}: {option} needs a value")
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: {option}={value!r} is not a valid {target.__name__}") from None


@dataclass
class MethodSpec:
    method: str
    config: MethodConfig

    @classmethod
    def build(cls, method: str, options: dict) -> "MethodSpec":
        if method not in REGISTRY:
            raise ConfigError(f"unknown method {method!r}{_suggest(method, REGISTRY)}; `mambapeft methods` lists them")
        config_cls = REGISTRY[method].Config
        hints = typing.get_type_hints(config_cls)
        known = {f.name for f in fields(config_cls)}
        values = {}
        for option, value in options.items():
            if option not in known:
                raise ConfigError(f"{method} has no option {option!r}{_suggest(option, known)}; "
                                  f"its options: {', '.join(sorted(known))}")
            values[option] = _convert(method, option, value, hints[option])
        config = config_cls(**values)
        config.validate(method)
        return cls(method, config)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """`id` or `id:key=value,key=value`."""
        method, _, rest = text.strip().partition(":")
        options = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"cannot read {item!r} in {text!r}: write options as key=value, separated by commas")
            options[key.strip()] = value.strip()
        return cls.build(method.strip(), options)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodSpec":
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


@dataclass
class PeftConfig:
    """The methods to attach: any combination, each at most once."""

    methods: list[MethodSpec]

    @classmethod
    def parse(cls, items, arch: str | None = None) -> "PeftConfig":
        """From spec strings, dicts, presets (`paper/...`) or a mix; `arch` picks presets' per-size rates."""
        from .presets import expand_preset

        if isinstance(items, (str, dict, MethodSpec)):
            items = [items]
        specs = []
        for item in items:
            if isinstance(item, MethodSpec):
                specs.append(item)
            elif isinstance(item, dict):
                specs.append(MethodSpec.from_dict(item))
            elif isinstance(item, str) and item.strip().startswith("paper/"):
                specs.extend(expand_preset(item.strip(), arch))
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
    def from_dict(cls, data) -> "PeftConfig":
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
    def from_json(cls, text: str) -> "PeftConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"the PEFT config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "PeftConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no PEFT config file {path}")
        try:
            return cls.from_json(path.read_text())
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def __str__(self) -> str:
        return " + ".join(str(spec) for spec in self.methods)
