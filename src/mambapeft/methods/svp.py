"""Selective Visual Prompting, SVP (Yao et al., AAAI 2025, "Selective Visual Prompting in Vision Mamba").

Why it exists: Vim's selective parameters (dt, B, C) are computed from the tokens themselves, so a prompt that is a
function of each token (rather than fixed extra tokens, which a bidirectional scan mostly forgets) steers what the
scan keeps and what it drops. SVP adds such token-wise prompts to the residual stream before every block:

    before block i:   h += P_i(u) (every patch token; the class token is left alone)
                      u = the embeddings (i = 0) or block i-1's mixer output (i >= 1)   (b, L, d)
    P_i(u) = a_i * SiLU(Up_i(Down_i u))  +  c_g * SiLU(W_g u)              g = i // shared_layers
             inner prompter (one per block)   cross prompter (one per group of `shared_layers` blocks)
             Down d -> rank, Up rank -> d       W_g d -> d (full width, with bias)
             a_i, c_g (d,): per-channel scales, zeros: the method starts as the identity

This is the official code's "addv4" prompter (models_mamba.py, init_prompt and incorporate_[deep_]prompt; the
released recipe: --prompt_add_gen mlp384*64, i.e. rank 64, and --shared_layers 4..12 per dataset, 8 on most):
there is no non-linearity between Down and Up (they multiply into one rank-`rank` map), the SiLU is last, and the
scales start at zero. In the official forward, the prompt of block i >= 1 is added to the mixer output before the
residual add, so stochastic depth drops it with the branch; here it is added by a forward hook on mixer i-1, which is
the same. Block 0's prompt is added to the embeddings (a pre-hook on block 0).

Where we differ from the code (docs/fidelity.md): the cross prompter of the tokens after the class token reads the
tokens before it in the official code (`hidden_states[:, :token_position]` on both halves, after the first half was
already prompted), which looks like a slip; we apply every prompter to each token itself, as the paper's equations do.
`prompt_scale` is sized (24, d) in the code whatever the depth; we size it (depth, d). The group count is
ceil(depth / shared_layers) (the code's depth // shared_layers would index past its list when they do not divide).
The optional SimAM on the pixels (`--input_relu`, parameter-free) is not part of this method.

Not mergeable: the prompts are non-linear functions of the tokens. Vision Mamba only: the cross and inner prompters
are defined on Vim's plain, single-width token sequence around its middle class token; VMamba's stages change width
and resolution and have no class token, and a language model's causal scan has no class token to steer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, NotApplicable
from .base import TABLE9_DECAY, TABLE9_LR, Example, Method, MethodConfig, kaiming_, option, register


@dataclass
class SVPConfig(MethodConfig):
    rank: int = option(64, "bottleneck of each block's inner prompter, Down d -> rank -> Up d (the code's mlp384*64)",
                       minimum=1)
    shared_layers: int = option(8, "consecutive blocks that share one cross prompter (the code's --shared_layers)",
                                minimum=1)
    cross: bool = option(True, "the cross prompters (full-width d x d, shared by groups of blocks)")
    inner: bool = option(True, "the inner prompters (one low-rank prompter per block)")
    dropout: float = option(0.0, "dropout on each prompt (the code's prompt_dropout, 0)", minimum=0, maximum=0.99)


def _linear(d_in: int, d_out: int, like: torch.Tensor, bias: bool = True) -> nn.Linear:
    """nn.Linear's own initialisation (the code's), on the base's device and dtype; nothing drawn on meta."""
    layer = nn.Linear(d_in, d_out, bias=bias, device=like.device, dtype=like.dtype)
    kaiming_(layer.weight)
    return layer


class SVPPrompters(nn.Module):
    """Every prompter of one model: inner[i] (Down, Up), cross[g] and their zero-initialised scales.

    `prompt(i, u)` is P_i(u) (b, L, d) -> (b, L, d), zero at the class-token position `cls`.
    """

    def __init__(self, depth: int, d: int, config: SVPConfig, cls: int, length: int, like: torch.Tensor):
        super().__init__()
        self.depth, self.shared_layers, self.cls, self.length = depth, config.shared_layers, cls, length
        groups = math.ceil(depth / config.shared_layers)
        factory = {"device": like.device, "dtype": like.dtype}
        if config.inner:
            self.inner = nn.ModuleList(nn.Sequential(_linear(d, config.rank, like), _linear(config.rank, d, like))
                                       for _ in range(depth))
            self.inner_scale = nn.Parameter(torch.zeros(depth, d, **factory))        # a_i
        else:
            self.inner, self.inner_scale = None, None
        if config.cross:
            self.cross = nn.ModuleList(_linear(d, d, like) for _ in range(groups))
            self.cross_scale = nn.Parameter(torch.zeros(groups, d, **factory))       # c_g
        else:
            self.cross, self.cross_scale = None, None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, i: int, u: torch.Tensor) -> torch.Tensor:
        return self.prompt(i, u)

    def prompt(self, i: int, u: torch.Tensor) -> torch.Tensor:
        if u.shape[1] != self.length:
            raise ConfigError(f"svp: block {i} sees {u.shape[1]} tokens, but SVP prompts the {self.length - 1} patch "
                              f"tokens around the class token at {self.cls}; another method inserts tokens (prompt, "
                              f"affix), which moves the class token. Use svp without soft-token methods")
        p = torch.zeros_like(u)                                                          # (b, L, d)
        if self.inner is not None:
            p = p + self.dropout(F.silu(self.inner[i](u))) * self.inner_scale[i]
        if self.cross is not None:
            g = i // self.shared_layers
            p = p + self.dropout(F.silu(self.cross[g](u))) * self.cross_scale[g]
        keep = torch.ones(u.shape[1], 1, dtype=u.dtype, device=u.device)
        keep[self.cls] = 0                                                               # the class token: no prompt
        return p * keep


@register
class SelectiveVisualPrompting(Method):
    name = "svp"
    category = "prompt tuning"
    description = ("Selective Visual Prompting: token-wise prompts SiLU(MLP(token)) added before every Vim block "
                   "(per-block low-rank inner + shared cross prompters); stays unmerged")
    Config = SVPConfig
    mergeable = False
    why_not_mergeable = "the prompts are non-linear functions of the tokens (SiLU of a projection), not a weight"
    examples = (Example("svp:rank=4,shared_layers=1"), Example("svp:rank=2,cross=false,dropout=0.1"))
    # the released recipe (svp/scripts/train.sh): vim_small, mlp384*64, shared_layers 8 on 6 of its 10 datasets
    presets = {"svp": ["svp:rank=64,shared_layers=8"]}
    search_step1 = {"rank": 4, "shared_layers": 8}
    search_step2 = {"rank": {"int": [4, 64]}, "shared_layers": {"int": [1, 12]}, "lr": TABLE9_LR,
                    "weight_decay": TABLE9_DECAY}
    search_vision_only = True

    def check(self, model):
        c = self.config
        if getattr(model, "family", None) != "vim":
            raise NotApplicable("SVP's prompters act on Vision Mamba's plain token sequence around its middle class "
                                "token; this family has no such sequence (VMamba changes width between stages and has "
                                "no class token; language models have no class token and scan causally)")
        if not (c.inner or c.cross):
            raise ConfigError("svp: inner=false and cross=false leave nothing to train; keep at least one")

    def attach(self, model):
        cfg = model.config
        like = next(iter(model.parameters()))
        prompters = SVPPrompters(len(model.layers), model.d_model, self.config, cfg.cls_position,
                                 cfg.num_patches + 1, like)
        model.svp = prompters
        self.handles = [model.layers[0].register_forward_pre_hook(self._embeddings_hook(prompters))]
        for i in range(1, len(model.layers)):
            self.handles.append(model.layers[i - 1].mixer.register_forward_hook(self._mixer_hook(prompters, i)))
        return list(prompters.parameters())

    @staticmethod
    def _embeddings_hook(prompters):
        def hook(block, args):
            h, *more = args                                     # the embeddings (b, L, d)
            return (h + prompters.prompt(0, h), *more)
        return hook

    @staticmethod
    def _mixer_hook(prompters, i):
        def hook(mixer, args, out):
            return out + prompters.prompt(i, out)               # mixer i-1's output, before the residual add
        return hook

    def clash(self, other):
        """Soft tokens inserted at the model's input (prompt tuning) shift every position:
        the class token is no longer where this method
        reads it; refused before anything runs (the search space then never samples the pair).
        Affix tokens are dropped before out_proj and do not matter."""
        if other.name == "prompt":
            return (f"{self.name} and prompt cannot be combined: prompt's tokens move the class token, which "
                    f"{self.name} relies on")
        return super().clash(other)

    def explain_count(self):
        c = self.config
        return (f"per block: inner Down/Up d x {c.rank} + biases + scale d; per {c.shared_layers} blocks: cross "
                f"d x d + bias + scale d")
