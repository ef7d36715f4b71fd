"""The vision task kind: a Vision Mamba or a VMamba fine-tuned on a VTAB-1k task (the paper's recipe), on the same
pipeline.

Recipe (paper, VTAB-1k): AdamW lr 1e-3, weight decay 1e-4, batch 32, 100 epochs with 10 warm-up epochs then cosine
decay, gradient clipping 5, the classification head always trained (`linear_probe` is added to the methods), top-1
accuracy. Stochastic depth stays on while fine-tuning, at the model's paper rate (Vim 0.1; VMamba the backbone's
pretraining rate, 0.3 for S and 0.6 for B, as MambaPEFT's VMamba configs keep it); `drop_path` overrides it and the
run's config records the rate used. The model's family (Vim or VMamba) is the one the family registry finds for
its name, folder or .pth (model/registry.py).

`split`: "final" trains on train800val200 and reports test (what the paper reports); "search" trains on train800 and
keeps the checkpoint with the best val200 accuracy (for choosing hyper-parameters), then reports test. The built-in
default (tiny-vim or tiny-vmamba on digits_rotation) is shorter, at a higher rate: BUILTIN_VISION_DEFAULTS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..options import option
from .config import RunConfig, default_of
from .tasks import Prepared, TaskKind, task_kind

SPLIT_MODES = {"final": ("train800val200", None), "search": ("train800", "val200")}   # mode -> (train, validation)
HEAD_METHODS = ("full", "linear_probe")
BUILTIN_VIM = "tiny-vim"
BUILTIN_MODELS = (BUILTIN_VIM, "tiny-vmamba")      # the built-in models the built-in demo's defaults are for


@dataclass
class VisionTrainConfig(RunConfig):
    kind = "vision"

    model: str = default_of("model", BUILTIN_VIM, "(vision: a Vim or a VMamba: 'tiny-vim' or 'tiny-vmamba' built in, "
                                 "a save_vim / save_vmamba folder, a .pth)")
    method: list[str] = default_of("method", ["lora_p_x:r=8"],
                                   "(vision: linear_probe, the head, is added unless full or linear_probe is given)")
    output_dir: str = default_of("output_dir", "runs/vision")
    epochs: float = default_of("epochs", 100.0, "(vision paper recipe: 100)")
    batch_size: int = default_of("batch_size", 32)
    micro_batch_size: int = default_of("micro_batch_size", 32)
    lr: float = default_of("lr", 1e-3, "(vision paper recipe: 1e-3)")
    weight_decay: float = default_of("weight_decay", 1e-4)
    scheduler: str = default_of("scheduler", "cosine")
    max_grad_norm: float = default_of("max_grad_norm", 5.0)
    logging_steps: int = default_of("logging_steps", 20)
    eval_batch_size: int = default_of("eval_batch_size", 128)
    flat_decay: bool = default_of("flat_decay", False, "(vision: false, the official recipe)")
    data_root: str | None = option(None, "VTAB-1k root holding <task>/ folders (default: the built-in tiny root)")
    vtab_task: str = option("digits_rotation",
                            "task folder under data_root with train800/val200/train800val200/test.txt")
    num_classes: int | None = option(None, "classes of the task (needed for a task that is not one of the 19 of "
                                     "VTAB-1k; every label is checked against it)", minimum=1)
    split: str = option("final", "final: train on train800val200, report test; search: train on train800, "
                        "pick the best checkpoint on val200, report test", choices=tuple(SPLIT_MODES))
    image_size: int | None = option(None, "input resolution (default: the model's)", minimum=8)
    warmup_epochs: float = option(10.0, "linear warm-up epochs before the cosine decay (paper: 10)", minimum=0)
    eval_epochs: float = option(5.0, "evaluate (search split) and save a checkpoint every this many epochs",
                                exclusive_minimum=0)
    drop_path: float | None = option(None, "stochastic depth while fine-tuning, rising over the blocks to this rate "
                                     "(default: the paper's recipe for the model: Vim 0.1, VMamba S 0.3, B 0.6)",
                                     minimum=0, maximum=0.99)


# The built-in demo: tiny-vim on digits_rotation; 20 epochs with 2 warm-up epochs (~640 steps) instead of 100/10,
# and lr 5e-3 (measured, 1 thread: lora_p_x r8 + head 68.8% test at 1e-3 vs 83.1% at 5e-3 in 20 epochs).
BUILTIN_VISION_DEFAULTS = dict(epochs=20.0, warmup_epochs=2.0, eval_epochs=5.0, lr=5e-3)


def resolve_vision_config(values: dict | None = None, where: str = "the command line") -> VisionTrainConfig:
    """Given values (None = not given), then the built-in defaults when the run is the built-in task."""
    return VisionTask().resolve(values, where)


def with_head(methods: list[str], log=print, why: str = "the classification head is always trained in VTAB PEFT"
              ) -> list[str]:
    """The methods plus linear_probe (VTAB PEFT always trains the fresh head) unless full or linear_probe is there."""
    names = [m.split(":")[0].split("/")[-1] for m in methods]
    if any(n in HEAD_METHODS for n in names):
        return list(methods)
    log(f"note: adding linear_probe ({why})")
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
    classes = task_classes(root, config.vtab_task, config.num_classes)
    train_name, val_name = SPLIT_MODES[config.split]
    kwargs = dict(image_size=image_size, num_classes=classes, cache=True)
    train = vtab_split(root, config.vtab_task, train_name, **kwargs)
    val = vtab_split(root, config.vtab_task, val_name, **kwargs) if val_name else None
    test = vtab_split(root, config.vtab_task, "test", **kwargs)
    return train, val, test, classes


@task_kind
class VisionTask(TaskKind):
    name = "vision"
    Config = VisionTrainConfig
    builtin_defaults = BUILTIN_VISION_DEFAULTS
    # the built-in vision demo: tiny-vim on digits_rotation, 5 epochs a trial (about 20 s each on two CPU cores)
    search_builtin_trial = dict(epochs=5.0, warmup_epochs=1.0, eval_epochs=1.0, save_total_limit=1)
    search_builtin_methods = ("lora_p_x", "lora_in_proj", "lora_out_proj", "partial_a", "partial_d",
                              "partial_cls_token", "partial_pos_embed", "additional_scan", "affix", "sdt")
    search_vision_methods = True

    def is_builtin(self, values: dict) -> bool:
        return values.get("data_root") is None and values.get("model", BUILTIN_VIM) in (*BUILTIN_MODELS, "builtin")

    def resolve(self, values=None, where="the command line"):
        values = dict(values or {})
        if values.get("model") == "builtin":
            values["model"] = BUILTIN_VIM
        return super().resolve(values, where)

    def is_builtin_model(self, config) -> bool:
        return config.model in BUILTIN_MODELS and config.data_root is None

    def output_dir_data(self, values: dict) -> list[str]:
        return [] if values.get("data_root") is None else [str(values.get("vtab_task", "digits_rotation"))]

    def prepare(self, config: VisionTrainConfig, log=print) -> Prepared:
        from ..config import PeftConfig
        from ..data.images import collate_images
        from ..peft import guess_arch

        model = self.load_model(config.model, img_size=config.image_size)
        train_set, val_set, test_set, classes = prepare_vision_data(config, model.config.img_size)
        torch.manual_seed(config.seed)
        model.reset_head(classes)                 # always a fresh head for the task, even with the same class count
        rate = config.drop_path if config.drop_path is not None else model.paper_drop_path
        model.set_drop_path(rate)
        log(f"data: {config.vtab_task}, {len(train_set)} training images, {len(val_set) if val_set else 0} "
            f"validation, {len(test_set)} test; {classes} classes, {model.config.img_size} px")
        steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
        return Prepared(
            model=model, peft_config=PeftConfig.parse(with_head(config.method, log), arch=guess_arch(model)),
            train_set=train_set, val_set=val_set,
            trainer_kwargs=dict(data_collator=collate_images, compute_metrics=_accuracy_metric,
                                preprocess_logits_for_metrics=_logits_only),
            lr=config.lr, warmup_steps=math.ceil(config.warmup_epochs * steps_per_epoch),
            eval_steps=max(1, round(config.eval_epochs * steps_per_epoch)), metric="eval_acc",
            describe={"model": config.model, "vtab_task": config.vtab_task, "split": config.split, "classes": classes,
                      "drop_path": rate},
            test=test_set)

    def score_test(self, model, prepared: Prepared, config: VisionTrainConfig) -> dict:
        return {"acc": accuracy(model, prepared.test, config.eval_batch_size), "n": len(prepared.test)}

    def search_trial_values(self, values: dict, with_test: bool) -> dict:
        return {**values, "split": "final" if with_test else "search"}
