"""The built-in tiny hybrid `tiny-granite-h` (src/mambapeft/assets/tiny-granite-h, scripts/pretrain_tiny_granite_h.py):
Granite 4.0-H's layout at the built-in models' size, the built-in tokenizer; transformers' own
GraniteMoeHybridForCausalLM loads the shipped folder with our logits; `info` names its layers; a short
`mambapeft train --model tiny-granite-h` with no method runs the hybrids' default (every layer type trains) end to
end, offline, scoring zero-shot and fine-tuned."""

from __future__ import annotations

import json

import torch
from transformers import GraniteMoeHybridForCausalLM

import mambapeft
from mambapeft.assets import BUILTIN_GRANITE_H, BUILTIN_MODEL
from mambapeft.cli.main import main
from mambapeft.model.granitemoehybrid import GraniteHybridLM
from mambapeft.peft import count_parameters
from mambapeft.train.language import BUILTIN_MODELS

from conftest import assert_rel_close


def test_builtin_hybrid_is_granite_h_and_transformers_reads_it():
    model = mambapeft.from_pretrained("tiny-granite-h")
    assert isinstance(model, GraniteHybridLM) and "tiny-granite-h" in BUILTIN_MODELS      # the built-in rates apply
    c = model.config
    assert (c.hidden_size, c.vocab_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state) == (128, 4096, 8, 32, 32)
    assert model.layer_types() == ["mamba", "mamba", "attention", "mamba"]
    assert c.position_embedding_type == "nope" and c.num_local_experts == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):       # the built-in Mamba-1's tokenizer, as is
        assert (BUILTIN_GRANITE_H / name).read_bytes() == (BUILTIN_MODEL / name).read_bytes()
    report = json.loads((BUILTIN_GRANITE_H / "pretraining.json").read_text())
    assert report["final_train_loss"] < 5.0 and report["held_out_task_text_loss"] < 6.0
    ids = torch.randint(0, c.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(str(BUILTIN_GRANITE_H)).eval()
    with torch.no_grad():
        assert_rel_close(model(ids).logits, theirs(ids).logits, tol=1e-4, what="tiny-granite-h in transformers")
    # 4 Mamba-2 layers' x rows (128 -> 256) + q, k, v, o (4 heads x 32, 2 KV heads) + 4 MLPs (128 -> 512, 256 -> 128)
    counts = count_parameters("tiny-granite-h", ["placement/both"])
    assert counts["trainable"] == 8 * (3 * (128 + 256) + 2 * (128 + 128) + 2 * (128 + 64)
                                       + 4 * ((128 + 512) + (256 + 128)))


def test_info_names_the_layers(capsys):
    assert main(["info", "tiny-granite-h"]) == 0
    out = capsys.readouterr().out
    assert "mamba 3" in out and "attention 1" in out


def test_train_without_arguments_runs_the_hybrid_default(tmp_path, capsys):
    """The whole default run is measured in docs/hybrids.md; here two optimiser steps, end to end."""
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-granite-h", "--max-steps", "2", "--eval-steps", "2",
                 "--output-dir", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == ["placement/both"]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and "acc" in results["zero_shot"] and "acc" in results["fine_tuned"]
    adapter = (out / "adapter" / "adapter_config.json").read_text()
    assert all(method in adapter for method in ("lora_p_x", "lora_attn", "lora_mlp"))
