"""Architecture and parameter counts of a language model, for `mambapeft info` and the parameter reports."""

from __future__ import annotations

from .lm import MambaLM

MIXER_PARTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")
MAMBA2_MIXER_PARTS = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj")


def count_unique(parameters) -> int:
    """Number of elements, each tensor counted once (a tied head is the embedding)."""
    seen, total = set(), 0
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def architecture_summary(model: MambaLM) -> dict:
    config = model.config
    first = model.backbone.layers[0]
    mixer = first.mixer
    mamba2 = config.model_type == "mamba2"
    tensors = ("A_log", "D", "dt_bias")     # parameters themselves, not modules
    per_layer = {part: sum(p.numel() for p in getattr(mixer, part).parameters()) if part not in tensors
                 else getattr(mixer, part).numel() for part in (MAMBA2_MIXER_PARTS if mamba2 else MIXER_PARTS)}
    if mamba2:                       # the mixer's own (gated) norm; "norm" below is the block's
        per_layer["gated_norm"] = per_layer.pop("norm")
    per_layer["norm"] = first.norm.weight.numel()
    layer_total = count_unique(first.parameters())
    tied = config.tie_word_embeddings
    return {
        "model_type": config.model_type,
        "d_model": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "d_inner": mixer.d_inner,
        "d_state": mixer.d_state,
        "dt_rank": None if mamba2 else mixer.dt_rank,
        "d_conv": mixer.d_conv,
        **({"num_heads": mixer.num_heads, "head_dim": mixer.head_dim, "n_groups": mixer.n_groups} if mamba2 else {}),
        "use_bias": bool(config.use_bias),
        "use_conv_bias": bool(config.use_conv_bias),
        "tie_word_embeddings": bool(tied),
        "parameters": {
            "total": count_unique(model.parameters()),
            "embeddings": model.backbone.embeddings.weight.numel(),
            "per_layer": layer_total,
            "per_layer_parts": per_layer,
            "layers": layer_total * len(model.backbone.layers),
            "norm_f": model.backbone.norm_f.weight.numel(),
            "lm_head": 0 if tied else model.lm_head.weight.numel(),
        },
    }
