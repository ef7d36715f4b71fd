"""The search's objective: fine-tune a configuration on every task and average the validation scores.

Each trial is an ordinary `mambapeft train` run (`fine_tune`, for any task kind: the same Trainer, data and
evaluation) with the trial's methods, in its own folder, on the trial budget (the base run config with the `trial`
overrides, e.g. fewer steps); the score of a task is its best validation accuracy (validation loss, negated, where the
validation set has no choices to score). Test sets are left out of the trials: only the final best configuration is
trained with the base run's full recipe and scored on them (`final_config`). Vision trials use the VTAB "search"
split (train800, validation val200) as the paper does; the final run trains on train800val200.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from ..config.spec import MethodSpec
from ..train.config import RunConfig
from ..train.run import fine_tune
from ..train.tasks import get_task


class _ReportEvaluations(TrainerCallback):
    """Passes each validation score to the search (for pruning) as it is measured, at the step counted over all
    tasks so far (task i's steps follow task i-1's), so pruners compare trials at equal training done."""

    def __init__(self, report: Callable[[int, float], None], task_index: int):
        self.report, self.task_index, self.offset = report, task_index, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.offset = self.task_index * state.max_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            self.report(self.offset + state.global_step, score_of(metrics))


def score_of(metrics: dict) -> float:
    if "eval_acc" in metrics:
        return float(metrics["eval_acc"])
    return -float(metrics["eval_loss"])


class TrainingObjective:
    """Scores method specs by training `base` (a TrainConfig or VisionTrainConfig) on each task; tasks override
    its data fields ({data, val_data, test_data} or, for vision, {vtab_task, data_root})."""

    def __init__(self, base: RunConfig, tasks: list[dict], folder, log=print, trial: dict | None = None):
        self.base, self.tasks, self.folder, self.log = base, tasks or [{}], Path(folder), log
        self.trial = dict(trial or {})          # the trial budget: overrides of the base run (max_steps, epochs, ...)
        self.kind = get_task(base.kind)

    def task_config(self, specs: list[MethodSpec], task: dict, output_dir: Path, with_test: bool) -> RunConfig:
        """A trial's run (the trial budget, validation only) or, with_test, the final run (the full recipe)."""
        budget = {} if with_test else self.trial
        values = {**self.base.to_dict(), **budget, **task, "method": [spec_text(s) for s in specs],
                  "output_dir": str(output_dir)}
        return type(self.base).from_dict(self.kind.search_trial_values(values, with_test), where="a search trial")

    def __call__(self, specs: list[MethodSpec], report, tag: str = "trial") -> dict:
        scores, trainable, ran = [], None, None
        for i, task in enumerate(self.tasks):
            out = self.folder / "trials" / tag / f"task{i}"
            config = self.task_config(specs, task, out, with_test=False)
            result = fine_tune(config, callbacks=[_ReportEvaluations(report, i)], overwrite=True, log=lambda *_: None)
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)      # the trial's adapter/ stays; its checkpoints go
            best = result.get("best_validation")
            if best is None:
                raise RuntimeError(f"trial {tag}: the run on task {i} has no validation score; give validation data")
            scores.append(best if result.get("metric", "eval_acc") == "eval_acc" else -best)
            trainable = result["parameters"]["trainable"]
            ran = ran or ran_config(result)
        return {"score": sum(scores) / len(scores), "task_scores": scores, "trainable": trainable, "config": ran}


def ran_config(result: dict) -> list[dict]:
    """The methods as the run trained them: every learning rate and decay the run filled in written out."""
    return [{**m, "lr": m["lr"] if m["lr"] is not None else result["run_lr"],
             "weight_decay": m["weight_decay"] if m["weight_decay"] is not None else result["run_weight_decay"]}
            for m in result["methods"]]


def spec_text(spec: MethodSpec) -> str:
    """`id:key=value,...` with every option written out, so a spec survives any change of defaults."""
    options = ",".join(f"{k}={v}" for k, v in spec.to_dict().items() if k != "method" and v is not None)
    return spec.method + (":" + options if options else "")


def final_config(objective: TrainingObjective, config: list[dict], task: dict, output_dir) -> RunConfig:
    """The run config of the best configuration on one task, with its test set: what `train --config` takes."""
    specs = [MethodSpec.from_dict(c) for c in config]
    return objective.task_config(specs, task, Path(output_dir), with_test=True)

