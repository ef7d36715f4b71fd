"""Memory options of a training step: per-block gradient checkpointing (model/checkpointing.py) and a frozen base
stored in 16 bits (model/narrow_base.py).

Gradients with checkpointing equal those without for every method on every family in tests/test_conformance.py;
here: that activations are really not kept (bytes saved for the backward pass), that generation is unaffected, the
narrow base against a float32 model holding the same (rounded) weights, training steps against float32, the
refusals, and both options through `mambapeft train`.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MambaConfig

from mambapeft import ConfigError, from_config, get_peft_model
from mambapeft.model import narrow_base

from conftest import adamw_losses, assert_rel_close, jitter_


def tiny_mamba(layers: int = 2, seed: int = 0):
    config = MambaConfig(hidden_size=32, num_hidden_layers=layers, vocab_size=512, state_size=8)
    return jitter_(from_config(config, seed=seed), seed)


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `run()` records the forward (each storage
    once); the graph is kept alive until they are counted."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(storages.values())


# ------------------------------------------------------------------ gradient checkpointing


def test_checkpointing_keeps_only_block_inputs():
    """8 blocks at 64 tokens: without checkpointing every block's activations are kept; with it, only each block's
    input (b, L, d) plus what lies outside the blocks (embedding, final norm, head), several times less."""
    model = tiny_mamba(layers=8)
    peft = get_peft_model(model, ["lora_p_x:r=4,dropout=0"]).train()
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))

    def step():
        return peft(input_ids=ids, labels=ids).loss

    plain = saved_bytes(step)
    peft.gradient_checkpointing_enable()
    checkpointed = saved_bytes(step)
    assert checkpointed * 4 < plain, (plain, checkpointed)
    blocks_inputs = 8 * 64 * 32 * 4                     # float32 (1, 64, 32) per block
    assert checkpointed >= blocks_inputs


def test_checkpointing_api_and_generation():
    """transformers-style switches on the model and the PeftModel; generation (a recurrent state passed to the blocks,
    no gradients) gives the same tokens; disabling restores the plain forward."""
    model = tiny_mamba()
    peft = get_peft_model(model, ["lora_p_x:r=4", "additional_scan"])
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = peft.generate(prompt, max_new_tokens=4, eos_token_id=None)
    assert not peft.is_gradient_checkpointing and model.supports_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert peft.is_gradient_checkpointing and model.is_gradient_checkpointing
    assert all("forward" in vars(block) for block in model.backbone.layers)
    assert torch.equal(peft.generate(prompt, max_new_tokens=4, eos_token_id=None), expected)
    peft.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not any("forward" in vars(b) for b in model.backbone.layers)


# ------------------------------------------------------------------ a narrow base


def stored_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_base_is_the_float32_model_with_rounded_weights(dtype):
    """A base stored in 16 bits computes exactly what a float32 model with its linear and embedding weights rounded
    to 16 bits computes (logits and every adapter gradient), and its weight memory halves."""
    specs = ["dora_p_x:r=2", "lora_out_proj:r=2", "lora_embed:r=2", "partial_a"]
    narrow, rounded = tiny_mamba(), tiny_mamba()
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.copy_(module.weight.to(dtype).float())
    peft, reference = get_peft_model(narrow, specs, seed=0).eval(), get_peft_model(rounded, specs, seed=0).eval()
    with torch.no_grad():
        for a, b in zip(peft.base_model.parameters(), reference.base_model.parameters()):
            if a.requires_grad:
                a.add_(torch.randn_like(a) * 0.05)
                b.copy_(a)
    before = stored_bytes(narrow)
    big = sum({id(m.weight): m.weight.numel() for m in narrow.modules()                  # a tied head counts once
               if isinstance(m, torch.nn.Linear | torch.nn.Embedding) and not m.weight.requires_grad}.values())
    peft.store_base_as(dtype)
    assert peft.base_dtype == dtype
    assert stored_bytes(narrow) == before - 2 * big
    assert stored_bytes(narrow) < 0.6 * before
    inputs = narrow.peft_inputs(batch=2, seed=0)
    out, ref = peft(**inputs), reference(**inputs)
    assert_rel_close(out.logits, ref.logits, tol=1e-6, what="logits")
    out.loss.backward()
    ref.loss.backward()
    for (name, a), (_, b) in zip(peft.base_model.named_parameters(), reference.base_model.named_parameters()):
        if b.requires_grad:
            assert a.grad is not None and a.grad.abs().sum() > 0, name
            assert_rel_close(a.grad, b.grad, tol=1e-5, what=name)
            assert a.dtype == torch.float32                       # trained tensors stay float32


def test_narrow_base_keeps_no_float32_copy_for_backward():
    """The backward pass keeps the 16-bit weights, not their float32 upcasts: the bytes saved for backward fall by
    about half of every saved weight (compared with the same model in float32)."""
    model = tiny_mamba(layers=4)
    peft = get_peft_model(model, ["lora_p_x:r=4,dropout=0"])
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    original_pack, narrow_saved = narrow_base._pack, []

    def counting_pack(t):                                # narrow_base's own hook, recording what it keeps narrow
        packed = original_pack(t)
        if isinstance(packed, tuple):
            narrow_saved.append(packed[1])
        return packed

    def step():
        return peft(input_ids=ids, labels=ids).loss

    peft.store_base_as("bfloat16")
    narrow_base._pack = counting_pack
    try:
        step().backward()
    finally:
        narrow_base._pack = original_pack
    # every linear layer a gradient runs back through keeps its weight for it: all but the first in_proj, whose
    # input (the frozen embedding) needs none
    first_in_proj = model.backbone.layers[0].mixer.in_proj.base
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not first_in_proj]
    kept = {id(t) for t in narrow_saved}
    missing = [m for m in layers if id(m.parametrizations.weight.original) not in kept]
    assert not missing, f"float32 copies of {missing} were kept for the backward pass"
    assert not narrow_base._upcasts                      # no float32 copy outlives its layer


def test_narrow_base_trains_like_float32_and_merges():
    """A few AdamW steps on a bfloat16 base follow the float32 run's losses to bf16's precision; merging upcasts
    first, leaving a plain float32 model that gives the adapted model's logits."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_mamba()
        peft = get_peft_model(model, ["lora_p_x:r=4,dropout=0", "additional_scan"], seed=0).train()
        peft.store_base_as(dtype)
        losses[dtype], ids = adamw_losses(peft)
    assert losses["float32"][-1] < losses["float32"][0]
    for a, b in zip(losses["bfloat16"], losses["float32"]):
        assert abs(a - b) < 1e-2 * abs(b), losses
    peft.eval()
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        generated = peft.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None)     # one-token steps, narrow
        merged = peft.merge_and_unload()
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        assert_rel_close(merged(input_ids=ids).logits, expected, tol=1e-5, what="merged")
        assert torch.equal(merged.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None), generated)


def test_narrow_base_keeps_tied_weights_tied():
    model = tiny_mamba()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.backbone.embeddings.weight
    peft = get_peft_model(model, ["lora_p_x:r=4"])
    peft.store_base_as("bfloat16")
    assert model.lm_head.parametrizations.weight.original is model.backbone.embeddings.parametrizations.weight.original
    peft.store_base_as("float32")
    assert model.lm_head.weight is model.backbone.embeddings.weight and model.lm_head.weight.dtype == torch.float32


def test_narrow_base_refusals():
    peft = get_peft_model(tiny_mamba(), ["full"])
    with pytest.raises(ConfigError, match="no frozen base weight"):
        peft.store_base_as("bfloat16")
    peft = get_peft_model(tiny_mamba(), ["lora_p_x"])
    with pytest.raises(ConfigError, match="base dtype must be one of"):
        peft.store_base_as("int3")
    half = tiny_mamba().to(torch.bfloat16)
    with pytest.raises(ConfigError, match="made from a float32 model"):
        get_peft_model(half, ["lora_p_x"]).store_base_as("bfloat16")


# ------------------------------------------------------------------ through `mambapeft train`


def test_train_cli_with_checkpointing_and_a_narrow_base(tmp_path):
    from transformers import AutoTokenizer

    from mambapeft.assets import BUILTIN_MODEL, builtin_split
    from mambapeft.cli.main import main

    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=4096, eos_token_id=0, pad_token_id=0)
    from_config(config, seed=0).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(str(BUILTIN_MODEL)).save_pretrained(tmp_path / "model")
    (tmp_path / "train.json").write_text(json.dumps(json.loads(builtin_split("train").read_text())[:8]))
    out = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.json"), "--val-size", "0",
                 "--output-dir", str(out), "--max-length", "64", "--max-steps", "3", "--batch-size", "2",
                 "--micro-batch-size", "1", "--method", "lora_p_x:r=4", "--gradient-checkpointing",
                 "--base-dtype", "bfloat16", "--logging-steps", "1"])
    assert code == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["gradient_checkpointing"] is True and saved["base_dtype"] == "bfloat16"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    refused = tmp_path / "refused"                      # checked before the output folder is touched
    assert main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.json"), "--val-size",
                 "0", "--output-dir", str(refused), "--max-steps", "1", "--method", "full",
                 "--base-dtype", "bfloat16"]) == 2
    assert not refused.exists()
