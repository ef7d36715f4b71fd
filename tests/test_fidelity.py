"""The authors' behaviour, where ours differs, reproduced on small models against plain restatements (docs/fidelity.md
lists each difference with its reference in the official code)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mambapeft
from mambapeft import get_peft_model
from mambapeft.cli.main import main
from mambapeft.config import expand_preset

from conftest import assert_rel_close


def micro(seed=0):
    model = mambapeft.from_config("mamba-micro", seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ SDT


@pytest.mark.parametrize("arch, channels, states",
                         [("mamba-130m", 15, 4), ("mamba-790m", 31, 4), ("mamba-1.4b", 41, 4)])
def test_sdt_selects_as_many_channels_as_the_authors_code(arch, channels, states, capsys):
    """dim - round((1 - fraction) * dim): 31 on mamba-790m (E 3072) and 41 on mamba-1.4b (E 4096), where rounding down
    gives 30 and 40."""
    assert main(["params", "--arch", arch, "-m", "sdt", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    layers = {"mamba-130m": 24, "mamba-790m": 48, "mamba-1.4b": 48}[arch]
    assert result["trainable"] == layers * (channels * states + 32 * channels)
    note = result["notes"]["sdt"]
    assert f"{channels} channels x {states} states" in note and "the authors' parameter tool also counts" in note


def test_sdt_state_fraction_rounds_as_the_authors():
    from mambapeft.methods.sdt import SDTConfig, selected_sizes

    assert selected_sizes(4096, 16, SDTConfig(state_fraction=0.1)) == (41, 2)           # 16 - round(14.4) = 2
    assert selected_sizes(1536, 16, SDTConfig()) == (15, 4)


def test_the_paper_presets_run_sdt_as_its_authors():
    sdt, lora = expand_preset("paper/sdt_lora")
    assert (sdt.config.warmup_steps, sdt.config.restart) == (500, True)
    assert (lora.method, lora.config.r, lora.config.s, lora.config.dropout) == ("lora_out_proj", 8, 1.0, 0.1)


def test_the_restart_gives_fresh_methods_a_fresh_optimiser_and_a_new_schedule(tmp_path):
    """One train run with restart=true: at the selection the LoRA is back at its initial values, the optimiser has no
    state, and the learning rate starts its schedule again; the run is the warm-up plus its own length."""
    from transformers import TrainerCallback

    from mambapeft.assets import builtin_split
    from mambapeft.train import TrainConfig, fine_tune

    records = json.loads(builtin_split("train").read_text())[:16]
    (tmp_path / "train.json").write_text(json.dumps(records))
    seen = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["initial"] = {n: p.detach().clone() for n, p in model.base_model.named_parameters()
                               if "lora_out_proj" in n}

        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            lora = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if "lora_out_proj" in n}
            seen.setdefault("lr", []).append(lr_scheduler.get_last_lr()[0])
            if state.global_step == 3:                    # right after the selection (the MethodPhases callback ran)
                seen["after"] = lora
                seen["optimizer_state"] = len(optimizer.state)

    config = TrainConfig.from_dict({
        "model": "builtin", "data": str(tmp_path / "train.json"), "val_size": 0, "output_dir": str(tmp_path / "o"),
        "method": ["sdt:warmup_steps=3,restart=true,channel_fraction=0.1", "lora_out_proj:r=2,s=1"],
        "max_steps": 5, "batch_size": 2, "micro_batch_size": 2, "max_length": 96, "warmup_steps": 0, "lr": 1e-2,
        "scheduler": "linear", "logging_steps": 1, "eval_steps": 100})
    result = fine_tune(config, callbacks=[Watch()], log=lambda *a: None)
    assert result["steps"] == 8                                                   # 3 warm-up + the run's 5
    assert all(torch.equal(seen["after"][n], seen["initial"][n]) for n in seen["initial"])
    assert seen["optimizer_state"] == 0
    lrs = seen["lr"]                                                              # linear decay over 3, then over 5
    assert lrs[2] == pytest.approx(1e-2) and lrs[3] == pytest.approx(1e-2 * 4 / 5) and lrs[7] == pytest.approx(0.0)


# ------------------------------------------------------------------ DoRA


def test_dora_with_the_official_input_axis_equals_its_restatement():
    base = micro()
    W = base.backbone.layers[0].mixer.in_proj.weight.detach().clone()            # (2E, d)
    peft = get_peft_model(base, ["dora_p_x:r=2,s=0.5,magnitude=input,dropout=0"])
    delta = peft.base_model.backbone.layers[0].mixer.in_proj.deltas["dora_p_x"]
    E = 48
    assert torch.allclose(delta.magnitude, W[:E].norm(dim=0))                     # one value per input column (d,)
    with torch.no_grad():
        delta.up.normal_()
        delta.magnitude.mul_(1.3)
        V = W[:E] + 0.5 * delta.up @ delta.down
        expected_rows = V * (delta.magnitude / V.norm(dim=0))[None, :]
        x = torch.randn(3, 24)
        got = peft.base_model.backbone.layers[0].mixer.in_proj(x)
        torch.testing.assert_close(got[:, :E], x @ expected_rows.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[:, E:], x @ W[E:].T, rtol=1e-5, atol=1e-6)
        logits = peft(IDS).logits
        merged = peft.merge_and_unload()
        torch.testing.assert_close(merged.backbone.layers[0].mixer.in_proj.weight[:E], expected_rows)
        assert_rel_close(merged(IDS).logits, logits, tol=1e-5)


def test_the_paper_dora_preset_uses_the_official_axis_without_dropout():
    (spec,) = expand_preset("paper/dora_p_x")
    assert (spec.config.magnitude, spec.config.dropout, spec.config.r) == ("input", 0.0, 64)


# ------------------------------------------------------------------ LoRA dropout placement


def test_lora_dropout_after_down_equals_its_restatement():
    peft = get_peft_model(micro(), ["lora_p_x:r=3,s=0.5,dropout=0.5,dropout_at=bottleneck"])
    delta = peft.base_model.backbone.layers[0].mixer.in_proj.deltas["lora_p_x"]
    with torch.no_grad():
        delta.up.normal_()
    delta.train()
    x = torch.randn(4, 24)
    torch.manual_seed(11)
    got = delta.branch(x)
    torch.manual_seed(11)
    expected = 0.5 * F.dropout(x @ delta.down.T, 0.5, training=True) @ delta.up.T
    torch.testing.assert_close(got, expected)
    torch.manual_seed(11)
    wrong_place = 0.5 * (F.dropout(x, 0.5, training=True) @ delta.down.T) @ delta.up.T
    assert not torch.allclose(got, wrong_place)


@pytest.mark.parametrize("method, dropout, at", [
    ("lora_p_x", 0.1, "bottleneck"), ("lora_p_z", 0.1, "bottleneck"), ("lora_in_proj", 0.1, "bottleneck"),
    ("lora_out_proj", 0.1, "bottleneck"), ("lora_x_proj", 0.0, None), ("lora_dt_proj", 0.0, None),
    ("lora_p_dt", 0.0, None), ("lora_p_b", 0.0, None), ("lora_p_c", 0.0, None)])
def test_the_presets_place_lora_dropout_as_the_official_code(method, dropout, at):
    (spec,) = expand_preset(f"paper/{method}")
    assert spec.config.dropout == dropout
    if at:
        assert spec.config.dropout_at == at


# ------------------------------------------------------------------ the parallel adapter


def test_the_parallel_adapter_is_the_official_module():
    peft = get_peft_model(mambapeft.from_config("vim-small", device="meta"), ["paper/parallel_adapter"])
    assert peft.parameter_counts()["trainable"] == 884_736                     # 24 x 32 x (768 + 384): no biases
    with_bias = get_peft_model(mambapeft.from_config("vim-small", device="meta"), ["parallel_adapter:dim=32,bias=true"])
    assert with_bias.parameter_counts()["trainable"] == 884_736 + 24 * (32 + 384)

    peft = get_peft_model(micro(), ["parallel_adapter:dim=4,s=0.5,dropout=0.5"])
    branch = peft.base_model.backbone.layers[0].mixer.out_proj.deltas["parallel_adapter"]
    with torch.no_grad():
        branch.up.weight.normal_()
    branch.train()
    y, out = torch.randn(3, 48), torch.zeros(3, 24)
    torch.manual_seed(5)
    got = branch(y, out)
    torch.manual_seed(5)
    expected = 0.5 * F.dropout(F.relu(y @ branch.down.weight.T), 0.5, training=True) @ branch.up.weight.T
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ Vim drop path, 1-D decay


def test_vim_drop_path_rises_over_the_blocks_and_acts_only_in_training():
    from mambapeft.model.mamba.lm import drop_path

    vim = mambapeft.from_config("vim-micro", seed=0)
    vim.set_drop_path(0.1)
    assert [b.drop_path for b in vim.layers] == pytest.approx([0.0, 0.1])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        vim.eval()
        a, b = vim(images).logits, vim(images).logits
        assert torch.equal(a, b)                                                 # off at evaluation
        block, h = vim.layers[1], torch.randn(4, 17, 32)
        block.train()
        torch.manual_seed(2)
        got = block(h)
        torch.manual_seed(2)
        expected = h + drop_path(block.mixer(block.norm(h)), 0.1)
        torch.testing.assert_close(got, expected)
        dropped = [bool((block(h) - h).abs().sum((1, 2)).eq(0).any()) for _ in range(40)]
        assert any(dropped) and not all(dropped)                                 # whole samples' branches go


def test_the_vision_recipe_turns_drop_path_on_and_decay_off_for_1d_tensors():
    from mambapeft.train.vision import VisionTrainConfig

    assert VisionTrainConfig().flat_decay is False and VisionTrainConfig().drop_path is None
    peft = get_peft_model(micro(), ["lora_p_x:r=2", "linear_probe", "partial_d"])
    groups = peft.parameter_groups(lr=1e-3, weight_decay=0.05, flat_decay=False)
    decay = {}
    for g in groups:
        for p in g["params"]:
            decay[id(p)] = g["weight_decay"]
    named = dict(peft.base_model.named_parameters())
    lora = [p for n, p in named.items() if "lora_p_x" in n]
    delta_d = [p for n, p in named.items() if "parametrizations.D" in n and p.requires_grad]
    assert all(decay[id(p)] == 0.05 for p in lora)                               # 2-D: the run's decay
    assert all(decay[id(p)] == 1e-3 for p in delta_d)                            # its own decay stays (1-D)
    head = peft.base_model.lm_head.weight
    assert decay[id(head)] == 0.05
    mixed = get_peft_model(micro(), ["dora_p_x:r=2"])
    groups = mixed.parameter_groups(lr=1e-3, weight_decay=0.05, flat_decay=False)
    magnitude = mixed.base_model.backbone.layers[0].mixer.in_proj.deltas["dora_p_x"].magnitude
    assert next(g for g in groups if any(p is magnitude for p in g["params"]))["weight_decay"] == 0.0
