"""The hybrids (Granite 4.0-H, Nemotron-H, Bamba) leaving mambapeft: `export --to peft` writes a LoRA adapter that
peft.PeftModel.from_pretrained loads on transformers' own ...ForCausalLM with our logits (LoRA on the Mamba-2
in_proj and its row blocks, on the attention and MLP projections, DoRA on them); what a fused kernel would bypass
(LoRA on out_proj) and what peft cannot express (state methods, the experts' 3-D tensors) is refused by name for
every hybrid type; `mambapeft merge` writes a folder transformers' AutoModelForCausalLM loads with the adapted
model's logits, the SSM tensors trained by partial methods (A_log, D, dt_bias: partial_a, partial_d, partial_bias)
included. Tiny random models saved to temporary folders: nothing is downloaded."""

from __future__ import annotations

import warnings

import pytest
import torch

import mambapeft
from mambapeft import ConfigError, get_peft_model
from mambapeft.assets import BUILTIN_MODEL
from mambapeft.cli.main import main
from mambapeft.interop import export_peft

from conftest import assert_rel_close

peft_lib = pytest.importorskip("peft")
import transformers  # noqa: E402

ARCHS = {"granitemoehybrid": "granite-hybrid-micro", "nemotron_h": "nemotron-h-micro", "bamba": "bamba-micro"}
CLASSES = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "nemotron_h": "NemotronHForCausalLM",
           "bamba": "BambaForCausalLM"}


def ids_for(model):
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(ARCHS))
def base(request, tmp_path_factory):
    """(family, a saved random micro model of it, every weight moved off its init)."""
    model = mambapeft.from_config(ARCHS[request.param], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder


def ours(folder, specs):
    peft = get_peft_model(mambapeft.from_pretrained(folder), specs)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return peft.eval()


def theirs(family, folder):
    """transformers' class of the family on the saved weights (its own expert loop: the grouped matmul refuses the
    micro sizes on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, CLASSES[family]).from_pretrained(str(folder))
    model.config._experts_implementation = "eager"
    return model.eval()


EXPRESSIBLE = [["placement/both"], ["lora_in_proj:r=3", "lora_q_proj:r=3", "lora_v_proj:r=3"],
               ["lora_p_b:r=2", "lora_p_dt:r=2", "lora_o_proj:r=2"], ["dora_attn:r=2", "dora_mlp:r=2"]]


@pytest.mark.parametrize("specs", EXPRESSIBLE, ids=["+".join(s) for s in EXPRESSIBLE])
def test_export_loads_in_peft_on_transformers_class_with_our_logits(base, tmp_path, specs):
    family, folder = base
    peft = ours(folder, specs)
    ids = ids_for(peft.base_model)
    with torch.no_grad():
        expected = peft(ids).logits
        assert (expected - theirs(family, folder)(ids).logits).abs().max() > 1e-4      # the adapter changes them
    result = export_peft(peft, tmp_path / "peft", base_name_or_path=str(folder))
    assert result["merged"] == [] and result["exported"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft_lib.PeftModel.from_pretrained(theirs(family, folder), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_rel_close(loaded(ids).logits, expected, tol=1e-5, what=f"peft on {CLASSES[family]} {specs}")


@pytest.mark.parametrize("specs, needles", [
    (["lora_out_proj:r=2"], ["lora_out_proj", "fused Mamba-2 kernel", "out_proj.weight", "every hybrid"]),
    (["state_offset"], ["state_offset", "not a low-rank update"]),
    (["lora_p_x:r=2", "partial_d"], ["partial_d", "--merge-rest"]),
])
def test_what_peft_cannot_express_on_a_hybrid_is_refused_by_name(base, tmp_path, specs, needles):
    family, folder = base
    with pytest.raises(ConfigError) as err:
        export_peft(ours(folder, specs), tmp_path / "peft", base_name_or_path=str(folder))
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "peft").exists()


def test_expert_lora_is_refused_with_the_reason(base, tmp_path):
    family, folder = base
    if family == "bamba":
        pytest.skip("bamba has no experts")
    with pytest.raises(ConfigError, match="lora_experts.*target_parameters"):
        export_peft(ours(folder, ["lora_attn:r=2", "lora_experts:r=2"]), tmp_path / "p", base_name_or_path=str(folder))


def test_merge_rest_folds_partial_tensors_into_the_base_beside_the_adapter(base, tmp_path):
    family, folder = base
    peft = ours(folder, ["lora_attn:r=2", "partial_a", "partial_d"])
    ids = ids_for(peft.base_model)
    with torch.no_grad():
        expected = peft(ids).logits
    result = export_peft(peft, tmp_path / "peft", base_name_or_path=str(folder), merge_rest=True)
    assert result["merged"] == ["partial_a", "partial_d"] and result["exported"] == ["lora_attn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft_lib.PeftModel.from_pretrained(theirs(family, tmp_path / "peft" / "base"),
                                                    str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_rel_close(loaded(ids).logits, expected, tol=1e-5, what=f"{family} merge_rest")


def test_cli_merge_gives_a_folder_transformers_loads_with_trained_ssm_tensors(base, tmp_path, capsys):
    """`mambapeft merge` of LoRA everywhere plus A_log, D and dt_bias trained in place: AutoModelForCausalLM loads the
    folder and gives the adapted model's logits (a merge that dropped the SSM tensors would not)."""
    family, folder = base
    peft = ours(folder, ["placement/both", "partial_a", "partial_d", "partial_bias"])
    ids = ids_for(peft.base_model)
    with torch.no_grad():
        expected = peft(ids).logits
    peft.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(folder), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"),
                 "--tokenizer", str(BUILTIN_MODEL)]) == 0          # a tokenizer to copy (the micro base has none)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == CLASSES[family]
    merged.config._experts_implementation = "eager"
    with torch.no_grad():
        assert_rel_close(merged.eval()(ids).logits, expected, tol=1e-5, what=f"{family} merged, in transformers")
