"""benchmarks/gpu_check.py's comparison logic on the CPU: the float64 reference scan against the sequential backend
for every family with methods attached, and a deliberately wrong comparison failing."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_cpu_run_compares_two_implementations_and_passes(capsys):
    rows = gpu_check.run_checks("cpu", "cpu", speed=False)
    families = {r.check.split(" ")[0] for r in rows[1:]}
    from mambapeft.model.registry import FAMILIES

    assert set(FAMILIES) <= families
    assert all(r.ok for r in rows), [(r.check, r.error) for r in rows if not r.ok]
    assert 0 < max(r.error for r in rows if "forward" in r.check) < 1e-4        # two implementations: not identical
    assert gpu_check.main(["--device", "cpu", "--no-speed"]) == 0
    assert "every check passed" in capsys.readouterr().out


def test_without_cuda_it_says_so_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_a_wrong_result_fails():
    x = torch.randn(5, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    assert gpu_check.compare_outputs_and_grads(lambda v: v * 2, {"v": x}, {"v": y}) == 0
    x2, y2 = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    error = gpu_check.compare_outputs_and_grads(lambda v: v.sin(), {"v": x2}, {"v": y2})
    assert not gpu_check.Row("wrong", error, 1e-4).ok and not gpu_check.Row("nan", float("nan"), 1.0).ok
