"""The trainable-parameter counts of the paper's tables (SPEC section 2), through `mambapeft params`.

Counts are on the meta device (shapes only), so even Mamba-1.4b costs nothing. Percent is
trainable / (base + trainable), rounded as the paper prints it.
"""

import json

import pytest

from mambapeft.cli.main import main

# (architecture, specs, trainable, percent as printed in the paper)
PAPER = [
    ("mamba-130m", ["additional_scan:n=6"], 663_552, 0.51),
    ("mamba-130m", ["affix:n=3,projection=false"], 221_184, 0.17),
    ("mamba-130m", ["affix:n=3,projection=true"], 236_015_616, 64.64),
    ("mamba-130m", ["lora_p_x:r=64"], 3_538_944, 2.67),
    ("mamba-130m", ["lora_in_proj:r=32"], 2_949_120, 2.23),
    ("mamba-130m", ["sll_lora:r=8"], 1_898_304, 1.45),
    ("mamba-1.4b", ["lora_p_x:r=64"], 18_874_368, 1.36),
    ("mamba-1.4b", ["additional_scan:n=6"], 3_538_944, 0.26),
    ("mamba-1.4b", ["affix:n=3,projection=false"], 1_179_648, 0.09),
    ("mamba-1.4b", ["lora_in_proj:r=32"], 15_728_640, 1.13),
]


def params(capsys, arch, specs):
    args = ["params", "--arch", arch, "--json"]
    for spec in specs:
        args += ["--method", spec]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch, specs, trainable, percent", PAPER, ids=[f"{a}-{s[0]}" for a, s, *_ in PAPER])
def test_paper_counts(capsys, arch, specs, trainable, percent):
    result = params(capsys, arch, specs)
    assert result["trainable"] == trainable
    assert round(result["percent"], 2) == percent
    assert result["base"] == {"mamba-130m": 129_135_360, "mamba-1.4b": 1_372_178_432}[arch]


def test_hand_counts_of_the_other_methods(capsys):
    """d 768, E 1536, N 16, R 48, K 4, 24 layers: each count written out from the shapes."""
    d, E, N, R, K, layers = 768, 1536, 16, 48, 4, 24
    expected = {
        "lora_x_proj:r=8": 8 * (E + R + 2 * N),
        "lora_dt_proj:r=8": 8 * (R + E),
        "lora_out_proj:r=8": 8 * (E + d),
        "lora_p_z:r=8": 8 * (d + E),
        "lora_p_dt:r=4": 4 * (E + R),
        "lora_p_b:r=4": 4 * (E + N),
        "lora_p_c:r=4": 4 * (E + N),
        "dora_p_x:r=8": 8 * (d + E) + E,
        "parallel_adapter:dim=32": 32 * (E + d),                      # no biases, as the official adapter
        "parallel_adapter:dim=32,bias=true": 32 * (E + d) + 32 + d,
        "partial_a": E * N,
        "partial_d": E,
        "partial_conv1d": E * K,
        "partial_bias": E,
    }
    for spec, per_layer in expected.items():
        assert params(capsys, "mamba-130m", [spec])["trainable"] == per_layer * layers, spec
    assert params(capsys, "mamba-130m", ["lora_embed:r=8"])["trainable"] == 8 * (50280 + d)
    assert params(capsys, "mamba-130m", ["linear_probe"])["trainable"] == 50280 * d      # the untied head
    assert params(capsys, "mamba-130m", ["full"])["trainable"] == 129_135_360


def test_presets_pick_the_per_size_settings(capsys):
    assert params(capsys, "mamba-370m", ["paper/sll_lora"])["config"] == "sll_lora:r=16"
    result = params(capsys, "mamba-130m", ["paper/lora_p_x"])
    assert result["trainable"] == 3_538_944 and "lr=0.001" in result["config"]
    assert "lr=0.0001" in params(capsys, "mamba-1.4b", ["paper/lora_p_x"])["config"]


def test_hybrid_counts_add_up(capsys):
    result = params(capsys, "mamba-130m", ["lora_p_x:r=64", "additional_scan:n=6", "partial_d"])
    assert result["per_method"] == {"lora_p_x:r=64": 3_538_944, "additional_scan": 663_552, "partial_d": 36_864}
    assert result["trainable"] == 3_538_944 + 663_552 + 36_864


def test_params_text_output_and_errors(capsys):
    assert main(["params", "--arch", "mamba-130m", "-m", "lora_p_x:r=64"]) == 0
    assert "3,538,944" in capsys.readouterr().out
    assert main(["params", "--arch", "mamba-130m", "-m", "lora_q"]) == 2
    assert "unknown method 'lora_q'" in capsys.readouterr().err
    assert main(["params", "--arch", "mamba-9b", "-m", "lora_p_x"]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    assert main(["params", "--arch", "tiny"]) == 2
    assert "name at least one method" in capsys.readouterr().err


def test_methods_lists_every_method_with_help(capsys):
    from mambapeft.methods import REGISTRY

    assert main(["methods", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert {d["method"] for d in described} == set(REGISTRY)
    assert all(o["help"] for d in described for o in d["options"].values())
    assert main(["methods", "lora_p_x"]) == 0
    assert "rank of the low-rank update" in capsys.readouterr().out
