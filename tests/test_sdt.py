"""Sparse Dimension Tuning: the selection rule, sparsity of the final update, the phases, save and load."""

import json

import pytest
import torch
from transformers import MambaConfig

import mambapeft
from mambapeft import PeftModel, get_peft_model
from mambapeft.cli.main import main
from mambapeft.methods.sdt import select

SPEC = "sdt:warmup_steps=3,channel_fraction=0.25,state_fraction=0.5"


def base_model():
    return mambapeft.from_config(MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=64, state_size=4,
                                             time_step_rank=2), seed=0).eval()


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def train(peft, steps, start=0, lr=0.05):
    """AdamW steps with the trainer's step notifications, as the training loop makes them."""
    optimizer = torch.optim.AdamW(peft.parameter_groups(lr=lr, weight_decay=0.0))
    peft.train()
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad()
        peft(IDS, labels=IDS).loss.backward()
        optimizer.step()
        peft.on_step_end(step)
    peft.eval()
    return optimizer


def test_selection_is_the_top_k_of_the_stated_criterion():
    dense = torch.zeros(6, 4)
    dense[4] = torch.tensor([0.0, 3.0, -1.0, 0.5])      # channel score 10.25: first
    dense[1] = torch.tensor([2.0, 0.0, 0.0, -2.5])      # 10.25 + ... : 4 + 6.25 = 10.25, tie, lower index first
    dense[3] = torch.tensor([0.1, 0.1, 0.0, 0.0])       # 0.02: third
    channels, states = select(dense, 2, 2)
    assert channels.tolist() == [1, 4]
    assert states.tolist() == [[3, 0], [1, 2]]          # by squared change inside each channel: 6.25 > 4; 9 > 1
    channels, states = select(dense, 3, 1)
    assert channels.tolist() == [1, 4, 3] and states.tolist() == [[3], [1], [0]]


def test_only_selected_entries_change_and_the_rest_is_bit_identical():
    base = base_model()
    pretrained = {n: p.detach().clone() for n, p in base.state_dict().items()}
    peft = get_peft_model(base, [SPEC, "lora_out_proj:r=2"])
    sdt = peft.methods[0]
    train(peft, 3)
    assert sdt.phase_name() == "sdt sparse"
    selections = [(a.channels.clone(), a.states.clone()) for a, _ in sdt.parts]
    train(peft, 4, start=3)
    merged = peft.merge_and_unload()
    after = merged.state_dict()
    R, N = 2, 4
    for layer, (channels, states) in enumerate(selections):
        name = f"backbone.layers.{layer}.mixer"
        changed = after[f"{name}.A_log"] != pretrained[f"{name}.A_log"]
        expected = torch.zeros_like(changed)
        expected[channels[:, None], states] = True
        assert torch.equal(changed, expected)            # the selected entries moved, nothing else did
        changed = after[f"{name}.x_proj.weight"] != pretrained[f"{name}.x_proj.weight"]
        expected = torch.zeros_like(changed)
        expected[R : R + 2 * N][:, channels] = True
        assert torch.equal(changed, expected)
        assert channels.numel() == 8 and states.shape == (8, 2)     # 25% of E = 32, 50% of N = 4
        for part in ("conv1d.weight", "dt_proj.weight", "dt_proj.bias", "D", "in_proj.weight"):
            assert torch.equal(after[f"{name}.{part}"], pretrained[f"{name}.{part}"])


def test_warmup_change_is_discarded_or_kept():
    for keep in (False, True):
        base = base_model()
        A_log = base.backbone.layers[0].mixer.A_log.detach().clone()
        peft = get_peft_model(base, [SPEC + f",keep_warmup={keep}"])
        train(peft, 3)                                   # the warm-up, then the selection
        a = peft.methods[0].parts[0][0]
        assert not a.dense.requires_grad and a.dense.grad is None
        assert (a.dense.abs().sum() > 0) == keep
        unselected = torch.ones_like(A_log, dtype=torch.bool)
        unselected[a.channels[:, None], a.states] = False
        effective = peft.base_model.backbone.layers[0].mixer.A_log.detach()
        assert torch.equal(effective[unselected], (A_log + a.dense.detach())[unselected])


def test_save_load_reproduces_outputs_and_selection(tmp_path):
    peft = get_peft_model(base_model(), [SPEC, "lora_out_proj:r=2"])
    train(peft, 5)
    expected = peft(IDS).logits
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert torch.equal(loaded(IDS).logits, expected)
    for (a, _), (a2, _) in zip(peft.methods[0].parts, loaded.methods[0].parts):
        assert torch.equal(a.channels, a2.channels) and torch.equal(a.states, a2.states)
        assert a2.current == 1 and not a2.dense.requires_grad and a2.values.requires_grad
    assert loaded.parameter_counts() == peft.parameter_counts()


def test_adapter_saved_in_the_warmup_resumes_to_the_same_selection(tmp_path):
    first = get_peft_model(base_model(), [SPEC])
    train(first, 2)
    assert first.methods[0].phase_name() == "sdt warm-up"
    first.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(base_model(), tmp_path)
    assert resumed.methods[0].phase_name() == "sdt warm-up"
    assert torch.equal(resumed(IDS).logits, first.eval()(IDS).logits)       # the dense warm-up delta came back
    resumed.on_step_end(3)                              # the warm-up ends: selection from the restored delta
    first.on_step_end(3)
    for (a, _), (b, _) in zip(resumed.methods[0].parts, first.methods[0].parts):
        assert torch.equal(a.channels, b.channels) and torch.equal(a.states, b.states)
    assert resumed.methods[0].phase_name() == "sdt sparse"


def test_vim_directions_select_independently():
    vim = mambapeft.from_config("vim-micro", seed=0)
    peft = get_peft_model(vim, ["sdt:warmup_steps=1,channel_fraction=0.1,state_fraction=0.25"])
    parts = peft.methods[0].parts
    assert len(parts) == 2 * 2                           # 2 layers x 2 directions
    with torch.no_grad():
        for i, (a, _) in enumerate(parts):
            a.dense.normal_(generator=torch.Generator().manual_seed(i))
    peft.on_step_end(1)
    chosen = [a.channels.tolist() for a, _ in parts]
    assert chosen[0] != chosen[1] and chosen[2] != chosen[3]
    for a, _ in parts:
        assert a.channels.numel() == 6 and a.states.shape == (6, 4)       # 10% of E = 64; 25% of N = 16
    pixels = torch.randn(2, 3, 32, 32)
    out = peft(pixel_values=pixels, labels=torch.tensor([1, 2]))
    out.loss.backward()
    assert all(a.values.grad.abs().sum() > 0 for a, _ in parts)


@pytest.mark.parametrize("specs, message", [
    (["sdt:channel_fraction=0"], "channel_fraction=0.0 must be > 0"),
    (["sdt:state_fraction=1.5"], "state_fraction=1.5 must be <= 1"),
    (["sdt", "partial_a"], "clash"),
    (["sdt:warmup_steps=0"], "warmup_steps=0 must be >= 1"),
])
def test_bad_settings_fail_before_training(specs, message):
    with pytest.raises(mambapeft.ConfigError, match=message):
        get_peft_model(base_model(), specs)


def test_warmup_longer_than_the_run_is_refused():
    peft = get_peft_model(base_model(), ["sdt:warmup_steps=50"])
    with pytest.raises(mambapeft.ConfigError, match="warmup_steps=50 is not shorter than the run"):
        peft.check_training(total_steps=50)
    peft.check_training(total_steps=51)


def test_params_reports_the_count_after_selection(capsys):
    assert main(["params", "--arch", "mamba-130m", "--method", "sdt", "--method", "lora_out_proj:r=8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    E, N, layers = 1536, 16, 24
    k_c, k_s = int(0.01 * E), int(0.25 * N)                       # 15 channels, 4 states
    sdt = layers * (k_c * k_s + 2 * N * k_c)
    lora = layers * 8 * (E + 768)
    assert result["per_method"] == {"sdt": sdt, "lora_out_proj": lora}
    assert result["trainable"] == sdt + lora
    assert "15 channels x 4 states" in result["notes"]["sdt"] and "warm-up" in result["notes"]["sdt"]


def test_warmup_selection_and_sparse_training_in_one_train_run(tmp_path, capfd):
    from mambapeft.assets import builtin_split
    from mambapeft.train import TrainConfig
    from mambapeft.train.run import fine_tune

    data = tmp_path / "train.json"
    data.write_text(json.dumps(json.loads(builtin_split("train").read_text())[:12]))
    config = TrainConfig.from_dict({
        "model": "builtin", "data": str(data), "val_size": 0, "method": ["sdt:warmup_steps=2", "lora_out_proj:r=2"],
        "output_dir": str(tmp_path / "run"), "max_steps": 5, "batch_size": 2, "micro_batch_size": 2,
        "max_length": 48, "warmup_steps": 0, "eval_steps": 5, "logging_steps": 1, "lr": 1e-2})
    lines = []
    fine_tune(config, log=lines.append)
    assert "phase at step 0: sdt warm-up" in lines and "phase from step 2: sdt sparse" in lines
    bar = capfd.readouterr().err
    assert "sdt warm-up:" in bar and "sdt sparse:" in bar and "5/5" in bar     # the progress bar names the phase
    base = mambapeft.from_pretrained("builtin")
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert peft.methods[0].phase_name() == "sdt sparse"
    after = peft.merge_and_unload().state_dict()
    for layer, (a, _) in enumerate(peft.methods[0].parts):
        changed = after[f"backbone.layers.{layer}.mixer.A_log"] != before[f"backbone.layers.{layer}.mixer.A_log"]
        expected = torch.zeros_like(changed)
        expected[a.channels[:, None], a.states] = True
        assert torch.equal(changed, expected)

    config.max_steps = 2
    with pytest.raises(mambapeft.ConfigError, match="warmup_steps=2 is not shorter than the run"):
        fine_tune(config, log=lines.append)
