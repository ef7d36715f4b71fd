"""Prompt tuning (paper Section 3.1): n trainable soft tokens added to the input sequence.

    h (b, L, d) --insert n tokens (n, d)--> (b, L+n, d) --blocks--> norm_f --drop them--> (b, L, d)

The tokens enter at the model's "embeddings" stage (Vision Mamba: after the position embedding) and their
outputs are dropped after the final norm, so the output keeps exactly the input's positions. Where they go:

    prefix          before the first real token (the only choice on a causal language model, see below)
    suffix          after the last real token
    prefix+suffix   ceil(n/2) before, floor(n/2) after (the paper's best for Vim, Appendix A.1)
    infix           evenly spaced: the real tokens are cut into n+1 equal runs, one token between runs
                    (n = 1 sits in the middle, like Vim's class token)

On a causal model (`model.is_causal`) only `prefix` is accepted: every output there sees only earlier
positions, so a token after the last real one changes no output and gets no gradient (suffix, and the suffix
half of prefix+suffix), and infix positions depend on the sequence length, so a token's position would move as
generation adds tokens and generation from the recurrent state could not equal the full forward.

The optional projection is P-tuning v2's reparametrisation, the official code's PrefixEncoder:
Embedding(n, d) -> Linear(d, hidden) -> tanh -> Linear(hidden, d), hidden = d by default (paper: Vim-S prompt
with projection, 8 tokens, 298,752 parameters). The tokens are computed once per forward. Soft tokens cannot
be folded into weights (`mergeable = False`); `merge_and_unload` collapses the projection into plain tokens,
so inference carries no MLP.

The helpers here (`soft_positions`, `TokenMLP`, `check_position`, `check_hidden`) are shared with affix.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, NotApplicable
from ..model.hooks import PeftHook
from .base import TABLE9_DECAY, TABLE9_LR, Example, Method, MethodConfig, get_module, is_meta, option, register, unwrap

POSITIONS = ("prefix", "infix", "suffix", "prefix+suffix")


def soft_positions(position: str, n: int, length: int) -> torch.Tensor:
    """Where n soft tokens sit in the extended sequence of length `length + n` (n,) long, ascending."""
    if position == "prefix":
        return torch.arange(n)
    if position == "suffix":
        return torch.arange(length, length + n)
    if position == "prefix+suffix":
        before = (n + 1) // 2
        return torch.cat([torch.arange(before), torch.arange(length + before, length + n)])
    if position == "infix":
        # token i goes before real token floor((i+1) L / (n+1)); the i tokens before it shift it by i
        return torch.tensor([(i + 1) * length // (n + 1) + i for i in range(n)], dtype=torch.long)
    raise ValueError(f"unknown soft-token position {position!r}; one of {', '.join(POSITIONS)}")


def check_position(method: str, position: str, n: int, model) -> None:
    """The position rules shared by prompt and affix (see the module docstring for why)."""
    if position == "prefix+suffix" and n < 2:
        raise ConfigError(f"{method}: position=prefix+suffix splits the tokens between both ends and needs n >= 2, "
                          f"got n={n}")
    if position != "prefix" and model.is_causal:
        why = {
            "suffix": "tokens after the last real token cannot change any output of a causal model "
                      "(and get no gradient)",
            "prefix+suffix": "the suffix half would sit after the last real token, where a causal model's outputs "
                             "cannot see it",
            "infix": "infix positions depend on the sequence length, so they would move as generation adds tokens "
                     "and step-by-step generation could not equal the full forward",
        }[position]
        raise ConfigError(f"{method}: position={position} does not work on a causal model ({type(model).__name__}): "
                          f"{why}. Use position=prefix")


def check_hidden(method: str, config) -> None:
    """A hidden size without a projection would be silently ignored: refuse it."""
    if config.hidden is not None and not config.projection:
        raise ConfigError(f"{method}: hidden={config.hidden} sizes the projection MLP, which is off; "
                          f"add projection=true or drop hidden")


@torch.no_grad()
def _linear_init_(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """nn.Linear's default initialisation; nothing on the meta device."""
    if is_meta(weight):
        return
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] else 0.0
    nn.init.uniform_(bias, -bound, bound)


@torch.no_grad()
def normal_(t: torch.Tensor) -> torch.Tensor:
    """N(0, 1), nn.Embedding's default (the official code's token init); nothing on the meta device."""
    if not is_meta(t):
        t.normal_()
    return t


class TokenMLP(nn.Module):
    """P-tuning v2's token projection: Embedding(n, width) -> Linear(width, hidden) -> tanh -> Linear(hidden, out).

    The embedding of the n token ids 0..n-1 is just its (n, width) table, so it is held as that table.
    """

    def __init__(self, n: int, width: int, hidden: int, out: int, like: torch.Tensor):
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.embedding = nn.Parameter(normal_(torch.empty(n, width, **factory)))
        self.weight1 = nn.Parameter(torch.empty(hidden, width, **factory))
        self.bias1 = nn.Parameter(torch.empty(hidden, **factory))
        self.weight2 = nn.Parameter(torch.empty(out, hidden, **factory))
        self.bias2 = nn.Parameter(torch.empty(out, **factory))
        _linear_init_(self.weight1, self.bias1)
        _linear_init_(self.weight2, self.bias2)

    def forward(self) -> torch.Tensor:
        hidden = torch.tanh(F.linear(self.embedding, self.weight1, self.bias1))  # (n, hidden)
        return F.linear(hidden, self.weight2, self.bias2)                         # (n, out)


def first_parameter(model) -> torch.Tensor:
    """A base tensor whose device and dtype new parts follow."""
    return next(iter(model.parameters()))


# ---------------------------------------------------------------- prompt tuning


@dataclass
class PromptConfig(MethodConfig):
    n: int = option(8, "number of soft tokens", minimum=1)
    position: str = option("prefix", "where the tokens go: prefix, infix (evenly spaced), suffix, or prefix+suffix "
                           "(split in half); causal language models accept prefix only", choices=POSITIONS)
    projection: bool = option(False, "compute the tokens with an MLP (Embedding -> Linear -> tanh -> Linear) "
                              "that merge_and_unload collapses into plain tokens")
    hidden: int | None = option(None, "hidden size of the projection MLP (default: the model width d, as the paper)",
                                minimum=1)
    init: str = option("normal", "token init: normal (N(0,1), the paper's code) or vocab (embeddings of random "
                       "vocabulary tokens, Lester et al. 2021; needs a token embedding)", choices=("normal", "vocab"))


class PromptTokens(PeftHook):
    """The model-level hook: n tokens (n, d), plain or from a TokenMLP, inserted at stage "embeddings"."""

    def __init__(self, n: int, d: int, position: str, projection: bool, hidden: int, like: torch.Tensor):
        super().__init__()
        self.n, self.position = n, position
        if projection:
            self.mlp = TokenMLP(n, d, hidden, d, like)
            self.register_parameter("weight", None)
        else:
            self.mlp = None
            self.weight = nn.Parameter(normal_(torch.empty(n, d, device=like.device, dtype=like.dtype)))

    def current_tokens(self) -> torch.Tensor:
        return self.weight if self.mlp is None else self.mlp()             # (n, d)

    def tokens(self, stage, direction, length, offset):
        if stage != "embeddings" or offset > 0:       # a continuing state has seen the prefix already
            return None
        return self.current_tokens(), soft_positions(self.position, self.n, length)

    @torch.no_grad()
    def collapse(self) -> nn.Parameter:
        """Replaces the projection by the tokens it computes now."""
        if self.mlp is not None:
            self.weight = nn.Parameter(self.mlp().clone())
            self.mlp = None
        return self.weight


def _embedding_table(model) -> torch.Tensor | None:
    if model.embedding_path is None:
        return None
    layer = unwrap(get_module(model, model.embedding_path))
    return layer.weight if isinstance(layer, nn.Embedding) else None


@register
class PromptTuning(Method):
    name = "prompt"
    category = "prompt tuning"
    description = ("n soft tokens added to the input sequence (prefix, infix, suffix or both ends), "
                   "stripped from the output")
    Config = PromptConfig
    mergeable = False      # tokens are not a weight; merge_and_unload collapses a projection into plain tokens
    why_not_mergeable = "soft tokens are extra sequence positions, not a change of any weight"
    examples = (Example("prompt:n=3", identity=False), Example("prompt:n=2,projection=true", identity=False),
                Example("prompt:n=3,position=infix", identity=False, non_causal_only=True),
                Example("prompt:n=2,position=suffix", identity=False, non_causal_only=True),
                Example("prompt:n=4,position=prefix+suffix", identity=False, non_causal_only=True))
    presets = {"prompt": ["prompt:n=8,position=prefix+suffix,projection=false"],
               "prompt_proj": ["prompt:n=8,position=prefix+suffix,projection=true"]}
    search_step1 = {"n": 1}
    search_step2 = {"n": {"int": [1, 3]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}

    def check(self, model):
        c = self.config
        if "embeddings" not in model.peft_stages:
            raise NotApplicable(f"prompt: {type(model).__name__} takes no soft tokens at its input")
        check_position("prompt", c.position, c.n, model)
        check_hidden("prompt", c)
        if c.init == "vocab" and _embedding_table(model) is None:
            raise ConfigError(f"prompt: init=vocab copies token embeddings, but {type(model).__name__} has no token "
                              f"embedding table (Vision Mamba embeds patches); use init=normal")

    def attach(self, model):
        c = self.config
        d = model.d_model
        hook = PromptTokens(c.n, d, c.position, c.projection, c.hidden or d, like=first_parameter(model))
        if c.init == "vocab":
            table = _embedding_table(model)
            target = hook.weight if hook.mlp is None else hook.mlp.embedding
            if not is_meta(target):
                with torch.no_grad():
                    ids = torch.randint(0, table.shape[0], (c.n,))
                    target.copy_(table[ids.to(table.device)])
        model.hooks.append(hook)
        self.hook = hook
        return list(hook.parameters())

    def collapse(self, model, tensors):
        tokens = self.hook.collapse()
        # a new config (the caller's PeftConfig is not edited) that says what the adapter now is, so it reloads
        self.config = replace(self.config, projection=False, hidden=None)
        return [tokens]
