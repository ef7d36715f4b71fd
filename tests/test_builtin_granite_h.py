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
from mambapeft.assets import BUILTIN_GRANITE_H, BUILTIN_MODEL, PRETRAINING_STEPS, builtin_split
from mambapeft.cli.main import main
from mambapeft.model.granitemoehybrid import GraniteHybridLM
from mambapeft.peft import count_parameters
from mambapeft.train.language import BUILTIN_MODELS, method_config, resolve_config

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
    assert report["steps"] == PRETRAINING_STEPS                   # every built-in language model's budget
    assert report["final_train_loss"] < 4.0 and report["held_out_task_text_loss"] < 5.5
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


def test_search_runs_on_the_hybrid_with_attention_in_its_space(tmp_path, capsys):
    """`mambapeft search --model tiny-granite-h` end to end on a sliver of the built-in task (2 optimiser steps a
    trial): step 1 can switch the attention LoRA on beside an SSM method, the winner is retrained, and the baseline
    it is compared with is the hybrid's own default (placement/both: every layer type; it used to be the language
    task's lora_p_x)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 16), ("validation", 6), ("test", 6)):
        (folder / f"{split}.json").write_text(json.dumps(json.loads(builtin_split(split).read_text())[:n]))
    run = {"data": str(folder / "train.json"), "val_data": str(folder / "validation.json"),
           "test_data": str(folder / "test.json"), "max_steps": 2, "eval_steps": 1, "warmup_steps": 0,
           "batch_size": 2, "micro_batch_size": 2, "max_length": 48, "logging_steps": 1, "save_total_limit": 1,
           "eval_batch_size": 8, "lr": 5e-3}
    space = {"step1": {"trials": 2, "methods": {"lora_p_x": {"r": 2}, "lora_attn": {"r": 2}}},
             "step2": {"trials": 1, "methods": {"lora_attn": {"r": {"int": [1, 4]}}, "lora_p_x": {"r": 2}}}}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "space.json").write_text(json.dumps(space))
    out = tmp_path / "search"
    assert main(["search", "--config", str(folder / "run.json"), "--model", "tiny-granite-h", "--space",
                 str(folder / "space.json"), "--output-dir", str(out), "--no-prune", "--jobs", "1"]) == 0
    assert "best configuration:" in capsys.readouterr().out
    config = json.loads((out / "best_config.json").read_text())
    assert config["model"] == "tiny-granite-h"
    assert {spec.split(":")[0] for spec in config["method"]} <= {"lora_p_x", "lora_attn", "lora_mlp"}
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["default"]["methods"] == ["placement/both"]            # the hybrid's own default, not lora_p_x
    baseline = json.loads((out / "baseline" / "results.json").read_text())
    assert [m["method"] for m in baseline["methods"]] == ["lora_p_x", "lora_attn", "lora_mlp"]
    assert "fine_tuned" in json.loads((out / "final" / "results.json").read_text())


def test_a_runs_lr_reaches_the_default_presets_methods():
    """The hybrids' default is a preset (placement/both); its methods used to keep the built-in column's 3e-2 even
    when the run was given --lr. Now --lr reaches them; without it they take the column's rate."""
    given = method_config(resolve_config(None, {"model": "tiny-granite-h", "lr": 0.1}), None)
    assert [(s.method, s.config.lr) for s in given.methods] == [("lora_p_x", None), ("lora_attn", None),
                                                                ("lora_mlp", None)]         # None: the run's 0.1
    default = method_config(resolve_config(None, {"model": "tiny-granite-h"}), None)
    assert all(s.config.lr is not None for s in default.methods)
