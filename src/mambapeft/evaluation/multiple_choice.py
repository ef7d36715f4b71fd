"""Multiple-choice scoring by log-likelihood, with acc and acc_norm as lm-evaluation-harness defines them.

For each item and choice i, ll_i = sum over the continuation's tokens of log p(token | context, earlier tokens).
acc: argmax_i ll_i is the gold index. acc_norm: argmax_i ll_i / len(choice_i), the length in characters of
the choice text (lm-evaluation-harness's `completion_len`; bytes for ASCII text).
Context and continuation are tokenised apart and concatenated; a sequence longer than max_length keeps its
last max_length tokens (the harness cuts contexts on the left the same way).

Two implementations give the same numbers:

* `loglikelihoods` (score_items and the harness bridge use it): the choices of an item share their context,
  and a recurrent model can keep what it read. So each distinct context runs once, the state after it is
  copied once per continuation, and the continuations run from those copies, batched together:

      contexts (sorted, batched)  --model, state-->  state after each context, log p of the next token
      state rows copied per continuation  --model-->  log p of the continuation's other tokens

  Contexts of different lengths need no padding: the batch runs together up to the shortest context, that
  row's state is set aside, the longer ones continue from the state (see `_run_contexts`). Continuations are
  right-padded (the model is causal: tokens after a row's end change nothing before it).
* `loglikelihoods_per_pair`: every (context, continuation) pair from the start, the reference the first is
  tested against. Requests longer than max_length (cut on the left) take this path in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.multiple_choice import MCItem
from ..model.mamba.lm import MambaState, cat_rows, map_rows


def _context_ids(tokenizer, context: str) -> list[int]:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    return ctx or [tokenizer.eos_token_id]        # nothing to condition on: start from the eos token


def _continuation_ids(tokenizer, continuation: str) -> list[int]:
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _score(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """pred (n, vocab) log-probs predicting target (n,) -> (sum of the targets' log-probs, all are the argmax)."""
    return pred.gather(-1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all())


@torch.no_grad()
def loglikelihoods_per_pair(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                            max_length: int = 2048) -> list[tuple[float, bool]]:
    """[(context, continuation)] -> [(sum log p(continuation | context), continuation is the greedy one)].

    Every pair runs from its first token: the plain reference of `loglikelihoods`.
    """
    encoded = []
    for context, continuation in requests:
        ctx, cont = _context_ids(tokenizer, context), _continuation_ids(tokenizer, continuation)
        ids = (ctx + cont)[-max_length:]
        encoded.append((ids, min(len(cont), len(ids) - 1)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
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
            results[i] = _score(pred, target)
    model.train(was_training)
    return results


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int = 2048) -> list[tuple[float, bool]]:
    """[(context, continuation)] -> [(sum log p(continuation | context), continuation is the greedy one)].

    Each distinct context runs once (see the module docstring); equal to `loglikelihoods_per_pair` up to
    float rounding. `batch_size` bounds the rows of every forward pass (contexts, then continuations).
    """
    if not hasattr(model, "new_state"):           # not a recurrent model of ours: nothing to share
        return loglikelihoods_per_pair(model, tokenizer, requests, batch_size=batch_size, max_length=max_length)
    contexts: dict[str, list[int]] = {}                       # each distinct context tokenised once
    encoded = []
    for context, continuation in requests:
        if context not in contexts:
            contexts[context] = _context_ids(tokenizer, context)
        encoded.append((contexts[context], _continuation_ids(tokenizer, continuation)))
    results: list = [None] * len(requests)

    # a sequence cut on the left, or an empty continuation: the per-pair path, for the very same numbers
    apart = [i for i, (ctx, cont) in enumerate(encoded) if len(ctx) + len(cont) > max_length or not cont]
    scored = loglikelihoods_per_pair(model, tokenizer, [requests[i] for i in apart], batch_size=batch_size,
                                     max_length=max_length)
    for i, result in zip(apart, scored):
        results[i] = result
    groups: dict[tuple[int, ...], list[int]] = {}              # context tokens -> its requests
    skip = set(apart)
    for i, (ctx, _) in enumerate(encoded):
        if i not in skip:
            groups.setdefault(tuple(ctx), []).append(i)

    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        keys = sorted(groups, key=len, reverse=True)                                  # longest context first
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            state, first = _run_contexts(model, batch, device)   # one row per context; (G, vocab) next-token logp
            rows = sorted(((g, i) for g, key in enumerate(batch) for i in groups[key]),
                          key=lambda row: -len(encoded[row[1]][1]))                 # similar lengths together
            for r in range(0, len(rows), batch_size):
                chunk = rows[r:r + batch_size]
                conts = [encoded[i][1] for _, i in chunk]
                logp = _run_continuations(model, state.select(torch.tensor([g for g, _ in chunk], device=device)),
                                          conts, pad, device)                       # (R, M, vocab) or None
                for row, ((g, i), cont) in enumerate(zip(chunk, conts)):
                    pred = first[g:g + 1]                                           # predicts cont[0]
                    if len(cont) > 1:
                        pred = torch.cat([pred, logp[row, :len(cont) - 1]])          # (n, vocab) predicts cont
                    results[i] = _score(pred, torch.tensor(cont, device=device))
    finally:
        model.train(was_training)
    return results


def _run_contexts(model, contexts: list[tuple[int, ...]], device) -> tuple[MambaState, torch.Tensor]:
    """Contexts (longest first) -> the state after each (one row per context) and the log-probs (G, vocab) of
    the token that follows each.

    No padding: the rows run together up to the shortest active context; its rows are done (state and last
    logits set aside), the others continue from the state. One forward per distinct length.
    """
    state = model.new_state()
    first = None                                               # (G, vocab), filled from the last rows up
    pieces = []                                                # states of finished rows, last rows first
    active, done = len(contexts), 0                            # rows [0, active) still run; tokens read so far
    while active:
        end = len(contexts[active - 1])                        # the shortest active context ends here
        ids = torch.tensor([ctx[done:end] for ctx in contexts[:active]], device=device)   # (active, end - done)
        logits = model(ids, state=state, logits_to_keep=1).logits[:, -1]                  # (active, vocab)
        finished = active
        while finished and len(contexts[finished - 1]) == end:
            finished -= 1
        if first is None:
            first = logits.new_empty(len(contexts), logits.shape[-1], dtype=torch.float32)
        first[finished:active] = F.log_softmax(logits[finished:active].float(), dim=-1)
        # Slices, not copies: later passes write only rows [0, finished) (a full pass makes new tensors, a
        # step writes into rows [0, finished) of the same buffers), so rows >= finished stay as they are.
        # (every tensor of a mixer's state: conv, scan state and the hooks' own buffers, any family)
        ended, running = slice(finished, active), slice(0, finished)
        pieces.append([map_rows(layer, lambda t, rows=ended: t[rows]) for layer in state.layers])
        state.layers = [map_rows(layer, lambda t, rows=running: t[rows]) for layer in state.layers]
        active, done = finished, end
    pieces.reverse()                                            # rows in context order
    # rows read different numbers of tokens; hooks ask only whether the state has a past
    layers = [cat_rows([p[n] for p in pieces], offset=len(contexts[-1])) for n in range(len(state.layers))]
    return MambaState(layers), first


def _run_continuations(model, state: MambaState, conts: list[list[int]], pad: int, device) -> torch.Tensor | None:
    """Log-probs (R, M, vocab) after each continuation's tokens but the last, from its own copy of the state;
    right-padded to the longest (M = its length - 1). None when every continuation is one token long."""
    longest = max(len(c) for c in conts) - 1
    if longest == 0:
        return None
    ids = torch.full((len(conts), longest), pad, dtype=torch.long)
    for row, cont in enumerate(conts):
        ids[row, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
    return F.log_softmax(model(ids.to(device), state=state).logits.float(), dim=-1)


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
