"""Fine-tuning on transformers' Trainer: what a PEFT model needs changed, and nothing else.

The Trainer keeps the loop (AdamW steps, warm-up and decay, gradient accumulation, clipping, bf16 autocast on
GPU, periodic checkpoints with optimiser, scheduler and RNG states, resuming, the progress bar, TensorBoard,
best-checkpoint tracking, and multi-GPU through `accelerate launch` / `torchrun`). `PeftTrainer` changes:
  * the optimiser: AdamW over `PeftModel.parameter_groups` (per-method learning rate and weight decay);
  * checkpoints hold the adapter only (PeftModel.save_pretrained), and resuming / loading the best reads it back;
  * the NaN guard: a loss, a gradient or an updated parameter that is not finite stops the run, naming the last good
    checkpoint (finite adapter tensors and validation loss, and not the one the bad step started from) or saying
    plainly that there is none;
  * evaluation adds multiple-choice accuracy on the validation items, when they have choices.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import ProgressCallback, Trainer, TrainerCallback

from ..errors import MambaPeftError
from ..peft import ADAPTER_WEIGHTS


class TrainingDiverged(MambaPeftError):
    """The loss became NaN or infinite; the run stopped."""


def complete_checkpoints(output_dir) -> list[Path]:
    """checkpoint-N folders whose trainer state was written (the Trainer writes it last), by step."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        state = path / "trainer_state.json"
        if (path.is_dir() and path.name.split("-")[-1].isdigit() and state.is_file()
                and (path / ADAPTER_WEIGHTS).is_file()):
            try:
                json.loads(state.read_text())
            except json.JSONDecodeError:
                continue                       # killed while writing it
            found.append(path)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def is_good_checkpoint(path: Path) -> bool:
    """Finite adapter tensors, and a finite validation loss where the run evaluated at that step."""
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception:
        return False
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        return False
    step = checkpoint_step(path)
    for record in state.get("log_history", []):
        if record.get("step") == step:
            for key, value in record.items():
                if key.startswith("eval_") and isinstance(value, (int, float)) and not math.isfinite(value):
                    return False
    return True


def last_good_checkpoint(output_dir, before_step: int | None = None) -> Path | None:
    """The newest complete, good checkpoint, saved before `before_step` (a failed step's start is not good)."""
    for path in reversed(complete_checkpoints(output_dir)):
        if before_step is not None and checkpoint_step(path) >= before_step:
            continue
        if is_good_checkpoint(path):
            return path
    return None


def diverged(what: str, step: int, output_dir, lr: float) -> TrainingDiverged:
    """The NaN guard's error: what went wrong where, and which checkpoint (if any) is worth keeping."""
    good = last_good_checkpoint(output_dir, before_step=step - 1)
    saved = complete_checkpoints(output_dir)
    if good is not None:
        kept = (f"The last good checkpoint is {good} (finite weights and validation loss); "
                f"`mambapeft eval --adapter {good}` scores it.")
    elif saved:
        kept = (f"No checkpoint of this run is good: {', '.join(p.name for p in saved)} hold non-finite weights or a "
                f"non-finite validation loss, or started the bad step.")
    else:
        kept = "No checkpoint had been saved yet."
    return TrainingDiverged(
        f"{what} at step {step}; the run stopped before that update. {kept} Lower the learning rate (this run: "
        f"{lr:g}) or raise warmup_steps, and train again with --overwrite.")


class PeftTrainer(Trainer):
    def __init__(self, *args, mc_items=None, tokenizer=None, flat_decay: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.flat_decay = flat_decay
        self.mc_items = mc_items or []
        self.mc_tokenizer = tokenizer
        callbacks = self.callback_handler.callbacks
        progress = next((c for c in callbacks if isinstance(c, ProgressCallback)), None)
        for callback in callbacks:
            if isinstance(callback, MethodPhases):
                callback.progress = progress

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' schedule, except when a method runs a phase as a run of its own (SDT with restart): then
        the schedule runs once over that phase and again, from its start, over the rest of the run."""
        first = self.model.extra_steps() if hasattr(self.model, "extra_steps") else 0
        if self.lr_scheduler is None and first:
            from torch.optim.lr_scheduler import LambdaLR

            warmup = self.args.get_warmup_steps(num_training_steps - first)
            kind = self.args.lr_scheduler_type
            kind = getattr(kind, "value", kind)
            phase1 = schedule(kind, min(warmup, first // 2), first)
            phase2 = schedule(kind, warmup, num_training_steps - first)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                         lambda step: phase1(step) if step < first else phase2(step - first))
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.model.parameter_groups(self.args.learning_rate, self.args.weight_decay, self.flat_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1,
                                               self.args.adam_beta2), eps=self.args.adam_epsilon)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            labels = inputs.get("labels")
            if num_items_in_batch == 0 or (labels is not None and not (labels[:, 1:] != -100).any()):
                raise TrainingDiverged(
                    f"step {self.state.global_step + 1}'s batch has no token to learn (every label is cut away or "
                    f"masked), so its loss is over zero tokens. Raise max_length or set train_on_prompt=true, and "
                    f"train again with --overwrite")
            raise diverged(f"the training loss became {loss.item()}", self.state.global_step + 1,
                           self.args.output_dir, self.args.learning_rate)
        return result

    # ---------------------------------------------------------------- adapter-only checkpoints

    def _save(self, output_dir=None, state_dict=None):
        # in place: under data parallelism the other processes write their RNG states into the same folder meanwhile
        self.model.save_pretrained(output_dir or self.args.output_dir, in_place=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.model.load_adapter_weights(Path(resume_from_checkpoint) / ADAPTER_WEIGHTS)

    def _load_best_model(self):
        self.model.load_adapter_weights(Path(self.state.best_model_checkpoint) / ADAPTER_WEIGHTS)

    # ---------------------------------------------------------------- validation accuracy

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The validation loss, plus multiple-choice acc / acc_norm when the validation set has choices: added
        here, inside the loop, so the log, the callbacks (the search's pruning) and best-checkpoint selection
        all see them with the loss."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.mc_items:
            from ..evaluation.multiple_choice import score_items

            scores = score_items(self.model, self.mc_tokenizer, self.mc_items,
                                 batch_size=self.args.per_device_eval_batch_size)
            output.metrics.update({f"{metric_key_prefix}_acc": scores["acc"],
                                   f"{metric_key_prefix}_acc_norm": scores["acc_norm"]})
        return output


def world_size() -> int:
    """Processes training together (torchrun / accelerate launch set WORLD_SIZE); 1 otherwise."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """Rank 0 writes the run's files; the other processes only train."""
    return int(os.environ.get("RANK", "0")) == 0


def schedule(kind: str, warmup: int, total: int):
    """The learning-rate factor at a step: linear warm-up, then linear or cosine decay to 0 (or constant), as
    transformers' schedulers of those names."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0
    return factor


def trainer_arguments(config, *, lr: float, warmup_steps: int, eval_steps: int, has_validation: bool, metric: str,
                      report_to="none", max_steps: int | None = None):
    """transformers' TrainingArguments from the fields the language and vision configs share, plus what each run
    derives itself (its rate, warm-up and evaluation interval in steps, its metric)."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.batch_size // (config.micro_batch_size * world_size()),
        learning_rate=lr,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if max_steps is None else max_steps,
        lr_scheduler_type=config.scheduler if config.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=warmup_steps,
        max_grad_norm=config.max_grad_norm,              # 0: no clipping (transformers clips only above 0)
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_validation,
        metric_for_best_model=metric,
        greater_is_better=metric != "eval_loss",
        seed=config.seed,
        bf16=cuda if config.bf16 is None else config.bf16,
        use_cpu=not cuda,
        report_to=report_to,
        label_names=["labels"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


class UpdateGuard(TrainerCallback):
    """The NaN guard's other half: gradients before each optimiser step and parameters after it must be finite
    (the loss is checked in PeftTrainer.compute_loss)."""

    @staticmethod
    def _bad(model, grads: bool) -> str | None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                t = p.grad if grads else p
                if t is not None and not torch.isfinite(t).all():
                    return name
        return None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if (name := self._bad(model, grads=True)) is not None:
            raise diverged(f"the gradient of {name} became non-finite", state.global_step + 1, args.output_dir,
                           args.learning_rate)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if (name := self._bad(model, grads=False)) is not None:
            raise diverged(f"the update made {name} non-finite", state.global_step + 1, args.output_dir,
                           args.learning_rate)


class MethodPhases(TrainerCallback):
    """Tells methods with phases (SDT's warm-up, then its sparse phase) where training stands, and says so: a log
    line when the phase changes, and the phase as the progress bar's description (PeftTrainer hands us the bar).

    The run's length is checked against them before the first step (a warm-up as long as the run is an error).
    """

    def __init__(self, log=print):
        self.log, self.phase, self.progress = log, "", None

    def _show(self) -> None:
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None and self.phase and bar.desc != self.phase:
            bar.set_description(self.phase)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.phase = model.phase()
        if self.phase:
            self.log(f"phase at step {state.global_step}: {self.phase}")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model.on_step_end(state.global_step):
            if optimizer is not None:
                optimizer.state.clear()               # a fresh optimiser for the next phase (its groups stay)
            self.log(f"restart at step {state.global_step}: the other methods back at their initial values, a fresh "
                     f"optimiser, the learning-rate schedule from its start")
        if model.phase() != self.phase:
            self.phase = model.phase()
            self.log(f"phase from step {state.global_step}: {self.phase}")
        self._show()


class JsonlMetrics(TrainerCallback):
    """Appends every log (training loss, learning rate, validation metrics) to metrics.jsonl, one object a line.

    On resume, lines logged after the checkpoint being resumed are dropped, so the file reads as one run.
    """

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                       for k, v in (logs or {}).items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
