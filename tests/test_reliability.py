"""Outputs written whole or not at all, refusals that never lose data, no tracebacks, nothing silently wrong.

Every writing command (merge, export, import, train, eval --output, search) is killed at each of its write steps
(outputs.write_step, MAMBAPEFT_KILL_AT) and fed a bad input with --overwrite: the old output must be byte-identical
afterwards, and a folder left half-written must be refused by every reader, naming it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mambapeft
from mambapeft import CheckpointError, ConfigError, PeftModel, get_peft_model
from mambapeft.assets import BUILTIN_MODEL
from mambapeft.cli.main import main
from mambapeft.errors import RunFolderError
from mambapeft.outputs import INCOMPLETE, atomic_folder

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = Path("/proc/mambapeft-test/out")           # no process may create anything under /proc, root included


def snapshot(*paths) -> dict:
    found = {}
    for root in paths:
        root = Path(root)
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(capsys, args, *needles, unchanged=()):
    """exit 2, one paragraph naming every needle, no traceback, every file under `unchanged` byte-identical."""
    before = snapshot(*unchanged)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, f"{args}: exit {code}: {err[-800:]}"
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(*unchanged) == before, f"{args}: files changed"
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Adapters on the built-in model: a mergeable one, one with a method that stays (prompt), and their outputs."""
    folder = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    lora = get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_p_x:r=2"])
    with torch.no_grad():
        for t in lora.adapter_tensors().values():
            t.add_(0.01 * torch.randn_like(t))
    lora.base_model.name_or_path = "builtin"
    lora.save_pretrained(folder / "lora")
    mixed = get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_p_x:r=2", "prompt:n=2"])
    mixed.base_model.name_or_path = "builtin"
    mixed.save_pretrained(folder / "mixed")
    assert main(["merge", "builtin", "--adapter", str(folder / "mixed"), "--output", str(folder / "merged")]) == 0
    assert main(["export", str(folder / "lora"), "--output", str(folder / "exported")]) == 0
    return folder


def run_cli(*args, kill_at=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["MAMBAPEFT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "mambapeft", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- 1. a kill at every write step


COMMANDS = {
    "merge": lambda w, out: ["merge", "builtin", "--adapter", w / "mixed", "--output", out],
    "export": lambda w, out: ["export", w / "lora", "--output", out],
    "import": lambda w, out: ["import", w / "exported", "--output", out],
}


@pytest.mark.parametrize("step", ["started", "written", "moved-aside"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_kill_at_any_write_step_leaves_the_old_output_or_nothing(work, tmp_path, capsys, command, step):
    out = tmp_path / "out"
    old = None
    if step == "moved-aside":                     # only an --overwrite moves an old output aside
        assert main([str(a) for a in COMMANDS[command](work, out)]) == 0
        old = snapshot(out)
    args = COMMANDS[command](work, out) + (["--overwrite"] if old else [])
    done = run_cli(*args, kill_at=step)
    assert done.returncode == -9, done.stderr[-2000:]
    partial = list(tmp_path.glob(".out.partial-*"))
    if step == "moved-aside":                     # old and new both whole, under their hidden names
        assert not out.exists()
        aside, = tmp_path.glob(".out.old-*")
        assert {k.replace(str(aside), str(out)): v for k, v in snapshot(aside).items()} == old
        assert len(partial) == 1 and not (partial[0] / INCOMPLETE).exists()
        return
    assert not out.exists(), "a half-written output took the output's name"
    assert len(partial) == 1 and (partial[0] / INCOMPLETE).is_file()
    # every reader refuses the half-written folder, naming it
    if command == "merge":
        with pytest.raises(CheckpointError, match="incomplete"):
            mambapeft.from_pretrained(partial[0])
        readers = [["eval", partial[0], "--limit", "2"]]
    elif command == "export":
        readers = [["import", partial[0], "--output", tmp_path / "m"]]
    else:
        with pytest.raises(CheckpointError, match="incomplete"):
            PeftModel.from_pretrained(mambapeft.from_pretrained("builtin"), partial[0])
        readers = [["merge", "builtin", "--adapter", partial[0], "--output", tmp_path / "m"],
                   ["eval", "builtin", "--adapter", partial[0], "--limit", "2"]]
    if step == "written":                       # at "started" the folder may hold nothing yet to be refused for
        for args in readers:
            refused(capsys, args, "incomplete", str(partial[0].name))
    assert not (tmp_path / "m").exists()


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_adapter_folder_is_saved_whole(tmp_path):
    peft = get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_p_x:r=2"])
    peft.save_pretrained(tmp_path / "a")
    peft.save_pretrained(tmp_path / "a")                          # again: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "a" / INCOMPLETE).write_text("")
    with pytest.raises(CheckpointError, match=r"incomplete.*\.incomplete"):
        PeftModel.from_pretrained(mambapeft.from_pretrained("builtin"), tmp_path / "a")


def test_merge_and_export_from_python_write_whole_folders(tmp_path, monkeypatch):
    """The Python API writes as the commands do: a failure midway leaves the old folder as it was, a non-empty
    folder is refused without overwrite before anything is merged, and the new folder replaces the old whole."""
    from mambapeft.interop import export_peft, merge_to_folder
    from mambapeft.model.mamba import MambaFamily

    def adapted():
        return get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_p_x:r=2,dropout=0", "prompt:n=2"])

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RunFolderError, match="not empty"):
        merge_to_folder(adapted(), out, overwrite=False)
    failing = RuntimeError("disk trouble midway")
    monkeypatch.setattr(MambaFamily, "save", lambda self, model, folder: (_ for _ in ()).throw(failing))
    with pytest.raises(RuntimeError, match="midway"):
        merge_to_folder(adapted(), out)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["merged"]
    monkeypatch.undo()
    result = merge_to_folder(adapted(), out)
    assert result["remaining"] == ["prompt"]
    assert not (out / "old.txt").exists() and (out / "remaining_adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]               # no partial sibling left
    exported = tmp_path / "exported"
    export_peft(get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_in_proj:r=2"]), exported)
    with pytest.raises(RunFolderError, match="not empty"):
        export_peft(get_peft_model(mambapeft.from_pretrained("builtin"), ["lora_in_proj:r=2"]), exported,
                    overwrite=False)
    assert {p.name for p in exported.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


# ---------------------------------------- 2. --overwrite with a refused input keeps the old output


def test_overwrite_with_a_bad_input_keeps_the_old_output(work, tmp_path, capsys):
    merged, exported = work / "merged", work / "exported"
    refused(capsys, ["merge", "builtin", "--adapter", work / "typo", "--output", merged, "--overwrite"],
            "no adapter folder", unchanged=[merged])
    refused(capsys, ["merge", "tiny-mamba2", "--adapter", work / "mixed", "--output", merged, "--overwrite"],
            "made for another base model", unchanged=[merged])
    refused(capsys, ["export", work / "typo", "--output", exported, "--overwrite"], "no adapter folder",
            unchanged=[exported])
    refused(capsys, ["export", work / "mixed", "--output", exported, "--overwrite"], "prompt",
            unchanged=[exported])
    refused(capsys, ["export", work / "lora", "--base", "tiny-mamba2", "--output", exported, "--overwrite"],
            "made for another base model", unchanged=[exported])
    imported = tmp_path / "imported"
    assert main(["import", str(exported), "--output", str(imported)]) == 0
    refused(capsys, ["import", work / "lora", "--output", imported, "--overwrite"], "adapter_config.json",
            unchanged=[imported])
    refused(capsys, ["import", exported, "--base", "tiny-mamba2", "--output", imported, "--overwrite"],
            unchanged=[imported])
    results = tmp_path / "results.json"
    results.write_text('{"kept": true}\n')
    refused(capsys, ["eval", "builtin", "--adapter", work / "typo", "--output", results], "no adapter folder",
            unchanged=[results])
    search = tmp_path / "search"
    search.mkdir()
    (search / "search_config.json").write_text("{}\n")
    refused(capsys, ["search", "--output-dir", search, "--overwrite", "--storage", "nosuch://x"], "unknown database",
            unchanged=[search])


def test_train_with_overwrite_and_a_bad_method_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": 1}\n')
    (out / "run_config.json").write_text('{"old": 1}\n')
    refused(capsys, ["train", "--output-dir", out, "--overwrite", "--method", "lora_p_x:r=8,r=4"], "'r' twice",
            unchanged=[out])


# ---------------------------------------------------------------- 3. output paths checked before any work


def test_output_paths_that_cannot_be_written_are_refused_first(work, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, needle in (
        (["train", "--output-dir", a_file], "is a file"),
        (["train", "--output-dir", UNWRITABLE], "cannot write"),
        (["merge", "builtin", "--adapter", work / "lora", "--output", a_file], "is a file"),
        (["merge", "builtin", "--adapter", work / "lora", "--output", UNWRITABLE], "cannot write"),
        (["export", work / "lora", "--output", UNWRITABLE], "cannot write"),
        (["import", work / "exported", "--output", a_file], "is a file"),
        (["eval", "builtin", "--output", tmp_path], "is a folder"),
        (["search", "--output-dir", a_file], "is a file"),
        (["search", "--output-dir", tmp_path / "s", "--storage", f"sqlite:///{UNWRITABLE}/s.db"], "cannot write"),
        (["search", "--output-dir", tmp_path / "s", "--storage", "postgresql://u:secret@127.0.0.1:1/x"],
         "cannot connect"),
        (["search", "--output-dir", tmp_path / "s", "--trial-steps", "5"], "warmup_steps"),
    ):
        err = refused(capsys, args, needle, unchanged=[a_file])
        assert "secret" not in err
    assert not (tmp_path / "s").exists()                  # search_config.json is written only after every check


def test_eval_output_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    import mambapeft.evaluation.multiple_choice as mc

    monkeypatch.setattr(mc, "score_items", lambda *a, **k: pytest.fail("scored before checking --output"))
    refused(capsys, ["eval", "builtin", "--output", tmp_path / "missing" / "r.json"], "does not exist")


# ---------------------------------------------------------------- 4. incomplete and merged folders


def test_eval_of_a_merged_folder_loads_its_remaining_adapter(work, capsys):
    assert main(["eval", str(work / "merged"), "--limit", "4"]) == 0
    assert "remaining_adapter" in capsys.readouterr().out
    refused(capsys, ["eval", work / "merged", "--adapter", work / "lora", "--limit", "4"], "remaining_adapter")


def test_non_finite_base_weights_are_refused_at_load(tmp_path, capsys):
    model = mambapeft.from_pretrained("builtin")
    model.save_pretrained(tmp_path / "nan")
    state = load_file(str(tmp_path / "nan" / "model.safetensors"))
    key = next(k for k in state if k.endswith("A_log"))
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"NaN or infinite.*{key}"):
        mambapeft.from_pretrained(tmp_path / "nan")
    refused(capsys, ["eval", tmp_path / "nan", "--tokenizer", "builtin"], "NaN or infinite")


# ---------------------------------------------------------------- 5. nothing silently wrong


def test_duplicate_keys_are_refused_naming_the_key(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("method: [lora_p_x]\nlr: 0.01\nepochs: 1\nlr: 0.02\n")
    (tmp_path / "run.json").write_text('{"lr": 0.01, "method": ["lora_p_x"], "lr": 0.02}')
    (tmp_path / "space.json").write_text('{"step1": {"trials": 2, "trials": 3}}')
    refused(capsys, ["train", "--config", tmp_path / "run.yaml"], "'lr' is given twice", "line 4")
    refused(capsys, ["train", "--config", tmp_path / "run.json"], "'lr' is given twice")
    refused(capsys, ["train", "--method", "lora_p_x:r=8,r=4"], "'r' twice")
    refused(capsys, ["search", "--space", tmp_path / "space.json", "--output-dir", tmp_path / "s"], "'trials'")
    with pytest.raises(ConfigError, match="'r' is given twice"):
        mambapeft.PeftConfig.from_json('{"methods": [{"method": "lora_p_x", "r": 8, "r": 4}]}')


def test_options_that_do_not_apply_to_the_data_are_refused(capsys):
    refused(capsys, ["train", "--val-size", "100"], "val_size=100 does not apply", "built-in data")


def test_a_search_worker_with_other_settings_is_refused():
    import optuna

    from mambapeft.search.hybrid import SearchSettings, check_fingerprint

    study = optuna.create_study(direction="maximize")
    check_fingerprint(study, SearchSettings(fingerprint="abc"))
    check_fingerprint(study, SearchSettings(fingerprint="abc"))                # the same search: joins
    with pytest.raises(ConfigError, match="other settings"):
        check_fingerprint(study, SearchSettings(fingerprint="def"))


def test_unscorable_validation_records_are_counted_aloud(tmp_path, capsys):
    from mambapeft.assets import builtin_split
    from mambapeft.train.language import LanguageTask, load_tokenizer, prepare_data

    records = json.loads(builtin_split("validation").read_text())[:4]
    (tmp_path / "train.json").write_text(json.dumps(json.loads(builtin_split("train").read_text())[:8]))
    records[1] = {"instruction": "Say hello.", "input": "", "output": "hello", "answer": "hello"}
    (tmp_path / "val.json").write_text(json.dumps(records))
    config = LanguageTask().resolve({"data": str(tmp_path / "train.json"), "val_data": str(tmp_path / "val.json")})
    _, _, val_items, _ = prepare_data(config, load_tokenizer("builtin"), log=lambda *_: None)
    assert val_items == []
    assert "1 of 4 validation examples have no answer with choices" in capsys.readouterr().err


# ---------------------------------------------------------------- 6. tracebacks that became messages


def test_max_grad_norm_zero_means_off(tmp_path, capsys):
    assert main(["train", "--max-grad-norm", "0", "--max-steps", "1", "--eval-steps", "1", "--test-data", "none",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["max_grad_norm"] == 0.0


def test_a_tokenizer_without_pad_or_eos_token(tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL))
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.unk_token = tokenizer.bos_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token", "unk_token", "bos_token"):
        config.pop(key, None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    refused(capsys, ["eval", "builtin", "--tokenizer", tmp_path / "tok", "--limit", "2"], "no pad, end-of-sequence")


def test_a_harness_task_naming_a_missing_file(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        "task: missing_file_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent/mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    refused(capsys, ["eval", "builtin", "--tasks", "missing_file_mc", "--include-path", tmp_path / "tasks"],
            "/nonexistent/mc.jsonl", "does not exist")


def test_a_full_disk_while_saving_is_a_message(tmp_path, capsys, monkeypatch, work):
    import mambapeft.interop as interop

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(interop, "merge_to_folder", full)
    out = tmp_path / "merged"
    refused(capsys, ["merge", "builtin", "--adapter", work / "lora", "--output", out], "the disk is full")
    assert list(tmp_path.iterdir()) == []                 # the partial folder went with the error


# ---------------------------------------------------------------- 7. interop details and defaults


def test_exports_name_a_portable_base_and_the_real_dropout(work):
    config = json.loads((work / "exported" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()
    assert config["lora_dropout"] == 0.1                            # lora_p_x's default dropout
    from mambapeft.interop import portable_base

    assert portable_base("state-spaces/mamba-130m-hf") == ("state-spaces/mamba-130m-hf", None)
    assert "inside the mambapeft install" in portable_base("builtin")[1]


def test_storage_urls_are_printed_as_optuna_takes_them():
    from mambapeft.cli.search import shown_url

    pytest.importorskip("psycopg2")
    assert shown_url("postgresql://u:pw@host/db") == "postgresql+psycopg2://u:***@host/db"


def test_default_output_folders_are_named_after_the_run():
    from mambapeft.train.tasks import get_task

    language, vision = get_task("language"), get_task("vision")
    assert language.resolve({}).output_dir == "runs/builtin-lora_p_x"
    assert language.resolve({"model": "tiny-mamba2", "method": ["state_offset"]}).output_dir == \
        "runs/tiny-mamba2-state_offset"
    assert language.resolve({"model": "state-spaces/mamba-130m-hf", "data": "x/commonsense_170k.json",
                             "method": ["paper/additional_scan", "lora_p_x:r=4"]}).output_dir == \
        "runs/mamba-130m-hf-commonsense_170k-additional_scan+lora_p_x"
    assert vision.resolve({"model": "tiny-vmamba"}).output_dir == "runs/tiny-vmamba-lora_p_x"
    assert language.resolve({"output_dir": "mine"}).output_dir == "mine"


def test_data_warnings_are_shown_once_without_source_lines(capsys):
    from mambapeft.verbosity import note

    note("a data warning for the test")
    note("a data warning for the test")
    err = capsys.readouterr().err
    assert err == "warning: a data warning for the test\n"


def test_verbose_shows_every_warning_with_its_source(monkeypatch):
    from mambapeft.verbosity import note

    monkeypatch.setenv("MAMBAPEFT_VERBOSE", "1")
    with pytest.warns(UserWarning, match="shown under --verbose"):
        note("shown under --verbose")
    with pytest.warns(UserWarning, match="shown under --verbose"):
        note("shown under --verbose")                              # every time
