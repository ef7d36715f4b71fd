"""The Mamba-1 language model on our mixer.

Our own module tree, with exactly the module names of transformers' `MambaForCausalLM`
(backbone.embeddings, backbone.layers.i.{norm, mixer.*}, backbone.norm_f, lm_head), so a Hugging Face
checkpoint's state dict loads into it unchanged and a merged model saves as one transformers loads.
Why not transformers' model with its mixers swapped: its block passes transformers' cache object (whose API
changed three times) into the mixer, and its generation path assumes that cache; owning the ~150 lines of
model around the mixer keeps one recurrent state of our own, which affix tokens and extra scan states need.

    input_ids (b, L) --embeddings--> h (b, L, d)
    [model hooks may insert soft prompt tokens here]
    for each layer:  h = h + mixer(norm(h))          (residual in float32)
    norm_f --> [soft prompt positions dropped] --> lm_head --> logits (b, L, vocab)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ...errors import NotApplicable
from ..checkpoint import write_hf_checkpoint
from ..hooks import drop_inserted, insert_from_hooks
from ..interface import PeftModelInterface, TensorSlot
from .mixer import MambaMixer, MixerState


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def drop_path(branch: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: each sample's whole branch is dropped with probability `rate`, the kept ones scaled up."""
    keep = 1.0 - rate
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    return branch * mask / keep


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), the residual stream kept in float32.

    `drop_path` (stochastic depth, training only) is what Vim's and VMamba's fine-tuning recipes use; 0 elsewhere."""

    def __init__(self, mixer: MambaMixer, eps: float, residual_in_fp32: bool = True, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(mixer.d_model, eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32
        self.drop_path = 0.0

    def forward(self, h, mask=None, state: MixerState | None = None):
        residual = h.float() if self.residual_in_fp32 else h
        branch = self.mixer(self.norm(h.to(self.norm.weight.dtype)), mask, state)
        if self.drop_path and self.training:
            branch = drop_path(branch, self.drop_path)
        return residual + branch


class MambaBackbone(nn.Module):
    def __init__(self, config, mixer_factory, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # _weight skips nn.Embedding's own init (MambaLM.reset_parameters does it; on the meta device the
        # built-in normal_ would import torch's compiler stack for seconds)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                       _weight=torch.empty(config.vocab_size, config.hidden_size, **factory))
        self.layers = nn.ModuleList(
            MambaBlock(mixer_factory(config, **factory), config.layer_norm_epsilon, config.residual_in_fp32, **factory)
            for _ in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, **factory)


def mixer_from_config(config, device=None, dtype=None) -> MambaMixer:
    """A mixer for a transformers MambaConfig or FalconMambaConfig."""
    return MambaMixer(
        config.hidden_size,
        d_state=config.state_size,
        d_conv=config.conv_kernel,
        expand=config.expand,
        dt_rank=config.time_step_rank,
        conv_bias=config.use_conv_bias,
        bias=config.use_bias,
        bcdt_rms_eps=getattr(config, "mixer_rms_eps", None) if config.model_type == "falcon_mamba" else None,
        device=device,
        dtype=dtype,
    )


@dataclass
class MambaState:
    """Recurrent state of the whole model for generation: one MixerState per layer."""

    layers: list[MixerState] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def select(self, rows: torch.Tensor) -> MambaState:
        """A new state made of copies of batch rows `rows` (b',) long, in that order; a row may repeat (one
        context continued by several continuations). The copy is independent: stepping one leaves the other."""
        return MambaState([map_rows(layer, lambda t: t.index_select(0, rows)) for layer in self.layers])


def map_rows(layer, fn, **changes):
    """A copy of one mixer's state (any family's) with fn applied to each of its batch-first tensors, the hooks' own
    buffers (`extra`) included; `changes` set other fields."""
    for key, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            changes[key] = fn(value)
        elif key == "extra" and isinstance(value, dict):
            changes[key] = {k: fn(v) for k, v in value.items()}
    return dataclasses.replace(layer, **changes)


def cat_rows(layers: list, **changes):
    """One mixer's state made of the rows of several (same family, in order); `changes` set other fields."""
    first = layers[0]
    if hasattr(first, "cat_rows"):        # a state whose rows may differ in length (a hybrid's attention keys)
        return first.cat_rows(layers, **changes)
    for key, value in vars(first).items():
        if isinstance(value, torch.Tensor):
            changes[key] = torch.cat([getattr(layer, key) for layer in layers])
        elif key == "extra" and isinstance(value, dict):
            changes[key] = {k: torch.cat([layer.extra[k] for layer in layers]) for k in value}
    return dataclasses.replace(first, **changes)


@dataclass
class MambaLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: MambaState | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy, labels -100 ignored; the same as transformers' ForCausalLMLoss."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items_in_batch


class MambaLM(nn.Module, PeftModelInterface):
    """Mamba-1 causal language model. `config` is a transformers MambaConfig or FalconMambaConfig."""

    family = "mamba"
    is_causal = True                      # outputs see only the past: a suffix soft token would change nothing
    embedding_path = "backbone.embeddings"
    head_path = "lm_head"
    # the config fields an adapter depends on (the head's tying does not matter to adapters)
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
                        "expand", "time_step_rank", "use_bias", "use_conv_bias")

    @staticmethod
    def mixer_factory(config, device=None, dtype=None):
        return mixer_from_config(config, device=device, dtype=dtype)

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"only silu activations are supported, the config asks for {config.hidden_act!r}")
        self.config = config
        self.backbone = MambaBackbone(config, self.mixer_factory, device=device, dtype=dtype)
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
            block.mixer.reset_parameters()
            block.mixer.out_proj.weight /= n_layer**0.5     # GPT-2 style scaling of the residual branch
            block.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def peft_mixers(self) -> list[MambaMixer]:
        return [layer.mixer for layer in self.backbone.layers]

    def model_tensor(self, role: str) -> TensorSlot:
        raise NotApplicable(f"a language model has no {role} (a Vision Mamba tensor)")

    def peft_inputs(self, batch: int = 2, seed: int = 0, length: int = 9) -> dict:
        ids = torch.randint(0, self.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids.to(self.device), "labels": ids.to(self.device)}

    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on."""
        return {k: getattr(self.config, k) for k in self.fingerprint_keys}

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    def new_state(self) -> MambaState:
        return MambaState([MixerState() for _ in self.backbone.layers])

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
        """input_ids (b, L) -> logits (b, L, vocab); loss when labels (b, L) are given (-100 = ignore).

        attention_mask (b, L): 1 for real tokens, 0 for padding (padded positions are zeroed before in_proj and
        after the conv, as in transformers, so left padding leaves the real tokens' outputs unchanged).
        state: continue from it and update it (generation; see `new_state`). A length-1 input that continues a
        state takes each mixer's one-token `step` (outside autograd).
        logits_to_keep: compute the logits of the last `logits_to_keep` positions only, (b, k, vocab), as
        transformers' argument of that name (0: all positions); the head is a large part of a pass that only
        needs the state and the last position.
        """
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep must be >= 0 and 0 when labels are given, got {logits_to_keep}")
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
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()                      # (b, L, vocab)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return MambaLMOutput(loss=loss, logits=logits, state=state)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Greedy or sampled continuation; see `mambapeft.model.generation.generate` for the options."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors in the Hugging Face Mamba format, which transformers' MambaForCausalLM and
        our from_pretrained both load (refused while PEFT parts are attached: save the adapter, or merge first)."""
        write_hf_checkpoint(self, folder)
