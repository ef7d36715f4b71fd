"""Paper presets and per-size learning rates, gathered from the methods (each method file owns its facts).

`paper/<name>` expands to the method specs of one row of the paper's tables: every method's `presets` (its Table 1 /
Appendix A.1 setting), plus the hybrids below. Where the paper gives a language learning rate per model size
(Table 7; 5e-5 for full fine-tuning), a method's `lr_by_size` holds it, and `size_lr` is the one function that reads
it: presets get it when the architecture is known, and a run without --lr gives it to every method that has one.

The built-in tiny Mamba ("builtin", 1M parameters) has a column of its own: methods whose update is scaled by a plain
s = 0.1 from a zero start (`scaled_update`: the LoRA family, DoRA, the parallel adapter) move 10x slower at the same
rate, so they take 3e-2 (measured on the built-in task, 8 epochs, lora_p_x r8: 3e-3 -> 24.1% test, chance;
3e-2 -> 52.7%); full fine-tuning takes 1e-3 (83.0%); every other method the run's rate, BUILTIN_BASE_LR by default.

`placement/<where>` (also written `paper/placement/<where>`) are the placements of LoRA in a hybrid model compared in
the 2026 hybrid fine-tuning studies: on the attention layers only (what peft's default targets for nemotron_h do),
on the SSM layers only, or on both. They mean something only where a model has both kinds of layer, so peft.py
refuses them on a pure SSM model (`check_placement`). "both" trains every layer type: the SSM mixers, the attention
projections and every MLP (Granite 4.0-H's and Bamba's follow each mixer, Nemotron-H's are layers of their own and
the shared experts of its MoE layers), so `mambapeft params` shows no layer type at 0; it is the hybrids' default
method (`HybridFamily.default_method`). The SSM part is lora_p_x, the language runs' default on pure Mamba models.
"""

from __future__ import annotations

from ..methods import REGISTRY

BUILTIN_BASE_LR = 3e-3
BUILTIN_SCALED_LR = 3e-2
DEFAULT_LR = 1e-3

# presets that combine methods (Table 1 / Table 8, and SDT as its authors run it)
HYBRID_PRESETS: dict[str, list[str]] = {
    # SDT + LoRA as its authors run it: LoRA r 8 on out_proj with lora_alpha = r (scale 1) and dropout 0.1
    # (furiosa-ai/ssm-peft sd_lora.py L78-79), the warm-up a run of its own
    "sdt_lora": ["sdt:warmup_steps=500,restart=true", "lora_out_proj:r=8,s=1,dropout=0.1"],
    "all_lora_r8": ["lora_in_proj:r=8", "lora_out_proj:r=8", "lora_x_proj:r=8", "lora_dt_proj:r=8", "lora_embed:r=8"],
    "lora_in_out_proj": ["lora_in_proj:r=8", "lora_out_proj:r=8"],
}

# where LoRA goes in a hybrid model (attention / SSM / mixed layer stacks); refused on pure SSM models
PLACEMENT_PREFIX = "placement/"
PLACEMENT_PRESETS: dict[str, list[str]] = {
    "placement/attention": ["lora_attn:r=8"],
    "placement/ssm": ["lora_p_x:r=8"],
    "placement/both": ["lora_p_x:r=8", "lora_attn:r=8", "lora_mlp:r=8"],
}


def all_presets() -> dict[str, list[str]]:
    """Every preset: each registered method's `paper/<name>`, the combinations above, the placements."""
    presets = {}
    for cls in REGISTRY.values():
        presets.update(cls.presets)
    presets.update(HYBRID_PRESETS)
    presets.update(PLACEMENT_PRESETS)
    return presets


def is_preset(text: str) -> bool:
    """Whether a method spec string names a preset (`paper/...` or `placement/...`)."""
    return text.strip().startswith(("paper/", PLACEMENT_PREFIX))


def preset_name(key: str) -> str:
    """How a preset key is written on the command line."""
    return key if key.startswith(PLACEMENT_PREFIX) else f"paper/{key}"


def size_lr(method: str, arch: str | None, config=None) -> float | None:
    """The learning rate of `method` (with `config`) on the named model size (Table 7, the released configs, or the
    built-in model's column), if known."""
    cls = REGISTRY.get(method)
    if cls is None or arch is None:
        return None
    rate = cls.size_lr(config if config is not None else cls.Config(), arch)
    if rate is not None:
        return rate
    if arch == "builtin" and cls.scaled_update:
        return BUILTIN_SCALED_LR
    return None


def size_rank(method: str, arch: str | None) -> int | None:
    """A per-size rank (SLL LoRA's 8 / 16 / 32 / 64), if the method has one."""
    return getattr(REGISTRY.get(method), "rank_by_size", {}).get(arch)


def run_lr(arch: str | None) -> float:
    """The run's learning rate when none is given: the built-in model's base rate, else 1e-3."""
    return BUILTIN_BASE_LR if arch == "builtin" else DEFAULT_LR
