"""Additional-scan (paper Section 3.3, Eq. 6-8): N' more state dimensions in every selective scan.

    A_log (E, N)  -> [A_log | A_new]        A_new (E, N') trainable, no weight decay
    B, C  (b, L, N) -> [B | x @ W_B^T], [C | x @ W_C^T]      W_B, W_C (N', E): new rows of x_proj

The scan is diagonal, so the N pretrained states evolve exactly as before (Eq. 8); the new ones store what
the task needs. `location` says where the new states sit: "top" (before state 0, the slowest-decaying,
long-term end of an S4D-initialised A) or "bottom" (after state N-1). `init` sets A_new: "neighbour" (the
paper's proposal) copies the adjacent pretrained column, "s4d" continues S4D-real (A = N+1 .. N+N'),
"constant" sets A = `a_value`. The new B and C rows start like x_proj's own rows (Kaiming-uniform);
`zero_init` zeroes the C rows so the model starts exactly as the base model (zeroing B as well would pin every
gradient of the method at zero for good: the new states and the C rows' gradient would both vanish).

Merging grows the layers: A_log gets N + N' columns, x_proj's B and C blocks N + N' rows each and the config's
state_size becomes N + N', a plain checkpoint of a slightly larger state that transformers loads as it is.
Vision Mamba's mixers get one set per scan direction, and so do VMamba's four (the paper's `x_proj_scan_addi`
(4, 2n, E) and `A_log_scan_addi` (4E, n), copied from the pretrained A: the `paper/vmamba/additional_scan` preset);
merging grows VMamba's stacked A_logs (4E, N + n) and x_proj_weight (4, R + 2(N + n), E) and its config's d_state.

Mamba-2 (`GroupExtraStates`): A is one scalar per head, so the added states share their head's A; each group gets
N' more B and C channels, computed from in_proj's input by new in_proj rows and passed through a depthwise conv of
their own (then SiLU), as the pretrained B and C are. The state becomes (H, P, N + N'). Merging adds those rows to
in_proj's B and C blocks and those channels to conv1d, a plain Mamba-2 checkpoint of state size N + N'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NotApplicable
from ..model.hooks import PeftHook
from .base import TABLE9_DECAY, TABLE9_LR, Example, Method, MethodConfig, is_meta, kaiming_, option, register, unwrap


@dataclass
class AdditionalScanConfig(MethodConfig):
    n: int = option(6, "number of added state dimensions N'", minimum=1)
    location: str = option("top", "where the new states sit: top (before state 0) or bottom (after the last)",
                           choices=("top", "bottom"))
    init: str = option("neighbour", "initial A of the new states: neighbour (copy the adjacent pretrained column), "
                       "s4d (A = N+1 .. N+N') or constant (A = a_value)", choices=("neighbour", "s4d", "constant"))
    a_value: float = option(1.0, "A of the new states when init=constant", exclusive_minimum=0)
    zero_init: bool = option(False, "zero the new C rows, so the model starts exactly as the base model")


class ExtraStates(PeftHook):
    """The added A columns and x_proj rows of one mixer, per scan direction."""

    def __init__(self, mixer, config: AdditionalScanConfig):
        super().__init__()
        self.top = config.location == "top"
        E, N, n = mixer.d_inner, mixer.d_state, config.n
        self.A_log = nn.ParameterList()           # [direction] (E, N')
        self.B_weight = nn.ParameterList()        # [direction] (N', E)
        self.C_weight = nn.ParameterList()        # [direction] (N', E)
        for slot, proj in zip(mixer.tensors("A_log"), mixer.projections("B")):
            A_log, x_weight = slot.value, proj.layer.weight
            factory = {"device": A_log.device, "dtype": A_log.dtype}
            if config.init == "neighbour":
                column = 0 if self.top else N - 1
                new_A = A_log.detach()[:, column : column + 1].repeat(1, n).clone()
            elif config.init == "s4d":
                new_A = torch.log(torch.arange(N + 1, N + n + 1, **factory)).expand(E, n).clone()
            else:
                new_A = torch.full((E, n), math.log(config.a_value), **factory)
            self.A_log.append(nn.Parameter(new_A))
            like = {"device": x_weight.device, "dtype": x_weight.dtype}
            self.B_weight.append(nn.Parameter(kaiming_(torch.empty(n, E, **like))))
            C = torch.zeros(n, E, **like) if config.zero_init else kaiming_(torch.empty(n, E, **like))
            self.C_weight.append(nn.Parameter(C))

    def _join(self, old, new, dim):
        return torch.cat([new, old] if self.top else [old, new], dim=dim)

    def extend_initial(self, direction, h0):
        # (E, N) -> (E, N + N'), the added states starting at zero
        return self._join(h0, h0.new_zeros(h0.shape[0], self.A_log[direction].shape[1]), 1)

    def extend_state(self, direction, x, A_log, B, C):
        # x (b, L, E); A_log (E, N); B, C (b, L, N) -> N + N' states
        B_new = F.linear(x, self.B_weight[direction])                              # (b, L, N')
        C_new = F.linear(x, self.C_weight[direction])                              # (b, L, N')
        A_new = self.A_log[direction].to(A_log.dtype)
        return self._join(A_log, A_new, 1), self._join(B, B_new, -1), self._join(C, C_new, -1)


class GroupExtraStates(PeftHook):
    """Mamba-2's added states: per group N' more B and C channels from in_proj's input, with a conv of their own."""

    def __init__(self, mixer, config: AdditionalScanConfig):
        super().__init__()
        self.top = config.location == "top"
        G, n, K = mixer.n_groups, config.n, mixer.d_conv
        self.groups, self.n, self.kernel = G, n, K
        in_proj, conv = unwrap(mixer.in_proj), unwrap(mixer.conv1d)
        like = {"device": in_proj.weight.device, "dtype": in_proj.weight.dtype}
        self.weight = nn.Parameter(kaiming_(torch.empty(2 * G * n, mixer.d_model, **like)))     # rows [B | C]
        if config.zero_init and not is_meta(self.weight):
            with torch.no_grad():
                self.weight[G * n:].zero_()
        # a depthwise conv over the new channels, initialised as nn.Conv1d's own (fan-in K)
        self.conv_weight = nn.Parameter(kaiming_(torch.empty(2 * G * n, 1, K, **like)))
        self.conv_bias = nn.Parameter(torch.zeros(2 * G * n, **like)) if conv.bias is not None else None

    def extra_channels(self, h):
        return F.linear(h, self.weight)                                            # (b, L, 2Gn)

    def extra_conv(self, channels, state):
        """Causal depthwise conv of the new channels; with a state, continues from the inputs it keeps of them."""
        length, past = channels.shape[1], self.kernel - 1
        xt = channels.mT                                                           # (b, 2Gn, L)
        if state is None:
            return F.conv1d(xt, self.conv_weight, self.conv_bias, padding=past, groups=xt.shape[1])[..., :length].mT
        before = state.extra.get(id(self))
        before = xt.new_zeros(xt.shape[0], xt.shape[1], past) if before is None else before.to(xt.dtype)
        full = torch.cat([before, xt], dim=-1)                                     # (b, 2Gn, K-1+L)
        state.extra[id(self)] = full[..., full.shape[-1] - past:]
        return F.conv1d(full, self.conv_weight, self.conv_bias, groups=xt.shape[1])[..., :length].mT

    def join_states(self, B, C, more):
        # B, C (b, L, G, N); more (b, L, 2Gn) -> B, C (b, L, G, N + n)
        B_new, C_new = more.unflatten(-1, (2, self.groups, self.n)).unbind(-3)
        return self._join(B, B_new.to(B.dtype), -1), self._join(C, C_new.to(C.dtype), -1)

    def _join(self, old, new, dim):
        return torch.cat([new, old] if self.top else [old, new], dim=dim)

    def extend_initial(self, direction, h0):
        # (H, P, N) -> (H, P, N + n), the added states starting at zero
        return self._join(h0, h0.new_zeros(*h0.shape[:-1], self.n), -1)

    @torch.no_grad()
    def merge_into(self, mixer) -> None:
        """The new rows into in_proj's B and C blocks, the new channels into conv1d, per group: state N + n."""
        E, G, N, n = mixer.d_inner, self.groups, mixer.d_state, self.n
        in_proj, conv = unwrap(mixer.in_proj), unwrap(mixer.conv1d)

        def grow(t, new, start):                                  # t rows [.. | B (G*N) | C (G*N) | ..] from start
            B, C = t[start:start + G * N], t[start + G * N:start + 2 * G * N]
            B_new, C_new = new[: G * n], new[G * n:]
            B = self._join(B.unflatten(0, (G, N)), B_new.unflatten(0, (G, n)), 1).flatten(0, 1)
            C = self._join(C.unflatten(0, (G, N)), C_new.unflatten(0, (G, n)), 1).flatten(0, 1)
            return torch.cat([t[:start], B, C, t[start + 2 * G * N:]])

        # rows out of in_proj pass a per-block factor where the mixer has one (Falcon-H1's µP vector); the new rows
        # did not while they were ours, so they go in divided by it: exact through the factor
        folded = self.weight.detach() / torch.tensor([mixer.in_proj_block_scale("B")] * (G * n) +
                                                     [mixer.in_proj_block_scale("C")] * (G * n),
                                                     dtype=self.weight.dtype, device=self.weight.device)[:, None]
        in_proj.weight = nn.Parameter(grow(in_proj.weight.detach(), folded, 2 * E))
        in_proj.out_features = in_proj.weight.shape[0]
        if in_proj.bias is not None:
            in_proj.bias = nn.Parameter(grow(in_proj.bias.detach(), torch.zeros(2 * G * n, dtype=in_proj.bias.dtype,
                                                                               device=in_proj.bias.device), 2 * E))
        conv.weight = nn.Parameter(grow(conv.weight.detach(), self.conv_weight.detach(), E))
        if conv.bias is not None:
            conv.bias = nn.Parameter(grow(conv.bias.detach(), self.conv_bias.detach(), E))
        conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
        mixer.d_state = N + n
        mixer.conv_dim = conv.weight.shape[0]


def _hooks(model):
    for mixer in model.peft_mixers():
        for hook in mixer.hooks:
            if isinstance(hook, (ExtraStates, GroupExtraStates)):
                yield mixer, hook


@register
class AdditionalScan(Method):
    name = "additional_scan"
    category = "additional scan"
    description = ("N' extra state dimensions (extra A columns, extra B and C rows of x_proj); "
                   "pretrained states untouched")
    Config = AdditionalScanConfig
    merge_order = 10                            # reshapes A_log and x_proj: after every delta on them is merged
    targets = frozenset({("state", None)})
    examples = (Example("additional_scan:n=3,zero_init=true"),
                Example("additional_scan:n=2,location=bottom,init=s4d", identity=False))
    # VMamba (Table 5): the new rows before the pretrained B and C rows, A copied from the pretrained A; the shipped
    # config has scan_addition_num 1, but the table's counts (395K S, 527K B) are those of n = 2 (docs/vision.md)
    presets = {"additional_scan": ["additional_scan:n=6,location=top,init=neighbour"],
               "vmamba/additional_scan": ["additional_scan:n=2,location=top,init=neighbour"]}
    search_step1 = {"n": 1}
    search_step2 = {"n": {"int": [1, 6]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}
    lr_by_size = {"mamba-130m": 5e-3, "mamba-370m": 1e-3, "mamba-790m": 1e-3, "mamba-1.4b": 1e-4}   # Table 7

    def check(self, model):
        for mixer in model.peft_mixers():
            mixer.require_stage("extend_state", self.name)
            if getattr(mixer, "bcdt_rms_eps", None) is not None:
                raise NotApplicable("additional_scan cannot go on FalconMamba: its RMS norm over B and C would mix the "
                                    "added states into the pretrained ones")
            if getattr(mixer, "bcdt_norm_eps", None) is not None:
                raise NotApplicable("additional_scan cannot go on Jamba's mixers: a merge would put the added B and C "
                                    "rows under its b_layernorm / c_layernorm, whose RMS over N + n states would mix "
                                    "them into the pretrained ones (the adapted model normalises N only)")
            mixer.tensors("A_log")
            mixer.projections("B")

    @staticmethod
    def per_head(mixer) -> bool:
        """Mamba-2's layout (one A per head, state (H, P, N)) rather than Mamba-1's (A (E, N))."""
        return len(mixer.state_shape) == 3

    def attach(self, model):
        params = []
        for mixer in model.peft_mixers():
            hook = (GroupExtraStates if self.per_head(mixer) else ExtraStates)(mixer, self.config)
            mixer.hooks.append(hook)
            params += list(hook.parameters())
        return params

    def param_groups(self, params, lr, weight_decay, flat_decay=True):
        """The new A columns get no weight decay (decay would pull A toward 0: states that never forget)."""
        lr = self.config.lr if self.config.lr is not None else lr
        wd = self.config.weight_decay if self.config.weight_decay is not None else weight_decay
        a = [t for name, t in params.items() if ".A_log." in name]
        bc = [t for name, t in params.items() if ".A_log." not in name and (flat_decay or t.dim() > 1)]
        flat = [t for name, t in params.items() if ".A_log." not in name and not flat_decay and t.dim() <= 1]
        return [{"params": a, "lr": lr, "weight_decay": 0.0, "method": self.name},
                {"params": bc, "lr": lr, "weight_decay": wd, "method": self.name},
                {"params": flat, "lr": lr, "weight_decay": 0.0, "method": self.name}]

    @torch.no_grad()
    def merge(self, model):
        n = self.config.n
        for mixer, hook in list(_hooks(model)):
            for other in mixer.hooks:                         # state-shaped tensors of other methods grow with it
                if other is not hook:
                    for direction in range(mixer.num_directions):
                        other.grow_state(direction, n, hook.top)
            if isinstance(hook, GroupExtraStates):
                hook.merge_into(mixer)
                del mixer.hooks[[i for i, h in enumerate(mixer.hooks) if h is hook][0]]
                continue
            slots, B_rows, C_rows = mixer.tensors("A_log"), mixer.projections("B"), mixer.projections("C")
            grown_A, grown_x = [], []
            for direction, (slot, B_proj, C_proj) in enumerate(zip(slots, B_rows, C_rows)):
                grown_A.append(hook._join(slot.value.detach(), hook.A_log[direction].detach(), 1))
                w = B_proj.layer.weight.detach()        # x_proj: the B rows come before the C rows, in one layer
                (b0, b1), (c0, c1) = B_proj.rows, C_proj.rows
                grown_x.append(torch.cat([w[:b0], hook._join(w[b0:b1], hook.B_weight[direction].detach(), 0),
                                          w[b1:c0], hook._join(w[c0:c1], hook.C_weight[direction].detach(), 0),
                                          w[c1:]]))
            replace_tensors(slots, grown_A)
            replace_tensors([p.weight_slot for p in B_rows], grown_x)
            for p in B_rows:
                if isinstance(p.layer, nn.Linear):
                    p.layer.out_features = p.layer.weight.shape[0]
            mixer.d_state += n
            del mixer.hooks[[i for i, h in enumerate(mixer.hooks) if h is hook][0]]
        model.record_state_growth(n)


def replace_tensors(slots, values) -> None:
    """Gives each slot's tensor a new value (of a new shape), as a new parameter: a whole tensor directly; the parts
    of a tensor stacked over the directions (TensorSlot.index: rows, or entry k) put together again in order."""
    groups: dict[tuple[int, str], list] = {}
    for slot, value in zip(slots, values):
        groups.setdefault((id(slot.owner), slot.name), []).append((slot, value))
    for parts in groups.values():
        slot = parts[0][0]
        if slot.index is None:
            whole = parts[0][1]
        elif isinstance(slot.index, int):
            whole = torch.stack([v for _, v in sorted(parts, key=lambda sv: sv[0].index)])
        else:
            whole = torch.cat([v for _, v in sorted(parts, key=lambda sv: sv[0].index[0])])
        setattr(slot.owner, slot.name, nn.Parameter(whole))

