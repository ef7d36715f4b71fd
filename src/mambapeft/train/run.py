"""One fine-tuning run, for every task kind: check everything, then lock the folder, then train and score.

    1. the task kind loads and checks the model, the data and the methods (nothing on disk changes yet; any problem
       is a ConfigError / CheckpointError naming the file or option and the way out);
    2. the run folder is locked and readied (train/run_folder.py: an earlier run is refused unless --resume or
       --overwrite), and run_config.json written;
    3. zero-shot test score, the methods attached, training on transformers' Trainer (train/trainer.py), the best
       adapter saved, the test score again.

Outputs in config.output_dir: run_config.json, checkpoint-N/ (adapter, optimiser, scheduler, RNG and trainer state),
metrics.jsonl, adapter/ (the best adapter, or the last when there is no validation set) and results.json.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import ConfigError
from ..methods import REGISTRY
from ..outputs import check_writable
from ..peft import check_combination, check_methods, get_peft_model
from .config import RunConfig
from .run_folder import RunFolder, write_atomic
from .tasks import Prepared, get_task, total_steps


def check_run(config: RunConfig, prepared: Prepared) -> None:
    """The methods' combination and fit to the model, phased methods against the run's length, the batch against the
    processes training together (data parallel: batch_size = micro_batch_size x accumulation x processes)."""
    from .trainer import world_size

    world = world_size()
    if config.batch_size % (config.micro_batch_size * world):
        raise ConfigError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                          f"{config.micro_batch_size} x {world} processes; the effective batch is micro_batch_size x "
                          f"gradient accumulation x processes")
    methods = [REGISTRY[spec.method](spec.config) for spec in prepared.peft_config.methods]
    check_combination(methods)
    check_methods(prepared.model, methods)
    if config.base_dtype != "float32" and any(m.name == "full" for m in methods):
        raise ConfigError(f"base_dtype {config.base_dtype}: `full` trains every base weight, so none stays frozen to "
                          f"store narrow; use float32 with full fine-tuning")
    steps = total_steps(config, len(prepared.train_set))
    for method in methods:
        method.check_training(steps)


def fine_tune(config: RunConfig | dict, *, resume: bool = False, overwrite: bool = False, callbacks=(),
              log=print) -> dict:
    """Runs `config` (a dict goes through its task kind's defaults); returns the results (also in results.json).

    Under torchrun / accelerate launch every process trains and only rank 0 touches the run folder, scores and writes.
    """
    from .trainer import (
        JsonlMetrics,
        MethodPhases,
        PeftTrainer,
        UpdateGuard,
        is_main_process,
        trainer_arguments,
        world_size,
    )

    if isinstance(config, dict):
        config = get_task(config.get("task")).resolve({k: v for k, v in config.items() if k != "task"}, "the config")
    task = get_task(config.kind)
    start = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    main = is_main_process()
    if not main:
        log = _silent
    check_writable(config.output_dir, "--output-dir", folder=True)
    prepared = task.prepare(config, log)
    check_run(config, prepared)

    out = Path(config.output_dir)
    folder = RunFolder(out).open(config, resume=resume, overwrite=overwrite, log=log) if main else nullcontext()
    with folder:
        results = {**prepared.describe, "methods": prepared.peft_config.to_dict()["methods"], "run_lr": prepared.lr,
                   "run_weight_decay": config.weight_decay, "processes": world_size()}
        if not resume and main and (before := task.score_test(prepared.model, prepared, config)):
            results["zero_shot"] = before
            log(f"zero-shot test accuracy: {format_scores(before)}")

        peft = get_peft_model(prepared.model, prepared.peft_config, seed=config.seed)
        if config.gradient_checkpointing:
            peft.gradient_checkpointing_enable()
        if config.base_dtype != "float32":
            peft.store_base_as(config.base_dtype)
        counts = peft.parameter_counts()
        results["parameters"] = counts
        log(f"methods: {', '.join(str(s) for s in peft.peft_config.methods)}; trainable parameters "
            f"{counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.2f}%)")

        has_validation = prepared.val_set is not None
        extra = peft.extra_steps()                 # a warm-up run of its own (SDT restart) comes on top of the run
        max_steps = total_steps(config, len(prepared.train_set)) + extra if extra else None
        if extra:
            log(f"{extra} warm-up steps of their own, then the run's {max_steps - extra} steps: {max_steps} in all")
        trainer = PeftTrainer(
            model=peft,
            args=trainer_arguments(config, lr=prepared.lr, warmup_steps=prepared.warmup_steps,
                                   eval_steps=prepared.eval_steps, has_validation=has_validation,
                                   metric=prepared.metric, report_to=_report_to(), max_steps=max_steps),
            train_dataset=prepared.train_set,
            eval_dataset=prepared.val_set,
            callbacks=[JsonlMetrics(out / "metrics.jsonl"), MethodPhases(log), UpdateGuard(), *callbacks],
            flat_decay=config.flat_decay,
            **prepared.trainer_kwargs,
        )
        resume_from = str(_resume_point(out, log)) if resume else None
        if resume_from:
            log(f"resuming from {resume_from}")
        train_start = time.time()
        trainer.train(resume_from_checkpoint=resume_from)
        steps = trainer.state.global_step
        results["processes"] = trainer.args.world_size
        if not main:
            return {"steps": steps}
        peft.save_pretrained(out / "adapter")
        results.update(best_checkpoint=trainer.state.best_model_checkpoint, best_validation=trainer.state.best_metric,
                       metric=prepared.metric if has_validation else None, steps=steps,
                       seconds_per_step=round((time.time() - train_start) / max(1, steps), 4))
        if after := task.score_test(peft, prepared, config):
            results["fine_tuned"] = after
            before = results.get("zero_shot")
            log("test accuracy: " + (f"zero-shot {format_scores(before)} -> " if before else "")
                + f"fine-tuned {format_scores(after)}")
        results["wall_seconds"] = round(time.time() - start, 1)
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        log(f"adapter saved to {out / 'adapter'} ({results['wall_seconds']:.0f} s)")
    return results


def fine_tune_vision(config, **kwargs) -> dict:
    """`fine_tune` for a vision config or dict (kept for callers of the vision-only entry point)."""
    if isinstance(config, dict):
        config = {"task": "vision", **config}
    return fine_tune(config, **kwargs)


def _silent(*args, **kwargs) -> None:
    """The log of processes other than rank 0."""


def format_scores(scores: dict) -> str:
    text = f"{scores['acc']:.1%}"
    if "acc_norm" in scores:
        text += f" (acc_norm {scores['acc_norm']:.1%})"
    return text + (f", {scores['n']} items" if "n" in scores else "")


def _resume_point(out: Path, log) -> Path:
    """The newest good checkpoint (a diverged run's last ones are skipped, with a note)."""
    from .trainer import complete_checkpoints, last_good_checkpoint

    latest = complete_checkpoints(out)[-1]
    good = last_good_checkpoint(out)
    if good is None:
        raise ConfigError(f"--resume: every checkpoint in {out} holds non-finite weights or validation loss; "
                          f"train again with --overwrite and a lower learning rate")
    if good != latest:
        log(f"note: {latest.name} is not good (non-finite weights or validation loss); resuming from {good.name}")
    return good


def _report_to():
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return "none"
