"""Memba (Lee, Li, Yin, Xiao, Panda, "Memba: Membrane-driven Parameter-Efficient Fine-Tuning for Mamba", ICLR 2026,
arXiv 2506.18184): leaky-integrate membrane (LIM) neurons on the gate branch, LoRA on in_proj and out_proj, and
cross-layer membrane transfer.

Mamba-1 gates the scan's output with silu(z_t), a function of the current token only. Memba puts a neuron with a
memory in front of the silu: per channel, the membrane potential u integrates the gate's input over the sequence,
leaks by a factor tau each step and resets to zero once it reaches a threshold; the potential itself (not a spike)
is what the gate reads. The neuron has no trainable parameter: what trains is the LoRA on in_proj (which computes z)
and on out_proj. Per mixer and channel, with z_t the gate's input (b, E) at position t:

    v_t = tau * u_{t-1} + z_t                    the potential before reset (what the gate reads)
    u_t = 0 where v_t >= threshold, else v_t     hard reset; the spike test is not differentiated (a constant mask)
    y_t = scan(...)_t * silu(v_t)                in place of silu(z_t)

u_0 = 0 at the start of a sequence. Cross-layer membrane transfer (`transfer=true`): layer l+1's neuron starts from
the average of layer l's potentials v over the (real) positions of the sequence instead of from zero. That average
reads the whole sequence, so on a causal model every position would see later tokens: the option is refused there
(NotApplicable, by name) and allowed on the non-causal Vision Mamba.

Where the neuron sits: once per mixer, on Z after in_proj and before the directions, so Vim's two directions share
one gate as they share silu(z) (the mixer's "gate" stage, model/mamba/mixer.py). Padding is zeroed before the neuron
(a left-padded prompt starts with u = 0 at its first real token, as an unpadded one does). Generation carries u in the
mixer's recurrent state, so step-by-step generation gives the full forward's outputs.

Families: the Mamba-1 mixers (Mamba, FalconMamba, Vim, Jamba's Mamba layers) have a z gate before silu. Mamba-2's
gate sits inside its gated RMSNorm (norm(y * silu(z))), VMamba's SS2D has none in the supported forward types, and
S4D and Gated DeltaNet have other gates: those families raise NotApplicable (no "gate" stage).

Merging: the neuron is a recurrence over positions, not a weight, so it stays; `merge_and_unload` folds the LoRA
into in_proj and out_proj and keeps the neuron (config r=0: the neuron alone). What the paper and its code say
against what is written here, and what we could not check: docs/fidelity.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import NotApplicable
from ..model.hooks import PeftHook, masked
from .base import TABLE9_DECAY, TABLE9_LR, Example, Method, detach_delta, option, projections, register
from .lora import LoRAConfig, attach_linear_lora, check_rank

LORA_ROLES = ("in_proj", "out_proj")


@dataclass
class MembaConfig(LoRAConfig):
    r: int = option(8, "rank of the LoRA on in_proj and out_proj (0: the membrane neurons alone)", minimum=0)
    tau: float = option(0.5, "leak: the membrane keeps tau of its potential from one position to the next",
                        exclusive_minimum=0, maximum=1)
    threshold: float = option(1.0, "the potential at which the membrane resets to zero", exclusive_minimum=0)
    transfer: bool = option(False, "cross-layer membrane transfer: each layer's neuron starts from the previous "
                            "layer's average potential (non-causal models only: it reads the whole sequence)")


def leaky_integrate(z: torch.Tensor, tau: float, threshold: float, u0: torch.Tensor | None = None):
    """The LIM neuron over a sequence: z (b, L, E) -> (potentials v (b, L, E), the membrane u after the last position
    (b, E)). A loop over positions: the reset makes the recurrence nonlinear, so no parallel scan computes it."""
    compute = torch.promote_types(z.dtype, torch.float32)
    u = z.new_zeros(z.shape[0], z.shape[2], dtype=compute) if u0 is None else u0.to(compute)   # (b, E)
    potentials = []
    for t in range(z.shape[1]):
        v = tau * u + z[:, t].to(compute)                                           # (b, E) leak, integrate
        potentials.append(v)
        u = v.masked_fill(v.detach() >= threshold, 0.0)                             # hard reset where it fired
    return torch.stack(potentials, dim=1).to(z.dtype), u


class MembraneGate(PeftHook):
    """One mixer's LIM neurons on the gate's input (no parameters); `previous` is the hook of the mixer before it,
    whose average potential this one starts from when the transfer is on."""

    def __init__(self, config: MembaConfig, previous: MembraneGate | None):
        super().__init__()
        self.tau, self.threshold = config.tau, config.threshold
        self._previous = (previous,)          # a tuple: not a submodule of this hook
        self.average = None                   # (b, E) this forward's average potential, for the next layer
        self._transfers = False               # set when the next layer's hook reads `average`

    def gate(self, z, mask, state):
        previous = self._previous[0]
        start = state.extra.get(id(self)) if state is not None else None          # (b, E) generation's membrane
        if start is None and previous is not None:
            start = previous.average
        v, last = leaky_integrate(masked(z, mask), self.tau, self.threshold, start)   # (b, L, E), (b, E)
        if state is not None:
            state.extra[id(self)] = last.detach()
        if self._transfers:
            weights = torch.ones_like(v[..., :1]) if mask is None else mask[:, :, None].to(v.dtype)   # (b, L, 1)
            self.average = (v * weights).sum(1) / weights.sum(1).clamp(min=1)       # (b, E)
        return v


@register
class Memba(Method):
    name = "memba"
    category = "gate"
    description = ("Memba (ICLR 2026): leaky-integrate membrane neurons on the gate's input z, LoRA on in_proj and "
                   "out_proj, optional cross-layer membrane transfer")
    Config = MembaConfig
    mergeable = False
    why_not_mergeable = ("the membrane neuron is a nonlinear recurrence over positions, not a weight; merging folds "
                         "the LoRA into in_proj and out_proj and keeps the neuron (r=0)")
    targets = frozenset({("gate", None)})
    examples = (Example("memba:r=4", identity=False), Example("memba:r=4,transfer=true", identity=False))
    # the paper's commonsense runs (causal: no transfer) and its Vim runs (transfer on); rank, scale, tau and
    # threshold are our defaults, not read from the authors' code (docs/fidelity.md)
    presets = {"memba": ["memba:r=8,s=0.1,dropout=0.1,dropout_at=bottleneck"],
               "vim/memba": ["memba:r=8,s=0.1,dropout=0.1,dropout_at=bottleneck,transfer=true"]}
    scaled_update = True
    search_step1 = {"r": 4, "s": 0.1}
    search_step2 = {"r": {"int": [4, 16]}, "s": {"log": [1e-2, 1.0]}, "tau": {"float": [0.1, 0.9]},
                    "threshold": {"log": [0.25, 4.0]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}

    def check(self, model):
        for mixer in model.peft_mixers():
            if "gate" not in mixer.peft_stages:
                raise NotApplicable(f"{mixer.display_name} has no gate input z before a silu for the membrane neurons "
                                    "(the Mamba-1 mixers of Mamba, Vim and Jamba have one; Mamba-2 gates inside its "
                                    "gated norm)")
        if self.config.transfer and model.is_causal:
            raise NotApplicable("transfer=true starts each layer's neuron from the previous layer's average potential "
                                "over the whole sequence, so every position of a causal model would read later tokens; "
                                "use transfer=false")
        if self.config.r:
            for role in LORA_ROLES:
                check_rank(self.name, self.config.r, projections(model, role))

    def attach(self, model):
        self.hooks = []
        for mixer in model.peft_mixers():
            hook = MembraneGate(self.config, self.hooks[-1] if self.config.transfer and self.hooks else None)
            if hook._previous[0] is not None:
                hook._previous[0]._transfers = True
            mixer.hooks.append(hook)
            self.hooks.append(hook)
        if not self.config.r:
            return []
        return [t for role in LORA_ROLES for t in attach_linear_lora(model, self.name, role, self.config)]

    def collapse(self, model, tensors):
        """Folds the LoRA into in_proj and out_proj; the neurons stay (they hold no tensors)."""
        if self.config.r:
            for role in LORA_ROLES:
                for p in projections(model, role):
                    detach_delta(p, self.name).merge_into(p.layer)
            self.config = dataclasses.replace(self.config, r=0)
        return []

    def explain_count(self):
        if not self.config.r:
            return "the membrane neurons have no trainable parameters"
        return (f"LoRA of rank {self.config.r} on in_proj (r x (d + 2E)) and out_proj (r x (E + d)) of every mixer; "
                "the membrane neurons add none")
