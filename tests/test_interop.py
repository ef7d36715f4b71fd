"""Adapters in Hugging Face peft's format both ways, and `mambapeft merge`, checked with the real libraries: peft
loads what we export onto transformers' MambaForCausalLM with our logits, what peft trains imports with its logits,
the harness's `peft=` path accepts the export, and a merged folder loads in transformers with its tokenizer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import mambapeft
from mambapeft import ConfigError, PeftModel, get_peft_model
from mambapeft.assets import BUILTIN_MODEL
from mambapeft.cli.main import main
from mambapeft.interop import export_peft, import_peft

from conftest import assert_rel_close

peft_lib = pytest.importorskip("peft")
from transformers import AutoTokenizer, MambaForCausalLM  # noqa: E402

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def saved_random(arch: str, folder):
    """A random model of `arch`, every weight moved off its init, saved in the Hugging Face format."""
    model = mambapeft.from_config(arch, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved random mamba-micro (Hugging Face format): the base both libraries load."""
    return saved_random("mamba-micro", tmp_path_factory.mktemp("base"))


def ours(base, specs, seed=2):
    peft = get_peft_model(mambapeft.from_pretrained(base), specs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return peft.eval()


def their_logits(base_folder, adapter_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_lib.PeftModel.from_pretrained(MambaForCausalLM.from_pretrained(str(base_folder)),
                                                   str(adapter_folder)).eval()
    with torch.no_grad():
        return model(IDS).logits


EXPRESSIBLE = [["lora_in_proj:r=3"], ["lora_x_proj:r=2"], ["lora_embed:r=4"],
               ["lora_p_x:r=3"], ["lora_p_z:r=2,s=0.5"], ["lora_p_dt:r=2"], ["lora_p_b:r=2"], ["lora_p_c:r=2"],
               ["lora_p_x:r=2", "lora_p_z:r=3", "lora_x_proj:r=2", "lora_embed:r=2"],
               ["dora_p_x:r=2"], ["dora_in_proj:r=2"], ["dora_x_proj:r=2"]]


@pytest.mark.parametrize("specs", EXPRESSIBLE, ids=["+".join(s) for s in EXPRESSIBLE])
def test_export_loads_in_peft_with_our_logits_and_imports_back(base, tmp_path, specs):
    peft = ours(base, specs)
    with torch.no_grad():
        expected = peft(IDS).logits
    result = export_peft(peft, tmp_path / "peft", base_name_or_path=str(base))
    assert result["merged"] == [] and result["base"] == str(base)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == any(s.startswith("dora") for s in specs)
    assert_rel_close(their_logits(base, tmp_path / "peft"), expected, tol=1e-5, what=f"peft {specs}")
    back = import_peft(mambapeft.from_pretrained(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert_rel_close(back(IDS).logits, expected, tol=1e-5, what=f"imported {specs}")


@pytest.fixture(scope="module")
def base2(tmp_path_factory):
    """A saved random mamba2-tiny (Hugging Face format), for peft on transformers' Mamba2ForCausalLM."""
    return saved_random("mamba2-tiny", tmp_path_factory.mktemp("base2"))


MAMBA2_EXPRESSIBLE = [["lora_in_proj:r=3"], ["lora_p_x:r=2", "lora_p_z:r=3"], ["lora_p_b:r=2", "lora_p_c:r=2"],
                      ["lora_p_dt:r=2", "lora_embed:r=2"], ["dora_in_proj:r=2"]]


@pytest.mark.parametrize("specs", MAMBA2_EXPRESSIBLE, ids=["+".join(s) for s in MAMBA2_EXPRESSIBLE])
def test_mamba2_export_loads_in_peft_on_transformers_mamba2(base2, tmp_path, specs):
    """LoRA on Mamba-2's in_proj and its row blocks is LoRA on in_proj in peft (other rows zero), which peft applies
    on Mamba2ForCausalLM (its torch path calls in_proj as a module): the same logits, and back."""
    from transformers import Mamba2ForCausalLM

    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    peft = ours(base2, specs)
    with torch.no_grad():
        expected = peft(ids).logits
    export_peft(peft, tmp_path / "peft", base_name_or_path=str(base2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_lib.PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(str(base2)),
                                                    str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_rel_close(theirs(ids).logits, expected, tol=1e-5, what=f"peft on Mamba2ForCausalLM {specs}")
    back = import_peft(mambapeft.from_pretrained(base2), tmp_path / "peft").eval()
    with torch.no_grad():
        assert_rel_close(back(ids).logits, expected, tol=1e-5, what=f"imported {specs}")


def test_mamba2_export_refuses_out_proj_by_name(base2, tmp_path):
    with pytest.raises(ConfigError, match="lora_out_proj.*out_proj"):
        export_peft(ours(base2, ["lora_out_proj:r=2"]), tmp_path / "p")


@pytest.mark.parametrize("specs, needles", [
    (["lora_out_proj:r=2"], ["lora_out_proj", "peft refuses LoRA on Mamba's out_proj"]),
    (["lora_dt_proj:r=2"], ["lora_dt_proj", "reads dt_proj.weight directly", "silently ignored"]),
    (["partial_a"], ["partial_a", "not a low-rank update"]),
    (["dora_p_x:r=2,magnitude=input"], ["magnitude=input", "no peft form"]),
    (["lora_in_proj:r=2", "dora_x_proj:r=2"], ["mixes LoRA and DoRA", "--merge-rest"]),
    (["lora_p_x:r=2", "additional_scan:n=2"], ["additional_scan", "--merge-rest"]),
])
def test_what_peft_cannot_express_is_refused_by_name(base, tmp_path, specs, needles):
    with pytest.raises(ConfigError) as err:
        export_peft(ours(base, specs), tmp_path / "peft", base_name_or_path=str(base))
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "peft").exists()


def test_unmergeable_methods_cannot_be_exported_even_with_merge_rest(base, tmp_path):
    with pytest.raises(ConfigError, match="prompt can be neither expressed .* nor merged"):
        export_peft(ours(base, ["lora_p_x:r=2", "prompt:n=2"]), tmp_path / "p", merge_rest=True)


@pytest.mark.parametrize("specs", [["sll_lora:r=2"], ["lora_p_x:r=2", "lora_out_proj:r=2", "partial_a", "partial_d"],
                                   ["lora_in_proj:r=2", "dora_x_proj:r=2", "partial_conv1d"],
                                   ["lora_dt_proj:r=2", "lora_x_proj:r=2"]])
def test_merge_rest_folds_the_rest_into_a_base_beside_the_adapter(base, tmp_path, specs):
    peft = ours(base, specs)
    with torch.no_grad():
        expected = peft(IDS).logits
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL))
    result = export_peft(peft, tmp_path / "peft", base_name_or_path=str(base), merge_rest=True, tokenizer=tokenizer)
    assert result["merged"] and result["base"] == str((tmp_path / "peft" / "base").resolve())
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        result["base"]
    assert (tmp_path / "peft" / "base" / "tokenizer.json").is_file()
    assert_rel_close(their_logits(tmp_path / "peft" / "base", tmp_path / "peft"), expected, tol=1e-5, what="merged")


def test_a_lora_trained_with_peft_imports_with_its_logits(base, tmp_path):
    """peft's own LoRA (rank pattern, rsLoRA scaling, dropout), trained for a few steps on MambaForCausalLM."""
    hf = MambaForCausalLM.from_pretrained(str(base))
    config = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "embeddings"],
                                 rank_pattern={"x_proj": 2}, use_rslora=True, lora_dropout=0.1)
    model = peft_lib.get_peft_model(hf, config)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        ids = torch.randint(0, 97, (4, 12))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(str(tmp_path / "trained"))
    mine = import_peft(mambapeft.from_pretrained(base), tmp_path / "trained").eval()
    assert {s.method for s in mine.peft_config.methods} == {"lora_in_proj", "lora_x_proj", "lora_embed"}
    with torch.no_grad():
        assert_rel_close(mine(IDS).logits, expected, tol=1e-5, what="imported peft LoRA")


def test_imports_refuse_what_has_no_mambapeft_form(base, tmp_path):
    hf = MambaForCausalLM.from_pretrained(str(base))
    config = peft_lib.LoraConfig(r=2, target_modules=["in_proj"], layers_to_transform=[0])
    peft_lib.get_peft_model(hf, config).save_pretrained(str(tmp_path / "partial"))
    with pytest.raises(ConfigError, match="layers_to_transform=\\[0\\] has no mambapeft form"):
        import_peft(mambapeft.from_pretrained(base), tmp_path / "partial")
    hf = MambaForCausalLM.from_pretrained(str(base))
    peft_lib.get_peft_model(hf, peft_lib.LoraConfig(r=2, target_modules=["dt_proj"])).save_pretrained(
        str(tmp_path / "dt"))
    with pytest.raises(ConfigError, match="never applied by transformers' MambaForCausalLM"):
        import_peft(mambapeft.from_pretrained(base), tmp_path / "dt")


def test_cli_export_import_and_merge(base, tmp_path, capsys):
    peft = ours(base, ["lora_p_x:r=2", "partial_d"])
    peft.base_model.name_or_path = str(base)
    with torch.no_grad():
        expected = peft(IDS).logits
    peft.save_pretrained(tmp_path / "adapter")
    tok = str(BUILTIN_MODEL)
    assert main(["export", str(tmp_path / "adapter"), "--output", str(tmp_path / "p")]) == 2
    assert "partial_d" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--output", str(tmp_path / "p"), "--merge-rest",
                 "--tokenizer", tok]) == 0
    assert_rel_close(their_logits(tmp_path / "p" / "base", tmp_path / "p"), expected, tol=1e-5, what="cli export")
    assert main(["import", str(tmp_path / "p"), "--output", str(tmp_path / "back")]) == 0
    back = PeftModel.from_pretrained(mambapeft.from_pretrained(tmp_path / "p" / "base"), tmp_path / "back").eval()
    with torch.no_grad():
        assert_rel_close(back(IDS).logits, expected, tol=1e-5, what="cli import")
    # merge: a complete folder transformers loads, tokenizer included (AutoTokenizer would give an empty one without)
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
                 "--tokenizer", tok]) == 0
    hf = MambaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert_rel_close(hf(IDS).logits, expected, tol=1e-4, what="merged")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tok)) and tokenizer("def f(x):")["input_ids"]
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
                 "--tokenizer", tok]) == 2
    assert "not empty" in capsys.readouterr().err


def test_merge_keeps_what_cannot_merge_beside_the_weights(base, tmp_path, capsys):
    peft = ours(base, ["lora_p_x:r=2", "affix:n=2", "parallel_adapter:dim=4"])
    with torch.no_grad():
        expected = peft(IDS).logits
    peft.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
                 "--tokenizer", str(BUILTIN_MODEL)]) == 0
    note = (tmp_path / "m" / "MERGE_NOTE.txt").read_text()
    assert "affix" in note and "parallel_adapter" in note and "ReLU" in note
    rest = PeftModel.from_pretrained(mambapeft.from_pretrained(tmp_path / "m"), tmp_path / "m" / "remaining_adapter")
    with torch.no_grad():
        assert_rel_close(rest.eval()(IDS).logits, expected, tol=1e-5, what="merged + remaining")


def test_the_harness_peft_argument_accepts_the_export(tmp_path):
    """lm-evaluation-harness's HFLM(pretrained=..., peft=...) on the exported adapter scores as we do."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mambapeft.evaluation.multiple_choice import loglikelihoods
    from mambapeft.train import load_tokenizer

    peft = ours(BUILTIN_MODEL, ["lora_p_x:r=4", "lora_embed:r=2"])
    tokenizer = load_tokenizer("builtin")
    requests = [("The quick brown fox", " jumps"), ("def f(x):", " return x"), ("import", " os")]
    expected = loglikelihoods(peft, tokenizer, requests)
    export_peft(peft, tmp_path / "p", base_name_or_path=str(BUILTIN_MODEL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = HFLM(pretrained=str(BUILTIN_MODEL), peft=str(tmp_path / "p"), tokenizer=str(BUILTIN_MODEL),
                  device="cpu", batch_size=2, dtype="float32")
        got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    for (ll, greedy), (want, want_greedy) in zip(got, expected):
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
