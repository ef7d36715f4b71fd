"""Our Mamba-2 language model against transformers' Mamba2ForCausalLM (its CPU torch path) for the same weights.

transformers 5.x normalises the gated RMSNorm per group of E/G channels (MambaRMSNormGated(group_size=E/G)), as
mamba_ssm's kernel does, so it is a valid oracle for n_groups > 1 too; earlier versions normalised over the full
width. The gated norm is also checked on its own against a float64 restatement of mamba_ssm's `rms_norm_ref`
(test_gated_norm_is_mamba_ssms_grouped_norm), so a change of transformers' definition cannot pass unnoticed.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config

import mambapeft
import mambapeft.scan.ssd as ssd
from mambapeft.model.hooks import PeftHook
from mambapeft.model.mamba2.modeling import GatedRMSNorm, Mamba2LM

from conftest import assert_rel_close, twin_models

# chunk_size is transformers' chunk (its torch path pads to a multiple of it); ours is 64 unless patched
CONFIGS = {
    "G1-P16-N16": dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=1, state_size=16, chunk_size=8),
    "G2-P12-N10": dict(hidden_size=48, num_heads=8, head_dim=12, n_groups=2, state_size=10, chunk_size=16),
    "G3-P5-N7-K3-bias-noconvbias": dict(hidden_size=30, num_heads=12, head_dim=5, n_groups=3, state_size=7,
                                        conv_kernel=3, use_bias=True, use_conv_bias=False, chunk_size=7),
    "G4-P9-N13-expand3-untied": dict(hidden_size=24, expand=3, num_heads=8, head_dim=9, n_groups=4, state_size=13,
                                     tie_word_embeddings=False, chunk_size=256),
    "G1-P8-N5-K2-residual-not-fp32": dict(hidden_size=20, num_heads=5, head_dim=8, n_groups=1, state_size=5,
                                          conv_kernel=2, residual_in_fp32=False, chunk_size=5),
}


def config(name, **extra):
    return Mamba2Config(**{"num_hidden_layers": 2, "vocab_size": 71, "tie_word_embeddings": True,
                           **CONFIGS[name], **extra})


@pytest.fixture(params=[64, 16], ids=["our-chunk-64", "our-chunk-16"])
def our_chunk(request, monkeypatch):
    monkeypatch.setattr(ssd, "_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name, our_chunk):
    hf, ours = twin_models(config(name))
    ids = torch.randint(0, 71, (3, 37))            # odd length, across both models' chunk boundaries
    with torch.no_grad():
        expected = hf(ids, labels=ids)
        got = ours(ids, labels=ids)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padded_batch_equals_transformers(name):
    hf, ours = twin_models(config(name))
    ids = torch.randint(0, 71, (3, 23))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


def test_left_padding_does_not_leak_into_real_tokens():
    """Without an in_proj bias, a left-padded row gives the unpadded row's logits (padding never reaches the state)."""
    _, ours = twin_models(config("G2-P12-N10"))
    ids = torch.randint(1, 71, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = ours(ids).logits
        in_batch = ours(padded, attention_mask=mask).logits[:, 5:]
    assert_rel_close(in_batch, alone, tol=1e-5)


@pytest.mark.parametrize("name", ["G2-P12-N10", "G3-P5-N7-K3-bias-noconvbias", "G4-P9-N13-expand3-untied"])
def test_every_gradient_equals_transformers(name, our_chunk):
    hf, ours = twin_models(config(name))
    hf.train(), ours.train()
    ids = torch.randint(0, 71, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    hf(ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    hf_params = dict(hf.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    assert set(names) == set(hf_params)
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_rel_close(p.grad, hf_params[name].grad, tol=1e-4, what=name)


def test_gated_norm_is_mamba_ssms_grouped_norm():
    """Float64 restatement of mamba_ssm's rms_norm_ref(z=z, group_size=E/G, norm_before_gate=False)."""
    E, G, eps = 24, 3, 1e-5
    norm = GatedRMSNorm(E, E // G, eps)
    with torch.no_grad():
        norm.weight.normal_()
    y, z = torch.randn(2, 5, E), torch.randn(2, 5, E)
    gated = y.double() * F.silu(z.double())
    groups = gated.view(2, 5, G, E // G)
    expected = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).view(2, 5, E) * norm.weight.double()
    assert_rel_close(norm(y, z), expected, tol=1e-6)
    whole = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    assert (norm(y, z).double() - whole).abs().max() > 1e-3        # per group is not over the full width


def test_named_architectures_and_hand_counted_sizes():
    counts = {name: sum(p.numel() for p in mambapeft.from_config(name, device="meta").parameters())
              for name in ("mamba2-130m", "mamba2-2.7b", "mamba2-tiny")}
    # mamba2-130m: E 1536, H 24, G 1, N 128; in_proj rows 2*1536 + 2*128 + 24 = 3352, conv over 1536 + 256 = 1792
    # channels; embedding 50288*768 (tied head) + 24 layers of (in_proj 768*3352 + conv 1792*(4+1) + dt_bias, A_log,
    # D 3*24 + gated norm 1536 + out_proj 1536*768 + block norm 768) + norm_f 768
    layer_130m = 768 * 3352 + 1792 * 5 + 3 * 24 + 1536 + 1536 * 768 + 768
    assert counts["mamba2-130m"] == 50288 * 768 + 24 * layer_130m + 768
    # mamba2-2.7b: E 5120, H 80; in_proj rows 2*5120 + 256 + 80 = 10576, conv 5376 channels
    layer_27b = 2560 * 10576 + 5376 * 5 + 3 * 80 + 5120 + 5120 * 2560 + 2560
    assert counts["mamba2-2.7b"] == 50288 * 2560 + 64 * layer_27b + 2560
    # mamba2-tiny: d 64, E 128, H 8 of 16, N 16: in_proj rows 256 + 32 + 8 = 296, conv 160 channels
    layer_tiny = 64 * 296 + 160 * 5 + 3 * 8 + 128 + 128 * 64 + 64
    assert counts["mamba2-tiny"] == 1024 * 64 + 2 * layer_tiny + 64
    mixer = mambapeft.from_config("mamba2-370m", device="meta").backbone.layers[0].mixer
    assert (mixer.d_model, mixer.num_heads, mixer.head_dim, mixer.d_state, mixer.n_groups) == (1024, 32, 64, 128, 1)
    assert len(mambapeft.from_config("mamba2-780m", device="meta").backbone.layers) == 48
    assert mambapeft.from_config("mamba2-1.3b", device="meta").config.hidden_size == 2048


def test_large_architectures_build_instantly_on_meta():
    import time

    start = time.perf_counter()
    model = mambapeft.from_config("mamba2-2.7b", device="meta")
    assert time.perf_counter() - start < 5
    assert isinstance(model, Mamba2LM)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.layers[0].mixer.in_proj.weight.shape == (10576, 2560)


def test_architecture_names_and_hub_ids():
    from mambapeft.model import FAMILIES

    assert FAMILIES["mamba2"].hub_ids["mamba2-130m"] == "state-spaces/mamba2-130m"
    assert "mamba2-tiny" not in FAMILIES["mamba2"].hub_ids
    assert FAMILIES["mamba"].hub_ids["mamba-130m"] == "state-spaces/mamba-130m-hf"
    with pytest.raises(mambapeft.ConfigError, match="is a Mamba-2 architecture"):
        mambapeft.model.arch_config("mamba2-130m")


def test_random_init_is_reproducible_and_sane():
    a = mambapeft.from_config("mamba2-tiny", seed=3)
    b = mambapeft.from_config("mamba2-tiny", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    mixer = a.backbone.layers[0].mixer
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1 and A.max() <= 16 and A.unique().numel() == mixer.num_heads
    assert torch.equal(mixer.D, torch.ones(mixer.num_heads))
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(mixer.norm.weight, torch.ones(mixer.d_inner))


def test_model_api():
    model = mambapeft.from_config("mamba2-tiny", seed=0)
    assert model.d_model == 64 and model.is_causal and model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert len(model.peft_mixers()) == 2 and model.new_state().offset == 0
    fingerprint = model.peft_fingerprint()
    assert fingerprint["model_type"] == "mamba2" and fingerprint["n_groups"] == 1 and fingerprint["head_dim"] == 16
    model.untie_weights()
    assert model.lm_head.weight is not model.backbone.embeddings.weight
    assert torch.equal(model.lm_head.weight, model.backbone.embeddings.weight)
    assert not model.config.tie_word_embeddings


def test_input_validation_and_inputs_embeds():
    model = mambapeft.from_config("mamba2-tiny")
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    ids = torch.randint(0, 1024, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(inputs_embeds=model.backbone.embeddings(ids)).logits)
    bad = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, n_groups=1, state_size=4, num_hidden_layers=1,
                       vocab_size=10)
    object.__setattr__(bad, "num_heads", 3)        # past transformers' own validation
    with pytest.raises(ValueError, match="must equal expand"):
        Mamba2LM(bad)


# ---------------------------------------------------------------- PEFT readiness (the mixer's extension points)


class _Counting(torch.nn.Module):
    """A stand-in for an adapter wrapper: adds a constant, counts calls."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, t):
        self.calls += 1
        return self.base(t) + 0.25


@pytest.mark.parametrize("part", ["in_proj", "conv1d", "out_proj"])
def test_projections_are_called_as_modules(part):
    model = mambapeft.from_config("mamba2-tiny", seed=1).eval()
    ids = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        mixer = model.backbone.layers[1].mixer
        setattr(mixer, part, _Counting(getattr(mixer, part)))
        after = model(ids).logits
        model.generate(ids, 2)
    assert getattr(mixer, part).calls >= 3          # the full pass, the prompt pass, and the single-token step
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ["A_log", "D", "dt_bias", "conv1d.weight", "norm.weight"])
def test_small_tensors_are_read_at_every_call(name):
    """A parametrization (what partial tuning uses) changes the output in the full pass and in the step path."""
    from torch.nn.utils import parametrize

    class Shift(torch.nn.Module):
        def forward(self, t):
            return t + 0.3

    model = mambapeft.from_config("mamba2-tiny", seed=2).eval()
    ids = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        owner_path, _, attr = f"backbone.layers.0.mixer.{name}".rpartition(".")
        parametrize.register_parametrization(model.get_submodule(owner_path), attr, Shift())
        assert not torch.allclose(model(ids).logits, full)
        state = model.new_state()
        model(ids[:, :8], state=state)
        last = model(ids[:, 8:], state=state).logits
    assert_rel_close(last, model(ids).logits[:, 8:], tol=1e-5)


class _InsertTokens(PeftHook):
    """Two soft tokens at the front of the sequence at one stage; they leave again before out_proj."""

    def __init__(self, stage, width):
        super().__init__()
        self.stage = stage
        self.soft = torch.nn.Parameter(torch.randn(2, width))

    def tokens(self, stage, direction, length, offset):
        if stage != self.stage or offset:
            return None
        return self.soft, torch.tensor([0, 1])


@pytest.mark.parametrize("stage", ["before_in_proj", "after_in_proj"])
def test_soft_tokens_enter_and_leave_at_each_stage(stage):
    model = mambapeft.from_config("mamba2-tiny", seed=4).eval()
    mixer = model.backbone.layers[0].mixer
    width = mixer.d_model if stage == "before_in_proj" else mixer.in_proj.out_features
    ids = torch.randint(0, 1024, (2, 10))
    with torch.no_grad():
        plain = model(ids).logits
        mixer.hooks.append(_InsertTokens(stage, width))
        prefixed = model(ids).logits
        state = model.new_state()                   # the prefix enters with the prompt pass, not with each step
        parts = [model(ids[:, :6], state=state).logits]
        parts += [model(ids[:, t:t + 1], state=state).logits for t in range(6, 10)]
    assert prefixed.shape == plain.shape and not torch.allclose(prefixed, plain)
    assert_rel_close(torch.cat(parts, dim=1), prefixed, tol=1e-5)
    assert state.offset == 10


def test_cli_info_on_a_mamba2_architecture(capsys):
    from mambapeft.cli.main import main

    assert main(["info", "mamba2-130m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    p = info["parameters"]
    assert (info["model_type"], info["num_heads"], info["head_dim"], info["n_groups"]) == ("mamba2", 24, 64, 1)
    assert p["per_layer_parts"]["in_proj"] == 768 * 3352 and p["per_layer_parts"]["gated_norm"] == 1536
    assert p["total"] == 128_989_632
    assert main(["info", "mamba2-tiny"]) == 0
    assert "heads (H) 8 x head_dim (P) 16" in capsys.readouterr().out
