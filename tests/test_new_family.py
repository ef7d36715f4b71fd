"""A model family registered here, in the test only, shows up everywhere a family should: `mambapeft info`,
`params`, `train`, `merge`, `methods` and the conformance battery, with no other file touched.

The toy family is a Mamba-1 language model under its own name, config class (model_type "toy_mamba") and
architectures: what a newcomer's family declares, through the family record alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import MambaConfig

import mambapeft
from mambapeft.assets import BUILTIN_MODEL
from mambapeft.cli.main import main
from mambapeft.model import MambaLM
from mambapeft.model.files import read_raw_config
from mambapeft.model.language import HFLanguageFamily
from mambapeft.model.registry import FAMILIES, register_family, unregister_family
from mambapeft.model.summary import language_summary

from conftest import assert_rel_close


class ToyConfig(MambaConfig):
    model_type = "toy_mamba"


class ToyLM(MambaLM):
    family = "toy"


class ToyFamily(HFLanguageFamily):
    name = "toy"
    title = "Toy Mamba"
    model_class = ToyLM
    config_class = ToyConfig
    architectures = {"toy-micro": dict(hidden_size=20, num_hidden_layers=2, vocab_size=4096, state_size=3,
                                       time_step_rank=2)}
    check_architecture = "toy-micro"

    def config(self, name, **overrides):
        return ToyConfig(**{**self.architectures[name.lower()], **overrides})

    def read_config(self, folder):
        raw, _ = read_raw_config(folder)
        return ToyConfig.from_dict(raw), "hf"

    def claims_config(self, raw):
        return raw.get("model_type") == "toy_mamba"

    def summary(self, model):
        mixer = model.backbone.layers[0].mixer
        return language_summary(model, ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"),
                                {"d_inner": mixer.d_inner, "d_state": mixer.d_state})

    def summary_lines(self, summary):
        return [f"  a toy: d_inner {summary['d_inner']}, d_state {summary['d_state']}, "
                f"{summary['parameters']['total']:,} parameters"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy family registered (and forgotten afterwards); a saved toy model with the built-in tokenizer."""
    register_family(ToyFamily)
    folder = tmp_path_factory.mktemp("toy") / "toy-model"
    model = mambapeft.from_config("toy-micro", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mambapeft.model.save_pretrained(model, folder)
    for file in BUILTIN_MODEL.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    yield folder
    unregister_family("toy")


def test_the_registry_builds_recognises_and_loads_it(toy):
    assert type(mambapeft.from_config("toy-micro", device="meta")) is ToyLM
    assert type(mambapeft.from_config(ToyConfig(hidden_size=8, num_hidden_layers=1, vocab_size=16))) is ToyLM
    assert mambapeft.model.family_of(toy) is FAMILIES["toy"]
    loaded = mambapeft.from_pretrained(toy)
    assert type(loaded) is ToyLM and loaded.config.model_type == "toy_mamba"


def test_info_params_and_methods_list_it(toy, capsys):
    assert main(["info", str(toy)]) == 0
    out = capsys.readouterr().out
    assert "a toy: d_inner 40, d_state 3" in out
    assert main(["params", "toy-micro", "-m", "lora_p_x:r=2", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["trainable"] == 2 * 2 * (20 + 40)            # 2 layers x r 2 x (d in + E out)
    assert main(["methods", "--json"]) == 0
    table = {d["method"]: d["applies_to"] for d in json.loads(capsys.readouterr().out)}
    assert table["lora_p_x"]["toy"] is None and table["lora_x_proj"]["toy"] is None
    assert "toy" in table["partial_cls_token"] and table["partial_cls_token"]["toy"]      # a reason


def test_train_and_merge_it_from_the_command_line(toy, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(toy), "--method", "lora_p_x:r=2", "--max-steps", "3", "--eval-steps", "3",
                 "--output-dir", str(out)]) == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model"]["architecture"]["model_type"] \
        == "toy_mamba"
    assert main(["merge", str(toy), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = mambapeft.from_pretrained(tmp_path / "merged")
    adapted = mambapeft.PeftModel.from_pretrained(mambapeft.from_pretrained(toy), adapter).eval()
    ids = torch.randint(0, 4096, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(merged(ids).logits, adapted(ids).logits, tol=1e-5, what="toy merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file() or any(
        Path(tmp_path / "merged").glob("tokenizer*"))


def test_the_conformance_battery_runs_on_it(toy, tmp_path):
    from test_conformance import applicability, cases, run_battery

    reasons = applicability("toy")
    assert reasons["lora_p_x"] is None and reasons["partial_cls_token"].startswith("partial_cls_token does not apply")
    chosen = ["lora_p_x", "additional_scan", "affix", "state_offset", "partial_a", "sdt"]
    found = cases("toy", chosen)
    assert {method for method, _, _ in found} == set(chosen)
    for i, (_, spec, identity) in enumerate(found):
        run_battery("toy", spec, identity, tmp_path / str(i))
