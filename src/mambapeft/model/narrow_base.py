"""A frozen base stored narrow (bfloat16 or float16), computed in float32.

Why: the frozen weights are most of a PEFT run's memory at short lengths (11 GB of float32 for mamba-2.8b). Stored
in 16 bits they take half, and nothing is lost that the checkpoint had (the released weights are 16-bit). On a CPU
without bf16 instructions (this project's Zen 3) bf16 matmuls are slow, so compute stays float32: each weight is
upcast when its layer runs, and the float32 copy is dropped after it.

What is stored narrow: the `weight` of every nn.Linear and nn.Embedding whose weight is frozen and not
parametrized already (in_proj, x_proj, dt_proj, out_proj, the embedding, the head, a hybrid's attention and MLP
projections). LoRA / DoRA / adapter wrappers call these layers as modules, so they still apply; trained tensors and
the small tensors methods parametrize (A_log, D, conv, norms, dt bias, a hybrid's stacked expert weights) stay
float32 (a small share of the weights).

How:
  * `Upcast`, a parametrization (torch.nn.utils.parametrize) on each such weight: `layer.weight` reads as the float32
    upcast of the narrow `original`, so every reader (the layer, DoRA's norm, the head's dtype) sees float32.
  * The backward pass would keep each float32 copy (a matmul saves its weight to compute the input's gradient), which
    would hold a float32 copy of every weight at once. `keeping_narrow()` (a saved-tensors hook, around the forward)
    saves the narrow original instead and upcasts it again in the backward pass.
  * `restore` (before merging, or to go back) turns the weights float32 again and removes the parametrizations, tied
    weights staying tied (the embedding and a tied head share one narrow original).

Refused (ConfigError): a base that is not float32 (load it in float32: methods make their tensors in the base's
type, and they must stay float32); a run where no base weight is frozen (`full` trains them all: nothing to store
narrow); undoing it while another parametrization sits on top of a narrow weight. Left float32 rather than refused:
weights a method trains or parametrizes (linear_probe's head, a delta on a Linear's weight).

Not done: loading a checkpoint straight into the narrow form (the base is built or loaded in float32 first, so a
process's peak holds the float32 weights once while it starts); the embedding lookup upcasts the whole table (the
tied head shares it), a transient float32 copy.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NARROW_LAYERS = (nn.Linear, nn.Embedding)

# storage address of a live float32 upcast -> (weak reference to it, the narrow tensor it came from, the function
# that widens that tensor again: Tensor.float here, a dequantization for a quantized base, model/quantized_base.py)
_upcasts: dict[int, tuple[weakref.ref, torch.Tensor, object]] = {}


def _forget(ptr: int, ref: weakref.ref) -> None:
    if _upcasts.get(ptr, (None,))[0] is ref:
        del _upcasts[ptr]


class Upcast(nn.Module):
    """Parametrization: the stored narrow tensor, read as float32 (and remembered, so that a backward pass that
    would keep the float32 copy keeps the narrow one: `keeping_narrow`)."""

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        wide = original.float()
        return remember(wide, original, torch.Tensor.float)


def remember(wide: torch.Tensor, source: torch.Tensor, widen) -> torch.Tensor:
    """Notes that float32 `wide` is `widen(source)`, so that `keeping_narrow` saves `source` for the backward pass
    in its place; returns `wide`."""
    if wide.requires_grad:                      # a trained tensor is never stored narrow; nothing to remember
        return wide
    ptr = wide.untyped_storage().data_ptr()
    ref = weakref.ref(wide, lambda r, p=ptr: _forget(p, r))
    _upcasts[ptr] = (ref, source, widen)
    return wide


def _pack(t: torch.Tensor):
    found = _upcasts.get(t.untyped_storage().data_ptr()) if t.dtype == torch.float32 else None
    if found is None or found[0]() is None:
        return t
    return ("narrow", found[1], found[2], t.shape, t.stride(), t.storage_offset())


def _unpack(packed):
    if isinstance(packed, tuple) and packed and packed[0] == "narrow":
        _, narrow, widen, shape, stride, offset = packed
        return widen(narrow).as_strided(shape, stride, offset)       # the same view of a fresh upcast
    return packed


def keeping_narrow():
    """The context the forward runs in: tensors saved for the backward pass that are float32 upcasts of narrow
    weights are kept as the narrow weights."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def narrow_slots(model: nn.Module, among: set[int] | None = None) -> list[tuple[nn.Module, torch.Tensor]]:
    """(layer, its weight) for every layer that stores its weight narrow: frozen, floating, not parametrized, and
    one of `among` (ids of the base model's own tensors, not a method's) when given."""
    found = []
    for module in model.modules():
        if isinstance(module, NARROW_LAYERS) and not parametrize.is_parametrized(module, "weight"):
            weight = module.weight
            if weight.is_floating_point() and not weight.requires_grad and (among is None or id(weight) in among):
                found.append((module, weight))
    return found


def store_narrow(model: nn.Module, dtype: torch.dtype, among: set[int] | None = None) -> int:
    """Stores the frozen base weights of `model` in `dtype` (see the module's docstring); returns how many tensors.
    Call it after the methods are attached (they must find the float32 layers, and what they train stays float32);
    `among`: the ids of the tensors that may be stored narrow (the base model's own)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"a narrow base is stored in bfloat16 or float16, not {dtype}")
    slots = narrow_slots(model, among)
    wrong = {str(w.dtype) for _, w in slots if w.dtype != torch.float32}
    if wrong:
        raise ConfigError(f"the base model is in {', '.join(sorted(wrong))}; a narrow base is made from a float32 "
                          f"model (load it with dtype float32)")
    if not slots:
        raise ConfigError("no frozen base weight to store narrow: every linear and embedding weight is trained "
                          "(e.g. by `full`) or already narrow")
    unique = {id(w): w for _, w in slots}
    for module, _ in slots:
        parametrize.register_parametrization(module, "weight", Upcast(), unsafe=True)
    for weight in unique.values():             # after registering: a tied weight is registered on both layers
        weight.data = weight.data.to(dtype)
    return len(unique)


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The type the frozen base weights are stored in (float32 unless `store_narrow` ran)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], Upcast):
            return module.parametrizations.weight.original.dtype
    return torch.float32


def stored_layers(model: nn.Module, kind: type, storage: str) -> list[nn.Module]:
    """The layers whose weight is held by a `kind` parametrization (Upcast, quantized_base.Dequantize), each
    checked to carry nothing on top of it, so undoing the storage cannot drop another parametrization."""
    layers = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
              and isinstance(m.parametrizations.weight[0], kind)]
    for module in layers:
        if len(module.parametrizations.weight) != 1:
            raise ConfigError(f"{type(module).__name__}.weight carries another parametrization on top of its "
                              f"{storage} storage; remove that first")
    return layers


def restore(model: nn.Module) -> None:
    """The narrow weights back to float32 plain parameters (the same Parameter objects, so ties hold)."""
    layers = stored_layers(model, Upcast, "narrow")
    originals = {id(m.parametrizations.weight.original): m.parametrizations.weight.original for m in layers}
    for weight in originals.values():
        weight.data = weight.data.float()
    for module in layers:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
