"""The hybrids' default method and placement presets: `placement/attention`, `placement/ssm`, `placement/both` train
the layer types they name, counted by hand per layer type on the micro architectures; `placement/both` (the
hybrids' default when a run names no method) trains every layer type; a placement on a model of SSM layers only is
refused by name (exit code 2 on the command line), never run as plain LoRA."""

from __future__ import annotations

import pytest

from mambapeft import NotApplicable
from mambapeft.cli.main import main
from mambapeft.cli.methods import print_placements
from mambapeft.config import expand_preset
from mambapeft.model.registry import FAMILIES
from mambapeft.peft import count_parameters
from mambapeft.train.language import LanguageTask

R = 8


def lora(inputs: int, outputs: int) -> int:
    """Down (r, in) + Up (out, r)."""
    return R * (inputs + outputs)


# granite-hybrid-micro: d 24, layers [mamba, attention, mamba], Mamba-2 6 heads x 8 (d_inner 48), attention 6 heads x 4
# with 2 KV heads, a shared MLP of 14 (input_linear 24 -> 28, gate and up) after every mixer, 3 experts
GRANITE = {"mamba": 2 * lora(24, 48),                                                 # lora_p_x: the x rows of in_proj
           "attention": lora(24, 24) + 2 * lora(24, 8) + lora(24, 24),                # q, k, v, o
           "mlp": 3 * (lora(24, 28) + lora(14, 24))}                                   # every layer's shared MLP
# nemotron-h-micro: d 24, blocks [mamba, moe, attention, mlp, mamba], Mamba-2 5 heads x 7 (d_inner 35), attention 4
# heads x 6 with 2 KV heads, the MLP block 24 -> 10 -> 24, the MoE block's shared expert 24 -> 8 -> 24
NEMOTRON = {"mamba": 2 * lora(24, 35),
            "attention": lora(24, 24) + 2 * lora(24, 12) + lora(24, 24),
            "mlp": lora(24, 10) + lora(10, 24),
            "moe": lora(24, 8) + lora(8, 24)}


def trained(result: dict) -> dict[str, int]:
    return {kind: entry["trainable"] for kind, entry in result["per_layer_type"].items() if kind != "other"}


@pytest.mark.parametrize("arch, hand", [("granite-hybrid-micro", GRANITE), ("nemotron-h-micro", NEMOTRON)])
def test_placements_train_the_layer_types_they_name(arch, hand):
    counts = {p: trained(count_parameters(arch, [f"placement/{p}"])) for p in ("attention", "ssm", "both")}
    zero = dict.fromkeys(counts["both"], 0)
    assert counts["attention"] == {**zero, "attention": hand["attention"]}
    assert counts["ssm"] == {**zero, "mamba": hand["mamba"]}
    assert counts["both"] == {**zero, **hand}
    assert all(counts["both"][kind] > 0 for kind in hand)          # every layer type of the model trains
    result = count_parameters(arch, ["placement/both"])
    assert result["trainable"] == sum(hand.values())
    assert all(e["layers"] == e["of"] for k, e in result["per_layer_type"].items() if k in hand)


def test_placement_presets_expand_under_both_spellings():
    assert [str(s) for s in expand_preset("placement/both")] == \
        [str(s) for s in expand_preset("paper/placement/both")] == ["lora_p_x", "lora_attn", "lora_mlp"]


@pytest.mark.parametrize("arch", ["mamba2-tiny", "builtin"])
@pytest.mark.parametrize("placement", ["attention", "ssm", "both"])
def test_placements_are_refused_on_models_of_one_layer_type(arch, placement):
    with pytest.raises(NotApplicable, match=f"placement/{placement} chooses which layer types of a hybrid"):
        count_parameters(arch, [f"placement/{placement}"])


def test_cli_params_shows_layer_types_and_refuses_with_exit_code_2(capsys):
    assert main(["params", "nemotron-h-micro", "-m", "placement/both"]) == 0
    out = capsys.readouterr().out
    for kind in ("mamba", "attention", "mlp", "moe"):
        assert f"[{kind}]" in out
    assert "in 0 of" not in out                                    # no layer type left untrained
    assert main(["params", "mamba2-tiny", "-m", "placement/ssm"]) == 2
    assert "SSM layers only" in capsys.readouterr().err


def test_methods_lists_the_placements(capsys):
    print_placements()                       # the end of `mambapeft methods` (whose method table takes a while)
    out = capsys.readouterr().out
    assert "placement/both        lora_p_x:r=8 + lora_attn:r=8 + lora_mlp:r=8" in out


def test_a_hybrid_run_without_method_trains_every_layer_type():
    language = LanguageTask()
    assert language.resolve({"model": "granite-hybrid-micro"}).method == ["placement/both"]
    assert language.resolve({"model": "nemotron-h-micro"}).method == ["placement/both"]
    assert language.resolve({"model": "bamba-micro"}).method == ["placement/both"]
    assert language.resolve({}).method == ["lora_p_x"]                       # pure SSM models: as before
    assert language.resolve({"model": "granite-hybrid-micro", "method": ["lora_attn"]}).method == ["lora_attn"]
    assert language.resolve({"model": "no/such-model-offline"}).method == ["lora_p_x"]   # no download to decide


@pytest.mark.parametrize("family", [name for name, f in FAMILIES.items() if f.default_method])
def test_every_hybrid_default_applies_to_its_family_and_trains_the_ssm_layers(family):
    """A hybrid run without --method must start: the family's default applies to its check architecture (Qwen3-Next's
    fused input layers have no x rows, so its default adapts the whole input layers) and trains the recurrent
    layers and the attention layers."""
    from mambapeft import from_config, get_peft_model

    record = FAMILIES[family]
    from mambapeft.peft import trainable_by_layer_type

    peft = get_peft_model(from_config(record.check_architecture, seed=0), list(record.default_method))
    by_type = trainable_by_layer_type(peft.base_model)
    assert by_type["mamba"]["trainable"] > 0 and by_type["attention"]["trainable"] > 0, by_type
