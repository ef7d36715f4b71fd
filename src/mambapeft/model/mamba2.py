"""The Mamba-2 language model: its mixer, and the model around it, on our own module tree.

Shapes: batch b, length L, model width d, inner width E = expand * d, H = E / P heads of P channels, G groups
(H % G == 0), state size N, conv kernel K. Parameter names are those of transformers' Mamba2ForCausalLM and
mamba_ssm's Mamba2, so checkpoints of both load as they are.

    h (b, L, d) --in_proj--> [z (E) | x (E) | B (G N) | C (G N) | dt (H)]            rows in this order
    xBC = [x | B | C] --causal depthwise conv1d over E + 2GN channels--> silu
    y = ssd_scan(x (b, L, H, P), dt, A = -exp(A_log) (H), B, C (b, L, G, N), D (H), dt_bias (H), softplus)
    y = norm.weight * rms_norm_per_group(y * silu(z))       gated RMSNorm, G groups of E/G channels
    out = out_proj(y)                                        (b, L, d)

What Mamba-2 changes against Mamba-1 (mixer.py): A is one scalar per head (not an (E, N) matrix), B, C and dt come
straight out of in_proj (no x_proj, no dt_proj: dt_bias is a parameter of its own), B and C pass through the conv
with x, and the gate is folded into a grouped RMSNorm before out_proj. Head h reads B and C of group h // (H/G).

Extension points, the same as those of the Mamba-1 mixer, so that PEFT methods plug in the same way:

* in_proj, conv1d, norm and out_proj are *called as modules*; their weights are never read here, so a wrapper
  (LoRA on in_proj or on a row block of it: z, x, B, C or dt) cannot be bypassed. No fused kernel that takes raw
  weights is used (mamba_ssm's `mamba_split_conv1d_scan_combined` would skip the wrappers).
* A_log, D, dt_bias, conv1d.weight and norm.weight are read as attributes at every call, so
  `torch.nn.utils.parametrize` can add a delta to any of them (partial tuning).
* `hooks` hold `PeftHook`s inserting soft tokens "before_in_proj" (width d) or "after_in_proj" (width of the
  in_proj output, 2E + 2GN + H), dropped again before out_proj (affix tuning).

The model around the mixers is MambaLM's (lm.py): pre-norm residual blocks in float32, final norm, tied head.
Generation keeps one `Mamba2MixerState` per layer; a length-1 forward with a state takes the single-step path
(one conv window, one recurrence step, as mamba_ssm's `Mamba2.step`), anything longer the chunked scan.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scan.ssd import NO_LIMIT, ssd_scan
from .lm import MambaBlock, MambaLMOutput, MambaState, RMSNorm, causal_lm_loss
from .mixer import _masked, drop_inserted, insert_from_hooks


@dataclass
class Mamba2MixerState:
    """What a new token needs from the past of one Mamba-2 mixer (generation)."""

    conv: torch.Tensor | None = None   # (b, E + 2GN, K-1): the last K-1 inputs of the causal conv (x, B and C)
    ssm: torch.Tensor | None = None    # (b, H, P, N): the scan state of every head
    offset: int = 0                    # real tokens consumed so far (inserted soft tokens not counted)


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: weight * rms_norm(y * silu(z)), per group of channels.

    With G groups the normalisation runs over each group of E/G channels separately (as mamba_ssm's kernel
    and transformers' MambaRMSNormGated with group_size do); G = 1 is a plain RMSNorm over all E channels.
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if d % group_size:
            raise ValueError(f"the gated norm's width {d} is not a multiple of its group size {group_size}")
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())                                           # (..., E)
        groups = gated.unflatten(-1, (-1, self.group_size))                             # (..., G, E/G)
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.flatten(-2).to(y.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 256,
        dt_limit: tuple[float, float] = NO_LIMIT,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = E = expand * d_model
        if E % head_dim:
            raise ValueError(f"the inner width {E} (expand {expand} x d_model {d_model}) is not a multiple of "
                             f"head_dim {head_dim}")
        self.head_dim = P = head_dim
        self.num_heads = H = E // P
        if H % n_groups:
            raise ValueError(f"{H} heads cannot be split into {n_groups} groups of B and C")
        self.n_groups = G = n_groups
        self.d_state = N = d_state
        self.d_conv = d_conv
        self.conv_dim = E + 2 * G * N
        self.chunk_size = chunk_size          # for the CUDA kernel only
        self.dt_limit = tuple(dt_limit)
        factory = {"device": device, "dtype": dtype}

        self.in_proj = nn.Linear(d_model, 2 * E + 2 * G * N + H, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(H, **factory))
        self.A_log = nn.Parameter(torch.empty(H, **factory))
        self.D = nn.Parameter(torch.empty(H, **factory))
        self.norm = GatedRMSNorm(E, E // G, norm_eps, **factory)
        self.out_proj = nn.Linear(E, d_model, bias=bias, **factory)
        self.hooks = nn.ModuleList()
        if self.A_log.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, A_range=(1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 0.1,
                             dt_floor: float = 1e-4):
        """mamba_ssm's initialisation: A uniform in A_range per head, D = 1, dt log-uniform via dt_bias."""
        H = self.num_heads
        self.A_log.copy_(torch.empty(H).uniform_(*A_range).log())
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse of softplus

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                state: Mamba2MixerState | None = None) -> torch.Tensor:
        """hidden_states (b, L, d) -> (b, L, d).

        mask (b, L): 1 for real tokens, 0 for padding (zeroed before in_proj and after the conv, as transformers
        does). state: continue from it and update it (generation); a single token then takes the step path.
        """
        offset = state.offset if state is not None else 0
        length = hidden_states.shape[1]
        E, H, G, N = self.d_inner, self.num_heads, self.n_groups, self.d_state

        h = _masked(hidden_states, mask)
        h, mask, kept = insert_from_hooks(self.hooks, "before_in_proj", 0, h, mask, offset)       # (b, L1, d)
        zxbcdt = self.in_proj(h)                                                                   # (b, L1, 2E+2GN+H)
        zxbcdt, mask, kept_after = insert_from_hooks(self.hooks, "after_in_proj", 0, zxbcdt, mask, offset)
        z, xBC, dt = zxbcdt.split([E, self.conv_dim, H], dim=-1)                                   # (b, L2, ...)

        if state is not None and xBC.shape[1] == 1:
            y = self._step(xBC, dt, mask, state)                                                   # (b, 1, E)
        else:
            b, L2 = xBC.shape[:2]
            xBC = _masked(F.silu(self._causal_conv(xBC, state)), mask)                            # (b, L2, E+2GN)
            x, B, C = xBC.split([E, G * N, G * N], dim=-1)
            out = ssd_scan(
                x.view(b, L2, H, self.head_dim), dt, -torch.exp(self.A_log.float()),
                B.view(b, L2, G, N), C.view(b, L2, G, N), D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                dt_limit=self.dt_limit, initial_states=state.ssm if state is not None else None,
                return_final_states=state is not None, chunk_size=self.chunk_size,
            )
            if state is not None:
                out, state.ssm = out                                                               # (b, H, P, N)
            y = out.reshape(b, L2, E).to(x.dtype)
        y = drop_inserted(self.norm(y, z), kept + kept_after)                                     # (b, L, E)
        if state is not None:
            state.offset += length
        return self.out_proj(y)                                                                    # (b, L, d)

    def _causal_conv(self, xBC: torch.Tensor, state: Mamba2MixerState | None) -> torch.Tensor:
        """Depthwise conv over time that sees only the past; with a state, continues from its last inputs."""
        length = xBC.shape[1]
        xt = xBC.mT                                                                   # (b, E+2GN, L)
        if state is None:
            return self.conv1d(xt)[..., :length].mT                                   # padding K-1, cut the tail
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xt.new_zeros(xt.shape[0], self.conv_dim, past)
        full = torch.cat([state.conv.to(xt.dtype), xt], dim=-1)                       # (b, E+2GN, K-1+L)
        state.conv = full[..., full.shape[-1] - past:]
        return self.conv1d(full)[..., past: past + length].mT

    def _step(self, xBC: torch.Tensor, dt: torch.Tensor, mask, state: Mamba2MixerState) -> torch.Tensor:
        """One token from the recurrent state: one conv window and one recurrence step, no chunked scan.

        xBC (b, 1, E+2GN), dt (b, 1, H) -> y (b, 1, E) before the gated norm. The state's tensors are replaced,
        not written in place, so that a state can be differentiated through or branched from.
        """
        b = xBC.shape[0]
        E, H, G, N, P = self.d_inner, self.num_heads, self.n_groups, self.d_state, self.head_dim
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xBC.new_zeros(b, self.conv_dim, past)
        window = torch.cat([state.conv.to(xBC.dtype), xBC.mT], dim=-1)                # (b, E+2GN, K)
        state.conv = window[..., 1:]
        xBC = self.conv1d(window)[..., past: past + 1].mT                             # the output seeing the window
        xBC = _masked(F.silu(xBC), mask)                                               # (b, 1, E+2GN)
        x, B, C = xBC[:, 0].float().split([E, G * N, G * N], dim=-1)
        x = x.view(b, H, P)
        B = B.view(b, G, 1, N).expand(b, G, H // G, N).reshape(b, H, 1, N)           # head h reads group h // (H/G)
        C = C.view(b, G, 1, N).expand(b, G, H // G, N).reshape(b, H, N, 1)

        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float())                      # (b, H)
        if self.dt_limit != NO_LIMIT:
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))                        # (b, H)
        ssm = state.ssm if state.ssm is not None else x.new_zeros(b, H, P, N)
        ssm = decay[..., None, None] * ssm + (dt[..., None] * x)[..., None] * B      # (b, H, P, N)
        state.ssm = ssm
        y = (ssm @ C).squeeze(-1) + self.D.float()[:, None] * x                        # (b, H, P)
        return y.reshape(b, 1, E).to(xBC.dtype)


def mixer_from_config(config, device=None, dtype=None) -> Mamba2Mixer:
    """A mixer for a transformers Mamba2Config."""
    return Mamba2Mixer(
        config.hidden_size,
        d_state=config.state_size,
        d_conv=config.conv_kernel,
        expand=config.expand,
        head_dim=config.head_dim,
        n_groups=config.n_groups,
        conv_bias=config.use_conv_bias,
        bias=config.use_bias,
        norm_eps=config.layer_norm_epsilon,
        chunk_size=config.chunk_size,
        dt_limit=tuple(config.time_step_limit),
        device=device,
        dtype=dtype,
    )


class Mamba2Backbone(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # _weight skips nn.Embedding's own init (reset_parameters does it; instant on the meta device)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                       _weight=torch.empty(config.vocab_size, config.hidden_size, **factory))
        self.layers = nn.ModuleList(
            MambaBlock(mixer_from_config(config, **factory), config.layer_norm_epsilon, config.residual_in_fp32,
                       **factory)
            for _ in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, **factory)


class Mamba2LM(nn.Module):
    """Mamba-2 causal language model. `config` is a transformers Mamba2Config."""

    # What PEFT methods may target: the same names as MambaLM's.
    is_causal = True
    embedding_path = "backbone.embeddings"
    head_path = "lm_head"

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"only silu activations are supported, the config asks for {config.hidden_act!r}")
        if config.num_heads * config.head_dim != config.expand * config.hidden_size:
            raise ValueError(f"num_heads {config.num_heads} x head_dim {config.head_dim} must equal expand "
                             f"{config.expand} x hidden_size {config.hidden_size}")
        self.config = config
        self.backbone = Mamba2Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.hooks = nn.ModuleList()   # model-level PeftHooks: soft prompt tokens at stage "embeddings"
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def untie_weights(self):
        """Gives the head its own copy of the embedding, for methods that change one but not the other."""
        if self.config.tie_word_embeddings:
            self.config = copy.deepcopy(self.config)
            self.config.tie_word_embeddings = False
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone(),
                                               requires_grad=self.lm_head.weight.requires_grad)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random initialisation in the style of mamba_ssm (for from_config; loading overwrites it)."""
        if seed is not None:
            torch.manual_seed(seed)
        n_layer = len(self.backbone.layers)
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.backbone.layers:
            mixer = block.mixer
            for module in (mixer.in_proj, mixer.out_proj, mixer.conv1d):
                module.reset_parameters()
            mixer.reset_ssm_parameters()
            mixer.norm.weight.fill_(1.0)
            mixer.out_proj.weight /= n_layer**0.5     # GPT-2 style scaling of the residual branch
            block.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    def peft_mixers(self) -> list[Mamba2Mixer]:
        return [layer.mixer for layer in self.backbone.layers]

    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on (the head's tying does not matter to adapters)."""
        c = self.config
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
                "expand", "num_heads", "head_dim", "n_groups", "use_bias", "use_conv_bias")
        return {k: getattr(c, k) for k in keys}

    def new_state(self) -> MambaState:
        return MambaState([Mamba2MixerState() for _ in self.backbone.layers])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: MambaState | None = None,
        num_items_in_batch: int | None = None,
        **unused,
    ) -> MambaLMOutput:
        """input_ids (b, L) -> logits (b, L, vocab); loss when labels (b, L) are given (-100 = ignore).

        attention_mask (b, L): 1 for real tokens, 0 for padding. state: continue from it and update it
        (generation; see `new_state`); a single new token then costs one recurrence step per layer.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.backbone.embeddings(input_ids) if inputs_embeds is None else inputs_embeds    # (b, L, d)
        if attention_mask is not None and attention_mask.shape != h.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(h.shape[:2])}")
        mask = attention_mask
        offset = state.offset if state is not None else 0
        for hook in self.hooks:
            hook.begin_forward(offset)
        h, mask, kept = insert_from_hooks(self.hooks, "embeddings", 0, h, mask, offset)       # soft prompt in
        for i, layer in enumerate(self.backbone.layers):
            h = layer(h, mask, state.layers[i] if state is not None else None)
        h = drop_inserted(self.backbone.norm_f(h), kept)                                     # soft prompt out
        logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()                      # (b, L, vocab)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return MambaLMOutput(loss=loss, logits=logits, state=state)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Greedy or sampled continuation; see `mambapeft.model.generation.generate` for the options."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, folder) -> None:
        """Writes config.json and model.safetensors in the Hugging Face Mamba-2 format."""
        from .loading import save_pretrained

        save_pretrained(self, folder)
