"""Multiple-choice scoring by log-likelihood, with acc and acc_norm as lm-evaluation-harness defines them.

For each item and choice i, ll_i = sum over the continuation's tokens of log p(token | context, earlier tokens).
acc: argmax_i ll_i is the gold index. acc_norm: argmax_i ll_i / len(choice_i), the length in characters of
the choice text (lm-evaluation-harness's `completion_len`; bytes for ASCII text).
Context and continuation are tokenised apart and concatenated; a sequence longer than max_length keeps its
last max_length tokens (the harness cuts contexts on the left the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.multiple_choice import MCItem


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int = 2048) -> list[tuple[float, bool]]:
    """[(context, continuation)] -> [(sum log p(continuation | context), continuation is the greedy one)]."""
    encoded = []
    for context, continuation in requests:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:                                   # nothing to condition on: start from the eos token
            ctx = [tokenizer.eos_token_id]
        ids = (ctx + cont)[-max_length:]
        encoded.append((ids, min(len(cont), len(ids) - 1)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))      # similar lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)                # right padding: causal, safe
        for row, i in enumerate(chunk):
            ids[row, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
        logp = F.log_softmax(model(ids.to(device)).logits.float(), dim=-1)          # (b, L, vocab)
        for row, i in enumerate(chunk):
            seq, n = encoded[i]
            target = torch.tensor(seq[len(seq) - n:], device=device)                 # (n,)
            pred = logp[row, len(seq) - n - 1:len(seq) - 1]                          # (n, vocab) predicts target
            results[i] = (pred.gather(-1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all()))
    model.train(was_training)
    return results


def score_items(model, tokenizer, items: list[MCItem], *, batch_size: int = 16, max_length: int = 2048) -> dict:
    """{"acc", "acc_norm", "n", "predictions"} over `items` (see the module docstring)."""
    requests = [(item.context, cont) for item in items for cont in item.continuations()]
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length)]
    correct = correct_norm = 0
    predictions = []
    k = 0
    for item in items:
        scores = lls[k:k + len(item.choices)]
        k += len(item.choices)
        best = max(range(len(scores)), key=scores.__getitem__)
        norm = [s / max(1, len(c)) for s, c in zip(scores, item.choices)]
        best_norm = max(range(len(norm)), key=norm.__getitem__)
        correct += best == item.gold
        correct_norm += best_norm == item.gold
        predictions.append(best)
    n = len(items)
    return {"acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan"),
            "n": n, "predictions": predictions}
