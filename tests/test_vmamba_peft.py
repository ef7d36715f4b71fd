"""PEFT methods on VMamba's SS2D: per-direction parts against float64 restatements written here, the methods that
cannot apply and why, Table 5's trainable counts (the arithmetic in each case), and the paper presets.

The restatement is test_vmamba.py's loop reference `ref_ss2d` (one direction, one grid position at a time) with its
optional parts, what the methods add: a per-direction x_proj weight, soft tokens entering each direction's sequence
after the cross-scan, an initial state and state offsets. The model runs in float64 (A in float32, as upstream), so
agreement is far below float32 rounding."""

import pytest
import torch
from test_vmamba import jittered, ref_ss2d

from mambapeft import NotApplicable, get_peft_model
from mambapeft.config import PeftConfig
from mambapeft.model.vmamba.modeling import vmamba_config
from mambapeft.peft import count_parameters

from conftest import assert_rel_close

DIRECTIONS = 4
TOL = 1e-7              # float64 throughout, but A = -exp(A_log) enters the scan in float32, as upstream computes it


def peft_on_micro(spec: str, d_state: int = 2):
    """vmamba-micro in float64 (N = 2), jittered, with `spec` attached and its trainable tensors moved off their
    initial values; returns (peft, the first mixer, that mixer's pretrained tensors, a stage-0 input (b, H, W, d))."""
    model = jittered(vmamba_config("vmamba-micro", d_state=d_state)).double()
    mixer = model.peft_mixers()[0]
    pretrained = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
    torch.manual_seed(5)
    peft = get_peft_model(model, [spec]).eval()
    with torch.no_grad():
        for t in peft.base_model.parameters():
            if t.requires_grad:
                t.add_(torch.randn_like(t) * 0.3)
    x = torch.randn(2, 3, 4, mixer.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return peft, mixer, pretrained, x


def test_per_direction_lora_on_x_proj_is_the_restatement_and_merges_into_its_entry():
    """lora_x_proj on VMamba: direction k's x_proj is x_proj_weight[k] + s Up_k Down_k, each direction its own LoRA;
    merging writes entry k of the stacked weight (and nothing else)."""
    peft, mixer, p, x = peft_on_micro("lora_x_proj:r=2,s=0.5,dropout=0")
    deltas = mixer.x_proj.deltas["lora_x_proj"]
    assert sorted(deltas) == ["0", "1", "2", "3"]
    weights = [p["x_proj_weight"][k] + 0.5 * deltas[str(k)].up @ deltas[str(k)].down for k in range(DIRECTIONS)]
    assert not torch.allclose(weights[0], weights[1])                  # the directions really differ
    with torch.no_grad():
        got = mixer(x)
        expected = ref_ss2d(p, x, mixer.d_state, mixer.dt_rank, 1e-5, x_proj=weights)
        assert_rel_close(got, expected, tol=TOL, what="per-direction LoRA on x_proj")
        merged = peft.merge_and_unload()
    mixer = merged.peft_mixers()[0]
    assert isinstance(mixer.x_proj_weight, torch.nn.Parameter) and "x_proj_weight" in mixer.state_dict()
    assert_rel_close(mixer.x_proj_weight, torch.stack(weights), tol=1e-12, what="merged x_proj_weight")
    with torch.no_grad():
        assert_rel_close(mixer(x), expected, tol=TOL, what="merged mixer")


def test_affix_after_the_cross_scan_is_the_restatement():
    """affix (Table 5's "Affix-tuning w/o proj"): n tokens of width E per direction, read first in that direction's
    own order (so after the last patch for the reversed scans), through x_proj, dt_proj and the scan, then dropped."""
    peft, mixer, p, x = peft_on_micro("affix:n=2")
    (hook,) = mixer.hooks
    assert hook.weight.shape == (2, DIRECTIONS, mixer.d_inner)         # (n, directions, E)
    tokens = [hook.weight[:, k] for k in range(DIRECTIONS)]
    with torch.no_grad():
        expected = ref_ss2d(p, x, mixer.d_state, mixer.dt_rank, 1e-5, tokens=tokens)
        assert_rel_close(mixer(x), expected, tol=TOL, what="affix after the cross-scan")
        without = ref_ss2d(p, x, mixer.d_state, mixer.dt_rank, 1e-5)
    assert not torch.allclose(expected, without)


@pytest.mark.parametrize("spec, part", [("initial_state", "h0"), ("state_offset:variant=h", "h_offset"),
                                        ("state_offset:variant=y", "y_offset")])
def test_state_methods_are_their_formula(spec, part):
    """initial_state: each direction's scan starts from H0_k (E, N); state_offset h: y_t += C_t h'_k; y: y_t += y'_k.
    Per direction, added to each direction's output before the cross-merge (no gate in "v05_noz")."""
    peft, mixer, p, x = peft_on_micro(spec)
    (hook,) = mixer.hooks
    values = [hook.values[k].detach() for k in range(DIRECTIONS)]
    assert values[0].shape == ((mixer.d_inner,) if part == "y_offset" else (mixer.d_inner, mixer.d_state))
    with torch.no_grad():
        expected = ref_ss2d(p, x, mixer.d_state, mixer.dt_rank, 1e-5, **{part: values})
        assert_rel_close(mixer(x), expected, tol=TOL, what=spec)


def test_partial_tuning_changes_only_its_direction_and_merges_exactly():
    """partial_a / partial_bias put one delta on each direction's part of the stacked A_logs (rows k E ..) and
    dt_projs_bias (entry k); merged, the stacked tensors are the pretrained ones plus the deltas, part by part."""
    peft, mixer, p, x = peft_on_micro("partial_a")
    E = mixer.d_inner
    deltas = [d.inner.delta.detach() for d in mixer.parametrizations.A_logs]
    assert len(deltas) == DIRECTIONS and deltas[0].shape == (E, mixer.d_state)
    expected = p["A_logs"] + torch.cat(deltas)
    with torch.no_grad():
        assert_rel_close(mixer.A_logs, expected, tol=1e-12, what="A_logs seen through the parametrizations")
        out = mixer(x)
        merged = peft.merge_and_unload().peft_mixers()[0]
        assert_rel_close(merged.A_logs, expected, tol=1e-12, what="merged A_logs")
        assert_rel_close(merged(x), out, tol=1e-12, what="merged mixer")
    peft, mixer, p, _ = peft_on_micro("partial_bias")
    deltas = [d.inner.delta.detach() for d in mixer.parametrizations.dt_projs_bias]
    assert deltas[0].shape == (E,)
    assert_rel_close(mixer.dt_projs_bias, p["dt_projs_bias"] + torch.stack(deltas), tol=1e-12, what="dt bias")


@pytest.mark.parametrize("spec, why", [
    ("lora_p_z:r=4", "no z gate"),
    ("prompt:n=2", "no soft tokens at its input"),
    ("partial_cls_token", "no class token"),
    ("affix:n=2,projection=true", "use projection=false"),
])
def test_what_cannot_apply_says_why(spec, why):
    model = jittered(vmamba_config("vmamba-micro"))
    name = spec.split(":")[0]
    with pytest.raises(NotApplicable) as err:
        get_peft_model(model, [spec])
    assert str(err.value).startswith(f"{name} does not apply to vmamba models: ")
    if why:
        assert why in str(err.value)


# ---------------------------------------------------------------- Table 5's counts

# Sums over the 21 blocks of VMamba-S (depths 2, 2, 15, 2; d = 96, 192, 384, 768) and B (d = 128 ... 1024):
#   S: sum d = 2*96 + 2*192 + 15*384 + 2*768 = 192 + 384 + 5,760 + 1,536 = 7,872;   sum E = 2 sum d = 15,744
#   B: sum d = 2*128 + 2*256 + 15*512 + 2*1024 = 256 + 512 + 7,680 + 2,048 = 10,496; sum E = 20,992
SUM_D = {"vmamba-small": 7_872, "vmamba-base": 10_496}
SUM_E = {"vmamba-small": 15_744, "vmamba-base": 20_992}

TABLE_5 = [
    # (preset, count per model, its arithmetic)
    ("full", {"vmamba-small": 49_378_752 + 769_000, "vmamba-base": 87_532_800 + 1_025_000},
     "backbone + the 1000-class head (8d + 1) x 1000: 769 x 1000 (S), 1025 x 1000 (B)"),
    ("linear_probe", {"vmamba-small": 769 * 1000, "vmamba-base": 1025 * 1000}, "(8d + 1) x 1000"),
    ("partial_conv1d", {m: 9 * SUM_E[m] for m in SUM_E}, "a 3x3 depthwise kernel per channel: 9 sum E"),
    ("affix", {m: 3 * 4 * SUM_E[m] for m in SUM_E}, "3 tokens x 4 directions x E"),
    ("additional_scan", {m: 12 * 2 * SUM_E[m] for m in SUM_E},
     "per direction n A columns (E x n) + n B rows + n C rows (n x E): 4 x 3 n E, n = 2"),
    ("parallel_adapter", {m: 32 * (2 * d + d) for m, d in SUM_D.items()}, "Down E -> 32, Up 32 -> d: 32 (2d + d)"),
    ("lora_out_proj", {m: 64 * (2 * d + d) for m, d in SUM_D.items()}, "r (E + d), r = 64"),
    ("lora_p_x", {m: 64 * (d + 2 * d) for m, d in SUM_D.items()}, "r (d + E) on in_proj (X alone), r = 64"),
]


@pytest.mark.parametrize("arch", ["vmamba-small", "vmamba-base"])
@pytest.mark.parametrize("row, counts, arithmetic", TABLE_5, ids=[row for row, _, _ in TABLE_5])
def test_table_5_counts(row, counts, arithmetic, arch):
    """`mambapeft params --arch vmamba-small --method paper/vmamba/<row>` (without the head the VTAB runs add, which
    Table 5's PEFT rows include, about 18K for S: docs/vision.md compares row by row)."""
    result = count_parameters(arch, [f"paper/vmamba/{row}"])
    assert result["trainable"] == counts[arch], arithmetic


def test_hand_counts_are_table_5():
    """The counts above plus the head term of Table 5's Linear row (18.0K S, 24.0K B) give the table's figures, in
    thousands, where the paper's code does (docs/vision.md lists the rows that fit no formula)."""
    head = {"vmamba-small": 18.0, "vmamba-base": 24.0}
    table = {("partial_conv1d", "vmamba-small"): 160, ("affix", "vmamba-base"): 276,
             ("additional_scan", "vmamba-small"): 395, ("additional_scan", "vmamba-base"): 527,
             ("parallel_adapter", "vmamba-small"): 774, ("parallel_adapter", "vmamba-base"): 1_032,
             ("lora_out_proj", "vmamba-small"): 1_529, ("lora_out_proj", "vmamba-base"): 2_039,
             ("lora_p_x", "vmamba-small"): 1_529, ("lora_p_x", "vmamba-base"): 2_039}
    counts = {row: c for row, c, _ in TABLE_5}
    for (row, arch), thousands in table.items():
        assert abs(counts[row][arch] / 1000 + head[arch] - thousands) < 1.0, (row, arch)
    assert counts["full"]["vmamba-small"] - 769_000 == 49_378_752        # Table 5 "Full": 49,379K, the backbone
    assert counts["full"]["vmamba-base"] - 1_025_000 == 87_532_800       # 87,533K


def test_vmamba_presets_are_the_paper_settings():
    expected = {
        "linear_probe": "linear_probe", "full": "full", "partial_conv1d": "partial_conv1d:weight_decay=0.001",
        "affix": "affix:n=3,where=after_in_proj,position=prefix,projection=false,dual=true",
        "additional_scan": "additional_scan:n=2,location=top,init=neighbour",
        "parallel_adapter": "parallel_adapter:dim=32,s=1,dropout=0.1,bias=false",
        "lora_out_proj": "lora_out_proj:r=64,s=1,dropout=0.1,dropout_at=bottleneck",
        "lora_p_x": "lora_p_x:r=64,s=1,dropout=0.1,dropout_at=bottleneck",
    }
    for row, spec in expected.items():
        got, want = PeftConfig.parse([f"paper/vmamba/{row}"]).methods, PeftConfig.parse([spec]).methods
        assert [(m.method, m.config) for m in got] == [(m.method, m.config) for m in want], row
