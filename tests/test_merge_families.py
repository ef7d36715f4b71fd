"""`mambapeft merge` on adapters from real `mambapeft train` runs, for every built-in model: the merged folder
reloads (through the registry, by its own config) and gives the adapted model's outputs; language folders carry
the base's tokenizer; a vision run's adapter brings its new task head, so the merged model is the fine-tuned
classifier. One short run per family (two optimiser steps)."""

from __future__ import annotations

import json

import pytest
import torch

import mambapeft
from mambapeft import PeftModel
from mambapeft.cli.main import main
from mambapeft.model.registry import family_of

from conftest import assert_rel_close

RUNS = {
    "tiny-mamba": ["--method", "lora_p_x:r=2", "additional_scan:n=2", "--eval-steps", "2"],
    "tiny-mamba2": ["--method", "lora_in_proj:r=2", "partial_d", "--eval-steps", "2"],
    "tiny-vim": ["--task", "vision", "--method", "lora_p_x:r=2", "partial_a"],
    "tiny-vmamba": ["--task", "vision", "--method", "lora_out_proj:r=2"],
}


def inputs(model):
    return {k: v for k, v in model.peft_inputs(batch=2, seed=1).items() if k != "labels"}


@pytest.mark.parametrize("name", RUNS)
def test_merge_a_trained_adapter(name, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", name, *RUNS[name], "--max-steps", "2", "--output-dir", str(run)]) == 0
    adapter = run / "adapter"
    merged_folder = tmp_path / "merged"
    assert main(["merge", name, "--adapter", str(adapter), "--output", str(merged_folder)]) == 0
    capsys.readouterr()
    family = family_of(name)
    architecture = json.loads((adapter / "adapter_config.json").read_text())["base_model"]["architecture"]
    adapted = PeftModel.from_pretrained(family.fit_to_adapter(family.load(name), architecture), adapter).eval()
    merged = mambapeft.from_pretrained(merged_folder)
    assert family_of(merged_folder) is family and type(merged) is type(adapted.base_model)
    x = inputs(merged)
    with torch.no_grad():
        assert_rel_close(merged(**x).logits, adapted(**x).logits, tol=1e-5, what=f"{name} merged")
    if family.has_tokenizer:
        from transformers import AutoTokenizer

        theirs, base = AutoTokenizer.from_pretrained(str(merged_folder)), AutoTokenizer.from_pretrained(
            str(family.resolve_folder(name)))
        text = "def merge(a, b):\n    return a + b"
        assert len(theirs) == len(base) and theirs(text)["input_ids"] == base(text)["input_ids"]
    else:
        classes = json.loads((run / "results.json").read_text())["classes"]
        assert merged.config.num_classes == classes != family.load(name).config.num_classes
        with torch.no_grad():      # the merged classifier, reloaded, is the one the run's test accuracy is of
            assert merged(**x).logits.shape[-1] == classes
