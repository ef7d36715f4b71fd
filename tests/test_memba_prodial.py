"""Memba and ProDiaL (issue 29) against plain float64 restatements of their formulas, on the language model's
Mamba-1 mixer and Vim's bidirectional one: the membrane neuron position by position with scalar arithmetic, the
projector transformation as an explicit matrix; gradients by finite differences; merging (ProDiaL exactly, also
beside a LoRA on the same layer; Memba folds its LoRA and keeps the neuron); save / load; decoding steps; the
trainable counts by hand; where they do not apply and why."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_state_methods import as_if_trained, f64, lm, reference_direction, vim

import mambapeft
from mambapeft import NotApplicable, PeftModel, get_peft_model
from mambapeft.methods.memba import leaky_integrate
from mambapeft.search.space import paper_space

from conftest import assert_rel_close


def lim_by_hand(z, tau, threshold, start=None):
    """The LIM neuron with Python floats, one channel and position at a time: v = tau u + z; u = 0 if v >= threshold."""
    b, length, width = z.shape
    out = torch.zeros(b, length, width, dtype=torch.float64)
    for i in range(b):
        for c in range(width):
            u = 0.0 if start is None else float(start[i, c])
            for t in range(length):
                v = tau * u + float(z[i, t, c])
                out[i, t, c] = v
                u = 0.0 if v >= threshold else v
    return out


def lora_weight(layer, s):
    """W + s Up Down of a projection carrying a `memba` LoRA, in float64."""
    delta = layer.deltas["memba"]
    return f64(layer.base.weight) + s * f64(delta.up) @ f64(delta.down)


def memba_reference(mixer, h, tau, threshold, s, start=None):
    """The Memba mixer in float64: LoRA'd in_proj, the neuron by hand on Z, the scan gated by silu(v), LoRA'd out_proj.
    Returns the output and v (b, L, E)."""
    xz = F.linear(f64(h), lora_weight(mixer.in_proj, s))
    E = mixer.d_inner
    v = lim_by_hand(xz[..., E:], tau, threshold, start)
    xz = torch.cat([xz[..., :E], v], -1)
    y = reference_direction(mixer, xz, 0)
    if mixer.bidirectional:
        y = (y + reference_direction(mixer, xz.flip(1), 1).flip(1)) / 2
    return F.linear(y, lora_weight(mixer.out_proj, s)), v


def test_the_neuron_is_its_formula_and_resets():
    torch.manual_seed(0)
    z = torch.randn(2, 9, 5, dtype=torch.float64) * 1.5
    start = torch.randn(2, 5, dtype=torch.float64)
    for tau, threshold, u0 in ((0.5, 1.0, None), (0.9, 0.3, start), (0.2, 5.0, None)):
        v, last = leaky_integrate(z, tau, threshold, u0)
        expected = lim_by_hand(z, tau, threshold, u0)
        assert_rel_close(v, expected, tol=1e-12, what=f"tau={tau} threshold={threshold}")
        assert torch.equal(last, v[:, -1].masked_fill(v[:, -1] >= threshold, 0.0))
    assert (leaky_integrate(z, 0.5, 1.0)[0] >= 1.0).any(), "no reset happened: the test would not see one"


@pytest.mark.parametrize("build, transfer", [(lm, False), (vim, False), (vim, True)],
                         ids=["mamba", "vim", "vim-transfer"])
def test_memba_is_its_formula_in_float64(build, transfer):
    spec = "memba:r=3,s=0.7,tau=0.6,threshold=0.8" + (",transfer=true" if transfer else "")
    peft = get_peft_model(build(), [spec]).double().eval()
    as_if_trained(peft, seed=3)
    mixers = peft.base_model.peft_mixers()
    h = torch.randn(2, 7, mixers[0].d_model, dtype=torch.float64)
    start = None
    fired = False
    for mixer in mixers:                                  # in layer order: each reads the previous one's average
        expected, v = memba_reference(mixer, h, 0.6, 0.8, 0.7, start)
        with torch.no_grad():
            assert_rel_close(mixer(h), expected, tol=1e-7, what=spec)
        fired |= bool((v >= 0.8).any())
        start = v.mean(1) if transfer else None
    assert fired, "no neuron reset: the test would not see the reset"


def test_memba_gradients_by_finite_differences():
    """gradcheck on the neuron's input and on the LoRA factors through the whole mixer (resets included)."""
    torch.manual_seed(1)
    z = (torch.randn(2, 6, 3, dtype=torch.float64) * 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: leaky_integrate(t, 0.5, 1.0)[0], (z,), eps=1e-6, atol=1e-7)
    peft = get_peft_model(lm(), ["memba:r=2,dropout=0"]).double().eval()
    as_if_trained(peft, seed=4)
    mixer = peft.base_model.peft_mixers()[0]
    h = torch.randn(1, 5, mixer.d_model, dtype=torch.float64)
    params = dict(mixer.named_parameters())
    for name in ("in_proj.deltas.memba.up", "in_proj.deltas.memba.down", "out_proj.deltas.memba.up"):
        value = params[name].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t, n=name: torch.func.functional_call(mixer, {n: t}, (h,)), (value,),
                                        eps=1e-6, atol=1e-6, fast_mode=True)


def transform_by_hand(delta):
    """T = blockdiag(D_1, ...) + s Up Down, filled entry by entry."""
    n = delta.diagonal.shape[0] * delta.block + (delta.tail.shape[0] if delta.tail is not None else 0)
    T = torch.zeros(n, n, dtype=torch.float64)
    blocks = list(delta.diagonal) + ([delta.tail] if delta.tail is not None else [])
    at = 0
    for block in blocks:
        for i in range(block.shape[0]):
            for j in range(block.shape[1]):
                T[at + i, at + j] = float(block[i, j].detach())
        at += block.shape[0]
    if delta.down is not None:
        T += delta.s * f64(delta.up) @ f64(delta.down)
    return T


@pytest.mark.parametrize("build", [lm, vim], ids=["mamba", "vim"])
@pytest.mark.parametrize("spec", ["prodial:r=2,s=0.5", "prodial:block=3,r=1"])
def test_prodial_is_its_formula_in_float64(build, spec):
    """W' = W T on in_proj and out_proj; block=3 does not divide the micro widths, so a smaller last block is used."""
    peft = get_peft_model(build(), [spec]).double().eval()
    as_if_trained(peft, seed=5, std=0.2)
    for mixer in peft.base_model.peft_mixers():
        h = torch.randn(2, 6, mixer.d_model, dtype=torch.float64)
        w_in = f64(mixer.in_proj.base.weight) @ transform_by_hand(mixer.in_proj.deltas["prodial"])
        w_out = f64(mixer.out_proj.base.weight) @ transform_by_hand(mixer.out_proj.deltas["prodial"])
        xz = F.linear(f64(h), w_in)
        y = reference_direction(mixer, xz, 0)
        if mixer.bidirectional:
            y = (y + reference_direction(mixer, xz.flip(1), 1).flip(1)) / 2
        with torch.no_grad():
            assert_rel_close(mixer(h), F.linear(y, w_out), tol=1e-7, what=spec)


def test_prodial_gradients_by_finite_differences():
    peft = get_peft_model(lm(), ["prodial:block=2,r=2"]).double().eval()
    as_if_trained(peft, seed=6, std=0.2)
    mixer = peft.base_model.peft_mixers()[0]
    h = torch.randn(1, 5, mixer.d_model, dtype=torch.float64)
    params = dict(mixer.named_parameters())
    names = [n for n in params if ".prodial." in n]
    assert {n.rsplit(".", 1)[1] for n in names} == {"diagonal", "down", "up"}
    for name in names:
        value = params[name].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t, n=name: torch.func.functional_call(mixer, {n: t}, (h,)), (value,),
                                        eps=1e-6, atol=1e-6, fast_mode=True)


def test_prodial_merges_exactly_before_a_lora_on_the_same_layer(tmp_path):
    """W T x + LoRA(x): ProDiaL folds first (merge_order), so the merged weight is W T + s Up Down, not (W + ..) T."""
    peft = get_peft_model(lm(), ["lora_in_proj:r=2,dropout=0", "prodial:block=2,r=2"]).eval()
    as_if_trained(peft, seed=7, std=0.2)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = peft(ids).logits
        peft.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(lm(), tmp_path / "adapter").eval()
        assert torch.equal(loaded(ids).logits, expected)
        merged = peft.merge_and_unload().eval()
        assert type(merged) is type(lm())
        assert_rel_close(merged(ids).logits, expected, tol=1e-5, what="merged")


def test_memba_merges_its_lora_and_keeps_the_neuron(tmp_path):
    peft = get_peft_model(lm(), ["memba:r=2"]).eval()
    as_if_trained(peft, seed=8, std=0.2)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = peft(ids).logits
        kept = peft.merge_and_unload().eval()
        assert [m.name for m in kept.methods] == ["memba"] and kept.methods[0].config.r == 0
        assert kept.parameter_counts()["trainable"] == 0
        assert_rel_close(kept(ids).logits, expected, tol=1e-5, what="LoRA folded, neuron kept")
        kept.save_pretrained(tmp_path / "kept")
        base = copy.deepcopy(kept.base_model)              # the merged weights, without the neurons
        for mixer in base.peft_mixers():
            mixer.hooks = torch.nn.ModuleList()
        again = PeftModel.from_pretrained(base, tmp_path / "kept").eval()
        assert_rel_close(again(ids).logits, expected, tol=1e-5, what="kept neuron reloaded")
    assert "not a weight" in kept.methods[0].why_not_mergeable


@pytest.mark.parametrize("spec", ["memba:r=2+prodial:r=1"])
def test_memba_decoding_steps_equal_full_forwards_and_left_padding(spec):
    """The membrane potential lives in the recurrent state: one-token steps give the full forward's logits; a
    left-padded prompt gives the unpadded one's."""
    peft = get_peft_model(lm(), spec.split("+"))
    as_if_trained(peft, seed=9, std=0.3)
    peft.eval()
    ids = torch.randint(1, 97, (2, 6))
    generated = peft.generate(ids, max_new_tokens=4, eos_token_id=None)
    with torch.no_grad():
        full = peft(generated[:, :-1]).logits[:, 5:]
        state = peft.base_model.new_state()
        stepped = [peft.base_model(ids, state=state).logits[:, -1:]]
        for t in range(6, generated.shape[1] - 1):
            stepped.append(peft.base_model(generated[:, t : t + 1], state=state).logits)
        assert_rel_close(torch.cat(stepped, 1), full, tol=1e-5, what=spec)
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
        assert_rel_close(peft(padded, attention_mask=mask).logits[:, 3:], peft(ids).logits, tol=1e-5, what="padded")


def count(arch, spec):
    return get_peft_model(mambapeft.from_config(arch, device="meta"), [spec]).parameter_counts()["trainable"]


def test_trainable_counts_by_hand():
    """mamba-130m: d 768, E 1536, 24 layers. Memba: LoRA r (d + 2E) on in_proj + r (E + d) on out_proj, the neuron
    nothing. ProDiaL: per projector of input width n, n b + 2 n r (in_proj n = d, out_proj n = E). Vim-S (d 384,
    E 768, 24 layers): in_proj and out_proj are shared by the two directions, so the same formulas."""
    d, E, layers = 768, 1536, 24
    assert count("mamba-130m", "memba:r=8") == layers * 8 * ((d + 2 * E) + (E + d)) == 1_179_648
    assert count("mamba-130m", "memba:r=0") == 0
    assert count("mamba-130m", "prodial:block=1,r=4") == layers * ((d * 1 + 2 * d * 4) + (E * 1 + 2 * E * 4)) == 497_664
    assert count("mamba-130m", "prodial:block=4,r=0") == layers * (d * 4 + E * 4) == 221_184
    d, E = 384, 768
    assert count("vim-small", "memba:r=8,transfer=true") == 24 * 8 * ((d + 2 * E) + (E + d))
    assert count("vim-small", "prodial:block=1,r=4") == 24 * (d * 9 + E * 9)
    # the paper's "under 1%" for ProDiaL, at its preset, on the 130m model
    peft = get_peft_model(mambapeft.from_config("mamba-130m", device="meta"), ["paper/prodial"])
    assert peft.parameter_counts()["percent"] < 1.0


def test_where_they_do_not_apply_and_why():
    with pytest.raises(NotApplicable, match="memba does not apply to mamba2 models: .*gate input z before a silu"):
        get_peft_model(mambapeft.from_config("mamba2-tiny"), ["memba"])
    with pytest.raises(NotApplicable, match="memba does not apply to mamba models: transfer=true .* later tokens"):
        get_peft_model(lm(), ["memba:transfer=true"])
    with pytest.raises(NotApplicable, match="prodial does not apply to s4d models"):
        get_peft_model(mambapeft.from_config("s4d-micro"), ["prodial"])
    get_peft_model(mambapeft.from_config("mamba2-tiny"), ["prodial"])       # Mamba-2 has both projectors


def test_the_search_space_and_presets_offer_them():
    space = paper_space(vision=False)
    assert {"memba", "prodial"} <= set(space.step1)
    assert {"tau", "threshold"} <= set(space.step2["memba"])
    from mambapeft.config.presets import all_presets

    presets = all_presets()
    assert presets["memba"][0].startswith("memba:") and "transfer=true" in presets["vim/memba"][0]
    assert presets["prodial"][0].startswith("prodial:")
