"""Paper presets: `paper/<name>` expands to the method specs of one row of the paper's tables.

Hyperparameters are the paper's best settings (Table 1, Appendix A.1, Table 9; the SLL LoRA ranks of
Halloran et al.). Where the paper gives a language learning rate per model size (Table 7, and 5e-5 for full
fine-tuning), the preset fills `lr` in when the architecture is known (`mambapeft params --arch`, or the
model passed to `get_peft_model`); otherwise the run's learning rate applies.
"""

from __future__ import annotations

from ..errors import ConfigError

SIZES = ("mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b")
# paper Table 7 (language): learning rate by model size
LANGUAGE_LR = {
    "additional_scan": dict(zip(SIZES, (5e-3, 1e-3, 1e-3, 1e-4))),
    "affix": dict(zip(SIZES, (1e-4, 1e-5, 1e-5, 1e-5))),
    "lora_p_x": dict(zip(SIZES, (1e-3, 5e-4, 5e-4, 1e-4))),
    "full": dict.fromkeys(SIZES, 5e-5),
}
# The built-in tiny Mamba ("builtin", 1M parameters): its own column. Methods whose update is scaled by a plain
# s = 0.1 from a zero start (the LoRA family, DoRA, parallel adapter) move 10x slower at the same rate: measured
# on the built-in task, 8 epochs, lora_p_x r8: 3e-3 -> 24.1% test (chance), 3e-2 -> 52.7%; full at 1e-3 -> 83.0%.
# Every other method takes BUILTIN_BASE_LR.
BUILTIN_BASE_LR = 3e-3
SCALED_UPDATES = ("lora_embed", "lora_in_proj", "lora_x_proj", "lora_dt_proj", "lora_out_proj", "lora_p_x", "lora_p_z",
                  "lora_p_dt", "lora_p_b", "lora_p_c", "dora_p_x", "sll_lora", "parallel_adapter")
for _method in SCALED_UPDATES:
    LANGUAGE_LR.setdefault(_method, {})["builtin"] = 3e-2
LANGUAGE_LR["full"]["builtin"] = 1e-3
SLL_RANK = dict(zip(SIZES, (8, 16, 32, 64)))

PRESETS: dict[str, list[str]] = {
    # single methods (Table 1 settings; the language ones of Table 3)
    "lora_embed": ["lora_embed:r=32"],
    "lora_in_proj": ["lora_in_proj:r=32"],
    "lora_x_proj": ["lora_x_proj:r=64"],
    "lora_dt_proj": ["lora_dt_proj:r=64"],
    "lora_out_proj": ["lora_out_proj:r=96"],
    "lora_p_x": ["lora_p_x:r=64,s=0.1"],
    "lora_p_z": ["lora_p_z:r=64"],
    "lora_p_dt": ["lora_p_dt:r=64"],
    "lora_p_b": ["lora_p_b:r=64"],
    "lora_p_c": ["lora_p_c:r=64"],
    "dora_p_x": ["dora_p_x:r=64"],
    "parallel_adapter": ["parallel_adapter:dim=32,s=0.1"],
    "prompt": ["prompt:n=8,position=prefix+suffix,projection=false"],
    "prompt_proj": ["prompt:n=8,position=prefix+suffix,projection=true"],
    "affix": ["affix:n=3,where=after_in_proj,position=prefix,projection=false"],
    "affix_proj": ["affix:n=3,where=after_in_proj,position=prefix,projection=true"],
    "additional_scan": ["additional_scan:n=6,location=top,init=neighbour"],
    "partial_a": ["partial_a:weight_decay=1e-3"],
    "partial_d": ["partial_d:weight_decay=1e-3"],
    "partial_conv1d": ["partial_conv1d:weight_decay=1e-3"],
    "partial_bias": ["partial_bias:weight_decay=1e-2"],
    "sll_lora": ["sll_lora:s=1"],
    # Sparse Dimension Tuning (the second reference paper): alone, and with LoRA r 8 on out_proj as its authors run it
    "sdt": ["sdt"],
    "sdt_lora": ["sdt", "lora_out_proj:r=8"],
    "full": ["full"],
    "linear_probe": ["linear_probe"],
    # hybrids (Table 1 / Table 8)
    "all_lora_r8": ["lora_in_proj:r=8", "lora_out_proj:r=8", "lora_x_proj:r=8", "lora_dt_proj:r=8", "lora_embed:r=8"],
    "lora_in_out_proj": ["lora_in_proj:r=8", "lora_out_proj:r=8"],
}


def expand_preset(name: str, arch: str | None = None):
    """`paper/<row>` -> method specs, with the per-size learning rate (and SLL rank) when `arch` is known."""
    from .spec import MethodSpec, _suggest

    key = name.removeprefix("paper/")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_suggest(key, PRESETS)}; presets: "
                          + ", ".join(f"paper/{k}" for k in PRESETS))
    specs = []
    for text in PRESETS[key]:
        spec = MethodSpec.parse(text)
        if arch in LANGUAGE_LR.get(spec.method, {}) and spec.config.lr is None:
            spec.config.lr = LANGUAGE_LR[spec.method][arch]
        if spec.method == "sll_lora" and arch in SLL_RANK:
            spec.config.r = SLL_RANK[arch]
        specs.append(spec)
    return specs
