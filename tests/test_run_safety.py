"""Runs that never lose work and never fail with a traceback.

Every class of bad input is fed several inputs; each must end with exit code 2 (or the API's error type), a message
naming the file / option / record and the way out, and every file that existed before byte-identical (hashes
compared). Then: run folders are protected (an earlier run is refused, --overwrite replaces it, two processes cannot
share one, a dead process's lock is taken over) and the NaN guard names only checkpoints that are good.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MambaConfig

import mambapeft
from mambapeft import CheckpointError, ConfigError, PeftModel, get_peft_model
from mambapeft.assets import BUILTIN_MODEL, builtin_split
from mambapeft.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*folders) -> dict:
    """Every file under the folders, with its content hash."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, args, *needles, unchanged=()):
    """Runs the command line; asserts exit 2, a one-paragraph message holding every needle, and no file changed."""
    before = snapshot(*unchanged)
    code, _, err = cli(capsys, *args)
    assert code == 2, f"{args}: exit {code}, stderr {err[-500:]}"
    assert "Traceback" not in err and err.startswith("error: "), err
    assert err.strip().count("\n") == 0, f"not one paragraph: {err}"
    for needle in needles:
        assert needle in err, f"{args}: {needle!r} not in {err!r}"
    assert snapshot(*unchanged) == before, f"{args}: files changed"
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer d 32 Mamba with the built-in tokenizer, a copy without tokenizer files, and small data."""
    folder = tmp_path_factory.mktemp("safety")
    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=4096, eos_token_id=0, pad_token_id=0)
    mambapeft.from_config(config, seed=0).save_pretrained(folder / "model")
    mambapeft.from_config(config, seed=0).save_pretrained(folder / "no-tokenizer")
    AutoTokenizer.from_pretrained(str(BUILTIN_MODEL)).save_pretrained(folder / "model")
    small = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=512, eos_token_id=0, pad_token_id=0)
    mambapeft.from_config(small, seed=0).save_pretrained(folder / "small-vocab")
    AutoTokenizer.from_pretrained(str(BUILTIN_MODEL)).save_pretrained(folder / "small-vocab")
    for split, n in (("train", 16), ("validation", 6), ("test", 6)):
        records = json.loads(builtin_split(split).read_text())[:n]
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny / "model", "--data", tiny / "train.json", "--val-data", tiny / "validation.json",
            "--output-dir", out, "--max-length", "160", "--max-steps", "4", "--batch-size", "2",
            "--micro-batch-size", "2", "--eval-steps", "2", "--warmup-steps", "0", "--logging-steps", "1",
            "--lr", "1e-2", "--method", "lora_p_x:r=2", *extra]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished run's folder (checkpoints, adapter, metrics, results, run_config.json)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in train_args(tiny, out)]) == 0
    return out


# ------------------------------------------------------------------ 1. nothing changes until the run is known valid


def test_a_fresh_run_into_a_finished_runs_folder_is_refused_and_overwrite_replaces_it(tiny, finished, capsys,
                                                                                      tmp_path):
    err = refused(capsys, train_args(tiny, finished), "holds an earlier run", "checkpoint", "adapter/",
                  "--resume", "--overwrite", unchanged=[finished])
    assert "results.json" in err
    # --overwrite replaces it: a copy, so the module's finished run stays for the other tests
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    stale = copy / "checkpoint-999"
    stale.mkdir()
    code, out, _ = cli(capsys, *train_args(tiny, copy, "--overwrite", "--seed", "7"))
    assert code == 0 and "--overwrite: removing the earlier run" in out
    assert not stale.exists() and json.loads((copy / "run_config.json").read_text())["seed"] == 7


@pytest.mark.parametrize("bad, needles", [
    (["--method", "lora_px"], ["unknown method 'lora_px'", "did you mean 'lora_p_x'"]),
    (["--method", "lora_p_x:r=0"], ["r=0 must be >= 1"]),
    (["--method", "dora_p_x", "lora_p_x"], ["clash"]),
    (["--data", "missing.json"], ["no data file missing.json"]),
    (["--lr", "inf"], ["lr=inf is not a finite number"]),
    (["--weight-decay", "nan"], ["weight_decay=nan is not a finite number"]),
    (["--epochs", "inf", "--max-steps", "-1"], ["epochs=inf is not a finite number"]),
    (["--max-steps", "0"], ["max_steps=0 must be >= 1 (or -1)"]),
    (["--max-steps", "-5"], ["max_steps=-5 must be >= 1 (or -1)"]),
    (["--seed", "-1"], ["seed=-1 must be >= 0"]),
    (["--seed", str(2**40)], [f"seed={2**40} must be <= {2**32 - 1}"]),
    (["--method", "lora_p_x:r=100000"], ["r=100000 is larger than the layer it adapts", "in_proj: 32 inputs"]),
    (["--method", "lora_p_x:r=1e9"], ["r=1000000000 is larger than the layer"]),
    (["--method", "sdt:warmup_steps=10"], ["warmup_steps=10 is not shorter than the run (4 optimiser steps)"]),
])
def test_a_bad_run_touches_nothing(tiny, finished, capsys, tmp_path, bad, needles):
    """Into a fresh folder (nothing may be created) and into the finished run's folder with --resume and with
    --overwrite (nothing may change): the run is checked whole before any folder is touched."""
    fresh = tmp_path / "fresh"
    refused(capsys, train_args(tiny, fresh, *bad), *needles)
    assert not fresh.exists()
    for flag in ("--resume", "--overwrite"):
        refused(capsys, train_args(tiny, finished, *bad, flag), *needles, unchanged=[finished])


def test_resume_with_other_settings_is_refused(tiny, finished, capsys):
    refused(capsys, train_args(tiny, finished, "--resume", "--method", "lora_p_x:r=4"), "describes another run",
            "method", "another --output-dir", unchanged=[finished])
    refused(capsys, train_args(tiny, finished, "--resume", "--overwrite"), "give one of them", unchanged=[finished])


@pytest.mark.parametrize("content, needles", [
    ({"max_steps": "two"}, ["run.json: max_steps='two' is not a valid int"]),
    ({"lr": "abc"}, ["run.json: lr='abc' is not a valid float"]),
    ({"epochs": [1, 2]}, ["run.json: epochs=[1, 2] is not a valid float"]),
    ({"method": 3}, ["run.json: method=3 is not a valid list of strings"]),
    ({"modle": "x"}, ["run.json has unknown language keys 'modle' (did you mean 'model'?)"]),
    ({"train_on_prompt": "perhaps"}, ["train_on_prompt='perhaps' is not a valid bool"]),
])
def test_config_file_values_of_the_wrong_type(tiny, capsys, tmp_path, content, needles):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"output_dir": str(tmp_path / "out"), **content}))
    refused(capsys, ["train", "--config", file], *needles, unchanged=[tmp_path])
    assert not (tmp_path / "out").exists()


def test_two_processes_cannot_write_one_folder_and_a_dead_ones_lock_is_taken_over(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mambapeft", *map(str, train_args(tiny, out, "--max-steps", "400",
                                                                                      "--eval-steps", "200"))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").exists(), "the first run never took its lock"
        err = refused(capsys, train_args(tiny, out, "--overwrite"), "another process is writing", str(first.pid))
        assert "since" in err
    finally:
        first.kill()
        first.wait()
    # the first process is dead: its lock is stale, and a new run (here resuming nothing: refused for that reason,
    # not for the lock) takes it over
    assert (out / ".lock").exists()
    code, out_text, err = cli(capsys, *train_args(tiny, out, "--overwrite", "--max-steps", "2"))
    assert code == 0, err
    assert "taking over the lock" in out_text and not (out / ".lock").exists()


# ------------------------------------------------------------------ 2. the NaN guard checks what it calls good


def test_nan_guard_at_an_absurd_learning_rate_names_only_a_good_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_args(tiny, out, "--lr", "1e30", "--max-steps", "8", "--eval-steps", "1",
                                           "--save-total-limit", "8", "--method", "lora_p_x:r=2,s=1,dropout=0"))
    assert code == 2 and "Traceback" not in err
    assert "stopped before that update" in err and "Lower the learning rate (this run: 1e+30)" in err
    assert "--resume" not in err
    if "No checkpoint" in err:
        return
    named = Path(err.split("The last good checkpoint is ")[1].split(" (finite")[0])
    tensors = load_file(str(named / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # the checkpoint reloads and gives a finite loss on the training data
    model = mambapeft.from_pretrained(tiny / "model")
    peft = PeftModel.from_pretrained(model, named)
    ids = torch.randint(1, 4096, (2, 12))
    assert torch.isfinite(peft(ids, labels=ids).loss)


def test_nan_guard_says_plainly_when_no_checkpoint_exists(tiny, tmp_path, capsys):
    code, _, err = cli(capsys, *train_args(tiny, tmp_path / "run", "--lr", "1e30", "--eval-steps", "100",
                                           "--method", "lora_p_x:r=2,s=1,dropout=0"))
    assert code == 2 and "No checkpoint had been saved yet" in err and "--resume" not in err


def test_a_max_length_that_cuts_every_answer_is_named_before_training(tiny, tmp_path, capsys):
    refused(capsys, train_args(tiny, tmp_path / "run", "--max-length", "8", "--train-on-prompt", "false"),
            "have no token left to learn", "max_length 8", "number 1, 2", "train_on_prompt=true")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 3. every bad input gets a clear error


def test_a_model_folder_without_a_tokenizer(tiny, tmp_path, capsys):
    for args in (["train", "--model", tiny / "no-tokenizer", "--output-dir", tmp_path / "a"],
                 ["eval", tiny / "no-tokenizer"],
                 ["train", "--model", tiny / "model", "--tokenizer", tiny / "no-tokenizer", "--output-dir",
                  tmp_path / "b"]):
        refused(capsys, args, "no usable tokenizer", "tokenizer.json", "--tokenizer", unchanged=[tiny / "no-tokenizer"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("raw, needles", [
    (b'[{"instruction": "caf\xe9", "output": "x"}]', ["is not UTF-8 text: byte 21 (line 1) is b'\\xe9'"]),
    (b'[{"instruction": "a", "output": "b"},\n {"instruction": "\xff\xfe", "output": "b"}]', ["byte 56 (line 2)"]),
    (b'[{"instruction": "a", "output": "b"}, {"output": "c"}]', ["record 2 has no 'instruction' field"]),
])
def test_data_files_that_cannot_be_read(tiny, tmp_path, capsys, raw, needles):
    if b"\xe9" in raw or b"\xff" in raw:                 # the offset the message gives is the bad byte's own
        assert raw.index(b"\xe9" if b"\xe9" in raw else b"\xff") == int(needles[0].split("byte ")[1].split(" ")[0])
    data = tmp_path / "data.json"
    data.write_bytes(raw)
    refused(capsys, ["train", "--model", tiny / "model", "--data", data, "--output-dir", tmp_path / "o"],
            str(data), *needles, unchanged=[tmp_path])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--batch-size", "0"], ["--batch-size 0 must be >= 1"]),
    (["--limit", "0"], ["--limit 0 must be >= 1"]),
    (["--limit", "-3"], ["--limit -3 must be >= 1"]),
    (["--max-length", "0"], ["--max-length 0 must be >= 1"]),
    (["--output", "nowhere/at/all/results.json"], ["the folder", "does not exist"]),
    (["--tasks", " , "], ["--tasks names no task"]),
])
def test_eval_options(tiny, capsys, extra, needles):
    refused(capsys, ["eval", tiny / "model", *extra], *needles, unchanged=[tiny])


def test_eval_with_a_tokenizer_larger_than_the_vocabulary(tiny, capsys):
    refused(capsys, ["eval", tiny / "small-vocab"], "the tokenizer has 4096 tokens", "vocabulary only 512",
            "--tokenizer", unchanged=[tiny])


def test_eval_of_a_harness_task_while_offline(tiny, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    refused(capsys, ["eval", tiny / "model", "--tasks", "arc_easy", "--limit", "2"], "needs the network once",
            "arc_easy", "--include-path", unchanged=[tiny])


def adapter(tmp_path, name="adapter"):
    folder = tmp_path / name
    get_peft_model(mambapeft.from_pretrained(BUILTIN_MODEL), ["lora_p_x:r=2"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.pop("methods"), ["has no 'methods' key"]),
    (lambda c: c.pop("base_model"), ["has no 'base_model' key"]),
    (lambda c: c["base_model"].pop("architecture"), ["has no 'base_model.architecture'"]),
    (lambda c: c.update(methods="lora_p_x"), ["'methods' must be a list"]),
])
def test_adapter_configs_with_missing_keys(tmp_path, capsys, edit, needles):
    folder = adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    edit(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    refused(capsys, ["eval", "--adapter", folder], "adapter_config.json", *needles, unchanged=[folder])
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        PeftModel.from_pretrained(mambapeft.from_pretrained(BUILTIN_MODEL), folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_adapter_with_non_finite_tensors_is_refused(tmp_path, capsys, value):
    folder = adapter(tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    name = sorted(tensors)[1]
    tensors[name][0, 0] = value
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    refused(capsys, ["eval", "--adapter", folder], f"tensor {name} holds NaN or infinite values",
            "earlier checkpoint", unchanged=[folder])


def test_pickles_name_what_they_ask_for_and_never_advise_weights_only_false(tmp_path, capsys):
    hf = tmp_path / "hf"
    mambapeft.from_config("tiny").save_pretrained(hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(os.urandom(4096))
    err = refused(capsys, ["eval", hf, "--tokenizer", BUILTIN_MODEL], "pytorch_model.bin cannot be read",
                  unchanged=[hf])
    assert "weights_only" not in err

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"backbone.norm_f.weight": Evil()}, hf / "pytorch_model.bin")
    err = refused(capsys, ["eval", hf, "--tokenizer", BUILTIN_MODEL], "asks to unpickle posix.system",
                  "nothing in it was run", unchanged=[hf])
    assert "weights_only" not in err


def vtab_task(root, labels, task="shapes"):
    from PIL import Image

    folder = root / task
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(labels):
        Image.new("RGB", (32, 32), (40 * label, 0, 0)).save(folder / "images" / f"{i:06d}.png")
        lines.append(f"images/{i:06d}.png {label}")
    for name in ("train800", "val200", "train800val200", "test"):
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_vision_class_counts_and_image_sizes(tmp_path, capsys):
    root = tmp_path / "vtab"
    vtab_task(root, [0, 1, 2, 1])
    base = ["train", "--task", "vision", "--data-root", root, "--vtab-task", "shapes", "--output-dir", tmp_path / "o"]
    refused(capsys, base, "'shapes' is not one of the 19 VTAB-1k tasks", "labels 0..2", "--num-classes",
            unchanged=[root])
    refused(capsys, [*base, "--num-classes", "2"], "train800val200.txt:3: label 2 is out of range for 2 classes",
            unchanged=[root])
    refused(capsys, [*base, "--num-classes", "3", "--image-size", "30"], "image size 30 does not tile",
            "use 24 or 32", unchanged=[root])
    refused(capsys, [*base, "--num-classes", "0"], "num_classes=0 must be >= 1", unchanged=[root])
    refused(capsys, [*base, "--vtab-task", "svhn"], "no VTAB task folder", unchanged=[root])
    assert not (tmp_path / "o").exists()


def test_search_config_errors_name_the_file(tmp_path, capsys):
    for content, needle in (({"modle": "x"}, "unknown language keys 'modle'"), ({"lr": "fast"}, "lr='fast'"),
                            ({"task": "audio"}, "task must be one of language, vision")):
        file = tmp_path / "run.json"
        file.write_text(json.dumps(content))
        err = refused(capsys, ["search", "--config", file, "--output-dir", tmp_path / "s"], needle,
                      unchanged=[tmp_path])
        assert str(file) in err and "the command line" not in err
    assert not (tmp_path / "s").exists()


def test_params_and_info_take_every_name_train_takes(capsys):
    for name in ("builtin", "tiny-vim"):
        code, out, err = cli(capsys, "params", name, "-m", "lora_p_x:r=2", "--json")
        assert code == 0, err
        assert json.loads(out)["trainable"] > 0
        code, out, err = cli(capsys, "info", name)
        assert code == 0, err


def test_adapter_files_have_the_permissions_of_every_other_file(tmp_path):
    folder = adapter(tmp_path)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {plain.stat().st_mode & 0o777}, modes


def test_api_errors_are_the_same_classes(tiny, tmp_path):
    from mambapeft.train import TrainConfig, fine_tune

    with pytest.raises(ConfigError, match="max_steps=0 must be >= 1"):
        TrainConfig.from_dict({"max_steps": 0})
    with pytest.raises(ConfigError, match="lr='abc' is not a valid float"):
        TrainConfig.from_dict({"lr": "abc"})
    config = TrainConfig.from_dict({"model": str(tiny / "model"), "data": str(tiny / "train.json"),
                                    "output_dir": str(tmp_path / "o"), "method": ["lora_p_x:r=99999"]})
    with pytest.raises(ConfigError, match="larger than the layer"):
        fine_tune(config, log=lambda *a: None)
    assert not (tmp_path / "o").exists()
