"""Adapters in Hugging Face peft's format, both ways, and complete merged models.

    export_peft(peft_model, "out/")              -> adapter_config.json + adapter_model.safetensors that
                                                    peft.PeftModel.from_pretrained(MambaForCausalLM..., "out/") loads
    import_peft(base_model, "peft_adapter/")     -> our PeftModel with the same outputs
    merge_to_folder(peft_model, "merged/", tokenizer)   -> a complete model folder (+ the small remaining adapter)

What peft can express: LoRA on in_proj, x_proj and the embedding (also SLL LoRA's parts and the partial LoRAs, as LoRA
on the whole layer with the other rows of B zero), and DoRA with the row-wise magnitude (dora_p_x as DoRA on in_proj
whose Z rows keep their own norm). Several LoRAs on one layer become one LoRA of the summed rank; every scale is folded
into B and lora_alpha = r, so peft's scaling is 1 and the product is ours exactly. Not expressible: LoRA on out_proj
(peft >= 0.16 refuses out_proj and conv1d on Mamba models: its fused CUDA path bypasses them), LoRA on dt_proj
(transformers 5.x multiplies by dt_proj.weight directly, so peft's LoRA there is silently ignored; checked at run
time by `transformers_bypasses`),
DoRA with the official input-column magnitude, a mix of LoRA and DoRA (peft's `use_dora` is one switch per adapter),
and every method that is not a low-rank update of a linear layer. Those are refused by name with the reason, or, with
`merge_rest=True`, folded into a base checkpoint written beside the adapter (OUT/base), which the adapter then names
as its base. Tested against peft 0.21 (the range in pyproject's `peft` extra).

The hybrids (Granite 4.0-H, Nemotron-H, Bamba; docs/hybrids.md) export the same way onto transformers'
...ForCausalLM, whose module paths are ours: LoRA / DoRA on the Mamba-2 in_proj (and its row blocks) and on the
attention and MLP projections. LoRA on out_proj or conv1d is refused for every hybrid type, whether or not peft
checks the model type (peft 0.22 guards nemotron_h but not granitemoehybrid or bamba): the fused Mamba-2 kernel
reads those weights raw. The experts' and router's LoRA (parametrizations of tensors) are refused too: peft's
target_parameters could carry them, but this exporter does not write that layout. Tested with peft 0.22.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .methods.base import AdaptedLayer, owner_and_attr, remove_delta
from .methods.dora import DoRADelta
from .methods.lora import EmbeddingLoRADelta

PEFT_PREFIX = "base_model.model."
LINEAR_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")
# what our methods become in peft, and back: the module names of transformers' MambaForCausalLM
IMPORTS = {"in_proj": "lora_in_proj", "x_proj": "lora_x_proj", "dt_proj": "lora_dt_proj", "out_proj": "lora_out_proj"}
DORA_IMPORTS = {"in_proj": "dora_in_proj", "x_proj": "dora_x_proj", "dt_proj": "dora_dt_proj",
                "out_proj": "dora_out_proj"}


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("Hugging Face peft is not installed: pip install 'mambapeft[peft]' (or peft)") from None
    return peft


@functools.cache
def transformers_bypasses(layer: str, family: str = "mamba") -> bool:
    """Whether the family's transformers class (MambaForCausalLM, Mamba2ForCausalLM, the hybrids' ...ForCausalLM)
    reads `layer`.weight directly instead of calling the module in some layer, which silently bypasses a peft LoRA on
    it (transformers 5.x multiplies by Mamba-1's dt_proj.weight in its CPU path). Probed on the family's small
    architecture: a forward hook on every module of that name must fire."""
    import transformers

    from .model.registry import get_family
    from .verbosity import quiet_third_party

    record = get_family(family)
    with quiet_third_party():                  # transformers' expected "fast path ... falling back" notice
        config = record.config(record.check_architecture)
        config._experts_implementation = "eager"      # the grouped-matmul experts refuse the check sizes on CPU
        model = getattr(transformers, record.transformers_class)(config).eval()
        modules = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == layer]
        if not modules:
            return False
        called = set()
        for module in modules:
            module.register_forward_hook(lambda m, *_: called.add(id(m)))
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
    return len(called) < len(modules)


def is_hybrid(family) -> bool:
    """A family of hybrid models (Mamba-2 mixers beside attention layers: model/granitemoehybrid HybridFamily)."""
    from .model.granitemoehybrid import HybridFamily

    return isinstance(family, HybridFamily)


def peft_refuses_out_proj() -> bool:
    """peft >= 0.16 refuses LoRA on Mamba's out_proj and conv1d (huggingface/peft#2556, PR #2562)."""
    try:
        from peft.tuners import tuners_utils
    except ImportError:
        return True
    return hasattr(tuners_utils, "_check_lora_target_modules_mamba")


@dataclass
class LayerLoRA:
    """The low-rank parts on one module: A (r, in) stacked, B (out, r) with the scales folded in; DoRA's magnitude."""

    As: list = field(default_factory=list)
    Bs: list = field(default_factory=list)
    magnitude: torch.Tensor | None = None
    embedding: bool = False

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.As)


def _check_language_model(model):
    """The model's family, which must have a transformers class that peft can wrap."""
    from .model.registry import family_of_model

    family = family_of_model(model)
    if not getattr(family, "transformers_class", None):
        raise ConfigError(f"the peft format is for Hugging Face language models (MambaForCausalLM, Mamba2ForCausalLM, "
                          f"...); this adapter is on a {family.title} model, which transformers does not have")
    return family


def _low_rank_parts(delta, out_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one delta as a LoRA on the whole layer with scale 1: B holds s * Up on the delta's rows, zeros
    elsewhere."""
    down, up = delta.down.detach(), delta.up.detach()
    if isinstance(delta, EmbeddingLoRADelta):
        return down.t().contiguous(), delta.s * up                            # (r, vocab), (d, r)
    B = up.new_zeros(out_rows, up.shape[1])
    B[delta.start : delta.stop] = delta.s * up
    return down.clone(), B


def portable_base(name: str | None) -> tuple[str | None, str | None]:
    """(the base as a peft user loads it, a note or None). A hub id stays as it is; a local folder becomes its absolute
    path; a built-in name ("builtin", "tiny-mamba2") becomes the absolute path of the packaged folder, with a note
    that this folder lies inside the mambapeft install (loadable on this machine, not elsewhere)."""
    from .assets import BUILTIN_LANGUAGE_MODELS, HERE

    if name is None:
        return None, None
    folder = BUILTIN_LANGUAGE_MODELS.get(str(name))
    path = Path(str(name)).expanduser()
    if folder is None and path.is_dir():
        folder = path
    if folder is None:
        return str(name), None                                   # a hub id: portable as it is
    folder = folder.resolve()
    if folder.is_relative_to(HERE):
        return str(folder), (f"note: the base is mambapeft's packaged {folder.name}, at {folder} inside the mambapeft "
                             f"install: peft and transformers load it from there on this machine; elsewhere, copy that "
                             f"folder and pass its path as the base (peft's base_model_name_or_path)")
    return str(folder), None


def export_peft(peft_model, folder, *, base_name_or_path: str | None = None, merge_rest: bool = False,
                tokenizer=None, overwrite: bool = True) -> dict:
    """Writes `peft_model`'s low-rank updates as a Hugging Face peft adapter in `folder` (see the module docstring).

    Returns {"exported": [...], "merged": [...], "base": the base the adapter is for, "note": a note or None}. The
    base is named portably (`portable_base`: a hub id, or an absolute folder). Every part peft cannot express is
    refused by name with the reason, or, with merge_rest, folded into a base written to folder/"base" (with
    `tokenizer` when given); the model passed in is changed (parts taken off or merged), so pass one loaded for this.
    lora_dropout is the exported methods' dropout (peft's acts on the layer input, as our default dropout_at=input).
    The folder is written whole or not at all (outputs.atomic_folder): an existing one is replaced only once the new
    one is complete, and only with `overwrite` (else a non-empty folder is refused before anything is done).
    """
    from .outputs import atomic_folder, check_output_folder

    folder = check_output_folder(Path(folder), overwrite, "folder")
    with atomic_folder(folder, overwrite=overwrite, option="folder") as tmp:
        return _export_into(peft_model, tmp, base_name_or_path=base_name_or_path, merge_rest=merge_rest,
                            tokenizer=tokenizer, base_folder=folder / "base")


def _export_into(peft_model, folder, *, base_name_or_path, merge_rest, tokenizer, base_folder) -> dict:
    """export_peft's work, in the (partial) folder `folder`; `base_folder`: where the merged base will finally be."""
    peft = _require_peft()
    model = peft_model.base_model
    family = _check_language_model(model)
    folder = Path(folder)
    methods = {m.name: m for m in peft_model.methods}
    uses_dora = any(name.startswith("dora_") and _why_not_expressible(m, "in_proj", family) is None
                    for name, m in methods.items())

    # every low-rank part on a layer, with the reason it cannot go to peft (None: it can)
    parts, refusals = [], {}
    for path, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer):
            for key, delta in module.deltas.items():
                reason = _why_not_expressible(methods[key], path.rsplit(".", 1)[-1], family)
                if reason is None and uses_dora != isinstance(delta, DoRADelta):
                    reason = "peft's use_dora is one switch per adapter, and this adapter mixes LoRA and DoRA"
                parts.append((path, key, delta, reason))
                if reason:
                    refusals.setdefault(key, reason)
    on_layers = {key for _, key, _, _ in parts}
    for name, method in methods.items():
        if name not in on_layers:
            refusals[name] = (EXPERT_REFUSAL if name in ("lora_experts", "lora_router")
                              else f"{method.category} is not a low-rank update of a linear layer")
    if not any(reason is None for *_, reason in parts):
        raise ConfigError("nothing in this adapter is expressible in peft's format: "
                          + "; ".join(f"{k}: {v}" for k, v in refusals.items()))
    if refusals and not merge_rest:
        raise ConfigError("not expressible in peft's format: " + "; ".join(f"{k} ({v})" for k, v in refusals.items())
                          + ". Pass --merge-rest to fold them into a base checkpoint written beside the adapter")
    unmergeable = [n for n in refusals if not methods[n].mergeable]
    if unmergeable:
        raise ConfigError(f"{', '.join(unmergeable)} can be neither expressed in peft's format nor merged into the "
                          f"weights ({'; '.join(methods[n].why_not_mergeable for n in unmergeable)}); keep the adapter "
                          f"in mambapeft's format")
    if "additional_scan" in refusals and any(p.endswith("x_proj") and r is None for p, _, _, r in parts):
        raise ConfigError("additional_scan, merged, grows x_proj's rows, which the exported LoRA on x_proj is laid out "
                          "for; export without one of them, or write a complete model with `mambapeft merge`")

    # take every part off its layer: the expressible ones as (A, B), the others merged into the layer
    layers: dict[str, LayerLoRA] = {}
    for path, key, delta, reason in parts:
        module = model.get_submodule(path)
        owner, attr = owner_and_attr(model, path)
        if reason is not None:
            if isinstance(delta, EmbeddingLoRADelta):
                model.untie_weights()                       # the head keeps the embedding it had
            remove_delta(owner, attr, key).merge_into(module.base)
            continue
        entry = layers.setdefault(path, LayerLoRA(embedding=isinstance(delta, EmbeddingLoRADelta)))
        out_rows = module.base.embedding_dim if entry.embedding else module.base.weight.shape[0]
        A, B = _low_rank_parts(delta, out_rows)
        entry.As.append(A)
        entry.Bs.append(B)
        if isinstance(delta, DoRADelta):
            magnitude = module.base.weight.detach().norm(dim=1)                 # rows DoRA does not cover: unchanged
            magnitude[delta.start : delta.stop] = delta.magnitude.detach()
            entry.magnitude = magnitude
        remove_delta(owner, attr, key)
    merged = sorted(refusals)
    for method in sorted((methods[n] for n in refusals if n not in on_layers), key=lambda m: m.merge_order):
        method.merge(model)

    base, note = portable_base(base_name_or_path or getattr(model, "name_or_path", None))
    if merged:
        model.save_pretrained(folder / "base")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "base")
        base, note = str(Path(base_folder or folder / "base").resolve()), None

    tensors, ranks, targets = {}, {}, set()
    for path, entry in layers.items():
        A, B = torch.cat(entry.As, 0), torch.cat(entry.Bs, 1)
        name = path.rsplit(".", 1)[-1]
        targets.add(name)
        if ranks.setdefault(name, entry.rank) != entry.rank:
            raise ConfigError(f"the LoRA on {name} has different ranks in different layers, which peft's "
                              f"rank_pattern cannot express by module name")
        if entry.embedding:
            tensors[f"{PEFT_PREFIX}{path}.lora_embedding_A"] = A
            tensors[f"{PEFT_PREFIX}{path}.lora_embedding_B"] = B
        else:
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B
        if entry.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = entry.magnitude
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {k: v for k, v in ranks.items() if v != default_r}
    exported = sorted({key for _, key, _, reason in parts if reason is None})
    dropouts = sorted({float(getattr(methods[k].config, "dropout", 0.0)) for k in exported})
    if len(dropouts) > 1:
        note = ((note + "\n") if note else "") + (
            f"note: the exported methods train with different dropouts ({', '.join(map(str, dropouts))}); peft has one "
            f"lora_dropout per adapter: {dropouts[-1]} is written (dropout acts only in training)")
    config = peft.LoraConfig(r=default_r, lora_alpha=default_r, target_modules=sorted(targets), rank_pattern=pattern,
                             alpha_pattern=dict(pattern), lora_dropout=dropouts[-1], bias="none", use_dora=uses_dora,
                             task_type="CAUSAL_LM", base_model_name_or_path=base, inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"exported": exported, "merged": merged, "base": base, "note": note}


# the projections of a hybrid's attention and MLP layers (transformers' module names; methods/layer_lora.py)
HYBRID_LAYER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear", "gate_proj",
                        "up_proj", "down_proj")


# lora_experts / lora_router are parametrizations of tensors (the experts' stacked (E, out, in) weights, the router's
# (E, d)), not LoRA layers; peft 0.22 can put LoRA on such tensors (LoraConfig.target_parameters, a ParamWrapper
# per tensor, one rank-r pair per expert), but this exporter does not write that layout yet, so it refuses rather
# than guess it
EXPERT_REFUSAL = ("a LoRA on the experts' stacked weight tensors or the router's weight (a parametrization, not a "
                  "LoRA layer): peft 0.22's target_parameters could carry it, but mambapeft does not export that "
                  "layout yet")


def _why_not_expressible(method, layer: str, family) -> str | None:
    """Why a low-rank part of `method` on `layer` has no peft form on the family's transformers class (None: it has
    one)."""
    if is_hybrid(family) and layer in ("out_proj", "conv1d"):
        # peft 0.22 guards only the model types mamba, mamba2, falcon_mamba, falcon_h1 and nemotron_h: for
        # granitemoehybrid and bamba it would load the adapter and the fused kernel would drop it on CUDA
        return (f"the fused Mamba-2 kernel that transformers' {family.transformers_class} runs on CUDA "
                f"(mamba_ssm's mamba_split_conv1d_scan_combined) reads {layer}.weight as a raw tensor, bypassing a "
                f"peft LoRA on it; refused for every hybrid, whether or not peft itself checks")
    if is_hybrid(family) and layer in ("in_proj", *HYBRID_LAYER_TARGETS) and transformers_bypasses(layer, family.name):
        return (f"transformers' {family.transformers_class} reads {layer}.weight directly instead of calling the "
                f"layer, so a peft LoRA on it would be silently ignored")
    if layer == "out_proj" and peft_refuses_out_proj():
        return "peft refuses LoRA on Mamba's out_proj (its fused CUDA path bypasses it; huggingface/peft#2274, #2556)"
    if layer in ("dt_proj", "x_proj", "in_proj") and transformers_bypasses(layer, family.name):
        return (f"transformers' {family.transformers_class} reads {layer}.weight directly instead of calling the "
                f"layer, so a peft LoRA on it would be silently ignored")
    if method.name.startswith("dora_") and getattr(method.config, "magnitude", "output") != "output":
        return "peft's DoRA normalises each output row; magnitude=input (the official MambaPEFT axis) has no peft form"
    if method.name.startswith(("lora_", "dora_")) or method.name == "sll_lora":
        return None
    return f"{method.category} is not a low-rank update of a linear layer"


# ---------------------------------------------------------------- import


def import_peft(base_model, folder):
    """Reads a peft LoRA / DoRA adapter trained on a Mamba model into our PeftModel (same outputs)."""
    from .config import MethodSpec, PeftConfig
    from .outputs import check_complete
    from .peft import PeftModel

    family = _check_language_model(base_model)
    folder = Path(folder)
    check_complete(folder, "peft adapter folder")
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file():
        raise CheckpointError(f"no adapter_config.json in {folder}: is this a peft adapter folder?")
    try:
        cfg = json.loads(config_file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from None
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters (LoRA, DoRA) import")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False), ("layers_to_transform", None),
                    ("modules_to_save", None), ("layer_replication", None), ("trainable_token_indices", None)):
        if cfg.get(key, ok) not in (ok, [], {}):
            raise ConfigError(f"{config_file}: {key}={cfg[key]!r} has no mambapeft form (our methods act on every "
                              f"layer, without extra biases or copied modules)")
    if not weights_file.is_file():
        raise CheckpointError(f"no adapter_model.safetensors in {folder}")
    try:
        weights = load_file(str(weights_file))
    except Exception as err:
        raise CheckpointError(f"{weights_file} is corrupt or truncated ({err})") from None

    use_dora, rslora = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    by_module: dict[str, dict[str, dict]] = {}
    for key, tensor in weights.items():
        path = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                     "lora_magnitude_vector.weight", "lora_magnitude_vector"):
            if path.endswith("." + part):
                module = path[: -len(part) - 1]
                by_module.setdefault(module.rsplit(".", 1)[-1], {}).setdefault(module, {})[part.split(".")[0]] = tensor
                break
        else:
            raise ConfigError(f"{weights_file}: unexpected tensor {key} (not a LoRA / DoRA part)")

    n_layers = len(base_model.peft_mixers())
    specs, loads = [], {}
    for name, modules in sorted(by_module.items()):
        r = int(ranks.get(name, cfg["r"]))
        alpha = float(alphas.get(name, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        dropout = float(cfg.get("lora_dropout", 0.0))
        if name == "embeddings":
            if use_dora:
                raise ConfigError(f"{config_file}: DoRA on the embedding has no mambapeft form")
            specs.append(MethodSpec.build("lora_embed", {"r": r, "s": scale}))
            (path, parts), = modules.items()
            loads[f"{path}.deltas.lora_embed.down"] = parts["lora_embedding_A"].t()
            loads[f"{path}.deltas.lora_embed.up"] = parts["lora_embedding_B"]
            continue
        if name not in LINEAR_TARGETS:
            raise ConfigError(f"{config_file}: LoRA on {name!r} has no mambapeft method (we adapt in_proj, x_proj, "
                              f"dt_proj, out_proj and the embeddings)")
        if transformers_bypasses(name, family.name):
            raise ConfigError(f"{config_file}: the LoRA on {name} was never applied by transformers' "
                              f"{family.transformers_class} "
                              f"(it reads {name}.weight directly), so importing it would change the model's outputs; "
                              f"drop it from the adapter to import the rest")
        if len(modules) != n_layers:
            raise ConfigError(f"{config_file}: LoRA on {name} in {len(modules)} of the model's {n_layers} layers; "
                              f"mambapeft's methods act on every layer")
        method = (DORA_IMPORTS if use_dora else IMPORTS)[name]
        options = {"r": r, "s": scale, "dropout": dropout}
        specs.append(MethodSpec.build(method, options))
        for path, parts in modules.items():
            loads[f"{path}.deltas.{method}.down"] = parts["lora_A"]
            loads[f"{path}.deltas.{method}.up"] = parts["lora_B"]
            if use_dora:
                loads[f"{path}.deltas.{method}.magnitude"] = parts["lora_magnitude_vector"]
    peft_model = PeftModel(base_model, PeftConfig(specs))
    tensors = dict(peft_model.base_model.named_parameters())
    with torch.no_grad():
        for key, value in loads.items():
            if key not in tensors:
                raise ConfigError(f"{weights_file}: {key} does not fit this base model")
            if tensors[key].shape != value.shape:
                raise CheckpointError(f"{weights_file}: {key} has shape {tuple(value.shape)}, this base needs "
                                      f"{tuple(tensors[key].shape)}: the adapter was made for another model")
            tensors[key].copy_(value)
    return peft_model


# ---------------------------------------------------------------- a complete merged model


def plain_base(peft_model):
    """A copy of the base model without the methods still attached (their wrappers unwrapped, hooks dropped)."""
    model = peft_model.base_model
    added = {id(t) for t in peft_model.adapter_tensors().values()}
    wrapped = [path for path, module in model.named_modules() if isinstance(module, AdaptedLayer)]
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) in added or ".hooks." in f".{name}" or name.startswith("hooks."):
            continue
        for path in wrapped:
            if name.startswith(f"{path}.base."):
                name = f"{path}." + name[len(path) + len(".base."):]
        tensors[name] = t.detach()
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("Parametrized"))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(tensors, strict=True, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    return plain


def merge_to_folder(peft_model, folder, tokenizer=None, *, overwrite: bool = True) -> dict:
    """merge_and_unload, then a complete model folder: the weights and config (Hugging Face format for language
    models, which transformers loads), the tokenizer files, and, when some methods cannot merge, the small remaining
    adapter in folder/"remaining_adapter" with a note saying what stays and why. Written whole or not at all
    (outputs.atomic_folder): an existing folder is replaced only once the new one is complete, and only with
    `overwrite` (else a non-empty folder is refused before anything is merged)."""
    from .outputs import atomic_folder, check_output_folder

    check_output_folder(Path(folder), overwrite, "folder")
    with atomic_folder(folder, overwrite=overwrite, option="folder") as tmp:
        return _merge_into(peft_model, tmp, tokenizer)


def _merge_into(peft_model, folder: Path, tokenizer) -> dict:
    from .model.registry import family_of_model
    from .peft import PeftModel

    kept_names = [m.name for m in peft_model.methods if not m.mergeable]
    merged = peft_model.merge_and_unload()
    base = plain_base(merged) if isinstance(merged, PeftModel) else merged
    family_of_model(base).save(base, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    note = None
    if isinstance(merged, PeftModel):
        merged.save_pretrained(folder / "remaining_adapter")
        reasons = {m.name: m.why_not_mergeable for m in merged.methods}
        note = ("These methods stay as a small adapter beside the merged weights (load it with "
                "mambapeft.PeftModel.from_pretrained(model, 'remaining_adapter')): "
                + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
        (folder / "MERGE_NOTE.txt").write_text(note + "\n")
    return {"merged": [m.name for m in peft_model.methods if m.mergeable], "remaining": kept_names, "note": note}
