"""Gradient checkpointing per block, one mechanism for every family.

Why: a training step keeps every block's activations for the backward pass (about 12 MB per token for mamba-1.4b),
which is most of its memory at useful lengths. Checkpointing keeps only each block's input and runs the block again
in the backward pass: memory falls from (activations of all blocks) to (inputs of all blocks + activations of one
block), for one more forward pass of compute.

How: a family names its blocks (`PeftModelInterface.checkpoint_blocks`; by default found here, `default_blocks`: the
elements of the module list that holds the mixers) and
`enable` gives each block an instance-level `forward` that runs the class's own forward under
`torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)`. Nothing in the family's code
changes, state-dict keys stay as they are, and a new family gets it by holding its blocks in an nn.ModuleList (or
overriding `checkpoint_blocks`).

Why the recomputation gives the same result with every method: methods' parts sit inside the blocks (wrapped
projections, parametrized tensors, hooks called by the mixers) or before them (soft prompt tokens, affix tokens
computed once per forward in `begin_forward`); the recomputation reads the same parameters and the same tensors
made before the block, with the RNG state restored (LoRA dropout, drop path draw the same masks). A hook that kept a
count across calls would make the recomputed block save other tensors; non-reentrant checkpointing checks the
recomputed tensors' shapes and raises rather than giving wrong gradients.

A call that passes a recurrent state (generation, scoring) runs plainly: the block updates that state in place, and
a recomputation would start from the updated state. Such calls run without gradients anyway.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MARK = "_mambapeft_checkpointed"


def _recomputable(value) -> bool:
    """A block argument that recomputation can take again unchanged: a tensor, None, a number or a string, or a
    tuple / list of those (rotary position embeddings); anything else (a recurrent state object) is not."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_recomputable(v) for v in value)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's own forward, under checkpointing when gradients are being recorded."""
    plain = type(self).forward
    if not torch.is_grad_enabled() or not all(map(_recomputable, (*args, *kwargs.values()))):
        return plain(self, *args, **kwargs)
    return checkpoint(plain, self, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the innermost module lists (nn.ModuleList, nn.Sequential) that hold the model's mixers:
    Mamba-1's and Mamba-2's backbone.layers, Vim's layers, each VMamba stage's blocks, S4D's layers (each a mixer
    itself), and every layer of a hybrid's model.layers (attention and MLP layers included: they sit in the same
    list)."""
    mixers = {id(m) for m in model.peft_mixers()}

    def holds_mixer(module: nn.Module) -> bool:
        return any(id(m) in mixers for m in module.modules())

    lists = [m for m in model.modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and any(holds_mixer(e) for e in m)]
    innermost = [a for a in lists if not any(b is not a and any(b is m for m in a.modules()) for b in lists)]
    return [block for blocks in innermost for block in blocks]


def enable(model: nn.Module) -> None:
    """Checkpoints each of the model's blocks from now on (idempotent)."""
    blocks = model.checkpoint_blocks()
    held = {id(m) for block in blocks for m in block.modules()}
    missing = [m for m in model.peft_mixers() if id(m) not in held]
    if not blocks or missing:                 # a family whose layout the default does not find: say so, not skip it
        raise NotImplementedError(f"{type(model).__name__}: {len(missing)} mixers lie outside its checkpoint_blocks(); "
                                  f"override checkpoint_blocks to name its blocks")
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
        setattr(block, MARK, True)


def disable(model: nn.Module) -> None:
    """Back to plain forwards (idempotent)."""
    for block in model.checkpoint_blocks():
        if getattr(block, MARK, False):
            del block.forward
            delattr(block, MARK)


def is_enabled(model: nn.Module) -> bool:
    return any(getattr(block, MARK, False) for block in model.checkpoint_blocks())
