"""Multiple-choice evaluation sets: a context, candidate continuations, the index of the right one.

Scored as lm-evaluation-harness scores its multiple-choice tasks (mambapeft.evaluation.multiple_choice): the
request for choice i is (context, delimiter + choice_i).
Sources: a JSONL file of {"question" (or "context"), "choices": [...], "gold": index (or "answer": the
choice text)}, or instruction examples with choices (commonsense records): the context is the prompt plus
the output's text before the answer ("the correct answer is"), the choices the candidate answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .instructions import Example, load_examples, read_text


@dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "

    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


def items_from_examples(examples: list[Example], where: str = "the data") -> list[MCItem]:
    """Commonsense examples with an answer and choices -> MCItems; ConfigError when some have none."""
    items = []
    for i, ex in enumerate(examples):
        if ex.answer is None or not ex.choices:
            raise ConfigError(f"{where}: example {i} has no answer and choices (an 'answer' field plus "
                              f"'choices' or an 'Answer format: a/b/...' line), so it cannot be scored as "
                              f"multiple choice")
        pos = ex.response.rfind(ex.answer)
        lead = ex.response[:pos] if pos >= 0 else ""
        delimiter = " " if lead.endswith(" ") or not lead else ""
        items.append(MCItem(ex.prompt + lead.rstrip(" "), list(ex.choices), ex.choices.index(ex.answer), delimiter))
    return items


def load_mc_items(path) -> list[MCItem]:
    """A `.jsonl` of {question|context, choices, gold|answer}, or a commonsense `.json` (see above)."""
    path = Path(path)
    if path.suffix == ".json":
        return items_from_examples(load_examples(path), str(path))
    if not path.is_file():
        raise ConfigError(f"no evaluation file {path}")
    lines = [(n, line) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"{path} is empty: it needs at least one item")
    items = []
    for n, line in lines:
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where} must be an object with question, choices and gold")
        context = record.get("question", record.get("context"))
        choices = record.get("choices")
        if not isinstance(context, str):
            raise ConfigError(f"{where} has no 'question' (or 'context') string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: 'choices' must be a list of at least two strings")
        if "gold" in record:
            gold = record["gold"]
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
                raise ConfigError(f"{where}: gold {gold!r} is not an index of its {len(choices)} choices")
        elif "answer" in record:
            if record["answer"] not in choices:
                raise ConfigError(f"{where}: the answer {record['answer']!r} is not among its choices {choices}")
            gold = choices.index(record["answer"])
        else:
            raise ConfigError(f"{where} has no 'gold' (index) or 'answer' (choice text) field")
        items.append(MCItem(context, choices, gold))
    return items
