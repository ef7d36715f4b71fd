"""Options of method and run configs: a dataclass field with a help text and limits, read and checked in one place.

    r: int = option(8, "rank of the low-rank update", minimum=1)

Limits: `minimum`, `exclusive_minimum`, `maximum`, `choices`, and `allow` (values accepted whatever the other limits
say, e.g. max_steps -1 = "run the epochs"). Every float option must also be finite. `convert` turns text (command
line, spec strings) and JSON/YAML values into the field's type, and every message names where the value came from.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, field, fields

from .errors import ConfigError, did_you_mean


def option(default, help: str, **limits):
    """A config field with its help text and optional limits: minimum, exclusive_minimum, maximum, choices, allow."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})


def field_type(cls, name: str):
    """(the field's type, whether None is allowed), from its annotation."""
    annotation = typing.get_type_hints(cls)[name]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return list, False
    allowed = [a for a in args if a is not type(None)] or [annotation]
    return allowed[0], type(None) in args


def convert(value, target, nullable: bool, where: str):
    """Text or JSON value -> `target` (int, float, bool, str, list of str), or None where allowed."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if nullable:
            return None
        raise ConfigError(f"{where} needs a value")
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                number = float(value)
                if not math.isfinite(number) or not number.is_integer():
                    raise ValueError
                return int(number)
            if isinstance(value, float):
                return int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        if target is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            return float(value)
        if target is list:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError
            return list(items)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        kind = "list of strings" if target is list else target.__name__
        raise ConfigError(f"{where}={value!r} is not a valid {kind}") from None


def check_options(config, where: str) -> None:
    """Checks every field of a dataclass made with `option` against its limits; the message names `where`."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or isinstance(value, (list, dict)):
            continue
        text = f"{where}: {f.name}={value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{text} is not a finite number")
        if value in meta.get("allow", ()):
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{text} is not one of {', '.join(map(str, meta['choices']))}")
        if "minimum" in meta and value < meta["minimum"]:
            extra = f" (or {', '.join(map(str, meta['allow']))})" if meta.get("allow") else ""
            raise ConfigError(f"{text} must be >= {meta['minimum']}{extra}")
        if "exclusive_minimum" in meta and not value > meta["exclusive_minimum"]:
            raise ConfigError(f"{text} must be > {meta['exclusive_minimum']}")
        if "maximum" in meta and value > meta["maximum"]:
            raise ConfigError(f"{text} must be <= {meta['maximum']}")


def build_options(cls, values: dict, where: str, known_hint: str = ""):
    """An instance of the option dataclass `cls` from raw values (converted and checked), naming `where`."""

    known = {f.name for f in fields(cls)}
    converted = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{where} has no option {name!r}{did_you_mean(name, known)}"
                              + (f"; {known_hint}" if known_hint else f"; its options: {', '.join(sorted(known))}"))
        target, nullable = field_type(cls, name)
        converted[name] = convert(value, target, nullable, f"{where}: {name}")
    config = cls(**converted)
    check_options(config, where)
    return config


def defaults(cls) -> dict:
    """The default value of every field of an option dataclass."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


# ---------------------------------------------------------------- config files: a key given twice is an error


def _no_duplicates(where: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"{where}: the key {key!r} is given twice in one object; the last value would "
                                  f"silently win. Keep one")
            seen[key] = value
        return seen
    return hook


def parse_json(text: str, where: str):
    """json.loads, refusing an object that repeats a key (ConfigError naming it); syntax errors pass through."""
    import json

    return json.loads(text, object_pairs_hook=_no_duplicates(where))


def parse_yaml(text: str, where: str):
    """yaml.safe_load, refusing a mapping that repeats a key (ConfigError naming it and its line)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{where} line {key_node.start_mark.line + 1}: the key {key!r} is given twice in "
                                  f"one mapping; the last value would silently win. Keep one")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_config_text(text: str, path, where: str | None = None):
    """A .yaml/.yml file's text as YAML, anything else as JSON, both refusing duplicate keys."""
    from pathlib import Path

    where = where or str(path)
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        return parse_yaml(text, where)
    return parse_json(text, where)
