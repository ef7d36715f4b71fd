"""Affix tuning (paper Section 3.1, Figure 2b): per-layer soft tokens inside every mixer, outputs discarded.

Prefix tuning needs attention's keys and values; the paper's redesign for Mamba inserts n tokens into each
mixer's sequence and drops their outputs again, so input and output positions stay aligned:

    where=after_in_proj (the paper's best):  xz (b, L, 2E) --insert (n, 2E)--> conv1d, scan --drop--> y (b, L, E)
    where=before_in_proj:                    h (b, L, d) --insert (n, d)--> in_proj ... scan, gate --drop--> out_proj

Positions are those of prompt tuning (prefix by default; infix, suffix and prefix+suffix on non-causal models
only, for the same reasons, see prompt.py). A prefix enters the recurrent state first and is not inserted
again when generation continues from that state. After in_proj, only the X half of a token feeds the scan: the
Z half gates the token's own output, which is dropped, so it never gets a gradient. The paper counts it all
the same (3 tokens x 2E x layers = 221,184 for Mamba-130m) and so do we.

Vision Mamba ("dual", the official `inner_dual_prefix`): each scan direction gets its own tokens, placed in
that direction's own order (a prefix of the backward scan is the first thing it reads, i.e. after the last
patch); dual=false shares one set. Tokens before in_proj are inserted once and shared by both directions.

VMamba (paper Table 5, "Affix-tuning w/o proj"): after in_proj its features are a 2-D grid (the depthwise 3x3
conv follows), so where=after_in_proj means the first place with sequences: after the cross-scan
(`PeftMixerInterface.token_stage`). Each of the four directions gets its own n tokens of width E (dual), which
bypass the conv and pass through x_proj, dt_proj and the scan, and are dropped before the cross-merge: n x 4E per
block, as the official PrefixEncoder's N(0, 1) Embedding(n, sum of 4E over the blocks) sliced per block.

The optional projection is ONE MLP shared by all layers, P-tuning v2 style:
Embedding(n, w) -> Linear(w, hidden) + bias -> tanh -> Linear(hidden, layers * directions * w) + bias, w = 2E
(or d before in_proj), hidden = w by default. For Mamba-130m with 3 tokens that is 236,015,616 parameters
(the paper's 64.64%). It runs once per forward (in `begin_forward`, a model-level hook) and hands each mixer
its slice; `merge_and_unload` collapses it into plain per-layer tokens for inference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..errors import NotApplicable
from ..model.hooks import PeftHook
from .base import TABLE9_DECAY, TABLE9_LR, Example, Method, MethodConfig, option, register
from .prompt import POSITIONS, TokenMLP, check_hidden, check_position, normal_, soft_positions

WHERE = ("after_in_proj", "before_in_proj")


@dataclass
class AffixConfig(MethodConfig):
    n: int = option(3, "number of soft tokens per layer (the paper: 1-3; more overfits)", minimum=1)
    where: str = option("after_in_proj",
                        "insert after in_proj (2E-wide, X and Z; the paper's best; VMamba: E-wide, after the "
                        "cross-scan) or before it (d-wide)", choices=WHERE)
    position: str = option("prefix", "where the tokens go: prefix, infix (evenly spaced), suffix, or prefix+suffix; "
                           "causal language models accept prefix only", choices=POSITIONS)
    projection: bool = option(False, "compute all layers' tokens with one shared MLP (Embedding -> Linear -> tanh -> "
                              "Linear), collapsed into plain tokens by merge_and_unload")
    hidden: int | None = option(None, "hidden size of the projection MLP (default: the token width, 2E or d)",
                                minimum=1)
    dual: bool = option(True, "Vision Mamba, VMamba: separate tokens for each scan direction (after in_proj only)")


class AffixTokens(PeftHook):
    """One mixer's tokens (n, sets, width); sets = 2 for a dual bidirectional mixer, else 1.

    Without projection they are this hook's parameter; with it, the shared AffixProjection sets `current`.
    """

    def __init__(self, stage: str, n: int, sets: int, width: int, position: str, own: bool, like: torch.Tensor):
        super().__init__()
        self.stage, self.n, self.position = stage, n, position
        self.shape = (n, sets, width)
        self.current: torch.Tensor | None = None
        if own:
            self.weight = nn.Parameter(normal_(torch.empty(n, sets, width, device=like.device, dtype=like.dtype)))
        else:
            self.register_parameter("weight", None)

    def tokens(self, stage, direction, length, offset):
        if stage != self.stage or offset > 0:         # a continuing state has seen the prefix already
            return None
        tokens = self.weight if self.weight is not None else self.current
        if tokens is None:
            raise RuntimeError("affix tokens come from the shared projection, which runs at the start of the model's "
                               "forward (PeftHook.begin_forward); run the model, not a mixer on its own")
        return tokens[:, min(direction, tokens.shape[1] - 1)], soft_positions(self.position, self.n, length)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["current"] = None                       # a per-forward tensor (with its graph): not part of the model
        return state


class AffixProjection(PeftHook):
    """The model-level hook holding the shared MLP; computes every layer's tokens once per forward."""

    def __init__(self, n: int, width: int, hidden: int, targets: list[AffixTokens], like: torch.Tensor):
        super().__init__()
        sets = targets[0].shape[1]
        self.mlp = TokenMLP(n, width, hidden, len(targets) * sets * width, like)
        self.layout = (n, len(targets), sets, width)
        self.targets = list(targets)                  # a plain list: the mixers own these hooks

    def all_tokens(self) -> torch.Tensor:
        return self.mlp().view(self.layout)                                   # (n, layers, sets, width)

    def begin_forward(self, offset):
        if offset > 0:                                # generation step: the prefix is in the state already
            return
        out = self.all_tokens()
        for i, hook in enumerate(self.targets):
            hook.current = out[:, i]


@register
class AffixTuning(Method):
    name = "affix"
    category = "affix tuning"
    description = "per-layer soft tokens after (or before) in_proj, their outputs discarded after the scan"
    Config = AffixConfig
    mergeable = False      # tokens are not a weight; merge_and_unload collapses a projection into plain tokens
    why_not_mergeable = "soft tokens are extra sequence positions, not a change of any weight"
    examples = (Example("affix:n=2", identity=False),
                Example("affix:n=2,where=before_in_proj,projection=true", identity=False),
                Example("affix:n=2,dual=false", identity=False),
                Example("affix:n=2,projection=true", identity=False))
    presets = {"affix": ["affix:n=3,where=after_in_proj,position=prefix,projection=false"],
               "affix_proj": ["affix:n=3,where=after_in_proj,position=prefix,projection=true"],
               # VMamba (Table 5, "Affix-tuning w/o proj"): 3 tokens per direction after the cross-scan
               "vmamba/affix": ["affix:n=3,where=after_in_proj,position=prefix,projection=false,dual=true"]}
    search_step1 = {"n": 1}
    search_step2 = {"n": {"int": [1, 3]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}
    lr_by_size = {"mamba-130m": 1e-4, "mamba-370m": 1e-5, "mamba-790m": 1e-5, "mamba-1.4b": 1e-5}   # Table 7

    def _layout(self, mixer) -> tuple[str, int, int]:
        """(stage, token sets, width) for one mixer."""
        stage = mixer.token_stage(self.config.where)
        mixer.require_stage(stage, "affix")
        per_direction = stage in ("after_in_proj", "after_cross_scan")
        sets = mixer.num_directions if self.config.dual and per_direction else 1
        return stage, sets, mixer.soft_token_width(stage)

    def check(self, model):
        c = self.config
        mixers = model.peft_mixers()
        if not mixers:
            raise NotApplicable(f"affix: {type(model).__name__} has no mixers to insert tokens into")
        for mixer in mixers:
            self._layout(mixer)
        check_position("affix", c.position, c.n, model)
        check_hidden("affix", c)
        if c.projection:
            layouts = {self._layout(m) for m in mixers}
            if len(layouts) > 1:
                raise NotApplicable(f"affix: projection=true shares one MLP across layers, but the mixers of "
                                    f"{type(model).__name__} differ in token width or directions ({sorted(layouts)}); "
                                    f"use projection=false (as the paper does on VMamba)")

    def attach(self, model):
        c = self.config
        hooks = []
        for mixer in model.peft_mixers():
            stage, sets, width = self._layout(mixer)
            like = next(mixer.parameters())
            hook = AffixTokens(stage, c.n, sets, width, c.position, own=not c.projection, like=like)
            mixer.hooks.append(hook)
            hooks.append(hook)
        self.token_hooks = hooks
        self.projection = None
        if c.projection:
            _, _, width = self._layout(model.peft_mixers()[0])
            self.projection = AffixProjection(c.n, width, c.hidden or width, hooks, like=like)
            model.hooks.append(self.projection)
            return list(self.projection.parameters())
        return [hook.weight for hook in hooks]

    @torch.no_grad()
    def collapse(self, model, tensors):
        if self.projection is not None:
            out = self.projection.all_tokens()                                # (n, layers, sets, width)
            for i, hook in enumerate(self.token_hooks):
                hook.weight = nn.Parameter(out[:, i].clone())
                hook.current = None
            for i, hook in enumerate(model.hooks):
                if hook is self.projection:
                    del model.hooks[i]
                    break
            self.projection = None
        # a new config (the caller's PeftConfig is not edited) that says what the adapter now is, so it reloads
        self.config = replace(self.config, projection=False, hidden=None)
        return [hook.weight for hook in self.token_hooks]
