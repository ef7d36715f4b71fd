"""Builds the built-in task (src/mambapeft/assets/pydoc-topics/{train,validation,test}.json), deterministically.

    .venv/bin/python scripts/make_builtin_task.py

"Which topic of the Python documentation is this passage from?" — four choices, chance 25%. Passages are
25-word spans of the documentation topics held out from the built-in model's pretraining
(mambapeft.data.pydoc_text.TASK_TOPICS: 8 topics, each with a readable label). Per label, 44 passages evenly
spaced through the topic give 8 validation and 14 test examples; up to 48 of the remaining passages give the
training examples; no passage appears in two splits. A record is in LLM-Adapters' commonsense format: the
instruction names the four candidate labels in an "Answer format: a/b/c/d" line (gold at a random position)
and ends with the passage (closest to the answer, which a small recurrent model needs), the output is
"the correct answer is <label>", the answer is the label.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mambapeft.data.pydoc_text import task_passages  # noqa: E402

HELD = 44                            # evenly spaced passages per label for validation and test (smallest topic: 46)
SPLIT = {"validation": 8, "test": 14}
TRAIN_CAP = 48                       # at most this many of the other passages per label for training
WORDS = 25                           # words per passage
QUESTION = "Which topic of the Python documentation is this passage from?"


def record(passage: str, label: str, labels: list[str], rng: random.Random) -> dict:
    choices = [label] + rng.sample([x for x in labels if x != label], 3)
    rng.shuffle(choices)
    return {"instruction": f"{QUESTION}\nAnswer format: {'/'.join(choices)}\n\nPassage: {passage}",
            "input": "", "output": f"the correct answer is {label}", "answer": label}


def build(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    passages = task_passages(WORDS)
    labels = sorted(passages)
    splits = {"train": [], **{name: [] for name in SPLIT}}
    for label in labels:
        found = passages[label]
        if len(found) < HELD:
            raise RuntimeError(f"topic {label!r} has only {len(found)} passages, the task needs {HELD}")
        step = len(found) / HELD
        spaced = [int(i * step) for i in range(HELD)]
        rng.shuffle(spaced)
        start = 0
        for name, n in SPLIT.items():
            splits[name] += [record(found[i], label, labels, rng) for i in spaced[start:start + n]]
            start += n
        held = set(spaced[:start])
        rest = [p for i, p in enumerate(found) if i not in held]
        splits["train"] += [record(p, label, labels, rng) for p in rest[:TRAIN_CAP]]
    for items in splits.values():
        rng.shuffle(items)
    return splits


def main() -> None:
    out = ROOT / "src/mambapeft/assets/pydoc-topics"
    out.mkdir(parents=True, exist_ok=True)
    for name, items in build().items():  # train, validation, test
        (out / f"{name}.json").write_text(json.dumps(items, indent=1) + "\n")
        print(f"{name}: {len(items)} examples")


if __name__ == "__main__":
    main()
