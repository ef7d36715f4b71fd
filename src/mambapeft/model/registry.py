"""Model families as declared units: everything the front ends need to know about a family, in one record.

A family (one folder under model/, e.g. model/vim/) declares a `ModelFamily` subclass and registers it with
`@register_family`: its name, config class, architectures, built-in models, the task kinds it serves, how to build,
recognise, load, read (shapes only), save and summarise a model, whether it has a tokenizer and what a fine-tuning
run may have changed beyond the adapter (a vision run's new task head). `from_config`, `load_model`,
`shapes_model`, `info`, `params`, `train`, `eval`, `merge`, `export`, `methods` and the conformance battery ask
this registry and nothing else, so adding a family is one folder and one line in model/__init__.py.

Recognising a name is a vote, not an order of `if`s: every family scores it (`claim`) and the highest score wins
(two families claiming it equally is an error that names both):

    EXACT   3   one of the family's names: an architecture or a built-in model
    FILES   2   a local file or folder whose contents are the family's (config.json's model_type / format, the
                keys of a .pth)
    GUESS   1   a name of the family's kind without its contents (a .pth suffix, a hub id pattern)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import CheckpointError, ConfigError, did_you_mean

EXACT, FILES, GUESS = 3, 2, 1

FAMILIES: dict[str, ModelFamily] = {}


class ModelFamily:
    """One model family. Subclasses set the class attributes and implement what their models support."""

    name: ClassVar[str]                          # short id: "mamba", "vim", ... (`mambapeft methods` columns)
    title: ClassVar[str]                         # for messages: "Mamba-1", "Vision Mamba"
    model_class: ClassVar[type]
    config_class: ClassVar[type | tuple[type, ...]]
    architectures: ClassVar[dict[str, Any]] = {}  # name -> what `config` builds it from (random weights)
    hub_ids: ClassVar[dict[str, str]] = {}        # architecture -> where its released weights are
    builtins: ClassVar[dict[str, Path]] = {}      # built-in model name -> folder shipped in mambapeft/assets
    tasks: ClassVar[tuple[str, ...]] = ()         # the task kinds (train/tasks.py) it serves; the first is its default
    check_architecture: ClassVar[str]             # the small architecture that stands for it in checks
    has_tokenizer: ClassVar[bool] = False         # language families: a merged folder carries the tokenizer
    default_method: ClassVar[tuple[str, ...] | None] = None   # a run's methods when none are given (None: the task's)

    # ------------------------------------------------------------ building

    def config(self, name: str, **overrides):
        """The config object of a named architecture."""
        raise NotImplementedError

    def build(self, config, *, device=None, dtype=None, seed: int | None = None):
        """A randomly initialised model from a config object (device "meta": shapes only)."""
        if seed is not None and str(device) != "meta":
            torch.manual_seed(seed)
        return self.model_class(config, device=device, dtype=dtype)

    # ------------------------------------------------------------ recognising, loading, saving

    def claim(self, name_or_path) -> int:
        """How surely `name_or_path` is a model of this family: 0 (not), GUESS, FILES or EXACT."""
        return EXACT if self.owns_name(name_or_path) else 0

    def owns_name(self, name_or_path) -> bool:
        key = str(name_or_path).lower()
        return key in self.architectures or key in self.builtins

    def load(self, name_or_path, **options):
        """A pretrained model (eval mode, float32 unless options say otherwise)."""
        raise CheckpointError(f"{self.title} has no pretrained checkpoints to load; build one with "
                              f"from_config (architectures: {', '.join(self.architectures)})")

    def read_shapes(self, name_or_path):
        """A meta-device model with the architecture of a checkpoint (no weights read where the config says it all)."""
        raise CheckpointError(f"{self.title} has no checkpoints to read")

    def save(self, model, folder) -> None:
        """A folder `load` reads back (config.json + model.safetensors)."""
        raise NotImplementedError

    def source(self, name_or_path) -> str:
        """Where a checkpoint came from, in words (`mambapeft info`)."""
        return f"{self.title} checkpoint, {name_or_path}"

    def fit_to_adapter(self, model, architecture: dict):
        """The base model made to fit an adapter trained on it, where a fine-tuning run changed more than the adapter
        holds (a vision run's fresh task head for its classes); by default the model as it is."""
        return model

    # ------------------------------------------------------------ describing

    def summary(self, model) -> dict:
        """The architecture and parameter counts (`mambapeft info --json`)."""
        raise NotImplementedError

    def summary_lines(self, summary: dict) -> list[str]:
        """`mambapeft info`'s text, below the line naming the model and its source."""
        lines = ["  " + "   ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, dict))]
        for key, value in summary.get("parameters", {}).items():
            lines.append(f"  {key:<16} {value:,}")
        return lines


class ClassifierFamily(ModelFamily):
    """A family of classifiers (Vim, VMamba, S4D): a fine-tuning run trains a fresh task head, which its adapter
    carries (linear_probe), so a base is fitted to the adapter's classes before the adapter goes on."""

    def fit_to_adapter(self, model, architecture: dict):
        classes = architecture.get("num_classes")
        if isinstance(classes, int) and classes != model.config.num_classes:
            model.reset_head(classes)
        return model


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: makes a family known to every front end."""
    if cls.name in FAMILIES and type(FAMILIES[cls.name]) is not cls:
        raise ConfigError(f"a model family named {cls.name!r} is registered already ({type(FAMILIES[cls.name])})")
    FAMILIES[cls.name] = cls()
    return cls


def unregister_family(name: str) -> None:
    """Forgets a family (tests that register one of their own)."""
    FAMILIES.pop(name, None)


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_model(model) -> ModelFamily:
    """The family of a model object (its class's `family`)."""
    name = getattr(model, "family", None)
    if name in FAMILIES:
        return FAMILIES[name]
    raise ConfigError(f"{type(model).__name__} belongs to no registered model family")


def family_of_config(config) -> ModelFamily:
    """The family whose config class is the closest ancestor of the config's class (a family's subclass of another
    family's config is its own)."""
    mro = type(config).__mro__
    ranked = []
    for family in FAMILIES.values():
        classes = family.config_class if isinstance(family.config_class, tuple) else (family.config_class,)
        ranked += [(mro.index(c), family.name) for c in classes if c in mro]
    if ranked:
        return FAMILIES[min(ranked)[1]]
    raise ConfigError(f"a {type(config).__name__} is the config of no registered model family")


def all_architectures() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.architectures]


def builtin_names() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.builtins]


def known_names_hint(name: str) -> str:
    """", did you mean ...; known: ..." for a name that is none of ours."""
    known = all_architectures()
    return (f"{did_you_mean(name.lower(), [*known, *builtin_names()])}; known architectures: {', '.join(known)}; "
            f"built-in models: {', '.join(builtin_names())}")


def claimed_family(name_or_path) -> ModelFamily | None:
    """The family that claims a name by itself (no download), or None (unknown, or a hub id to be fetched)."""
    scores = {name: family.claim(name_or_path) for name, family in FAMILIES.items()}
    best = max(scores.values(), default=0)
    winners = [name for name, score in scores.items() if score == best]
    return FAMILIES[winners[0]] if best and len(winners) == 1 else None


def family_of(name_or_path) -> ModelFamily:
    """The family a name, file, folder or hub id belongs to: the one that claims it most surely. A hub id no family
    recognises by its name is decided by its config.json (fetched alone, or found in the cache)."""
    if Path(str(name_or_path)).expanduser().is_dir():
        from ..outputs import check_complete

        check_complete(Path(str(name_or_path)).expanduser(), "model folder")     # a half-written output: say so
    scores = {name: family.claim(name_or_path) for name, family in FAMILIES.items()}
    best = max(scores.values(), default=0)
    if best:
        winners = [name for name, score in scores.items() if score == best]
        if len(winners) > 1:
            raise CheckpointError(f"{name_or_path} could be a model of several families ({', '.join(winners)}); "
                                  f"pass a folder whose config.json says which")
        return FAMILIES[winners[0]]
    text = str(name_or_path)
    path = Path(text).expanduser()
    titles = ", ".join(family.title for family in FAMILIES.values())
    if path.is_dir():
        from .files import read_raw_config

        raw, file = read_raw_config(path)           # no config.json, or not JSON: says so
        kind = raw.get("model_type") or raw.get("format")
        described = f"a {kind!r} model" if kind else "no known model (no model_type or format)"
        raise ConfigError(f"{file} describes {described}, not {titles} (the model families mambapeft knows): a "
                          f"checkpoint folder's config.json names its family by model_type (Hugging Face) or format")
    if path.exists():
        raise CheckpointError(f"{text} is a file of no model family mambapeft knows ({titles}): pass a checkpoint "
                              f"folder (config.json and the weights) or a released .pth")
    from .files import hub_download, looks_local

    if looks_local(text):
        raise CheckpointError(f"no folder {text} (nor a file of that name): pass an existing checkpoint, an "
                              f"architecture or a hub id")
    if "/" not in text:
        raise ConfigError(f"unknown architecture {text!r} (nor a built-in model, a local checkpoint or a hub id "
                          f"owner/name){known_names_hint(text)}")
    config_file = hub_download(text, filename="config.json")
    scores = {name: family.claim(config_file.parent) for name, family in FAMILIES.items()}
    best = max(scores.values())
    if not best:
        raise CheckpointError(f"{text}: its config.json describes no model family mambapeft knows "
                              f"({', '.join(FAMILIES)})")
    return FAMILIES[max(scores, key=scores.get)]
