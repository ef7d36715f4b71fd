"""Tokenisation of examples for causal-LM training, and the padding collator.

Padding and Mamba: the scan has no attention mask. The model zeroes padded positions before in_proj and
after the conv (README, "Padding"), and a causal model's output at a position depends only on earlier
positions. We pad on the right, so every real token precedes every pad token: the real tokens' outputs are
exactly those of the unpadded sequence, and pad positions get label -100, so they add nothing to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..verbosity import note
from .instructions import Example

IGNORE = -100


@dataclass
class TokenizedSet:
    """Token ids and labels of a set of examples, plus how many were cut at max_length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tokenize_examples(tokenizer, examples: list[Example], *, max_length: int, train_on_prompt: bool = True,
                      what: str = "training") -> TokenizedSet:
    """prompt + response + eos -> ids; labels are the ids (or -100 on the prompt when not train_on_prompt).

    Prompt and response are tokenised apart, so the prompt/response boundary is exact. Sequences longer than
    max_length are cut at the end (as LLM-Adapters does); their number is counted and warned about.
    """
    eos = tokenizer.eos_token_id
    out = TokenizedSet([], [])
    nothing_to_learn = []
    for number, ex in enumerate(examples, 1):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = prompt + response
        labels = list(ids) if train_on_prompt else [IGNORE] * len(prompt) + response
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            nothing_to_learn.append((number, len(prompt)))
        out.input_ids.append(ids)
        out.labels.append(labels)
    if nothing_to_learn:
        numbers = ", ".join(str(n) for n, _ in nothing_to_learn[:8]) + (", ..." if len(nothing_to_learn) > 8 else "")
        longest = max(length for _, length in nothing_to_learn)
        text = (f"{len(nothing_to_learn)} of {len(examples)} {what} examples (number {numbers}) have no token left to "
                f"learn: cutting at max_length {max_length} removes their whole response (prompts up to {longest} "
                f"tokens). Raise max_length above {longest + 8}"
                + (" or set train_on_prompt=true" if not train_on_prompt else "") + ", or drop those examples")
        if len(nothing_to_learn) == len(examples):
            raise ConfigError(text + "; as it is, every loss would be over zero tokens (NaN)")
        note(text + "; they add nothing to the loss")
    if out.truncated:
        note(f"{out.truncated} of {len(examples)} {what} examples are longer than max_length {max_length} tokens and "
             f"were truncated (raise max_length to keep them whole)")
    return out


def pad_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: input_ids (b, L) padded with pad_id, labels with -100, attention_mask 1 on real tokens."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Collator:
    """For transformers' Trainer: pads each batch on the right (see the module docstring)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(features, self.pad_id)
