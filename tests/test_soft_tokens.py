"""Prompt and affix tuning against references written out by hand.

Prompt: the model run on an explicitly built sequence (soft tokens placed among the token embeddings, fed as
inputs_embeds), then the real positions picked out. Affix: a float64 re-statement of the mixer with the tokens
put into xz (or h) by hand. Besides: gradients, frozen base, save/load, merge and collapse, generation from the
recurrent state, the paper's exact parameter counts, and clear errors.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mambapeft
from mambapeft import ConfigError, MambaMixer, PeftConfig, PeftModel, get_peft_model, selective_scan_reference
from mambapeft.methods.prompt import soft_positions
from mambapeft.model.interface import PeftModelInterface
from mambapeft.model.mamba import DIRECTION_NAMES
from mambapeft.model.mamba.architectures import arch_config
from mambapeft.model.mamba.lm import MambaLM

from conftest import assert_rel_close

VOCAB = 1024          # the "tiny" architecture: d 64, E 128, 2 layers


def f64(t):
    return t.detach().double()


def tiny(seed=0):
    return mambapeft.from_config("tiny", seed=seed)


def perturb_trainable(peft, scale=0.3, seed=1):
    """Moves every trainable tensor off its init (LoRA's zero Up included), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def trainable(peft):
    return {n: p for n, p in peft.base_model.named_parameters() if p.requires_grad}


def mlp_by_hand(mlp):
    """Embedding -> Linear -> tanh -> Linear in float64, from the projection's tensors."""
    hidden = torch.tanh(f64(mlp.embedding) @ f64(mlp.weight1).T + f64(mlp.bias1))
    return hidden @ f64(mlp.weight2).T + f64(mlp.bias2)


def insert_by_hand(seq, tokens, positions):
    """seq (b, L, w) with tokens (n, w) at `positions` of the longer sequence; also the real tokens' places."""
    b, L, w = seq.shape
    parts, real, kept = [], 0, []
    for p in range(L + len(positions)):
        if p in positions:
            parts.append(tokens[positions.index(p)].expand(b, 1, w))
        else:
            parts.append(seq[:, real : real + 1])
            kept.append(p)
            real += 1
    return torch.cat(parts, dim=1), kept


class NonCausalLM(MambaLM):
    """The language model with the causal guard off, to test where infix and suffix tokens land."""

    is_causal = False


class MixerStack(nn.Module, PeftModelInterface):
    """A stand-in model: exactly what the model interface declares (mixers, hooks, causality, width), nothing more.

    With Vim-S sizes on the meta device it stands for Vision Mamba in the parameter counts.
    """

    family = "mixer-stack"

    def __init__(self, d, layers, bidirectional, is_causal=False, device=None, **mixer_kw):
        super().__init__()
        self.layers = nn.ModuleList(MambaMixer(d, bidirectional=bidirectional, device=device, **mixer_kw)
                                    for _ in range(layers))
        self.hooks = nn.ModuleList()
        self.is_causal = is_causal
        self._d = d
        if device != "meta":
            with torch.no_grad():
                for p in self.layers.parameters():
                    p.add_(torch.randn_like(p) * 0.1)

    @property
    def d_model(self):
        return self._d

    def peft_mixers(self):
        return list(self.layers)

    def peft_fingerprint(self):
        return {"d": self._d, "layers": len(self.layers)}

    def forward(self, h):
        for hook in self.hooks:
            hook.begin_forward(0)
        for mixer in self.layers:
            h = h + mixer(h)
        return h


# ---------------------------------------------------------------- the mixer, re-stated in float64


def reference_direction(mixer, xz, direction):
    """conv -> silu -> x_proj -> dt -> scan -> gate for one direction; xz (b, L, 2E) float64 -> y (b, L, E)."""
    names = DIRECTION_NAMES[direction]
    conv, x_proj, dt_proj = (getattr(mixer, names[k]) for k in ("conv1d", "x_proj", "dt_proj"))
    E, L = mixer.d_inner, xz.shape[1]
    x, z = xz[..., :E], xz[..., E:]
    x = F.silu(F.conv1d(x.mT, f64(conv.weight), f64(conv.bias), padding=mixer.d_conv - 1, groups=E)[..., :L]).mT
    dt_low, B, C = F.linear(x, f64(x_proj.weight)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.linear(dt_low, f64(dt_proj.weight), f64(dt_proj.bias))
    A = -torch.exp(f64(getattr(mixer, names["A_log"])))
    y = selective_scan_reference(x.mT, dt.mT, A, B.mT, C.mT, f64(getattr(mixer, names["D"])), z.mT, delta_softplus=True)
    return y.mT


def reference_affix_mixer(mixer, h, tokens, where, position):
    """One mixer with affix tokens (n, sets, width) put in by hand; h (b, L, d) -> (b, L, d) float64."""
    h = f64(h)
    positions = soft_positions(position, tokens.shape[0], h.shape[1]).tolist()
    w_in = f64(mixer.in_proj.weight)
    if where == "before_in_proj":
        longer, kept = insert_by_hand(h, tokens[:, 0], positions)
        xz = F.linear(longer, w_in)
        y = reference_direction(mixer, xz, 0)
        if mixer.bidirectional:
            y = (y + reference_direction(mixer, xz.flip(1), 1).flip(1)) / 2
        y = y[:, kept]
    else:
        xz = F.linear(h, w_in)
        longer, kept = insert_by_hand(xz, tokens[:, 0], positions)
        y = reference_direction(mixer, longer, 0)[:, kept]
        if mixer.bidirectional:      # the backward scan gets its own tokens (dual), placed in its own order
            longer, kept = insert_by_hand(xz.flip(1), tokens[:, -1], positions)
            y = (y + reference_direction(mixer, longer, 1)[:, kept].flip(1)) / 2
    return F.linear(y, f64(mixer.out_proj.weight))


def affix_tokens_by_hand(peft):
    """Every layer's affix tokens (n, sets, width) in float64, through the projection if there is one."""
    method = next(m for m in peft.methods if m.name == "affix")
    if method.projection is not None:
        n, layers, sets, width = method.projection.layout
        out = mlp_by_hand(method.projection.mlp).view(n, layers, sets, width)
        return [out[:, i] for i in range(layers)]
    return [f64(hook.weight) for hook in method.token_hooks]


# ---------------------------------------------------------------- positions


@pytest.mark.parametrize("position, n, length, expected", [
    ("prefix", 3, 5, [0, 1, 2]),
    ("suffix", 2, 5, [5, 6]),
    ("prefix+suffix", 3, 4, [0, 1, 6]),             # ceil(n/2) in front
    ("prefix+suffix", 4, 4, [0, 1, 6, 7]),
    ("infix", 1, 7, [3]),                           # the middle, where Vim puts its class token
    ("infix", 2, 6, [2, 5]),                        # x x T x x T x x
    ("infix", 3, 7, [1, 4, 7]),
])
def test_positions_by_hand(position, n, length, expected):
    assert soft_positions(position, n, length).tolist() == expected


def test_infix_tokens_are_evenly_spaced():
    for n in range(1, 7):
        for length in range(13):
            pos = soft_positions("infix", n, length).tolist()
            assert pos == sorted(set(pos)) and len(pos) == n and pos[-1] < length + n
            runs = [b - a - 1 for a, b in zip([-1] + pos, pos + [length + n])]      # real tokens between tokens
            assert sum(runs) == length and max(runs) - min(runs) <= 1


# ---------------------------------------------------------------- prompt tuning


@pytest.mark.parametrize("projection", [False, True])
def test_prompt_equals_the_model_on_an_explicitly_prefixed_sequence(projection):
    peft = get_peft_model(tiny(), [f"prompt:n=3,projection={projection}"])
    ids = torch.randint(0, VOCAB, (2, 9))
    out = peft(ids).logits
    assert out.shape == (2, 9, VOCAB)                                  # soft positions dropped again
    hook = peft.base_model.hooks[0]
    tokens = mlp_by_hand(hook.mlp) if projection else f64(hook.weight)
    reference_model = tiny()                                           # same weights, no hooks
    embeds = torch.cat([tokens.float().expand(2, -1, -1), reference_model.backbone.embeddings(ids)], dim=1)
    assert_rel_close(out, reference_model(inputs_embeds=embeds).logits[:, 3:], what="prompt prefix")


@pytest.mark.parametrize("position", ["infix", "suffix", "prefix+suffix"])
def test_prompt_positions_on_a_non_causal_model(position):
    torch.manual_seed(0)
    model = NonCausalLM(arch_config("tiny"))
    reference_model = NonCausalLM(arch_config("tiny"))
    reference_model.load_state_dict(model.state_dict())
    peft = get_peft_model(model, [f"prompt:n=3,position={position}"])
    ids = torch.randint(0, VOCAB, (2, 8))
    out = peft(ids).logits
    tokens = peft.base_model.hooks[0].weight.detach()
    longer, kept = insert_by_hand(reference_model.backbone.embeddings(ids), tokens,
                                  soft_positions(position, 3, 8).tolist())
    assert out.shape == (2, 8, VOCAB)
    assert_rel_close(out, reference_model(inputs_embeds=longer).logits[:, kept], what=position)


def test_prompt_vocab_init_copies_token_embeddings():
    peft = get_peft_model(tiny(), ["prompt:n=4,init=vocab"])
    table = peft.base_model.backbone.embeddings.weight
    for row in peft.base_model.hooks[0].weight:
        assert (table == row).all(dim=1).any()


# ---------------------------------------------------------------- affix tuning


@pytest.mark.parametrize("bidirectional, where, position, dual, projection", [
    (False, "after_in_proj", "prefix", True, False),
    (False, "after_in_proj", "prefix", True, True),
    (True, "after_in_proj", "prefix", True, False),
    (True, "after_in_proj", "prefix", False, False),
    (True, "after_in_proj", "infix", True, True),
    (False, "after_in_proj", "prefix+suffix", True, False),
    (True, "before_in_proj", "suffix", True, False),
    (False, "before_in_proj", "prefix", True, True),
])
def test_affix_matches_a_mixer_with_tokens_put_in_by_hand(bidirectional, where, position, dual, projection):
    torch.manual_seed(0)
    model = MixerStack(16, 2, bidirectional, d_state=4, d_conv=3)
    spec = f"affix:n=3,where={where},position={position},dual={dual},projection={projection}"
    peft = get_peft_model(model, [spec])
    sets = 2 if (bidirectional and dual and where == "after_in_proj") else 1
    width = 16 if where == "before_in_proj" else 64
    assert all(t.shape == (3, sets, width) for t in affix_tokens_by_hand(peft))
    h = torch.randn(2, 7, 16)
    out = peft(h)
    assert out.shape == h.shape
    expected = f64(h)
    for mixer, tokens in zip(model.layers, affix_tokens_by_hand(peft)):
        expected = expected + reference_affix_mixer(mixer, expected, tokens, where, position)
    assert_rel_close(out, expected, what=spec)


@pytest.mark.parametrize("spec", ["affix:n=2", "affix:n=3,projection=true", "affix:n=2,where=before_in_proj"])
def test_affix_in_the_language_model_keeps_every_position_in_order(spec):
    peft = get_peft_model(tiny(), [spec])
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
               for m in peft.base_model.peft_mixers()]
    ids = torch.randint(0, VOCAB, (2, 10))
    logits = peft(ids).logits
    for h in handles:
        h.remove()
    assert logits.shape == (2, 10, VOCAB)
    where = peft.methods[0].config.where
    for (mixer, h, out), tokens in zip(seen, affix_tokens_by_hand(peft)):
        assert out.shape == h.shape
        assert_rel_close(out, reference_affix_mixer(mixer, h, tokens, where, "prefix"), what=spec)


def test_only_the_x_half_of_affix_tokens_after_in_proj_gets_a_gradient():
    """The Z half gates the token's own output, which is dropped: it counts as a parameter but never learns."""
    peft = get_peft_model(tiny(), ["affix:n=3"])
    ids = torch.randint(0, VOCAB, (2, 8))
    peft(ids, labels=ids).loss.backward()
    for hook in peft.methods[0].token_hooks:
        E = hook.weight.shape[-1] // 2
        assert hook.weight.grad[..., :E].abs().min() > 0
        assert hook.weight.grad[..., E:].abs().max() == 0


# ---------------------------------------------------------------- training, saving, merging, generating

SPECS = [
    ["prompt:n=3"],
    ["prompt:n=3,projection=true,hidden=32"],
    ["affix:n=2"],
    ["affix:n=2,projection=true"],
    ["affix:n=2,where=before_in_proj,projection=true"],
    ["prompt:n=2,projection=true", "affix:n=2,projection=true", "lora_p_x:r=4"],
]


@pytest.mark.parametrize("specs", SPECS, ids=" + ".join)
def test_every_trainable_tensor_learns_and_the_base_stays_frozen(specs):
    peft = get_peft_model(tiny(), specs)
    perturb_trainable(peft)                      # LoRA's Up starts at zero and would block its Down's gradient
    params = trainable(peft)
    base = {n: p.detach().clone() for n, p in peft.base_model.named_parameters() if not p.requires_grad}
    assert params and base
    ids = torch.randint(0, VOCAB, (2, 8))
    peft(ids, labels=ids).loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.AdamW(peft.parameter_groups(lr=1e-2, weight_decay=0.1)).step()
    for name, p in peft.base_model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not move"


@pytest.mark.parametrize("specs", SPECS, ids=" + ".join)
def test_save_and_load_onto_a_fresh_base_gives_identical_outputs(specs, tmp_path):
    peft = get_peft_model(tiny(), specs).eval()        # eval: no LoRA dropout
    perturb_trainable(peft)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        expected = peft(ids).logits
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_merge_keeps_soft_tokens_collapses_projections_and_reloads(tmp_path):
    config = PeftConfig.parse(["prompt:n=2,projection=true", "affix:n=2,projection=true", "lora_p_x:r=4"])
    peft = get_peft_model(tiny(), config).eval()
    perturb_trainable(peft)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        expected = peft(ids).logits
    kept = peft.merge_and_unload()
    assert isinstance(kept, PeftModel)
    assert [m.name for m in kept.methods] == ["prompt", "affix"]
    assert all(m.config.projection is False for m in kept.methods)            # so the saved adapter reloads
    assert all(spec.config.projection is True for spec in config.methods[:2])  # the caller's config untouched
    names = [n for n, _ in kept.base_model.named_parameters()]
    assert not any("mlp" in n or "lora" in n for n in names)                  # no MLP left for inference
    assert len(kept.base_model.hooks) == 1                                     # the affix projection hook is gone
    assert kept.parameter_counts()["trainable"] == 2 * 64 + 2 * (2 * 256)     # plain tokens only
    with torch.no_grad():
        assert_rel_close(kept(ids).logits, expected, tol=1e-5, what="merged")
    kept.save_pretrained(tmp_path)
    base = tiny()                                       # a base with the merged weights, without any hooks
    base.load_state_dict({k: v for k, v in kept.base_model.state_dict().items() if k in base.state_dict()})
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, kept(ids).logits)


@pytest.mark.parametrize("specs", [
    ["prompt:n=3,projection=true"],
    ["affix:n=2"],
    ["affix:n=2,where=before_in_proj"],
    ["prompt:n=2", "affix:n=2,projection=true", "lora_p_x:r=4"],
], ids=" + ".join)
def test_generation_from_the_recurrent_state_equals_full_forwards(specs):
    peft = get_peft_model(tiny(), specs).eval()
    perturb_trainable(peft)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = peft(ids).logits
        state = peft.base_model.new_state()
        steps = [peft(ids[:, :4], state=state).logits]                 # the soft tokens enter the state here, once
        steps += [peft(ids[:, t : t + 1], state=state).logits for t in range(4, 9)]
    assert_rel_close(torch.cat(steps, dim=1), full, what="step by step")
    generated = peft.generate(ids, 5, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, peft(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


# ---------------------------------------------------------------- the paper's parameter counts


def counts(model, specs):
    c = get_peft_model(model, specs).parameter_counts()
    return c["trainable"], round(c["percent"], 2)


def vim_s():
    """Vim-S's mixers (d 384, E 768, R 24, 24 bidirectional layers), shapes only."""
    return MixerStack(384, 24, bidirectional=True, device="meta")


def test_language_counts_of_the_paper():
    mamba_130m = lambda: mambapeft.from_config("mamba-130m", device="meta")     # noqa: E731
    assert counts(mamba_130m(), ["affix:n=3"]) == (221_184, 0.17)                # 3 x 3072 x 24
    assert counts(mamba_130m(), ["paper/affix"]) == (221_184, 0.17)
    # one projection shared by all layers: Embedding(3, 2E), Linear(2E, 2E), tanh, Linear(2E, 24 * 2E)
    w, layers = 3072, 24
    by_hand = 3 * w + (w * w + w) + (w * layers * w + layers * w)
    assert by_hand == 236_015_616
    assert counts(mamba_130m(), ["affix:n=3,projection=true"]) == (by_hand, 64.64)
    assert counts(mamba_130m(), ["paper/affix_proj"]) == (by_hand, 64.64)
    assert counts(mamba_130m(), ["affix:n=3,where=before_in_proj"])[0] == 3 * 768 * 24
    assert counts(mamba_130m(), ["prompt:n=8"])[0] == 8 * 768
    assert counts(mambapeft.from_config("mamba-1.4b", device="meta"), ["affix:n=3"]) == (1_179_648, 0.09)


def test_vision_counts_of_the_paper():
    assert counts(vim_s(), ["affix:n=3"])[0] == 221_184                          # 3 x 1536 x 24 x 2 (dual)
    assert counts(vim_s(), ["affix:n=3,dual=false"])[0] == 110_592
    assert counts(vim_s(), ["affix:n=3,where=before_in_proj"])[0] == 3 * 384 * 24
    assert counts(vim_s(), ["prompt:n=8,position=prefix+suffix"])[0] == 3_072
    assert counts(vim_s(), ["paper/prompt"])[0] == 3_072
    assert counts(vim_s(), ["paper/prompt_proj"])[0] == 8 * 384 + 2 * (384 * 384 + 384)   # 298,752
    w = 1536                                                                     # dual: 2 sets per layer
    assert counts(vim_s(), ["paper/affix_proj"])[0] == 3 * w + (w * w + w) + (w * 48 * w + 48 * w)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, model, message", [
    ("prompt:n=0", tiny, r"prompt: n=0 must be >= 1"),
    ("affix:n=0", tiny, r"affix: n=0 must be >= 1"),
    ("prompt:position=middle", tiny, r"position='middle' is not one of prefix, infix, suffix, prefix\+suffix"),
    ("affix:position=around", tiny, r"position='around' is not one of"),
    ("affix:where=inside", tiny, r"where='inside' is not one of after_in_proj, before_in_proj"),
    ("affix:hidden=0", tiny, r"hidden=0 must be >= 1"),
    ("affix:hidden=64", tiny, r"affix: hidden=64 sizes the projection MLP, which is off"),
    ("prompt:hidden=64", tiny, r"prompt: hidden=64 sizes the projection MLP, which is off"),
    ("prompt:position=suffix", tiny, r"position=suffix does not work on a causal model.*Use position=prefix"),
    ("prompt:position=prefix+suffix", tiny, r"does not work on a causal model"),
    ("affix:position=infix", tiny, r"affix: position=infix does not work on a causal model.*Use position=prefix"),
    ("prompt:n=1,position=prefix+suffix", vim_s, r"needs n >= 2"),
    ("prompt:init=vocab", vim_s, r"init=vocab.*no token embedding"),
])
def test_bad_input_is_reported(spec, model, message):
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model(), [spec])


def test_a_suffix_on_a_causal_model_is_refused_before_anything_is_attached():
    model = tiny()
    with pytest.raises(ConfigError):
        get_peft_model(model, ["affix:position=suffix"])
    assert all(len(m.hooks) == 0 for m in model.peft_mixers())
