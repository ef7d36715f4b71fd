"""The base of our own families' config dataclasses (Vim, VMamba, S4D): the checks, the dict round trip and the
named-architecture lookup they share. (The language families use transformers' config classes.)"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import ClassVar

from ..errors import ConfigError, did_you_mean


class FamilyConfig:
    """Mixed into a @dataclass that has a `model_type` field; subclasses list their positive integer fields and
    add their own checks in `validate`."""

    title: ClassVar[str]                              # in messages: "Vim config: ..."
    positive_ints: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        expected = next(f.default for f in fields(self) if f.name == "model_type")
        if self.model_type != expected:
            raise ConfigError(f"a {type(self).__name__} has model_type {expected!r}, not {self.model_type!r}")
        for name in self.positive_ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{self.title} config: {name}={getattr(self, name)!r} must be a positive integer")
        self.validate()

    def validate(self) -> None:
        """The family's own checks (and derived defaults), after the shared ones."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.title} config: unknown keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def named(cls, table: dict[str, dict], name: str, **overrides):
        """The config of a named architecture of `table`, with any field overridden."""
        key = name.lower()
        if key not in table:
            raise ConfigError(f"unknown {cls.title} architecture {name!r}{did_you_mean(key, table)}; "
                              f"known: {', '.join(table)}")
        return cls(**{**table[key], **overrides})
