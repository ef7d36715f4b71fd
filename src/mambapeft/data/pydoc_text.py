"""The offline English text of the built-in model and task: what every Python installation carries.

`pydoc_data.topics` (about 465 KB in Python 3.11) is split by topic name, deterministically: the topics
in `TASK_TOPICS` make the built-in downstream task (scripts/make_builtin_task.py) and nothing else; all
other topics, plus the docstrings of the standard library's own modules (about 1.5 MB), are the pretraining
text of the built-in tiny Mamba (scripts/pretrain_tiny_lm.py). Any pretraining paragraph or docstring that
shares a run of SHARED_WORDS words with a task topic is dropped, so the model never read the task's passages.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

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


SHARED_WORDS = 8          # a pretraining paragraph sharing this many consecutive words with the task text is dropped
SKIPPED_PACKAGES = {"site-packages", "test", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip"}


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _fold(text).split(" ")
    return {tuple(words[i:i + SHARED_WORDS]) for i in range(len(words) - SHARED_WORDS + 1)}


def _task_shingles() -> set[tuple[str, ...]]:
    topics = _topics()
    return set().union(*(_shingles(topics[name]) for name in TASK_TOPICS if name in topics))


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings (8 words or more) of the standard library's .py files, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIPPED_PACKAGES or "tests" in parts or "test" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    out.append(doc)
    return out


def pretraining_documents() -> list[str]:
    """The pretraining text: one document per non-task topic (sorted), then one per stdlib docstring.

    Topics repeat each other ("compound" holds all of "try", "execmodel" all of "naming"), so leaving out the task
    topics is not enough: every paragraph (or docstring) sharing SHARED_WORDS consecutive words with a task topic,
    alone or joined to the kept text before it, is dropped as well.
    """
    topics = _topics()
    held_out = _task_shingles()
    documents = []
    for name in pretraining_topics():
        kept, tail = [], []                                     # tail: the last words of the kept text
        for par in re.split(r"\n\s*\n", topics[name].strip()):
            if not _shingles(" ".join(tail) + " " + par) & held_out:   # joined to the text before it: headings
                kept.append(par)                                        # and list items are shorter than a shingle
                tail = (tail + _fold(par).split(" "))[1 - SHARED_WORDS:]
        if kept:
            documents.append("\n\n".join(kept))
    documents += [doc for doc in stdlib_docstrings() if not _shingles(doc) & held_out]
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
