"""The PEFT hook plumbing every mixer shares: `PeftHook` (what methods that change the sequence or the state
implement), soft tokens put into a sequence and taken out again, and padding masks.

Methods import `PeftHook` from here; mixers call `insert_from_hooks` at their token stages, `drop_inserted` before
their output, and `masked` to keep padding out of the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn as nn

STAGES = ("embeddings", "before_in_proj", "after_in_proj")


class PeftHook(nn.Module):
    """Base of the PEFT parts that change the sequence or the state rather than a weight.

    A subclass overrides what it needs; the defaults change nothing. Hooks live in `mixer.hooks` (stages
    "before_in_proj", "after_in_proj", state extension) or in the language model's `hooks` (stage "embeddings").
    """

    def begin_forward(self, offset: int) -> None:
        """Called on the model's hooks at the start of every forward (e.g. to compute shared tokens once)."""

    def tokens(self, stage: str, direction: int, length: int, offset: int):
        """Soft tokens to insert at `stage`.

        stage "embeddings": width d, in the model before the first block (prompt tuning);
        stage "before_in_proj": width d, shared by both directions (direction is 0);
        stage "after_in_proj": width 2E ([X | Z]), asked once per direction;
        stage "after_cross_scan" (VMamba's SS2D, vmamba.py): width E, asked once per scan direction k = 0..3.
        Returns None, or (tokens (n, width), positions (n,) long): where the tokens sit in the extended
        sequence of length `length + n`. `offset` counts the tokens the recurrent state has already seen (0 for
        a fresh sequence), so that a prefix is inserted once and not again at every generation step.
        """
        return None

    def extend_state(self, direction: int, x: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        """Extra state dimensions. x (b, L, E); A_log (E, N); B, C (b, L, N). Returns them with N' >= N states.

        Called once per direction: 0 and 1 for Vim, the four scan directions 0..3 for VMamba's SS2D."""
        return A_log, B, C

    def extend_initial(self, direction: int, h0: torch.Tensor) -> torch.Tensor:
        """An initial state (E, N) made to cover the states `extend_state` adds (zeros there)."""
        return h0

    def initial_state(self, direction: int) -> torch.Tensor | None:
        """A state the scan of a fresh sequence starts from (initial-state tuning), in the mixer's `state_shape`
        ((E, N) here), or None (zeros)."""
        return None

    def state_offset(self, direction: int) -> tuple[str, torch.Tensor] | None:
        """An offset added before the gate at every step (state-offset tuning), or None: ("h", h') with h' in the
        mixer's `state_shape`, read through C_t of the pretrained states (y_t += C_t h'); or ("y", y') with y' in
        its `channel_shape` (y_t += y'). The mixer does the contraction, in its own layout."""
        return None

    def grow_state(self, direction: int, n: int, top: bool) -> None:
        """The mixer's state has grown by n dimensions (additional scan merged), at the top or the bottom: a hook that
        holds state-shaped tensors pads them with zeros there, which leaves its effect as it was."""

    def gate(self, z: torch.Tensor, mask: torch.Tensor | None, state) -> torch.Tensor:
        """The gate's input Z (b, L, E) transformed before silu (stage "gate": Memba's membrane neurons); `state` is
        the mixer's recurrent state in generation (the hook keeps its own values in `state.extra`), else None. Only
        hooks that override this are called."""
        return z

    def extra_channels(self, h: torch.Tensor) -> torch.Tensor | None:
        """Mamba-2's form of extra states: more B and C channels (b, L, 2 G n') computed from in_proj's input h, which
        the hook then convolves (`extra_conv`) and joins to B and C (`join_states`); None: nothing to add."""
        return None


def insert_tokens(t: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
    """Places `tokens` (n, w) at `positions` of the sequence t (b, L, w) made longer by n.

    Returns the longer sequence, its mask (inserted tokens count as real) and the index of the original
    positions in it, which `drop_inserted` uses to cut the sequence back.
    """
    batch, length, width = t.shape
    n = positions.numel()
    total = length + n
    positions = positions.to(device=t.device, dtype=torch.long)
    if tokens.shape != (n, width):
        raise ValueError(f"soft tokens have shape {tuple(tokens.shape)}, expected ({n}, {width})")
    if n and (positions.min() < 0 or positions.max() >= total or positions.unique().numel() != n):
        raise ValueError(f"soft-token positions {positions.tolist()} must be distinct and within [0, {total})")
    is_token = torch.zeros(total, dtype=torch.bool, device=t.device)
    is_token[positions] = True
    kept = (~is_token).nonzero().squeeze(1)                       # (L,) where the original tokens go
    source = torch.empty(total, dtype=torch.long, device=t.device)  # extended position -> row of [t | tokens]
    source[kept] = torch.arange(length, device=t.device)
    source[positions] = length + torch.arange(n, device=t.device)
    longer = torch.cat([t, tokens.to(t.dtype).expand(batch, n, width)], dim=1).index_select(1, source)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(batch, n)], dim=1).index_select(1, source)
    return longer, mask, kept


def drop_inserted(t: torch.Tensor, kept_list: list[torch.Tensor]) -> torch.Tensor:
    for kept in reversed(kept_list):
        t = t.index_select(1, kept)
    return t


def insert_from_hooks(hooks, stage: str, direction: int, t: torch.Tensor, mask, offset: int):
    """Inserts every hook's tokens for this stage; returns the sequence, its mask and what `drop_inserted` needs."""
    kept_list = []
    for hook in hooks:
        found = hook.tokens(stage, direction, t.shape[1], offset)
        if found is not None:
            t, mask, kept = insert_tokens(t, *found, mask)
            kept_list.append(kept)
    return t, mask, kept_list


def masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zeroes padding positions, as transformers does: a zero input leaves the scan state untouched."""
    return t if mask is None else t * mask[:, :, None].to(t.dtype)
