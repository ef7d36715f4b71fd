"""Vision fine-tuning on the PeftTrainer: a real short run on a generated VTAB folder, its outputs and adapter
round trip, the always-trained head, resume equivalence, config files, the search on vision tasks and the errors
a user meets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from mambapeft import ConfigError
from mambapeft.model.vim.loading import load_vim
from mambapeft.peft import PeftModel
from mambapeft.train import fine_tune_vision
from mambapeft.train.vision import VisionTrainConfig, resolve_vision_config, with_head


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    """A 2-class VTAB-1k-style task (bright left half vs bright right half), 32 px, all four list files."""
    root = tmp_path_factory.mktemp("vtab")
    task = root / "halves"
    (task / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        label = i % 2
        pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        pixels[:, 16 * label:16 * label + 16] += 150
        Image.fromarray(pixels).save(task / "images" / f"{i:06d}.png")
        lines.append(f"images/{i:06d}.png {label}")
    for name, part in (("train800", lines[:24]), ("val200", lines[24:32]), ("train800val200", lines[:32]),
                       ("test", lines[32:])):
        (task / f"{name}.txt").write_text("\n".join(part) + "\n")
    return root


class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


class StopAt(TrainerCallback):
    """Ends training after `step` (its checkpoint saved), as a kill right after a save would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def config(vtab, out, **changes):
    values = dict(data_root=str(vtab), vtab_task="halves", num_classes=2, method=["lora_p_x:r=2"], output_dir=str(out),
                  epochs=2.0,
                  warmup_epochs=0.5, batch_size=8, micro_batch_size=8, eval_batch_size=16, logging_steps=2,
                  eval_epochs=1.0, lr=5e-3, seed=3)
    values.update(changes)
    return VisionTrainConfig.from_dict(values)


def test_run_writes_outputs_and_the_adapter_reloads(vtab, tmp_path):
    logs, keep = [], KeepModel()
    results = fine_tune_vision(config(vtab, tmp_path), callbacks=[keep], log=logs.append)
    assert any("adding linear_probe" in line for line in logs)
    for name in ("results.json", "run_config.json", "metrics.jsonl", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "run_config.json").read_text())["vtab_task"] == "halves"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 8 == results["steps"]            # 2 epochs x ceil(32 / 8)
    assert [m["method"] for m in saved["methods"]] == ["lora_p_x", "linear_probe"]
    # trainable = LoRA on x's rows of in_proj + the 2-class head, counted by hand from the model's sizes
    base = load_vim("tiny-vim", num_classes=2)
    c = base.config
    d_inner = c.expand * c.d_model
    head = c.d_model * 2 + 2
    assert results["parameters"]["trainable"] == c.depth * 2 * (c.d_model + d_inner) + head   # A (2, d) + B (E, 2)

    # the head moved away from the fresh one, and the adapter on a fresh base gives the trained model's outputs
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    head_keys = [k for k in tensors if "head" in k]
    assert head_keys
    fresh = load_vim("tiny-vim")
    torch.manual_seed(3)
    fresh.reset_head(2)                                        # as fine_tune_vision makes its fresh head
    assert not torch.equal(tensors[[k for k in head_keys if k.endswith("weight")][0]], fresh.head.weight)
    reloaded = PeftModel.from_pretrained(load_vim("tiny-vim", num_classes=2), tmp_path / "adapter").eval()
    trained = keep.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, trained(pixel_values=x).logits, rtol=0, atol=0)
    from mambapeft.train.vision import accuracy, prepare_vision_data

    _, _, test, _ = prepare_vision_data(config(vtab, tmp_path), 32)
    assert accuracy(reloaded, test) == pytest.approx(results["fine_tuned"]["acc"])
    assert results["fine_tuned"]["acc"] > 0.75                 # the task is trivial: training must solve it


def test_search_split_selects_on_validation_and_resume_matches(vtab, tmp_path):
    quiet = dict(log=lambda _: None)
    whole = fine_tune_vision(config(vtab, tmp_path / "whole", split="search", save_total_limit=5), **quiet)
    assert whole["metric"] == "eval_acc" and whole["best_validation"] is not None
    assert whole["steps"] == 6                                 # 2 epochs x 24 / 8
    # stop right after the first epoch's checkpoint, then resume: the same adapter as the uninterrupted run
    part = tmp_path / "part"
    fine_tune_vision(config(vtab, part, split="search", save_total_limit=5), callbacks=[StopAt(3)], **quiet)
    assert not (part / "checkpoint-6").exists()
    resumed = fine_tune_vision(config(vtab, part, split="search", save_total_limit=5), resume=True, **quiet)
    assert resumed["steps"] == 6 and "zero_shot" not in resumed
    a = load_file(str(tmp_path / "whole" / "checkpoint-6" / "adapter_model.safetensors"))
    b = load_file(str(part / "checkpoint-6" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_head_methods_and_errors(vtab, tmp_path):
    assert with_head(["full"], log=lambda _: None) == ["full"]
    assert with_head(["lora_p_x", "linear_probe:lr=1e-2"], log=lambda _: None) == ["lora_p_x", "linear_probe:lr=1e-2"]
    with pytest.raises(ConfigError, match="no VTAB task folder .*halves"):
        fine_tune_vision(config(vtab, tmp_path, vtab_task="nope"), log=lambda _: None)
    broken = tmp_path / "root" / "broken"
    broken.mkdir(parents=True)
    for name in ("train800val200", "test"):
        (broken / f"{name}.txt").write_text("images/missing.png 0\n")
    with pytest.raises(ConfigError, match="missing image"):
        fine_tune_vision(config(vtab, tmp_path / "o", data_root=str(tmp_path / "root"), vtab_task="broken"), log=print)
    with pytest.raises(ConfigError, match="split='all' is not one of final, search"):
        config(vtab, tmp_path, split="all")
    with pytest.raises(ConfigError, match="unknown vision keys 'epoch'"):
        VisionTrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        fine_tune_vision(config(vtab, tmp_path / "empty"), resume=True, log=lambda _: None)
    builtin = resolve_vision_config({})                        # the built-in task gets the short schedule
    assert (builtin.epochs, builtin.lr) == (20.0, 5e-3)
    paper = resolve_vision_config({"data_root": "x"})
    assert (paper.epochs, paper.warmup_epochs, paper.lr, paper.weight_decay, paper.batch_size, paper.max_grad_norm,
            paper.scheduler) == (100.0, 10.0, 1e-3, 1e-4, 32, 5.0, "cosine")


def test_command_line_flags(vtab):
    from mambapeft.cli.main import build_parser
    from mambapeft.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--task", "vision", "--vtab-task", "halves", "--data-root", str(vtab),
                                      "--epochs", "3", "--split", "search"])
    _, c = config_from_args(args)
    assert (c.model, c.vtab_task, c.data_root, c.epochs, c.split, c.lr) == \
        ("tiny-vim", "halves", str(vtab), 3.0, "search", 1e-3)


def _run_file(vtab, tmp_path, out, **changes):
    import yaml

    values = dict(task="vision", data_root=str(vtab), vtab_task="halves", num_classes=2, method=["lora_p_x:r=2"],
                  epochs=1.0,
                  warmup_epochs=0.5, batch_size=8, micro_batch_size=8, eval_batch_size=16, lr=5e-3, seed=3,
                  output_dir=str(out), **changes)
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(values))
    return file


def test_config_file_runs_vision_and_its_run_config_reproduces_the_run(vtab, tmp_path, capsys):
    from mambapeft.cli.main import main

    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--config", str(_run_file(vtab, tmp_path, first))]) == 0
    saved = json.loads((first / "run_config.json").read_text())
    assert saved["task"] == "vision" and saved["vtab_task"] == "halves" and saved["epochs"] == 1.0
    # the written run config is itself a config file: the same run again, elsewhere, gives the same adapter
    assert main(["train", "--config", str(first / "run_config.json"), "--output-dir", str(second)]) == 0
    a, b = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "results.json").read_text())["fine_tuned"] == \
        json.loads((first / "results.json").read_text())["fine_tuned"]
    capsys.readouterr()
    assert main(["train", "--config", str(first / "run_config.json"), "--task", "language"]) == 2
    assert "vision run config but --task language" in capsys.readouterr().err
    assert main(["train", "--config", str(_run_file(vtab, tmp_path, first, max_seq=3))]) == 2
    assert "unknown vision keys 'max_seq'" in capsys.readouterr().err


def test_search_on_a_vision_task(vtab, tmp_path, capsys):
    """Trials train on train800 and are scored on val200; the best config's final run trains on train800val200."""
    import yaml

    from mambapeft.cli.main import main

    run = _run_file(vtab, tmp_path, tmp_path / "unused", eval_epochs=0.5)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "step1": {"trials": 3, "methods": {"lora_p_x": {"r": 2}, "partial_cls_token": {}, "partial_d": {}}},
        "step2": {"trials": 1, "methods": {"partial_d": {"lr": {"log": [1e-3, 1e-2]}}}}}))
    out = tmp_path / "search"
    assert main(["search", "--config", str(run), "--space", str(space), "--output-dir", str(out), "--no-prune"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    trials = [json.loads(p.read_text()) for p in out.glob("trials/*/task0/run_config.json")]
    assert len(trials) >= 3 and all(t["task"] == "vision" and t["split"] == "search" for t in trials)
    for result in out.glob("trials/*/task0/results.json"):              # a trial's score is its val200 accuracy
        assert 0.0 <= json.loads(result.read_text())["best_validation"] <= 1.0
    best = json.loads((out / "best_config.json").read_text())
    assert best["task"] == "vision" and best["split"] == "final"
    final = json.loads((out / "final" / "results.json").read_text())
    assert final["split"] == "final" and 0.0 <= final["fine_tuned"]["acc"] <= 1.0


# ---------------------------------------------------------------- VMamba (the built-in tiny-vmamba)


class DropPathProbe(TrainerCallback):
    """Records, at every call of the last block's DropPath, whether it is in train mode and its rate."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        drop_path = model.base_model.layers[-1].blocks[-1].drop_path
        drop_path.register_forward_pre_hook(lambda module, _: self.seen.append((module.training, module.p)))


def test_vmamba_run_trains_with_drop_path_on_and_the_adapter_reloads(vtab, tmp_path):
    """`--model tiny-vmamba` loads the VMamba; its stochastic depth (0.1 at the last block of tiny-vmamba, the
    paper's rule: the backbone's rate stays on) is active while training and recorded; the adapter reloads."""
    from mambapeft.model.vmamba.loading import load_vmamba
    from mambapeft.model.vmamba.modeling import VMamba

    probe, keep = DropPathProbe(), KeepModel()
    results = fine_tune_vision(config(vtab, tmp_path, model="tiny-vmamba", method=["lora_x_proj:r=2"], epochs=1.0),
                               callbacks=[probe, keep], log=lambda _: None)
    assert isinstance(keep.model.base_model, VMamba)
    assert results["steps"] == 4 and results["drop_path"] == pytest.approx(0.1)
    training = [p for is_training, p in probe.seen if is_training]
    assert len(training) == 2 * 4 and training == [pytest.approx(0.1)] * 8    # 2 calls a block forward, 4 steps
    # trainable: per SS2D and direction r (E + R + 2N) (lora_x_proj), plus the 2-class head (8d + 1) x 2
    base = load_vmamba("tiny-vmamba", num_classes=2)
    lora = sum(4 * 2 * (m.d_inner + m.dt_rank + 2 * m.d_state) for m in base.peft_mixers())
    assert results["parameters"]["trainable"] == lora + (base.config.num_features + 1) * 2
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, keep.model.eval()(pixel_values=x).logits,
                                   rtol=0, atol=0)


def test_search_on_tiny_vmamba(vtab, tmp_path, capsys):
    """`mambapeft search --task vision --model tiny-vmamba`: the default space leaves out what VMamba lacks; a tiny
    search (2 + 1 trials of 4 steps) runs and its best config names the VMamba."""
    import yaml

    from mambapeft.cli.main import main
    from mambapeft.cli.search import default_space, load_run_config

    kind, base, _, _ = load_run_config(None, "vision", None, "tiny-vmamba")
    assert base.model == "tiny-vmamba" and kind.is_builtin_model(base)
    notes = []
    space = default_space(kind, base, log=notes.append)
    assert not {"prompt", "lora_p_z", "partial_cls_token", "partial_pos_embed"} & set(space.step1)
    assert {"lora_p_x", "additional_scan", "affix"} <= set(space.step1)
    assert "lora_p_z" in notes[0] and "partial_cls_token" in notes[0]

    run = _run_file(vtab, tmp_path, tmp_path / "unused", model="tiny-vmamba", eval_epochs=0.5)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "step1": {"trials": 2, "methods": {"lora_p_x": {"r": 2}, "partial_d": {}}},
        "step2": {"trials": 1, "methods": {"partial_d": {"lr": {"log": [1e-3, 1e-2]}}}}}))
    out = tmp_path / "search"
    assert main(["search", "--config", str(run), "--space", str(space_file), "--output-dir", str(out),
                 "--no-prune", "--no-final"]) == 0
    trials = [json.loads(p.read_text()) for p in out.glob("trials/*/task0/run_config.json")]
    assert len(trials) >= 2 and all(t["model"] == "tiny-vmamba" for t in trials)
    assert json.loads((out / "best_config.json").read_text())["model"] == "tiny-vmamba"
