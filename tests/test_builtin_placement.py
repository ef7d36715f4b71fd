"""The placement benchmark's built-in models (scripts/pretrain_tiny_falcon_h1.py, pretrain_tiny_jamba.py,
pretrain_tiny_attention.py): each loads by name as its family's model, reads the built-in tokenizer, was pretrained
with the shared budget, and transformers' own class (FalconH1ForCausalLM, JambaForCausalLM,
GraniteMoeHybridForCausalLM) loads the shipped folder with our logits; the attention-only model is the tiny
Mamba-2's size; the placement presets train what hand counts say. One end-to-end run of benchmarks/placement.py's
row function (two steps) checks the benchmark's plumbing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mambapeft
from mambapeft.assets import (
    BUILTIN_ATTENTION,
    BUILTIN_FALCON_H1,
    BUILTIN_JAMBA,
    BUILTIN_MAMBA2,
    BUILTIN_MODEL,
    PRETRAINING_STEPS,
)
from mambapeft.peft import count_parameters
from mambapeft.train.language import BUILTIN_MODELS

from conftest import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = {  # name -> (folder, our class, transformers' class, layer types)
    "tiny-falcon-h1": (BUILTIN_FALCON_H1, "FalconH1LM", "FalconH1ForCausalLM", None),
    "tiny-jamba": (BUILTIN_JAMBA, "JambaLM", "JambaForCausalLM", ["mamba", "mamba", "attention", "mamba"]),
    "tiny-attention": (BUILTIN_ATTENTION, "GraniteHybridLM", "GraniteMoeHybridForCausalLM", ["attention"] * 4),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_builtin_loads_here_and_in_transformers(name):
    import transformers

    folder, ours, theirs_class, layer_types = MODELS[name]
    model = mambapeft.from_pretrained(name)
    assert type(model).__name__ == ours and name in BUILTIN_MODELS          # the built-in rates apply
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (128, 4, 4096)
    if layer_types is not None:
        assert model.layer_types() == layer_types
    for file in ("tokenizer.json", "tokenizer_config.json"):                 # the built-in Mamba-1's tokenizer, as is
        assert (folder / file).read_bytes() == (BUILTIN_MODEL / file).read_bytes()
    report = json.loads((folder / "pretraining.json").read_text())
    assert report["steps"] == PRETRAINING_STEPS and (report["batch"], report["length"], report["seed"]) == (8, 128, 0)
    assert report["final_train_loss"] < 7.0                                  # it learned (random: ln 4096 = 8.3)
    ids = torch.randint(0, c.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    theirs = getattr(transformers, theirs_class).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert_rel_close(model(ids).logits, theirs(ids).logits, tol=1e-4, what=f"{name} in transformers")


def test_falcon_h1_keeps_published_multipliers_and_attention_model_is_mamba2_sized():
    from mambapeft.model.falcon_h1 import FALCON_H1_ARCHITECTURES

    c = mambapeft.from_pretrained("tiny-falcon-h1").config
    published = FALCON_H1_ARCHITECTURES["falcon-h1-0.5b"]
    for key in ("embedding_multiplier", "key_multiplier", "attention_out_multiplier", "ssm_in_multiplier",
                "ssm_out_multiplier", "mlp_multipliers", "ssm_multipliers"):
        assert getattr(c, key) == pytest.approx(published[key]), key
    assert c.lm_head_multiplier == pytest.approx(published["lm_head_multiplier"] * 1024 / 128)   # µP: 1 / width
    attention = json.loads((BUILTIN_ATTENTION / "pretraining.json").read_text())["parameters"]
    mamba2 = json.loads((BUILTIN_MAMBA2 / "pretraining.json").read_text())["parameters"]
    assert abs(attention - mamba2) / mamba2 < 0.01


def test_placement_presets_train_hand_counted_parameters():
    # LoRA r 8 on the x rows of in_proj: (d + d_inner) x 8 per SSM layer; Jamba: 3 Mamba-1 layers (d_inner 256),
    # Falcon-H1: 4 Mamba-2 mixers (d_ssm 192)
    assert count_parameters("tiny-jamba", ["placement/ssm"])["trainable"] == 3 * 8 * (128 + 256)
    assert count_parameters("tiny-falcon-h1", ["placement/ssm"])["trainable"] == 4 * 8 * (128 + 192)
    # q, o: 128 -> 128; k, v: 128 -> 64 (2 key-value heads of 32); one attention layer in Jamba, four in Falcon-H1
    attn = 8 * ((128 + 128) * 2 + (128 + 64) * 2)
    assert count_parameters("tiny-jamba", ["placement/attention"])["trainable"] == attn
    assert count_parameters("tiny-falcon-h1", ["placement/attention"])["trainable"] == 4 * attn


def test_benchmark_row_runs_end_to_end(tmp_path):
    """benchmarks/placement.py's run function, two steps of one state-tuning row on the parallel hybrid."""
    import placement

    shared = dict(max_steps=2, evals=1, lr=None, threads=1, out=str(tmp_path))
    r = placement.run_one("tiny-falcon-h1 state_offset", "tiny-falcon-h1", ["paper/state_offset"], 0, shared)
    assert "not_applicable" not in r, r
    assert r["trainable"] > 0 and 0 <= r["test_acc"] <= 1 and 0 <= r["zero_shot"] <= 1
    plan = [("state", r["row"], r["model"], r["methods"])]
    table = placement.render(plan, [r], type("A", (), dict(max_steps=2, seeds=[0]))())
    assert "tiny-falcon-h1 state_offset" in table
