"""IBM Granite 4.0-H (`granitemoehybrid`): Mamba-2 mixers and attention layers in one stack, each followed by an MLP
(and, in the MoE variants, a mixture of experts), on our own module tree.

Shapes: batch b, length L, width d, vocabulary V. Parameter names are those of transformers'
GraniteMoeHybridForCausalLM, so its checkpoints load strictly and our saved folders load in transformers.

    input_ids (b, L) --embed_tokens--> h * embedding_multiplier                  [hooks: soft prompt tokens]
    each layer i (config.layer_types[i]: "mamba" or "attention"):
        h = h + residual_multiplier * mixer(input_layernorm(h))
              mixer: our Mamba2Mixer (model/mamba2.py, every hook stage), or transformers' GraniteMoeHybridAttention
              (GQA; RoPE from transformers' rotary module when position_embedding_type == "rope", else no positions)
        x = post_attention_layernorm(h)
        h = h + residual_multiplier * (shared_mlp(x) [+ block_sparse_moe(x) when num_local_experts > 0])
    norm --> lm_head --> / logits_scaling --> logits (b, L, V)

Only the SSM mixer and this glue are ours: the attention, MLP, MoE and rotary modules are transformers' own, called
as modules, so a LoRA wrapper on q_proj or input_linear wraps a real nn.Linear and the math is theirs by
construction. The attention module gets an `AttentionState` of ours as its cache (it only calls `update`), so one
`MambaState` carries the SSM states and the keys and values together through generation. The experts keep their
weights as stacked tensors (E, out, in) read at every call: methods adapt them with parametrizations
(methods/lora.py `lora_experts`), never through the router's or experts' forward.

Padding: Mamba layers zero padded positions (as transformers does); attention masks padded keys. A padded query
attends to itself only (not to nothing, which would give NaNs that the Mamba layers' zeroing cannot remove), so the
real positions' outputs never depend on padding. Positions for RoPE count every token the layer has seen
(soft prompt tokens included), as transformers' forward does without position_ids; RoPE depends on relative
positions only, so left padding does not move the real tokens' attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GraniteMoeHybridConfig
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
    GraniteMoeHybridAttention,
    GraniteMoeHybridMLP,
    GraniteMoeHybridMoE,
    GraniteMoeHybridRotaryEmbedding,
)

from ...errors import NotApplicable
from ..hooks import drop_inserted, insert_from_hooks
from ..interface import PeftModelInterface, Projection, TensorSlot, unwrap
from ..mamba.lm import MambaLMOutput, MambaState, RMSNorm, causal_lm_loss
from ..mamba2 import Mamba2Mixer, Mamba2MixerState

# config.layer_types: transformers 5 reads the published names ("mamba", "attention") as the new ones
MAMBA_TYPES = ("mamba", "linear_attention")
ATTENTION_TYPES = ("attention", "full_attention")


def layer_kind(layer_type: str) -> str:
    """"mamba" or "attention" for a config.layer_types entry."""
    if layer_type in MAMBA_TYPES:
        return "mamba"
    if layer_type in ATTENTION_TYPES:
        return "attention"
    raise ValueError(f"unknown Granite 4.0-H layer type {layer_type!r}: expected one of "
                     f"{MAMBA_TYPES + ATTENTION_TYPES}")


@dataclass
class AttentionState:
    """What a new token needs from the past of one attention layer: its keys and values (b, kv heads, T, head_dim),
    which of the T keys are real (b, T) bool, or None when all are, and the cache length T (`offset`).

    `shift` (b,): where rows of different lengths were joined (`cat_rows`: shorter rows left-padded with masked
    keys), how many slots of each row are such padding; a row's next position (RoPE) is then T - shift, so every row
    continues at its own position."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    offset: int = 0
    shift: torch.Tensor | None = None

    @staticmethod
    def cat_rows(states: list[AttentionState], **changes) -> AttentionState:
        """The rows of several states in order, the shorter caches left-padded to the longest (model/lm.py
        cat_rows; its `offset` change, a token count, does not apply: the offset here is the cache length)."""
        length = max(s.offset for s in states)
        keys, values, masks, shifts = [], [], [], []
        for s in states:
            b, pad = s.key.shape[0], length - s.offset
            keys.append(F.pad(s.key, (0, 0, pad, 0)))
            values.append(F.pad(s.value, (0, 0, pad, 0)))
            real = s.key_mask if s.key_mask is not None else s.key.new_ones(b, s.offset, dtype=torch.bool)
            masks.append(torch.cat([real.new_zeros(b, pad), real], dim=1))
            shift = s.shift if s.shift is not None else torch.zeros(b, dtype=torch.long, device=s.key.device)
            shifts.append(shift + pad)
        shift = torch.cat(shifts)
        return AttentionState(torch.cat(keys), torch.cat(values), torch.cat(masks), length,
                              shift if shift.any() else None)

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache call of transformers' attention module: appends this call's keys and values, returns all."""
        if self.key is not None:
            key = torch.cat([self.key.to(key.dtype), key], dim=2)
            value = torch.cat([self.value.to(value.dtype), value], dim=2)
        self.key, self.value = key, value
        return key, value

    def advance(self, mask: torch.Tensor | None, length: int) -> None:
        """Counts the `length` tokens of the call that just `update`d the cache (mask (b, L) of the real ones, or
        None: all real), so the next call masks the padded keys and continues at the right position."""
        self.key_mask = key_mask_after(mask, self.key_mask, self.offset, length)
        self.offset += length


@dataclass
class PassState:
    """The state of a block without memory (an MLP or MoE block of Nemotron-H): only the tokens seen."""

    offset: int = 0


def causal_key_mask(mask: torch.Tensor | None, state: AttentionState | None, length: int,
                   device: torch.device) -> torch.Tensor | None:
    """The boolean mask (b or 1, 1, L, T + L) of L new queries over the T past and L new keys (True: attend): causal,
    padded keys masked, every query sees itself. None where plain causal attention is exact (what sdpa runs fastest)."""
    past = state.offset if state is not None else 0
    past_mask = state.key_mask if state is not None else None
    if mask is None and past_mask is None and (past == 0 or length == 1):
        return None
    q = torch.arange(length, device=device)[:, None] + past
    k = torch.arange(past + length, device=device)[None, :]
    allowed = (k <= q)[None, None]                                                   # (1, 1, L, T+L)
    keys = key_mask_after(mask, past_mask, past, length)
    if keys is not None:
        allowed = (allowed & keys[:, None, None, :].to(device)) | (k == q)[None, None]
    return allowed


def key_mask_after(mask: torch.Tensor | None, past_mask: torch.Tensor | None, past: int,
                   length: int) -> torch.Tensor | None:
    """Which keys are real once `length` new tokens (mask (b, L) or None: all real) follow `past` ones."""
    if mask is None and past_mask is None:
        return None
    like = mask if mask is not None else past_mask
    b = like.shape[0]
    old = past_mask if past_mask is not None else torch.ones(b, past, dtype=torch.bool, device=like.device)
    new = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool, device=like.device)
    return torch.cat([old.bool(), new], dim=1)


ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
# a gated MLP's roles (down(silu(gate(x)) * up(x)), one Linear each): the Linears each role names
GATED_MLP_ROLES = {"gate_proj": ("gate_proj",), "up_proj": ("up_proj",), "down_proj": ("down_proj",),
                   "mlp_in": ("gate_proj", "up_proj"), "mlp_out": ("down_proj",)}


def whole_projections(modules, attrs) -> list[Projection]:
    """The Linear `attr` of each module, for each attr in `attrs`, every output row (a role that is a whole layer)."""
    return [Projection(m, attr, (0, unwrap(getattr(m, attr)).out_features)) for m in modules for attr in attrs]


def mixer_from_config(config: GraniteMoeHybridConfig) -> Mamba2Mixer:
    """Our Mamba-2 mixer with a Granite layer's sizes (the mixer's norm eps is the model's rms_norm_eps); Bamba's
    configs name the same fields."""
    return Mamba2Mixer(
        config.hidden_size,
        d_state=config.mamba_d_state,
        d_conv=config.mamba_d_conv,
        expand=config.mamba_expand,
        head_dim=config.mamba_d_head,
        n_groups=config.mamba_n_groups,
        conv_bias=config.mamba_conv_bias,
        bias=config.mamba_proj_bias,
        norm_eps=config.rms_norm_eps,
        chunk_size=config.mamba_chunk_size,
        dt_limit=tuple(config.time_step_limit),
    )


class GraniteHybridLayer(nn.Module):
    """One decoder layer: a mixer (`mamba` or `self_attn`, the other None) and the MLP / MoE after it."""

    def __init__(self, config: GraniteMoeHybridConfig, index: int):
        super().__init__()
        self.kind = layer_kind(config.layer_types[index])
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = mixer_from_config(config) if self.kind == "mamba" else None
        self.self_attn = GraniteMoeHybridAttention(config, index) if self.kind == "attention" else None
        self.shared_mlp = GraniteMoeHybridMLP(config)
        self.block_sparse_moe = GraniteMoeHybridMoE(config) if config.num_local_experts > 0 else None
        self.residual_multiplier = config.residual_multiplier

    @property
    def ssm(self) -> Mamba2Mixer | None:
        return self.mamba

    def forward(self, h, mask, attn_mask, position_embeddings, state):
        """h (b, L, d) -> (b, L, d). mask (b, L) of real tokens (Mamba); attn_mask (see `causal_key_mask`)."""
        x = self.input_layernorm(h)
        if self.mamba is not None:
            x = self.mamba(x, mask, state)
        else:
            length = x.shape[1]
            x = self.self_attn(x, attn_mask, cache=state, position_embeddings=position_embeddings)[0]
            if state is not None:
                state.advance(mask, length)
        h = h + x * self.residual_multiplier
        x = self.post_attention_layernorm(h)
        out = self.shared_mlp(x)
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(x) + out
        return h + out * self.residual_multiplier


class GraniteHybridModel(nn.Module):
    """The decoder without the head (transformers' GraniteMoeHybridModel's module names)."""

    def __init__(self, config: GraniteMoeHybridConfig):
        super().__init__()
        if config.position_embedding_type not in (None, "rope", "nope"):
            raise ValueError(f"unknown position_embedding_type {config.position_embedding_type!r}")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(GraniteHybridLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = None
        if config.position_embedding_type == "rope":
            with torch.device("cpu"):               # real numbers even when the model is built on the meta device
                self.rotary_emb = GraniteMoeHybridRotaryEmbedding(config)


class GraniteHybridLM(nn.Module, PeftModelInterface):
    """Granite 4.0-H causal language model (`config`: a transformers GraniteMoeHybridConfig).

    The other hybrid families (Bamba, Jamba, Falcon-H1, Nemotron-H, Qwen3-Next, Qwen3.5) subclass it and keep its
    constructor, head, tying, initialisation and forward; each says only what differs: its decoder
    (`decoder_class`), what its configs may not ask for (`check_config`), whether transformers' expert blocks are
    built (`builds_experts`), its two glue scalars (`embedding_multiplier`, `logits_scaling`; 1 where the family
    has none) and its interface answers."""

    family = "granitemoehybrid"
    is_causal = True
    embedding_path = "model.embed_tokens"
    head_path = "lm_head"
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "layer_types",
                        "num_attention_heads", "num_key_value_heads", "intermediate_size", "shared_intermediate_size",
                        "num_local_experts", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_head",
                        "mamba_d_conv", "mamba_expand", "mamba_conv_bias", "mamba_proj_bias", "attention_bias")
    decoder_class: type[nn.Module] = GraniteHybridModel     # the decoder without the head, built from the config
    builds_experts = True                                   # the decoder may hold transformers' MoE blocks

    def __init__(self, config: GraniteMoeHybridConfig, device=None, dtype=None):
        self.check_config(config)
        super().__init__()
        config._attn_implementation = "sdpa"          # a boolean mask, and the fast CPU path
        if self.builds_experts and getattr(config, "_experts_implementation", None) is None:
            config._experts_implementation = "eager"  # transformers' loop over the experts (any width, exact)
        self.config = config
        with torch.device(device if device is not None else torch.get_default_device()):
            self.model = self.decoder_class(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hooks = nn.ModuleList()               # model-level PeftHooks: soft prompt tokens at stage "embeddings"
        if dtype is not None:
            self.to(dtype)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    @classmethod
    def check_config(cls, config) -> None:
        """Refuses (ValueError) what this family's module tree does not implement, before anything is built (the
        decoder refuses what only it reads, such as Granite's position_embedding_type)."""
        if config.hidden_act != "silu":
            raise ValueError(f"only silu activations are supported, the config asks for {config.hidden_act!r}")

    # what a hybrid family around the same glue (nemotron_h) says differently
    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def embedding_multiplier(self) -> float:
        """h = embed_tokens(ids) * this (a µP scalar); a family without one sets the class attribute to 1.0."""
        return self.config.embedding_multiplier

    @property
    def logits_scaling(self) -> float:
        """logits = lm_head(h) / this; a family without one sets the class attribute to 1.0."""
        return self.config.logits_scaling

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight

    def untie_weights(self):
        """Gives the head its own copy of the embedding, for methods that change one but not the other."""
        if self.config.tie_word_embeddings:
            self.config = copy.deepcopy(self.config)
            self.config.tie_word_embeddings = False
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone(),
                                               requires_grad=self.lm_head.weight.requires_grad)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random initialisation in the style of transformers' (normal, std initializer_range; Mamba-2 mixers as
        mamba_ssm initialises them): for from_config; loading overwrites it."""
        if seed is not None:
            torch.manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(std=std)
            else:
                p.fill_(1.0) if name.endswith(("norm.weight", "norm_f.weight")) else p.zero_()
        for mixer in self.peft_mixers():
            mixer.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def peft_mixers(self) -> list[Mamba2Mixer]:
        """The Mamba-2 mixers (what the SSM methods adapt); attention and MLPs answer `layer_projections`."""
        return [layer.ssm for layer in self.model.layers if layer.ssm is not None]

    def layer_types(self) -> list[str]:
        return [layer.kind for layer in self.model.layers]

    def part_types(self) -> dict[str, str]:
        parts = {}
        for i, layer in enumerate(self.model.layers):
            parts[f"model.layers.{i}.{'mamba' if layer.kind == 'mamba' else 'self_attn'}"] = layer.kind
            parts[f"model.layers.{i}.shared_mlp"] = "mlp"
            if layer.block_sparse_moe is not None:
                parts[f"model.layers.{i}.block_sparse_moe"] = "moe"
        return parts

    def attention_projections(self, role: str) -> list[Projection]:
        """`role` (q_proj, k_proj, v_proj, o_proj) of every layer's `self_attn`, whole; refused by name in a model
        without attention layers."""
        attention = [layer.self_attn for layer in self.model.layers if layer.self_attn is not None]
        if not attention:
            raise NotApplicable(f"this {self.family} model has no attention layers (layer_types: all mamba)")
        return whole_projections(attention, (role,))

    def gated_mlp_projections(self, role: str, mlps: list[nn.Module]) -> list[Projection]:
        """`role` in a family whose MLPs are gated, one Linear per role (GATED_MLP_ROLES): those Linears of `mlps`."""
        attrs = GATED_MLP_ROLES.get(role)
        if attrs is None:
            raise NotApplicable(f"{self.family} has no {role!r} projection")
        return whole_projections(mlps, attrs)

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            return self.attention_projections(role)
        mlps = [layer.shared_mlp for layer in self.model.layers]
        width = self.config.shared_intermediate_size
        rows = {"gate_proj": ("input_linear", (0, width)), "up_proj": ("input_linear", (width, 2 * width)),
                "mlp_in": ("input_linear", (0, 2 * width)), "down_proj": ("output_linear", (0, self.d_model)),
                "mlp_out": ("output_linear", (0, self.d_model))}
        if role in rows:
            attr, span = rows[role]
            return [Projection(mlp, attr, span) for mlp in mlps]
        raise NotApplicable(f"{self.family} has no {role!r} projection")

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        moes = [layer.block_sparse_moe for layer in self.model.layers if layer.block_sparse_moe is not None]
        where = {"router": lambda m: TensorSlot(m.router, "weight"),
                 "experts_in": lambda m: TensorSlot(m.experts, "gate_up_proj"),
                 "experts_out": lambda m: TensorSlot(m.experts, "down_proj")}
        if role not in where:
            raise NotApplicable(f"{self.family} has no {role!r} tensor")
        if not moes:
            raise NotApplicable(f"this {self.family} model has no experts (num_local_experts 0: a dense model)")
        return [where[role](m) for m in moes]

    def model_tensor(self, role: str) -> TensorSlot:
        raise NotApplicable(f"a language model has no {role} (a Vision Mamba tensor)")

    def peft_inputs(self, batch: int = 2, seed: int = 0, length: int = 9) -> dict:
        ids = torch.randint(0, self.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids.to(self.device), "labels": ids.to(self.device)}

    def peft_fingerprint(self) -> dict:
        fingerprint = {k: getattr(self.config, k) for k in self.fingerprint_keys}
        fingerprint["layer_types"] = self.layer_types()
        return fingerprint

    # ------------------------------------------------------------------ running

    def new_state(self) -> MambaState:
        """An empty state for generation: a Mamba2MixerState per Mamba layer, an AttentionState per attention one."""
        return MambaState([Mamba2MixerState() if layer.kind == "mamba" else AttentionState()
                           for layer in self.model.layers])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: MambaState | None = None,
        num_items_in_batch: int | None = None,
        logits_to_keep: int = 0,
        **unused,
    ) -> MambaLMOutput:
        """input_ids (b, L) -> logits (b, L, V); loss when labels (b, L) are given (-100 = ignore). The arguments mean
        what they mean in MambaLM.forward (model/lm.py): attention_mask 1 for real tokens, state to continue from and
        update (generation), logits_to_keep the last positions only."""
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep must be >= 0 and 0 when labels are given, got {logits_to_keep}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds                 # (b, L, d)
        if attention_mask is not None and attention_mask.shape != h.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(h.shape[:2])}")
        h = h * self.embedding_multiplier
        offset = state.offset if state is not None else 0
        for hook in self.hooks:
            hook.begin_forward(offset)
        h, mask, kept = insert_from_hooks(self.hooks, "embeddings", 0, h, attention_mask, offset)    # soft prompt in
        length = h.shape[1]
        # "parallel": a layer with attention beside its mixer (Falcon-H1)
        first_attention = next((i for i, layer in enumerate(self.model.layers)
                                if layer.kind in ("attention", "parallel")), None)
        attn_mask, position_embeddings = None, None
        if first_attention is not None:
            past = state.layers[first_attention] if state is not None else None
            attn_mask = causal_key_mask(mask, past, length, h.device)
            if getattr(self.model, "rotary_emb", None) is not None:
                start = past.offset if past is not None else 0
                positions = torch.arange(start, start + length, device=h.device)[None]           # (1, L)
                if past is not None and past.shift is not None:
                    positions = positions - past.shift[:, None]                                  # (b, L)
                position_embeddings = self.rotary(h, positions)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, mask, attn_mask, position_embeddings, state.layers[i] if state is not None else None)
        h = drop_inserted(self.final_norm(h), kept)                                               # soft prompt out
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = (self.lm_head(h.to(self.lm_head.weight.dtype)) / self.logits_scaling).float()
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return MambaLMOutput(loss=loss, logits=logits, state=state)

    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) of transformers' rotary module; rebuilt once if the model was built on the meta device."""
        if self.model.rotary_emb.inv_freq.device.type == "meta":
            with torch.device(h.device):
                self.model.rotary_emb = type(self.model.rotary_emb)(self.config)
        return self.model.rotary_emb(h, positions)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Greedy or sampled continuation; see `mambapeft.model.generation.generate` for the options."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors that transformers' GraniteMoeHybridForCausalLM and `load_granite_hybrid`
        both load, with the published tensor names (refused while PEFT parts are attached: save the adapter, or merge
        first)."""
        from ..registry import family_of_model

        family_of_model(self).save(self, folder)


def hybrid_summary(model) -> dict:
    """`mambapeft info` for a hybrid: sizes, the layers of each kind, and the parameters of each kind of part
    (model.part_types(): "mamba", "attention", "mlp", "moe")."""
    from ..summary import count_unique

    c = model.config
    kinds = model.layer_types()
    parts = sorted(model.part_types().items(), key=lambda item: -len(item[0]))       # longest prefix first
    per_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        kind = next((k for prefix, k in parts if name.startswith(prefix + ".")), "other")
        per_kind[kind] = per_kind.get(kind, 0) + p.numel()
    return {"model_type": c.model_type, "d_model": c.hidden_size, "n_layer": c.num_hidden_layers,
            "vocab_size": c.vocab_size, "layers": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
            "parameters": {"total": count_unique(model.parameters()), **per_kind}}
