"""Data-parallel training across processes, run for real: `torchrun --nproc-per-node 2 -m mambapeft train` on the CPU
(gloo) gives the adapter of one process with the same effective batch, resumes, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mambapeft.assets import builtin_split

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "train.json").write_text(json.dumps(json.loads(builtin_split("train").read_text())[:24]))
    return folder


def train(data, out, processes: int, *extra) -> dict:
    """One `mambapeft train` run; batch 4 = micro 1 x accumulation (4 / processes) x processes."""
    args = ["-m", "mambapeft", "train", "--model", "builtin", "--data", str(data / "train.json"), "--val-size", "0",
            "--max-length", "96", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-2", "--warmup-steps",
            "0", "--scheduler", "constant", "--logging-steps", "1", "--eval-steps", "2", "--save-total-limit", "4",
            "--method", "lora_p_x:r=2,dropout=0", "--seed", "3", "--output-dir", str(out), *extra]
    command = [sys.executable, *args] if processes == 1 else [TORCHRUN, "--nproc-per-node", str(processes),
                                                              "--master-port", str(29500 + os.getpid() % 500), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_processes_equal_one_with_the_same_effective_batch_and_resume(data, tmp_path):
    one = train(data, tmp_path / "one", 1, "--max-steps", "4")
    two = train(data, tmp_path / "two", 2, "--max-steps", "4")
    assert (one["processes"], two["processes"]) == (1, 2) and one["steps"] == two["steps"] == 4
    close(adapter(tmp_path / "one"), adapter(tmp_path / "two"))

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [round(r["loss"], 4) for r in rows if "loss" in r]

    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    # only rank 0 wrote the run's files: the same as the one-process run, no lock left behind; each process adds its
    # RNG state to a checkpoint (the Trainer's rng_state_<rank>.pth), which an exact resume needs
    def files(out):
        return {re.sub(r"rng_state(_\d+)?\.pth", "rng_state.pth", p.relative_to(out).as_posix())
                for p in out.rglob("*")}

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                              "rng_state_1.pth"]
    assert not (tmp_path / "two" / ".lock").exists()

    # two processes stopped after 2 steps, then resumed by two processes to 4: the uninterrupted run's adapter
    part = tmp_path / "part"
    train(data, part, 2, "--max-steps", "2")
    resumed = train(data, part, 2, "--max-steps", "4", "--resume")
    assert resumed["steps"] == 4
    close(adapter(part), adapter(tmp_path / "two"))


def test_the_batch_must_split_over_the_processes(tmp_path, monkeypatch, capsys):
    from mambapeft.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    code = main(["train", "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "1", "--output-dir",
                 str(tmp_path / "o")])
    assert code == 2 and "not a multiple of micro_batch_size 1 x 3 processes" in capsys.readouterr().err
