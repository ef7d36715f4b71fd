"""The offline English text of the built-in model and task: the documentation topics every Python carries.

`pydoc_data.topics` (about 465 KB in Python 3.11) is split by topic name, deterministically: the topics
in `TASK_TOPICS` make the built-in downstream task (scripts/make_builtin_task.py) and nothing else; all
other topics are the pretraining text of the built-in tiny Mamba (scripts/pretrain_tiny_lm.py). So the
model never saw, in pretraining, a word of the passages it is asked about in the task.
"""

from __future__ import annotations

import re

# topic name -> the label the task asks the model to name (no "/" inside: labels are listed "a/b/c/d")
TASK_TOPICS = {
    "debugger": "debugger",
    "formatstrings": "format strings",
    "string-methods": "string methods",
    "typesmapping": "dictionaries",
    "import": "import statement",
    "try": "exceptions",
    "execmodel": "execution model",
    "assignment": "assignment",
}


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def pretraining_topics() -> list[str]:
    """Sorted names of the topics the built-in model is pretrained on (all but the task's)."""
    return sorted(name for name in _topics() if name not in TASK_TOPICS)


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def pretraining_documents() -> list[str]:
    """One document per pretraining topic, in sorted topic order, without the paragraphs it shares with a task topic.

    Topics repeat each other ("compound" holds all of "try", "execmodel" all of "naming"), so leaving out the task
    topics is not enough: every paragraph that also occurs in a task topic is dropped as well.
    """
    topics = _topics()
    held_out = " | ".join(_fold(topics[name]) for name in TASK_TOPICS if name in topics)
    documents = []
    for name in pretraining_topics():
        paragraphs = [par for par in re.split(r"\n\s*\n", topics[name].strip()) if _fold(par) not in held_out]
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
    return documents


def task_passages(words_per_passage: int = 30) -> dict[str, list[str]]:
    """label -> consecutive passages of `words_per_passage` words of that held-out topic (whitespace folded)."""
    topics = _topics()
    missing = [name for name in TASK_TOPICS if name not in topics]
    if missing:
        raise RuntimeError(f"this Python's pydoc_data has no topics {missing}; the built-in task needs them")
    out = {}
    for name, label in TASK_TOPICS.items():
        words = _fold(topics[name]).split(" ")
        out[label] = [" ".join(words[i:i + words_per_passage])
                      for i in range(0, len(words) - words_per_passage + 1, words_per_passage)]
    return out
