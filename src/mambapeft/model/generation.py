"""Token generation with our own recurrent state: one full-sequence pass over the prompt, then one step a token.

The prompt pass leaves every layer's conv inputs and scan state in a `MambaState`; each new token then costs
one length-1 forward from that state, in which every mixer takes its one-token `step` (the conv on its last K
inputs, one step of the recurrence, no scan call), and which gives the same logits as re-running the whole
sequence (tested). Sampling uses transformers' logits warpers, so temperature, top-k and top-p mean what they mean
in `transformers.generate`.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy decoding)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns input_ids (b, L) followed by up to `max_new_tokens` new tokens (b, L + n).

    Greedy unless `do_sample`. Generation stops when every row has produced `eos_token_id` (default: the
    model config's; None never stops early); rows that finished earlier are filled with `pad_token_id`.
    For a batch of prompts of different lengths, left-pad them and pass `attention_mask`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    config = model.config
    if eos_token_id == -1:
        eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    warpers = _warpers(temperature, top_k, top_p) if do_sample else None

    was_training = model.training
    model.eval()
    try:
        input_ids = input_ids.to(model.device)
        state = model.new_state()
        # prompt pass: the state, and the logits of the last position only
        logits = model(input_ids, attention_mask=attention_mask, state=state, logits_to_keep=1).logits[:, -1]
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if do_sample:
                scores = warpers(tokens, logits)
                next_token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                next_token = logits.argmax(dim=-1)
            if eos_token_id is not None:
                if pad_token_id is not None:
                    next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if finished.all() or step == max_new_tokens - 1:
                break
            logits = model(next_token[:, None], state=state).logits[:, -1]      # one step: each mixer's `step`
        return tokens
    finally:
        model.train(was_training)
