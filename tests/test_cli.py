"""The command line: help, info on names, folders and bad input (a message, no traceback)."""

import json
import subprocess
import sys

import pytest

import mambapeft
from mambapeft.cli.main import main


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "info" in capsys.readouterr().out


def test_info_default_is_the_tiny_model(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["model"] == "tiny" and info["parameters"]["total"] == 131_008


def test_info_mamba_130m_counts(capsys):
    code, out, _ = run_cli(capsys, "info", "mamba-130m", "--json")
    info = json.loads(out)
    p = info["parameters"]
    assert (info["d_model"], info["n_layer"], info["d_inner"], info["dt_rank"]) == (768, 24, 1536, 48)
    assert p["total"] == 129_135_360 and p["per_layer"] == 3_771_648 and p["embeddings"] == 50280 * 768
    assert p["per_layer_parts"]["in_proj"] == 768 * 3072 and p["lm_head"] == 0


def test_info_text_output(capsys):
    code, out, _ = run_cli(capsys, "info", "mamba-1.4b")
    assert code == 0 and "1,372,178,432" in out and "d_inner (E) 4096" in out


def test_info_on_a_saved_folder(capsys, tmp_path):
    mambapeft.from_config("tiny").save_pretrained(tmp_path / "m")
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "m"), "--json")
    info = json.loads(out)
    assert code == 0 and "Hugging Face format" in info["source"] and info["parameters"]["total"] == 131_008


def test_bad_input_is_a_message_not_a_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 2 and err.startswith("error: no config.json in") and "Traceback" not in err
    code, _, err = run_cli(capsys, "info", "mamba-130")
    assert code == 2 and "did you mean 'mamba-130m'" in err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "mambapeft", "info", "tiny"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "parameters     131,008" in result.stdout


def test_info_vision_mamba_small(capsys):
    code, out, _ = run_cli(capsys, "info", "vim-small", "--json")
    info = json.loads(out)
    p = info["parameters"]
    assert code == 0 and (info["d_model"], info["depth"], info["tokens"], info["d_inner"]) == (384, 24, 197, 768)
    assert p["pos_embed"] == 197 * 384 and p["patch_embed"] == 3 * 16 * 16 * 384 + 384
    assert p["head"] == 384 * 1000 + 1000
    assert p["total"] == p["patch_embed"] + 384 + p["pos_embed"] + p["layers"] + 384 + p["head"]
    code, out, _ = run_cli(capsys, "info", "vim-tiny")
    assert code == 0 and "class token in the middle" in out


def test_train_task_vision_runs_the_builtin_vision_fine_tune(capsys, tmp_path):
    code = main(["train", "--task", "vision", "--epochs", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "adding linear_probe" in out and "fine-tuned" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["parameters"]["trainable"] == 6_404
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
