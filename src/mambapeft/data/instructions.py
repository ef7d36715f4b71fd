"""Instruction data: LLM-Adapters' commonsense JSON and generic JSONL, read strictly into `Example`s.

Formats read (the file name's suffix decides):
  * `.json`: a JSON list of {"instruction", "input" (optional), "output", "answer" (optional)} records, the
    format of LLM-Adapters' commonsense_170k.json, shown to the model through LLM-Adapters' prompt template;
  * `.jsonl`: one object per line, either {"prompt", "completion"} (used verbatim) or
    {"instruction", "input" (optional), "output"} (through the template).
A record may name its `choices` (a list of strings); otherwise, when it has an `answer`, they are read from
the instruction's "Answer format: a/b/c" line, as LLM-Adapters writes them. Records with choices can also be
scored as multiple choice (`multiple_choice.items_from_examples`).
Every problem is a ConfigError naming the file, the record and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

# LLM-Adapters' generate_prompt (finetune.py): the Alpaca template
TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ANSWER_FORMAT = re.compile(r"Answer format:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class Example:
    """One training example: the prompt the model reads and the response it learns to write."""

    prompt: str
    response: str
    answer: str | None = None          # the answer alone (commonsense records), for multiple-choice scoring
    choices: list[str] | None = None   # the candidate answers, when known


def format_prompt(instruction: str, input: str = "") -> str:
    """LLM-Adapters' prompt (everything before the response)."""
    if input:
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return TEMPLATE.format(instruction=instruction)


def _field(record: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            present = ", ".join(sorted(record)) or "none"
            raise ConfigError(f"{where} has no {key!r} field (its fields: {present})")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, it is a {type(value).__name__}")
    return value


def _choices(record: dict, instruction: str, answer: str | None, where: str) -> list[str] | None:
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: 'choices' must be a list of at least two strings")
    elif answer is not None:
        match = ANSWER_FORMAT.search(instruction)
        if match:
            choices = [c.strip() for c in match.group(1).split("/") if c.strip()]
    if choices is not None and answer is not None and answer not in choices:
        raise ConfigError(f"{where}: the answer {answer!r} is not among its choices {choices}")
    return choices


def example_from_record(record, where: str) -> Example:
    """One record of either format -> Example (ConfigError naming `where` when a field is wrong)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is a {type(record).__name__}, expected an object with instruction/output fields")
    if "prompt" in record and "instruction" not in record:
        return Example(_field(record, "prompt", where), _field(record, "completion", where))
    instruction = _field(record, "instruction", where)
    output = _field(record, "output", where)
    answer = _field(record, "answer", where, required=False)
    if answer is not None:
        answer = answer.strip()
    prompt = format_prompt(instruction, _field(record, "input", where, required=False) or "")
    return Example(prompt, output, answer, _choices(record, instruction, answer, where))


def read_text(path: Path) -> str:
    """A data file as UTF-8 text; a file in another encoding is an error naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte {err.start} (line {line}) is "
                          f"{err.object[err.start:err.start + 1]!r}; save the file as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; pass a data file") from None


def load_examples(path) -> list[Example]:
    """Reads a commonsense `.json` file or an instruction `.jsonl` file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no data file {path}")
    text = read_text(path)
    if not text.strip():
        raise ConfigError(f"{path} is empty: it needs at least one example")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{path} line {n}"))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path} line {n} is not valid JSON ({err.msg}); a .jsonl file holds one "
                                      f"JSON object per line") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); for one object per "
                              f"line name the file .jsonl") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}; the commonsense format is a JSON list of "
                              f"{{instruction, input, output, answer}} records")
        records = [(r, f"{path} record {i}") for i, r in enumerate(data, 1)]
    else:
        raise ConfigError(f"{path}: unknown data format {path.suffix!r}; use .json (a list of records, LLM-Adapters' "
                          f"commonsense format) or .jsonl (one record per line)")
    if not records:
        raise ConfigError(f"{path} holds no examples")
    return [example_from_record(record, where) for record, where in records]


def split_validation(examples: list, size: int | float, seed: int = 0) -> tuple[list, list]:
    """(train, validation): `size` examples (or that fraction) held out, chosen by a seeded shuffle."""
    import random

    n = round(size * len(examples)) if isinstance(size, float) and size < 1 else int(size)
    if n <= 0:
        return list(examples), []
    if n >= len(examples):
        raise ConfigError(f"cannot hold out {n} validation examples from {len(examples)}; lower val_size")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])
