"""A frozen base stored quantized (weight-only int8, or 4-bit NF4), computed in float32: LoRA on top is QLoRA.

Why: the frozen weights are most of a PEFT run's memory at short lengths. int8 stores a weight in 1 byte (+ one
float32 scale per row), 4-bit NF4 in half a byte (+ one float32 absmax per block of 64: 0.5625 bytes in all), against
4 for float32 and 2 for bfloat16 (model/narrow_base.py). The quantization error is the price: int8 row-wise absmax
rounds each weight to 1/254 of its row's largest (relative error ~0.4 % of the row's range), NF4 to one of 16 levels
per block (the QLoRA paper's data type, ~10 % of a block's absmax at worst).

The library: bitsandbytes (the QLoRA reference; `pip install mambapeft[quant]`). Its `quantize_4bit` /
`dequantize_4bit` (NF4) and `int8_vectorwise_quant` / `int8_vectorwise_dequant` run on the CPU (this project's Zen 3:
AVX2, no AVX-512) as on CUDA. torchao 0.18 was tried first: its int8 weight-only form runs here, but no 4-bit form
stores 4 bits on this CPU (Int4WeightOnlyConfig's "plain" packing needs the separate mslk kernels, "plain_int32"
refuses the CPU; IntxWeightOnlyConfig(torch.int4) stores the values unpacked, one per int8: no saving over int8).

What is quantized: the `weight` of every frozen nn.Linear of the base model except
  * out_proj, x_proj and dt_proj: the fused CUDA kernels (mamba_ssm's mamba_inner_fn for Mamba-1,
    mamba_split_conv1d_scan_combined for Mamba-2) take out_proj's (and Mamba-1's x_proj / dt_proj) raw weight
    tensors as arguments, so those stay float32 (the failure axolotl issue 3951 reports for a quantized out_proj);
  * conv1d (not a Linear; also read raw by the kernels), the embedding, the language head `lm_head` (kept
    unquantized as transformers' bitsandbytes integration keeps it; a tied head is the embedding's weight) and any
    Linear whose weight another kind of module shares, norms, A_log, D, dt_bias: float32;
  * weights a method trains or parametrizes (they are not frozen plain weights): float32.
So on Mamba models int8 / NF4 applies to in_proj (about two thirds of a block's weights) and on hybrids also to the
attention and MLP projections.

How (as narrow_base does for bfloat16): `Dequantize`, a parametrization (torch.nn.utils.parametrize), makes
`layer.weight` read as the float32 dequantization of the stored int8 / packed 4-bit tensor, so every reader (the
layer, LoRA's wrapper calling it, DoRA's norm, a kernel) sees an ordinary float32 weight; the float32 copy lives while
its layer runs. narrow_base.keeping_narrow (the forward's saved-tensors hook) keeps the quantized tensor for the
backward pass instead of the float32 copy and dequantizes it again there.

Merging (`merge_and_unload`) first dequantizes: the merged model is float32 with the dequantized base, the weights
the adapter was trained against (not the original float32 ones, which a quantized run no longer has).

Refused (ConfigError): a base that is not float32; bitsandbytes missing; no frozen weight to quantize; undoing it
under another parametrization.

Not done: loading a checkpoint straight into the quantized form (the base is built in float32 first, so the process
holds the float32 weights once at start); quantized out_proj on the CPU (it would be safe here, where no fused kernel
runs, but one rule for every device is simpler to reason about); bitsandbytes' CUDA path is untested here (no GPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from . import narrow_base

SCHEMES = ("int8", "int4")
BLOCK = 64                      # NF4 block size (bitsandbytes' and QLoRA's default)
KEPT_FLOAT = ("out_proj", "x_proj", "dt_proj")     # read raw by the fused CUDA kernels: never quantized
HEAD = "lm_head"                # kept float32, as transformers' bitsandbytes integration keeps it


def _bnb():
    try:
        import bitsandbytes.functional as functional
    except ImportError as e:
        raise ConfigError(f"an int8 / int4 base needs bitsandbytes: pip install 'mambapeft[quant]' ({e})") from None
    return functional


class Dequantize(nn.Module):
    """Parametrization: the stored quantized tensor (int8 [out, in], or NF4 packed uint8 [out*in/2, 1]) read as the
    float32 weight [out, in]. Its statistics (int8: a scale per row [out]; NF4: an absmax per block [out*in/64]) are
    buffers of this module, so they follow .to(device)."""

    def __init__(self, scheme: str, weight: torch.Tensor):
        super().__init__()
        functional = _bnb()
        self.scheme, self.shape = scheme, tuple(weight.shape)
        with torch.no_grad():
            if scheme == "int8":
                stored, scale, _ = functional.int8_vectorwise_quant(weight.detach())   # int8 [out, in], [out]
                self.register_buffer("stats", scale.float(), persistent=False)
            else:
                stored, state = functional.quantize_4bit(weight.detach(), blocksize=BLOCK, quant_type="nf4")
                self.register_buffer("stats", state.absmax, persistent=False)         # [out*in/64]
                self.register_buffer("code", state.code, persistent=False)            # the 16 NF4 levels
        self.stored = stored                   # handed over to the parameter by `store_quantized`

    def dequantize(self, stored: torch.Tensor) -> torch.Tensor:
        functional = _bnb()
        if self.scheme == "int8":
            return functional.int8_vectorwise_dequant(stored, self.stats).float().view(self.shape)
        state = functional.QuantState(absmax=self.stats, shape=torch.Size(self.shape), dtype=torch.float32,
                                      blocksize=BLOCK, quant_type="nf4", code=self.code)
        return functional.dequantize_4bit(stored, state)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return narrow_base.remember(self.dequantize(stored), stored, self.dequantize)


def quantizable(model: nn.Module, among: set[int] | None = None) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every frozen, plain float32 nn.Linear of `model` that may be quantized (module docstring);
    `among`: the ids of the base model's own tensors, when given."""
    elsewhere = {id(t) for m in model.modules() if not isinstance(m, nn.Linear) for t in m.parameters(recurse=False)}
    found = []
    for name, module in model.named_modules():
        parts = set(name.split("."))          # out_proj.base when a method wraps out_proj
        if (not isinstance(module, nn.Linear) or parts & {*KEPT_FLOAT, HEAD}
                or parametrize.is_parametrized(module, "weight") or id(module.weight) in elsewhere):
            continue
        weight = module.weight
        if weight.is_floating_point() and not weight.requires_grad and (among is None or id(weight) in among):
            found.append((name, module))
    return found


def store_quantized(model: nn.Module, scheme: str, among: set[int] | None = None) -> list[torch.Tensor]:
    """Quantizes the frozen base weights of `model` (module docstring); returns the statistics buffers it added
    (the caller counts them as base tensors, not an adapter's). Call it after the methods are attached."""
    if scheme not in SCHEMES:
        raise ConfigError(f"a quantized base is int8 or int4, not {scheme!r}")
    _bnb()
    layers = quantizable(model, among)
    wrong = {str(m.weight.dtype) for _, m in layers if m.weight.dtype != torch.float32}
    if wrong:
        raise ConfigError(f"the base model is in {', '.join(sorted(wrong))}; a quantized base is made from a float32 "
                          f"model (load it with dtype float32)")
    if not layers:
        raise ConfigError(f"no frozen linear weight to quantize to {scheme}: out_proj, x_proj, dt_proj, the embedding "
                          f"and the head stay float32, and every other linear weight is trained or already stored "
                          f"narrow")
    shared = {}
    for _, module in layers:
        shared.setdefault(id(module.weight), []).append(module)
    if any(len(v) > 1 for v in shared.values()):
        raise ConfigError("a linear weight shared by two layers cannot be quantized (each layer would hold its own "
                          "quantized copy); store the base in bfloat16 instead")
    added = []
    for _, module in layers:
        weight = module.weight
        dequantize = Dequantize(scheme, weight)
        parametrize.register_parametrization(module, "weight", dequantize, unsafe=True)
        weight.data = dequantize.stored      # the same Parameter object, now int8 / packed uint8
        del dequantize.stored
        added.extend(dequantize.buffers())
    return added


def stored_scheme(model: nn.Module) -> str | None:
    """"int8" / "int4" when `store_quantized` ran on `model`, else None."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], Dequantize):
            return module.parametrizations.weight[0].scheme
    return None


def restore(model: nn.Module) -> None:
    """The quantized weights back to float32 plain parameters holding their dequantized values (the same Parameter
    objects)."""
    layers = narrow_base.stored_layers(model, Dequantize, "quantized")
    for module in layers:
        original = module.parametrizations.weight.original
        with torch.no_grad():
            wide = module.parametrizations.weight[0].dequantize(original)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        original.data = wide
