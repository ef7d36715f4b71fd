"""The search report: a table of trials, Optuna's hyperparameter importances, and two PNG plots.

    report/trials.csv, report/trials.md      every trial of both steps: methods, settings, trainable, score, state
    report/importances.json                  per step, Optuna's fANOVA importances (when enough trials finished)
    report/history.png                       optimisation history of both steps
    report/pareto.png                        validation score against trainable parameters, Pareto front marked
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState


def trial_rows(study: optuna.Study, step: int) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        config = t.user_attrs.get("config", [])
        settings = "; ".join(
            f"{c['method']}(" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in c.items() if k != "method" and v is not None) + ")"
            for c in config)
        rows.append({
            "step": step,
            "trial": t.number,
            "state": t.state.name.lower(),
            "methods": " + ".join(t.user_attrs.get("methods", [])) or "(none)",
            "removed": t.user_attrs.get("removed", ""),
            "settings": settings,
            "trainable": t.user_attrs.get("trainable", ""),
            "score": "" if t.value is None else round(t.value, 6),
            "seconds": round(t.duration.total_seconds(), 1) if t.duration else "",
        })
    return rows


def importances(study: optuna.Study) -> dict:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or len({tuple(sorted(t.params.items())) for t in complete}) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):                     # too few distinct values for the evaluator
        return {}


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Points not beaten by another with fewer (or equal) parameters and a higher (or equal) score."""
    front, best = [], float("-inf")
    for params, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((params, score))
            best = score
    return front


def write_report(folder, studies: dict[int, optuna.Study]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for step, study in sorted(studies.items()) for row in trial_rows(study, step)]
    columns = list(rows[0]) if rows else ["step", "trial", "state", "methods", "score"]
    with open(folder / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    (folder / "importances.json").write_text(json.dumps(
        {f"step{step}": importances(study) for step, study in studies.items()}, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for step, study in sorted(studies.items()):
        done = list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        xs = [offset + t.number for t in done]
        ys = [t.value for t in done]
        ax.scatter(xs, ys, s=18, label=f"step {step} trials")
        best, running = [], float("-inf")
        for t in sorted(done, key=lambda t: t.number):
            running = max(running, t.value)
            best.append(running)
        ax.step(sorted(xs), best, where="post", label=f"step {step} best so far")
        offset += len(study.get_trials(deepcopy=False))
    ax.set_xlabel("trial (step 2 follows step 1)")
    ax.set_ylabel("validation score")
    ax.set_title("HybridPEFT optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "history.png", dpi=110)
    plt.close(fig)

    points = [(int(r["trainable"]), float(r["score"])) for r in rows
              if r["state"] == "complete" and r["trainable"] != "" and r["score"] != ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=18, alpha=0.6, label="trials")
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "r-o", ms=4, label="Pareto front")
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation score")
    ax.set_title("Score against trainable parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    plt.close(fig)
    return folder
