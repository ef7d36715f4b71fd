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

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .assets import BUILTIN_LANGUAGE_MODELS
from .config import MethodSpec, PeftConfig
from .errors import CheckpointError, ConfigError, NotApplicable
from .methods import REGISTRY, Method
from .model import narrow_base, quantized_base
from .model.summary import count_unique
from .version import __version__

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "mambapeft-adapter"


def guess_arch(model) -> str | None:
    """The named architecture of the model's family that it has the sizes of (for per-size preset learning rates),
    if any."""
    from .model.registry import FAMILIES

    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(model, "family", None))
    for name, sizes in (family.architectures if family else {}).items():
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


def check_methods(model, methods: list[Method]) -> None:
    """Every method's own check on `model` (NotApplicable names the method and the model family)."""
    for method in methods:
        try:
            method.check(model)
        except NotApplicable as err:
            reason = str(err).removeprefix(f"{method.name}: ")
            raise NotApplicable(f"{method.name} does not apply to {model.family} models: {reason}") from None


def check_placement(model, config: PeftConfig) -> None:
    """A placement preset (`placement/attention`, `.../ssm`, `.../both`) chooses between a hybrid's kinds of layer;
    on a model of one kind of layer (`part_types()` empty) it would silently mean plain LoRA, so it is refused."""
    from .config.presets import PLACEMENT_PREFIX

    for spec in config.methods:
        preset = (spec.preset or "").removeprefix("paper/")
        if preset.startswith(PLACEMENT_PREFIX) and not model.part_types():
            raise NotApplicable(f"{spec.preset} chooses which layer types of a hybrid model (Mamba-2 and attention "
                                f"layers, as granitemoehybrid, nemotron_h and bamba have) train; {model.family} models "
                                f"have SSM layers only, so there is nothing to place. Name the method instead (e.g. "
                                f"{spec.method}:r={getattr(spec.config, 'r', 8)})")


class PeftModel(nn.Module):
    """A base model with PEFT methods attached.

    `attached` is for a model whose methods are attached already (merge_and_unload's remainder): method name ->
    the tensors it owns; the config's methods are then wrapped, not attached again.
    """

    def __init__(self, model: nn.Module, config, *, arch: str | None = None,
                 attached: dict[str, list[torch.Tensor]] | None = None, methods: list[Method] | None = None):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ConfigError("the model already carries PEFT methods; attach all methods in one config")
        if not isinstance(config, PeftConfig):
            config = PeftConfig.parse(config, arch=arch or guess_arch(model))
        if methods is None:
            methods = [REGISTRY[spec.method](spec.config) for spec in config.methods]
        self.base_model = model
        self.peft_config = config
        self.methods = methods
        if attached is not None:
            owned = {id(t) for tensors in attached.values() for t in tensors}
            self._base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers()) if id(t) not in owned}
            self.base_parameter_count = count_unique(p for p in model.parameters() if id(p) not in owned)
            self._owned = dict(attached)
            return
        check_combination(methods)
        check_placement(model, config)
        check_methods(model, methods)
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
        # what a restart (SDT's warm-up as a run of its own) puts back: every other method's initial tensors
        self._initial = ({id(t): t.detach().clone() for m in methods for t in self._owned[m.name]}
                         if any(m.extra_steps() for m in methods) else {})

    # ------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        if not getattr(self, "_narrow", False):
            return self.base_model(*args, **kwargs)
        with narrow_base.keeping_narrow():       # the backward pass keeps the narrow weights, not float32 copies
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Per-block gradient checkpointing of the base model (model/checkpointing.py)."""
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model.is_gradient_checkpointing

    def store_base_as(self, dtype: str | torch.dtype) -> None:
        """Stores the frozen base weights in `dtype` ("bfloat16", "float16": model/narrow_base.py; "int8", "int4":
        weight-only quantization of the linear layers the fused kernels do not read raw, model/quantized_base.py;
        "float32" undoes it), computing in float32; the trained tensors stay float32. Merging widens first."""
        scheme = quantized_base.stored_scheme(self.base_model)
        if scheme and dtype == scheme:
            return
        if scheme and dtype not in ("float32", torch.float32):
            raise ConfigError(f"the base is stored {scheme}: its float32 weights are gone, so {dtype} would quantize "
                              f"or round the {scheme} values again; load the model again to store it as {dtype}, or "
                              f"store_base_as('float32') to go on from the dequantized weights")
        if dtype in quantized_base.SCHEMES:
            self._undo_narrow()
            added = quantized_base.store_quantized(self.base_model, dtype, among=self._base_ids)
            self._base_ids |= {id(t) for t in added}       # statistics of the base, not an adapter's tensors
            self._narrow = True
            return
        dtype = narrow_base.DTYPES.get(dtype, dtype)
        if dtype not in narrow_base.DTYPES.values():
            raise ConfigError(f"base dtype must be one of {', '.join([*narrow_base.DTYPES, *quantized_base.SCHEMES])}, "
                              f"got {dtype!r}")
        self._undo_narrow()
        self._narrow = dtype != torch.float32
        if self._narrow:
            narrow_base.store_narrow(self.base_model, dtype, among=self._base_ids)

    def _undo_narrow(self) -> None:
        """The base back to float32 (a quantized one to its dequantized values)."""
        quantized_base.restore(self.base_model)
        narrow_base.restore(self.base_model)
        self._narrow = False

    @property
    def base_dtype(self) -> torch.dtype | str:
        """The frozen base's storage: a torch dtype, or "int8" / "int4" for a quantized base."""
        return quantized_base.stored_scheme(self.base_model) or narrow_base.stored_dtype(self.base_model)

    # ------------------------------------------------------------ training phases

    def check_training(self, total_steps: int) -> None:
        """Raises ConfigError if a method cannot work in a run of `total_steps` optimiser steps."""
        for method in self.methods:
            method.check_training(total_steps)

    def on_step_end(self, step: int) -> bool:
        """The trainer's word after optimiser step `step` (1-based), for methods with phases (SDT). Returns True when
        a method asked for a restart: the other methods' tensors are then back at their initial values, and the
        trainer drops the optimiser state."""
        restarting = [m for m in self.methods if m.on_step_end(self.base_model, step) == "restart"]
        if restarting:
            with torch.no_grad():
                for method in self.methods:
                    if method not in restarting:
                        for t in self._owned[method.name]:
                            t.copy_(self._initial[id(t)])
        return bool(restarting)

    def extra_steps(self) -> int:
        """Optimiser steps the methods add to the run (see Method.extra_steps)."""
        return sum(m.extra_steps() for m in self.methods)

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

    def trainable_by_method(self) -> dict[str, int]:
        """Trainable elements each method owns now (a tensor shared by two methods counts for the first)."""
        return {m.name: count_unique(t for t in self._owned[m.name] if t.requires_grad) for m in self.methods}

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

    def parameter_groups(self, lr: float, weight_decay: float = 0.0, flat_decay: bool = True) -> list[dict]:
        """AdamW groups: per-method lr and decay (partial deltas decay toward the pretrained value); flat_decay=False:
        no run decay on biases and 1-D tensors (see Method.param_groups)."""
        names = {id(t): n for n, t in self.base_model.named_parameters()}
        groups = []
        for method in self.methods:
            # every tensor the method owns, trained now or not: the groups stay the same across phases (SDT's warm-up
            # delta freezes after selection), so an optimiser saved in one phase loads in the other
            owned = {names[id(t)]: t for t in self._owned[method.name]}
            if owned:
                groups += [g for g in method.param_groups(owned, lr, weight_decay, flat_decay) if g["params"]]
        return groups

    # ------------------------------------------------------------ save and load

    def save_pretrained(self, folder, *, in_place: bool = False) -> None:
        """adapter_config.json + adapter_model.safetensors, written whole or not at all: a folder holding only an
        adapter (or nothing) is replaced as a whole (outputs.atomic_folder); in a folder with other files, or with
        `in_place` (a trainer checkpoint, which other processes write their files into at the same time), each file
        is written to a temporary name and renamed."""
        from .outputs import atomic_folder

        folder = Path(folder)
        if in_place or (folder.is_dir() and {p.name for p in folder.iterdir()} - {ADAPTER_CONFIG, ADAPTER_WEIGHTS}):
            folder.mkdir(parents=True, exist_ok=True)
            self._write_adapter(folder)
            return
        with atomic_folder(folder, overwrite=True, option="adapter folder") as tmp:
            self._write_adapter(tmp)

    def _write_adapter(self, folder: Path) -> None:
        from .outputs import replace_file

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
        replace_file(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        replace_file(folder / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        match_permissions(folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder) -> PeftModel:
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
            raise CheckpointError(f"{file} does not match its adapter config: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        for name, t in expected.items():
            if saved[name].shape != t.shape:
                raise CheckpointError(f"{file}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(t.shape)}")
            if saved[name].is_floating_point() and not torch.isfinite(saved[name]).all():
                raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values; this adapter comes from a "
                                      f"run that diverged. Use an earlier checkpoint of that run, or train again with "
                                      f"a lower learning rate")
        for name, t in expected.items():
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
        self._undo_narrow()                     # a narrow base merges in float32 (a quantized one dequantized)
        for method in sorted((m for m in self.methods if m.mergeable), key=lambda m: m.merge_order):
            method.merge(model)
        remaining = [m for m in self.methods if not m.mergeable]
        kept_tensors = {m.name: m.collapse(model, self._owned[m.name]) for m in remaining}
        if not remaining:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        config = PeftConfig([MethodSpec(m.name, m.config) for m in remaining])
        return PeftModel(model, config, attached=kept_tensors, methods=remaining)


def read_adapter_config(folder: Path) -> dict:
    from .outputs import check_complete

    file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"no adapter folder {folder}")
    check_complete(folder, "adapter folder")
    if not file.is_file():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {folder}: is this a mambapeft adapter folder?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        hint = (" It looks like a Hugging Face peft adapter: convert it with `mambapeft import`."
                if isinstance(config, dict) and "peft_type" in config else "")
        raise CheckpointError(f"{file} is not a mambapeft adapter config (format {FORMAT!r} expected).{hint}")
    for key, kind in (("methods", list), ("base_model", dict)):
        if key not in config:
            raise CheckpointError(f"{file} has no {key!r} key; the file is incomplete: save the adapter again")
        if not isinstance(config[key], kind):
            raise CheckpointError(f"{file}: {key!r} must be a {kind.__name__}, it is a {type(config[key]).__name__}")
    if not isinstance(config["base_model"].get("architecture"), dict):
        raise CheckpointError(f"{file} has no 'base_model.architecture'; the file is incomplete: "
                              "save the adapter again")
    return config


def match_permissions(file: Path, like: Path) -> None:
    """safetensors writes files private to the user (0600); give them the mode of the other files written here."""
    with contextlib.suppress(OSError):
        file.chmod(like.stat().st_mode & 0o777)


def get_peft_model(model: nn.Module, config, *, arch: str | None = None, seed: int | None = None) -> PeftModel:
    """Attaches the methods of `config` (a PeftConfig, spec strings, dicts or presets) to `model`."""
    if seed is not None:
        torch.manual_seed(seed)
    return PeftModel(model, config, arch=arch)


def count_parameters(model_name: str, specs: list) -> dict:
    """What `specs` train on `model_name` (any name `train` accepts), counted on shapes only (meta device), after
    every warm-up phase (SDT counts what trains once its selection is made)."""
    import sys

    from .model.factory import shapes_model

    arch = "builtin" if model_name in BUILTIN_LANGUAGE_MODELS else model_name.lower()
    model = shapes_model(model_name)[0]
    peft = get_peft_model(model, PeftConfig.parse(specs, arch=arch), arch=arch)
    notes = {str(spec): note for spec, method in zip(peft.peft_config.methods, peft.methods)
             if (note := method.explain_count())}
    peft.on_step_end(sys.maxsize)          # as after every warm-up phase (SDT): count what trains from then on
    counts = peft.parameter_counts()
    per_method = dict(zip(map(str, peft.peft_config.methods), peft.trainable_by_method().values()))
    result = {"model": model_name, "config": str(peft.peft_config), "per_method": per_method, "notes": notes,
              "base": peft.base_parameter_count, **counts}
    if model.part_types():
        result["per_layer_type"] = trainable_by_layer_type(peft.base_model)
    return result


def trainable_by_layer_type(model) -> dict[str, dict]:
    """A hybrid's trainable elements per kind of layer part (model.part_types(): "mamba", "attention", "mlp", "moe";
    "other" for the embedding, head, norms and model-level parts), with the number of layers of each kind that train
    something, so a placement that trains 4 of 56 layers shows as such."""
    parts = sorted(model.part_types().items(), key=lambda item: -len(item[0]))       # longest prefix first
    counts: dict[str, dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        path, kind = next(((path, kind) for path, kind in parts if name.startswith(path + ".")), ("", "other"))
        entry = counts.setdefault(kind, {"trainable": 0, "parts": set()})
        entry["trainable"] += p.numel()
        entry["parts"].add(path)
    totals = {}
    for kind in dict.fromkeys(kind for _, kind in sorted(model.part_types().items())):
        entry = counts.get(kind, {"trainable": 0, "parts": set()})
        of = sum(1 for k in model.part_types().values() if k == kind)
        totals[kind] = {"trainable": entry["trainable"], "layers": len(entry["parts"]), "of": of}
    if "other" in counts:
        totals["other"] = {"trainable": counts["other"]["trainable"]}
    return totals
