"""Architecture and parameter counts of a language model, for `mambapeft info` and the parameter reports; each
family (model/<family>/) says which mixer parts and sizes it has."""

from __future__ import annotations

TENSOR_PARTS = ("A_log", "D", "dt_bias")     # parameters themselves, not modules


def count_unique(parameters) -> int:
    """Number of elements, each tensor counted once (a tied head is the embedding)."""
    seen, total = set(), 0
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def language_summary(model, mixer_parts: tuple[str, ...], sizes: dict, renamed: dict | None = None) -> dict:
    """The summary of a language model whose blocks are `backbone.layers[i].{norm, mixer}`: `sizes` (d_inner,
    d_state, ...) as the family states them, the parameters of each mixer part (`renamed`: a part's name in the
    summary where it clashes with the block's own, e.g. Mamba-2's gated "norm")."""
    config = model.config
    first = model.backbone.layers[0]
    mixer = first.mixer
    per_layer = {(renamed or {}).get(part, part): sum(p.numel() for p in getattr(mixer, part).parameters())
                 if part not in TENSOR_PARTS else getattr(mixer, part).numel() for part in mixer_parts}
    per_layer["norm"] = first.norm.weight.numel()
    layer_total = count_unique(first.parameters())
    tied = config.tie_word_embeddings
    return {
        "model_type": config.model_type,
        "d_model": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        **sizes,
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


def language_summary_lines(summary: dict, sizes_line: str) -> list[str]:
    """`mambapeft info`'s text for a language model (`sizes_line`: the family's own sizes, in words)."""
    p = summary["parameters"]
    parts = " · ".join(f"{k} {v:,}" for k, v in p["per_layer_parts"].items())
    yes = {True: "yes", False: "no"}
    return [
        f"  model_type   {summary['model_type']}",
        f"  d_model {summary['d_model']}   n_layer {summary['n_layer']}   vocab {summary['vocab_size']}",
        f"  {sizes_line}",
        f"  bias: in/out_proj {yes[summary['use_bias']]}, conv1d {yes[summary['use_conv_bias']]};  "
        f"lm_head tied to embeddings: {yes[summary['tie_word_embeddings']]}",
        f"parameters     {p['total']:,}",
        f"  embeddings   {p['embeddings']:,}",
        f"  per layer    {p['per_layer']:,}  ({parts})",
        f"  all layers   {p['layers']:,}",
        f"  norm_f       {p['norm_f']:,}",
        f"  lm_head      {'tied' if summary['tie_word_embeddings'] else format(p['lm_head'], ',')}",
    ]
