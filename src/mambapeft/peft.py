"""The PEFT model: a base model with methods attached, in the spirit of Hugging Face peft.

    peft = get_peft_model(model, ["lora_p_x:r=64", "additional_scan"])   # freezes what no method trains
    peft.print_trainable_parameters()
    optimizer = torch.optim.AdamW(peft.parameter_groups(lr=1e-3, weight_decay=0.0))
    peft.save_pretrained("adapter/")          # adapter_config.json + adapter_model.safetensors
    peft = PeftModel.from_pretrained(base, "adapter/")
    plain = peft.merge_and_unload()           # mergeable methods folded into the weights

Saved adapters hold the method specs, every tensor the methods created or train, and the base model's
architecture, so loading onto a base of other sizes is refused with the differences named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__
from .config import MethodSpec, PeftConfig
from .errors import CheckpointError, ConfigError
from .methods import REGISTRY, Method
from .model.architectures import ARCHITECTURES
from .model.summary import count_unique

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "mambapeft-adapter"


def guess_arch(model) -> str | None:
    """The named architecture a model has the sizes of (for per-size preset learning rates), if any."""
    config = getattr(model, "config", None)
    for name, sizes in ARCHITECTURES.items():
        if all(getattr(config, key, None) == value for key, value in sizes.items()):
            return name
    return None


def fingerprint(model) -> dict:
    """The base architecture an adapter is tied to."""
    return model.peft_fingerprint()


def check_combination(methods: list[Method]) -> None:
    """Raises ConfigError when a method appears twice or two methods clash."""
    seen = set()
    for method in methods:
        if method.name in seen:
            raise ConfigError(f"{method.name} appears twice in the PEFT config; keep one spec per method")
        seen.add(method.name)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            reason = a.clash(b) or b.clash(a)
            if reason:
                raise ConfigError(f"these methods clash: {reason}")


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, config, *, arch: str | None = None):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ConfigError("the model already carries PEFT methods; attach all methods in one config")
        if not isinstance(config, PeftConfig):
            config = PeftConfig.parse(config, arch=arch or guess_arch(model))
        methods = [REGISTRY[spec.method](spec.config) for spec in config.methods]
        check_combination(methods)
        for method in methods:
            method.check(model)
        self.base_model = model
        self.peft_config = config
        self.methods = methods
        self._base_ids = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        self.base_parameter_count = count_unique(model.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        self._owned: dict[str, list[torch.Tensor]] = {}
        for method in methods:
            tensors = method.attach(model)
            for t in tensors:
                t.requires_grad_(True)
            self._owned[method.name] = tensors

    # ------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def new_state(self):
        """An empty recurrent state of the base model, for forward(..., state=...)."""
        return self.base_model.new_state()

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self):
        return self.base_model.device

    # ------------------------------------------------------------ training phases

    def check_training(self, total_steps: int) -> None:
        """Raises ConfigError if a method cannot work in a run of `total_steps` optimiser steps."""
        for method in self.methods:
            method.check_training(total_steps)

    def on_step_end(self, step: int) -> None:
        """The trainer's word after optimiser step `step` (1-based), for methods with phases (SDT)."""
        for method in self.methods:
            method.on_step_end(self.base_model, step)

    def phase(self) -> str:
        """What the methods are doing now, for progress bars ("" when nothing is phased)."""
        return ", ".join(filter(None, (method.phase_name() for method in self.methods)))

    # ------------------------------------------------------------ reports

    def parameter_counts(self) -> dict:
        """trainable, total (base + added trainable tensors) and percent = trainable / total, as the paper counts."""
        params = list(self.base_model.parameters())
        trainable = count_unique(p for p in params if p.requires_grad)
        added = count_unique(p for p in params if id(p) not in self._base_ids and p.requires_grad)
        total = self.base_parameter_count + added
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}

    def print_trainable_parameters(self) -> None:
        c = self.parameter_counts()
        print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}")

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the adapter consists of: tensors methods created, and base weights they train."""
        tensors = {}
        for name, t in list(self.base_model.named_parameters()) + list(self.base_model.named_buffers()):
            if id(t) not in self._base_ids or t.requires_grad:
                tensors.setdefault(name, t)
        return tensors

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """AdamW groups: per-method lr and decay (partial deltas decay toward the pretrained value)."""
        names = {id(t): n for n, t in self.base_model.named_parameters()}
        groups = []
        for method in self.methods:
            # every tensor the method owns, trained now or not: the groups stay the same across phases (SDT's warm-up
            # delta freezes after selection), so an optimiser saved in one phase loads in the other
            owned = {names[id(t)]: t for t in self._owned[method.name]}
            if owned:
                groups += [g for g in method.param_groups(owned, lr, weight_decay) if g["params"]]
        return groups

    # ------------------------------------------------------------ save and load

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_tensors().items()}
        config = {
            "format": FORMAT,
            "mambapeft_version": __version__,
            "methods": self.peft_config.to_dict()["methods"],
            "base_model": {
                "name_or_path": getattr(self.base_model, "name_or_path", None),
                "architecture": fingerprint(self.base_model),
            },
        }
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder) -> "PeftModel":
        folder = Path(folder)
        config = read_adapter_config(folder)
        expected, found = fingerprint(model), config["base_model"]["architecture"]
        if expected != found:
            diffs = [f"{k} {found.get(k)!r} (this base: {expected.get(k)!r})"
                     for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
            raise CheckpointError(f"the adapter in {folder} was made for another base model: " + "; ".join(diffs))
        peft = cls(model, PeftConfig.from_dict(config["methods"]))
        peft.load_adapter_weights(folder / ADAPTER_WEIGHTS)
        return peft

    @torch.no_grad()
    def load_adapter_weights(self, file: Path) -> None:
        if not file.is_file():
            raise CheckpointError(f"no {file.name} in {file.parent}")
        try:
            saved = load_file(str(file))
        except Exception as err:
            raise CheckpointError(f"{file} is corrupt or truncated ({err})") from None
        expected = self.adapter_tensors()
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match its adapter config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, t in expected.items():
            if saved[name].shape != t.shape:
                raise CheckpointError(f"{file}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(t.shape)}")
            t.copy_(saved[name])
        for method in self.methods:
            method.after_load()

    # ------------------------------------------------------------ merge

    def merge_and_unload(self):
        """Folds every mergeable method into the weights.

        Returns the plain base model when every method merged (its parameters trainable again, as after
        loading); otherwise a PeftModel holding only the methods that stay as extra parameters (prompt and
        affix tokens, with any projection collapsed into plain tokens; the parallel adapter).
        """
        model = self.base_model
        for method in sorted((m for m in self.methods if m.mergeable), key=lambda m: m.merge_order):
            method.merge(model)
        remaining = [m for m in self.methods if not m.mergeable]
        kept_tensors = {m.name: m.collapse(model, self._owned[m.name]) for m in remaining}
        if not remaining:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        kept = PeftModel.__new__(PeftModel)
        nn.Module.__init__(kept)
        kept.base_model, kept.methods, kept._owned = model, remaining, kept_tensors
        kept.peft_config = PeftConfig([MethodSpec(m.name, m.config) for m in remaining])
        owned = {id(t) for tensors in kept_tensors.values() for t in tensors}
        kept._base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers()) if id(t) not in owned}
        kept.base_parameter_count = count_unique(p for p in model.parameters() if id(p) not in owned)
        return kept


def read_adapter_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"no adapter folder {folder}")
    if not file.is_file():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {folder}: is this a mambapeft adapter folder?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a mambapeft adapter config (format {FORMAT!r} expected)")
    return config


def get_peft_model(model: nn.Module, config, *, arch: str | None = None, seed: int | None = None) -> PeftModel:
    """Attaches the methods of `config` (a PeftConfig, spec strings, dicts or presets) to `model`."""
    if seed is not None:
        torch.manual_seed(seed)
    return PeftModel(model, config, arch=arch)
