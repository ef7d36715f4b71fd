"""Fine-tuning: a real run end to end, kill-and-resume of a real process, gradient accumulation, the NaN guard,
configs and the errors a user meets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import MambaConfig

from mambapeft import ConfigError, from_config, from_pretrained
from mambapeft.assets import BUILTIN_MODEL, builtin_split
from mambapeft.peft import PeftModel
from mambapeft.train import TrainConfig, TrainingDiverged, fine_tune, resolve_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer d 32 Mamba with the built-in tokenizer, and small train/validation/test files."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny")
    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=4096, eos_token_id=0, pad_token_id=0)
    from_config(config, seed=0).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(str(BUILTIN_MODEL)).save_pretrained(folder / "model")
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        records = json.loads(builtin_split(split).read_text())[:n]
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder


def tiny_config(tiny, out, **changes):
    values = dict(model=str(tiny / "model"), data=str(tiny / "train.json"), val_data=str(tiny / "validation.json"),
                  test_data=str(tiny / "test.json"), output_dir=str(out), max_length=160, epochs=1.0, batch_size=4,
                  micro_batch_size=2, lr=5e-2, warmup_steps=2, eval_steps=3, logging_steps=1, seed=1,
                  method=["lora_p_x:r=8,s=1"])
    values.update(changes)
    return TrainConfig.from_dict(values)


def test_end_to_end_run_writes_everything_and_learns(tiny, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny, out)
    results = fine_tune(config, log=lambda *a: None)
    assert json.loads((out / "run_config.json").read_text()) == config.to_dict()
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]                     # 24 examples / batch 4, learning
    assert [r["step"] for r in logs if "eval_acc" in r] == [3, 6]
    assert results["steps"] == 6 and "zero_shot" in results and "fine_tuned" in results
    assert results["best_checkpoint"].endswith(("checkpoint-3", "checkpoint-6"))
    # the saved adapter, loaded onto a fresh base, is the best checkpoint's, and reproduces the reported accuracy
    best = load_file(str(Path(results["best_checkpoint"]) / "adapter_model.safetensors"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == saved.keys() and all(torch.equal(best[k], saved[k]) for k in best)
    from mambapeft.data.multiple_choice import load_mc_items
    from mambapeft.evaluation import score_items
    from mambapeft.train import load_tokenizer

    reloaded = PeftModel.from_pretrained(from_pretrained(str(tiny / "model")), out / "adapter")
    again = score_items(reloaded, load_tokenizer(str(tiny / "model")), load_mc_items(tiny / "test.json"))
    assert again["acc"] == results["fine_tuned"]["acc"]


def _cli(tiny, out, *extra):
    return [sys.executable, "-m", "mambapeft", "train", "--model", str(tiny / "model"),
            "--data", str(tiny / "train.json"), "--val-size", "0", "--output-dir", str(out), "--max-length", "64",
            "--max-steps", "40", "--batch-size", "2", "--micro-batch-size", "1", "--lr", "5e-3",
            "--warmup-steps", "3", "--eval-steps", "4", "--logging-steps", "2",
            "--method", "lora_p_x:r=4,dropout=0.1", "--seed", "3", *extra]


def test_killed_run_resumes_to_the_same_adapter(tiny, tmp_path):
    """A real process killed (SIGKILL) mid-run and resumed ends with the uninterrupted run's adapter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_cli(tiny, whole), env=env, check=True, capture_output=True, timeout=300)

    from mambapeft.train import complete_checkpoints

    proc = subprocess.Popen(_cli(tiny, broken), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(broken)
        if done and int(done[-1].name.split("-")[1]) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (broken / "adapter").exists()
    killed_at = int(complete_checkpoints(broken)[-1].name.split("-")[1])
    assert 8 <= killed_at < 40
    resumed = subprocess.run(_cli(tiny, broken, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {broken / f'checkpoint-{killed_at}'}" in resumed.stdout
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    first_checkpoint = whole / "checkpoint-4"
    first = (load_file(str(first_checkpoint / "adapter_model.safetensors")) if first_checkpoint.exists()
             else None)
    assert first is None or any(not torch.equal(first[k], a[k]) for k in a)            # it did train past the kill
    def losses(run):                                   # the logged training losses, step by step
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 4)) for r in rows if "loss" in r]

    assert losses(broken) == losses(whole) and len(losses(whole)) == 20       # one run's log: no gap, no repeat


def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path):
    """batch 4 as 4 micro-batches of 1 == one micro-batch of 4 (loss normalised over all tokens of the step)."""
    runs = {}
    for micro in (1, 4):
        config = tiny_config(tiny, tmp_path / f"m{micro}", micro_batch_size=micro, max_steps=3, val_data=None,
                             val_size=0, test_data=None, method=["lora_p_x:r=4,dropout=0"])
        fine_tune(config, log=lambda *a: None)
        runs[micro] = load_file(str(tmp_path / f"m{micro}" / "adapter" / "adapter_model.safetensors"))
    for key in runs[1]:
        torch.testing.assert_close(runs[1][key], runs[4][key], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):                     # from step 5 on, the base model outputs NaN
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    model.base_model.backbone.norm_f.weight.fill_(float("nan"))

    out = tmp_path / "nan"
    config = tiny_config(tiny, out, val_data=None, val_size=0, test_data=None, eval_steps=2)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 6.*last good checkpoint is .*checkpoint-4"):
        fine_tune(config, callbacks=[Poison()], log=lambda *a: None)
    kept = load_file(str(out / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (out / "checkpoint-6").exists() and not (out / "adapter").exists()


# ------------------------------------------------------------------ configs and errors


def test_config_file_cli_overrides_and_builtin_defaults(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model": "some/model", "data": "d.json", "method": "additional_scan",
                                                   "lr": 5e-3}))
    (tmp_path / "run.yaml").write_text("model: some/model\ndata: d.json\nmethod: [lora_p_x, partial_a]\nepochs: 1\n")
    c = resolve_config(str(tmp_path / "run.json"), {"lr": 1e-4, "epochs": None})
    assert (c.model, c.method, c.lr, c.epochs, c.max_length, c.warmup_steps, c.val_size) == (
        "some/model", ["additional_scan"], 1e-4, 3.0, 256, 100, 2000)          # the paper's recipe by default
    y = resolve_config(str(tmp_path / "run.yaml"))
    assert y.method == ["lora_p_x", "partial_a"] and y.epochs == 1
    b = resolve_config(None, {"epochs": 1.0})
    assert (b.model, b.data, b.test_data, b.epochs, b.lr) == ("builtin", "builtin", "builtin", 1.0, None)
    # no --lr on the built-in model: its own column of rates (the LoRA family 3e-2), the rest the base rate 3e-3
    from dataclasses import replace

    import mambapeft
    from mambapeft.train.language import method_config, training_arguments

    two = replace(b, method=["lora_p_x", "partial_d"], output_dir=str(tmp_path / "o"))
    specs = method_config(two, mambapeft.from_pretrained("builtin")).methods
    assert {s.method: s.config.lr for s in specs} == {"lora_p_x": 3e-2, "partial_d": None}
    assert training_arguments(two, False, "eval_acc").learning_rate == 3e-3
    assert training_arguments(replace(two, model="some/model"), False, "eval_acc").learning_rate == 1e-3
    (tmp_path / "bad.json").write_text(json.dumps({"modle": "x"}))
    with pytest.raises(ConfigError, match="unknown language keys 'modle' \\(did you mean 'model'\\?\\)"):
        resolve_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        resolve_config(None, {"batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(ConfigError, match="scheduler='step' is not one of"):
        resolve_config(None, {"scheduler": "step"})


def test_cli_errors_are_clear(tiny, tmp_path, capsys):
    from mambapeft.cli.main import main

    assert main(["train", "--model", "nobody/not-a-cached-model", "--output-dir", str(tmp_path / "x")]) == 2
    assert "needs the network" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny / "model"), "--data", str(tmp_path / "missing.json"),
                 "--output-dir", str(tmp_path / "y")]) == 2
    assert "no data file" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_paper_learning_rates_apply_by_model_size_unless_lr_is_given():
    from mambapeft.train.language import method_config

    base = from_config("mamba-130m", device="meta")
    recipe = TrainConfig.from_dict({"model": "x", "data": "d.json", "method": ["additional_scan", "lora_p_x:r=8"]})
    assert [s.config.lr for s in method_config(recipe, base).methods] == [5e-3, 1e-3]          # paper Table 7
    run_lr = TrainConfig.from_dict({**recipe.to_dict(), "lr": 2e-4})
    assert [s.config.lr for s in method_config(run_lr, base).methods] == [None, None]
    assert [s.config.lr for s in method_config(recipe, from_config("tiny", device="meta")).methods] == [None, None]
