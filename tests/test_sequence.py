"""S4D on the run pipeline (`--task sequence`): the S4D folder format (save / load / shapes, strict), the built-in
pixel-sequence digits, .npz data checks, and short real runs from the command line: the default method and sdt,
checkpoints and resume, the run folder's protection, `mambapeft eval` of the adapter."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from mambapeft import CheckpointError, ConfigError
from mambapeft.cli.main import main
from mambapeft.data.sequences import BUILTIN_TASKS, builtin_split, digits_sequences, read_npz
from mambapeft.model.s4d import build_s4d, load_s4d, looks_like_s4d, read_s4d_shapes, save_s4d
from mambapeft.peft import PeftModel
from mambapeft.train import fine_tune
from mambapeft.train.sequence import SequenceTask, SequenceTrainConfig, sequence_methods
from mambapeft.train.tasks import default_task_for


def quiet(*_):
    pass


def perturbed(name="s4d-micro", seed=0, **overrides):
    model = build_s4d(name, seed=seed, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---------------------------------------------------------------- the S4D folder format


def test_save_load_round_trip_and_shapes(tmp_path):
    model = perturbed()
    save_s4d(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format"] == "mambapeft-s4d"
    loaded = load_s4d(tmp_path / "m")
    x = torch.rand(3, model.config.l_max, model.config.d_input)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.config == model.config and loaded.name_or_path == str(tmp_path / "m")
    shapes = read_s4d_shapes(tmp_path / "m")
    assert shapes.device.type == "meta"
    assert {k: v.shape for k, v in shapes.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # another class count: a fresh decoder, every other weight kept
    other = load_s4d(tmp_path / "m", num_classes=7)
    assert other.decoder.out_features == 7 == other.config.num_classes
    assert torch.equal(other.layers[1].C, model.layers[1].C) and torch.equal(other.encoder.weight, model.encoder.weight)
    # names
    assert looks_like_s4d(tmp_path / "m") and looks_like_s4d("tiny-s4d") and looks_like_s4d("s4d-pixels")
    assert not looks_like_s4d("tiny-vim") and not looks_like_s4d(tmp_path) and not looks_like_s4d("builtin")
    assert default_task_for("tiny-s4d") == "sequence" and default_task_for("builtin") == "language"
    random = load_s4d("s4d-micro", seed=1, num_classes=3)
    assert random.config.num_classes == 3 and torch.equal(random.layers[0].C, load_s4d("s4d-micro", seed=1).layers[0].C)


def test_strict_loading_names_what_is_wrong(tmp_path):
    model = perturbed()
    save_s4d(model, tmp_path / "m")
    folder = tmp_path / "m"
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "layers.0.D"}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors .*layers.0.D"):
        load_s4d(folder)
    save_file({**state, "layers.0.D": torch.zeros(3)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.0.D has shape \(3,\)"):
        load_s4d(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_s4d(folder)
    (folder / "config.json").write_text(json.dumps({"format": "mambapeft-vim", "d_model": 6}))
    with pytest.raises(CheckpointError, match="not a mambapeft S4D config"):
        load_s4d(folder)
    with pytest.raises(CheckpointError, match="no S4D model 'tiny-s4e'.*tiny-s4d"):
        load_s4d("tiny-s4e")
    with pytest.raises(CheckpointError, match="save_s4d"):
        load_s4d(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="PEFT adapters"):
        from mambapeft import get_peft_model

        save_s4d(get_peft_model(perturbed(), ["lora_ssm:r=1"]).base_model, tmp_path / "peft")


def test_builtin_model_and_tasks():
    model = load_s4d("tiny-s4d")
    assert model.config.form == "classifier" and model.config.num_classes == 5 and model.config.d_input == 1
    sizes = {name: tuple(len(builtin_split(name, part)[1]) for part in ("train", "test")) for name in BUILTIN_TASKS}
    assert sizes == {"digits": (448, 448), "digits-rows": (721, 180)}       # the S4 pixel benchmark's splits
    x, y = builtin_split("digits", "test")
    assert x.shape == (448, 64, 1) and x.min() >= 0 and x.max() <= 1 and set(y.tolist()) == {0, 1, 2, 3, 4}
    rows, _ = digits_sequences("row", (3,))
    columns, _ = digits_sequences("column", (3,))
    assert torch.equal(rows.reshape(-1, 8, 8).transpose(1, 2), columns.reshape(-1, 8, 8))
    # the pretrained model knows its pretraining task: digits 0-4 read by rows
    x, y = builtin_split("digits-rows", "test")
    with torch.no_grad():
        assert (model(x).logits.argmax(-1) == y).float().mean() > 0.9


# ---------------------------------------------------------------- data files


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_bad_data_files_are_refused_with_their_reason(tmp_path):
    good = dict(sequences=np.random.rand(10, 12).astype(np.float32), labels=np.arange(10) % 3)
    x, y = read_npz(npz(tmp_path / "good.npz", **good))
    assert x.shape == (10, 12, 1) and y.dtype == torch.int64
    cases = [
        (dict(sequences=good["sequences"]), "lacks the array.* labels"),
        (dict(good, labels=np.arange(9)), "10 sequences but 9 labels"),
        (dict(good, labels=np.linspace(0, 1, 10)), "'labels' has shape .* dtype float64"),
        (dict(good, labels=-np.arange(10)), "label -9 is negative"),
        (dict(good, sequences=np.zeros((10, 2, 2, 2))), r"'sequences' has shape \(10, 2, 2, 2\)"),
        (dict(good, sequences=np.array(["a"] * 10)), "'sequences' has dtype <U1"),
        (dict(good, sequences=np.where(np.eye(10, 12) > 0, np.nan, 0.0)), "sequence 0 holds NaN"),
        (dict(good, sequences=np.array([None] * 10, dtype=object)), "object arrays"),
    ]
    for i, (arrays, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            read_npz(npz(tmp_path / f"bad{i}.npz", **arrays))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ConfigError, match="cannot be read as a .npz"):
        read_npz(tmp_path / "text.npz")
    with pytest.raises(ConfigError, match="no such file"):
        read_npz(tmp_path / "missing.npz")

    # against the run: labels beyond num_classes, features the model does not read; nothing written
    out = tmp_path / "run"
    base = dict(task="sequence", model="tiny-s4d", data=str(tmp_path / "good.npz"), output_dir=str(out), max_steps=1)
    with pytest.raises(ConfigError, match="label 2 is out of range for 2 classes"):
        fine_tune({**base, "num_classes": 2}, log=quiet)
    npz(tmp_path / "wide.npz", sequences=np.random.rand(10, 12, 3), labels=np.arange(10) % 3)
    with pytest.raises(ConfigError, match="reads 1 features per step .* has 3"):
        fine_tune({**base, "data": str(tmp_path / "wide.npz")}, log=quiet)
    with pytest.raises(ConfigError, match="test_data .* 3 features per step, but data has 1"):
        fine_tune({**base, "test_data": str(tmp_path / "wide.npz")}, log=quiet)
    with pytest.raises(ConfigError, match="form 'theory'"):
        fine_tune({**base, "model": "s4d-theory"}, log=quiet)
    assert not out.exists()


def test_config_defaults_and_methods():
    task = SequenceTask()
    builtin = task.resolve({})
    assert isinstance(builtin, SequenceTrainConfig)
    assert (builtin.model, builtin.data, builtin.test_data, builtin.val_fraction) == ("tiny-s4d", "digits", "digits", 0)
    own = task.resolve({"data": "x.npz"})
    assert own.test_data is None and own.val_fraction == 0.1
    assert sequence_methods(["sdt"], 7, quiet) == ["sdt:warmup_steps=7", "linear_probe"]
    assert sequence_methods(["sdt:warmup_steps=3,out_proj=true", "full"], 7, quiet) == [
        "sdt:warmup_steps=3,out_proj=true", "full"]
    trial = task.search_trial_values(builtin.to_dict(), with_test=False)
    assert trial["test_data"] is None and trial["val_fraction"] == 0.2
    # the search space: S4D's own methods join the paper space's, what S4D lacks is left out
    from mambapeft.cli.search import check_space_fits_model, default_space

    assert set(default_space(task, builtin, log=quiet).step1) == set(task.search_builtin_methods)
    own_base = task.resolve({"model": "s4d-pixels", "data": "x.npz"})
    space = default_space(task, own_base, log=quiet)
    assert {"lora_ssm", "partial_log_dt", "sdt", "lora_out_proj"} <= set(space.step1)
    assert not {"lora_p_x", "additional_scan", "affix"} & set(space.step1)
    check_space_fits_model(space, own_base)


# ---------------------------------------------------------------- runs


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_method_rows_run_and_the_adapter_reloads(tmp_path):
    """SDT + LoRA, LoRA on the SSM and full fine-tuning each train a few steps; the adapter on a fresh base gives the
    scores the run reported."""
    small = dict(task="sequence", epochs=1.0, max_steps=3, batch_size=32, micro_batch_size=32, eval_epochs=1.0,
                 logging_steps=1)
    rows = {"sdlora": ["sdt:warmup_steps=1,restart=true,channel_fraction=0.0625,state_fraction=0.0625",
                       "lora_out_proj:r=4"],
            "lora_ssm": ["lora_ssm:r=2", "partial_log_dt"], "full": ["full"]}
    for name, methods in rows.items():
        out = tmp_path / name
        results = fine_tune({**small, "method": methods, "output_dir": str(out)}, log=quiet)
        assert results["steps"] == 3 + (name == "sdlora")             # sdt restarts: its warm-up comes on top
        names = [m["method"] for m in results["methods"]]
        assert ("linear_probe" in names) == (name != "full")
        model = PeftModel.from_pretrained(load_s4d("tiny-s4d"), out / "adapter").eval()
        from mambapeft.train.sequence import accuracy, prepare_sequence_data

        _, _, test, _ = prepare_sequence_data(SequenceTask().resolve({}), quiet)
        assert accuracy(model, test) == pytest.approx(results["fine_tuned"]["acc"])


def test_command_line_run_resume_protection_and_eval(tmp_path, capsys):
    """`mambapeft train --model tiny-s4d` (the sequence kind from the model), stopped after a checkpoint and resumed to
    the uninterrupted run's adapter; a second run in the folder is refused; `eval` scores the adapter."""
    args = ["train", "--model", "tiny-s4d", "--epochs", "2", "--eval-epochs", "1", "--batch-size", "64",
            "--micro-batch-size", "64", "--save-total-limit", "5", "--threads", "2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*args, "--output-dir", str(whole)]) == 0
    out = capsys.readouterr().out
    assert '"task": "sequence"' in out and "adding linear_probe" in out and "sdt warms up for one epoch" in out
    results = json.loads((whole / "results.json").read_text())
    assert results["steps"] == 14 + 7              # 2 epochs of 448 / 64 after SDT's one-epoch warm-up run
    assert [m["method"] for m in results["methods"]] == ["sdt", "partial_log_dt", "partial_d", "partial_out_bias",
                                                        "linear_probe"]
    assert results["zero_shot"]["n"] == 448

    from mambapeft.train.sequence import SequenceTask as Kind

    config = Kind().resolve({"model": "tiny-s4d", "epochs": 2.0, "eval_epochs": 1.0, "save_total_limit": 5,
                             "threads": 2, "output_dir": str(part)})
    fine_tune(config, callbacks=[StopAt(10)], log=quiet)               # past the warm-up, checkpoint-7 saved
    assert (part / "checkpoint-7").is_dir() and not (part / "checkpoint-14").exists()
    assert main([*args, "--output-dir", str(part)]) == 2               # the run folder is protected
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(part), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)

    report = tmp_path / "eval.json"
    assert main(["eval", "tiny-s4d", "--adapter", str(whole / "adapter"), "--output", str(report)]) == 0
    scores = json.loads(report.read_text())
    assert scores["digits"]["n"] == 448
    assert scores["digits"]["acc"] == pytest.approx(results["fine_tuned"]["acc"])

    # --method sdt alone: sdt's own fractions, a one-epoch warm-up filled in, the head added
    short = ["train", "--task", "sequence", "--method", "sdt", "--threads", "2", "--output-dir", str(tmp_path / "sdt")]
    assert main([*short, "--max-steps", "7"]) == 2                     # refused: nothing left after the warm-up
    assert "warmup_steps=7 is not shorter than the run (7 optimiser steps)" in capsys.readouterr().err
    assert main([*short, "--max-steps", "9"]) == 0
    assert "sdt warms up for one epoch (7 steps)" in capsys.readouterr().out
    results = json.loads((tmp_path / "sdt" / "results.json").read_text())
    assert results["steps"] == 9 and results["fine_tuned"]["n"] == 448
