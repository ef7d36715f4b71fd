"""State-based methods (initial-state tuning, state-offset tuning (h) and (y)) against plain float64 restatements of
their formulas, on the language model's mixer and Vim's bidirectional one; gradients by finite differences; the
paper counts; left padding; composition with affix tokens; the search space."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambapeft
from mambapeft import get_peft_model
from mambapeft.model.mamba import DIRECTION_NAMES

from conftest import assert_rel_close


def f64(t):
    return t.detach().double()


def reference_direction(mixer, xz, direction, h0=None, offset=None):
    """One direction of the Mamba-1 mixer in float64 from its formula, with an initial state h0 (E, N) and an offset:
    ("h", h' (E, N)): y_t += C_t h' before the gate; ("y", y' (E)): y_t += y' before the gate."""
    names = DIRECTION_NAMES[direction]
    conv, x_proj, dt_proj = (getattr(mixer, names[k]) for k in ("conv1d", "x_proj", "dt_proj"))
    E, L = mixer.d_inner, xz.shape[1]
    x, z = xz[..., :E], xz[..., E:]
    x = F.silu(F.conv1d(x.mT, f64(conv.weight), f64(conv.bias), padding=mixer.d_conv - 1, groups=E)[..., :L]).mT
    dt_low, B, C = F.linear(x, f64(x_proj.weight)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.softplus(F.linear(dt_low, f64(dt_proj.weight), f64(dt_proj.bias)))
    A = -torch.exp(f64(getattr(mixer, names["A_log"])))
    D = f64(getattr(mixer, names["D"]))
    b = x.shape[0]
    state = torch.zeros(b, E, mixer.d_state, dtype=torch.float64) if h0 is None else f64(h0).expand(b, -1, -1).clone()
    ys = []
    for t in range(L):                                    # h_t = exp(dt A) h_{t-1} + dt B x ;  y = C h + D x
        state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        y = (state * C[:, t, None, :]).sum(-1) + D * x[:, t]
        if offset is not None and offset[0] == "h":
            y = y + C[:, t] @ f64(offset[1]).mT
        if offset is not None and offset[0] == "y":
            y = y + f64(offset[1])
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, 1)


def reference_mixer(mixer, h, state_of=None, offset_of=None):
    """The mixer in float64; state_of(direction) -> H0 or None, offset_of(direction) -> ("h"|"y", tensor) or None."""
    xz = F.linear(f64(h), f64(mixer.in_proj.weight))
    state_of = state_of or (lambda d: None)
    offset_of = offset_of or (lambda d: None)
    y = reference_direction(mixer, xz, 0, state_of(0), offset_of(0))
    if mixer.bidirectional:
        y = (y + reference_direction(mixer, xz.flip(1), 1, state_of(1), offset_of(1)).flip(1)) / 2
    return F.linear(y, f64(mixer.out_proj.weight))


def perturbed(arch: str, seed=0):
    """A random model of `arch` moved off its initialisation (a random start would hide mistakes that keep it)."""
    model = mambapeft.from_config(arch, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def lm(seed=0):
    return perturbed("mamba-micro", seed)


def vim(seed=0):
    return perturbed("vim-micro", seed)


def lm2(seed=0):
    return perturbed("mamba2-tiny", seed)


def as_if_trained(peft, seed: int, std: float = 0.5) -> None:
    """Every trainable tensor drawn at random, as after training (methods start as the base model: a zero delta)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.normal_(std=std)


def hook_of(mixer):
    return next(h for h in mixer.hooks if hasattr(h, "values"))


@pytest.mark.parametrize("build", [lm, vim], ids=["mamba", "vim"])
@pytest.mark.parametrize("spec", ["initial_state", "state_offset", "state_offset:variant=y"])
def test_each_method_is_its_formula_in_float64(build, spec):
    peft = get_peft_model(build(), [spec]).double().eval()
    as_if_trained(peft, seed=3)
    mixers = peft.base_model.peft_mixers()
    h = torch.randn(2, 11, mixers[0].d_model, dtype=torch.float64)
    for mixer in mixers:
        values = hook_of(mixer).values
        if spec == "initial_state":
            expected = reference_mixer(mixer, h, state_of=lambda d, values=values: values[d])
        else:
            kind = spec.split("=")[-1] if "=" in spec else "h"
            expected = reference_mixer(mixer, h, offset_of=lambda d, kind=kind, values=values: (kind, values[d]))
        with torch.no_grad():
            assert_rel_close(mixer(h), expected, tol=1e-7, what=spec)
        assert not torch.allclose(expected, reference_mixer(mixer, h)), f"{spec} changes nothing"


@pytest.mark.parametrize("build", [lm, vim], ids=["mamba", "vim"])
@pytest.mark.parametrize("spec", ["initial_state", "state_offset", "state_offset:variant=y"])
def test_gradients_by_finite_differences(build, spec):
    """torch.autograd.gradcheck on H0, h' and y' of each direction (the scan's own backward for H0)."""
    peft = get_peft_model(build(), [spec]).double().eval()
    mixer = peft.base_model.peft_mixers()[0]
    h = torch.randn(1, 5, mixer.d_model, dtype=torch.float64)
    names = [n for n, _ in mixer.named_parameters() if ".values." in n]
    assert len(names) == mixer.num_directions
    for name in names:
        value = (dict(mixer.named_parameters())[name].detach() + 0.3 * torch.randn_like(
            dict(mixer.named_parameters())[name])).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda v, n=name: torch.func.functional_call(mixer, {n: v}, (h,)), (value,),
                                        eps=1e-6, atol=1e-7, fast_mode=True)


def test_counts_of_the_state_tuning_paper():
    def count(arch, spec):
        return get_peft_model(mambapeft.from_config(arch, device="meta"), [spec]).parameter_counts()["trainable"]

    assert [count("mamba-130m", s) for s in ("initial_state", "state_offset", "state_offset:variant=y")] == \
        [589_824, 589_824, 36_864]
    assert [count("mamba-1.4b", s) for s in ("initial_state", "state_offset", "state_offset:variant=y")] == \
        [3_145_728, 3_145_728, 196_608]
    assert count("vim-small", "initial_state") == 24 * 2 * 768 * 16                 # one per scan direction


@pytest.mark.parametrize("spec", ["initial_state", "state_offset", "initial_state+state_offset:variant=y"])
def test_left_padding_gives_the_unpadded_outputs(spec):
    """The initial state meets each row's first real token: padded and unpadded prompts give the same outputs."""
    peft = get_peft_model(lm(), spec.split("+"))
    as_if_trained(peft, seed=4)
    peft.eval()
    ids = torch.randint(1, 97, (1, 8))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = peft(ids).logits
        in_batch = peft(padded, attention_mask=mask).logits[:, 5:]
    assert_rel_close(in_batch, alone, tol=1e-5, what=spec)
    generated = peft.generate(padded, attention_mask=mask, max_new_tokens=3, eos_token_id=None)[:, 13:]
    assert torch.equal(generated, peft.generate(ids, max_new_tokens=3, eos_token_id=None)[:, 8:])


@pytest.mark.parametrize("build", [lm, lm2], ids=["mamba", "mamba2"])
@pytest.mark.parametrize("spec", ["initial_state", "state_offset", "state_offset:variant=y+additional_scan:n=2"])
def test_decoding_steps_equal_full_forwards(build, spec):
    """Greedy decoding takes the one-token `step` path; each new token's logits equal a full forward's."""
    peft = get_peft_model(build(), spec.split("+"))
    as_if_trained(peft, seed=5)
    peft.eval()
    ids = torch.randint(1, 97, (2, 6))
    generated = peft.generate(ids, max_new_tokens=5, eos_token_id=None)
    with torch.no_grad():
        full = peft(generated[:, :-1]).logits[:, 5:]                 # the logits each new token was chosen from
        state = peft.base_model.new_state()
        stepped = [peft.base_model(ids, state=state).logits[:, -1:]]
        for t in range(6, generated.shape[1] - 1):
            stepped.append(peft.base_model(generated[:, t : t + 1], state=state).logits)
    assert torch.equal(full.argmax(-1), generated[:, 6:])
    assert_rel_close(torch.cat(stepped, 1), full, tol=1e-5, what=spec)


def test_initial_state_and_affix_tokens_compose():
    """With affix tokens (a prefix after in_proj), the scan starts from H0, reads the tokens, then the text."""
    peft = get_peft_model(lm(), ["initial_state", "affix:n=2"]).double().eval()
    as_if_trained(peft, seed=5)
    mixer = peft.base_model.peft_mixers()[0]
    h = torch.randn(2, 6, mixer.d_model, dtype=torch.float64)
    tokens = next(hk for hk in mixer.hooks if hasattr(hk, "weight") and hk.weight is not None).weight  # (n, 1, 2E)
    xz = F.linear(f64(h), f64(mixer.in_proj.weight))
    longer = torch.cat([f64(tokens[:, 0]).expand(2, -1, -1), xz], 1)
    y = reference_direction(mixer, longer, 0, h0=hook_of(mixer).values[0])[:, 2:]
    with torch.no_grad():
        assert_rel_close(mixer(h), F.linear(y, f64(mixer.out_proj.weight)), tol=1e-7, what="H0 then affix")


def test_they_stay_unmerged_with_their_reason():
    from mambapeft.methods import REGISTRY

    peft = get_peft_model(lm(), ["initial_state", "state_offset", "lora_p_x:r=2"])
    kept = peft.merge_and_unload()
    assert {m.name for m in kept.methods} == {"initial_state", "state_offset"}
    assert "rank-N map" in REGISTRY["state_offset"].why_not_mergeable
    assert "gated by" in REGISTRY["state_offset"].why_not_mergeable
    assert "state" in REGISTRY["initial_state"].why_not_mergeable


def test_the_default_search_space_offers_them_and_a_search_runs_with_them(tmp_path):
    from mambapeft.search.hybrid import SearchSettings, open_storage, open_study, run_search
    from mambapeft.search.space import paper_space

    space = paper_space(vision=False, step1_trials=6, step2_trials=3)
    assert space.step1["initial_state"] == {} and space.step1["state_offset"] == {"variant": "y"}
    assert space.step2["state_offset"]["variant"] == {"choice": ["h", "y"]}
    small = space.restricted_to(["initial_state", "state_offset", "lora_p_x"])
    ids = torch.randint(0, 97, (2, 9))
    ran = []

    def objective(specs, report, tag):                        # a real attach, forward and backward per trial
        peft = get_peft_model(mambapeft.from_config("mamba-micro", seed=0), specs)
        loss = peft(ids, labels=ids).loss
        loss.backward()
        ran.append({s.method for s in specs})
        report(1, -loss.item())
        return {"score": -loss.item(), "trainable": peft.parameter_counts()["trainable"]}

    settings = SearchSettings(storage=f"sqlite:///{tmp_path}/s.db", seed=0, prune=False)
    result = run_search(small, objective, settings)
    assert any({"initial_state", "state_offset"} <= r for r in ran)
    assert open_study(settings, open_storage(settings), 2).get_trials()[0].user_attrs["methods"] == result.combination


# ------------------------------------------------------------------ Mamba-2: (H, P, N) states, offsets before the norm


def mamba2_reference(mixer, h, h0=None, offset=None):
    """The Mamba-2 mixer in float64 from its formula, one step at a time: s_t = exp(dt A_h) s + dt x_t B_t^T per head,
    y_t = C_t s_t + D x_t (+ C_t h' or + y'), then the gated RMSNorm and out_proj."""
    E, H, G, N, P = mixer.d_inner, mixer.num_heads, mixer.n_groups, mixer.d_state, mixer.head_dim
    zxbcdt = F.linear(f64(h), f64(mixer.in_proj.weight))
    z, xBC, dt = zxbcdt.split([E, E + 2 * G * N, H], dim=-1)
    L = h.shape[1]
    conv = mixer.conv1d
    xBC = F.silu(F.conv1d(xBC.mT, f64(conv.weight), f64(conv.bias), padding=mixer.d_conv - 1,
                          groups=xBC.shape[-1])[..., :L]).mT
    x, B, C = xBC.split([E, G * N, G * N], dim=-1)
    x = x.unflatten(-1, (H, P))
    B = B.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)                   # (b, L, H, N)
    C = C.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + f64(mixer.dt_bias))                                        # (b, L, H)
    A = -torch.exp(f64(mixer.A_log))
    b = h.shape[0]
    s = torch.zeros(b, H, P, N, dtype=torch.float64) if h0 is None else f64(h0).expand(b, -1, -1, -1).clone()
    ys = []
    for t in range(L):
        s = torch.exp(dt[:, t] * A)[..., None, None] * s + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        y = (s * C[:, t, :, None]).sum(-1) + f64(mixer.D)[:, None] * x[:, t]
        if offset is not None and offset[0] == "h":
            y = y + (f64(offset[1]) * C[:, t, :, None]).sum(-1)
        if offset is not None and offset[0] == "y":
            y = y + f64(offset[1])
        ys.append(y.flatten(-2))
    y = torch.stack(ys, 1) * F.silu(z)                                               # gated RMSNorm, one group here
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * f64(mixer.norm.weight)
    return F.linear(y, f64(mixer.out_proj.weight))


@pytest.mark.parametrize("spec", ["initial_state", "state_offset", "state_offset:variant=y"])
def test_mamba2_state_methods_are_their_formulas(spec):
    model = mambapeft.from_config("mamba2-tiny", seed=0)
    peft = get_peft_model(model, [spec]).double().eval()
    as_if_trained(peft, seed=3, std=0.3)
    mixer = peft.base_model.peft_mixers()[0]
    value = hook_of(mixer).values[0]
    assert value.shape == ((mixer.num_heads, mixer.head_dim) if "=y" in spec else mixer.state_shape)
    h = torch.randn(2, 9, mixer.d_model, dtype=torch.float64)
    if spec == "initial_state":
        expected = mamba2_reference(mixer, h, h0=value)
    else:
        expected = mamba2_reference(mixer, h, offset=("y" if "=y" in spec else "h", value))
    with torch.no_grad():
        assert_rel_close(mixer(h), expected, tol=1e-7, what=spec)
        assert not torch.allclose(expected, mamba2_reference(mixer, h))


def test_mamba2_states_with_additional_scan_merge_pad_and_generate():
    """initial_state + state_offset + additional_scan on Mamba-2: merging grows the state (H0 and h' pad with zeros,
    exactly), left padding leaves the outputs, and decoding equals the full forwards."""
    peft = get_peft_model(mambapeft.from_config("mamba2-tiny", seed=0),
                          ["initial_state", "state_offset", "additional_scan:n=3,location=bottom"])
    torch.manual_seed(4)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft.eval()
    ids = torch.randint(1, 1000, (1, 8))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = peft(ids).logits
        assert_rel_close(peft(padded, attention_mask=mask).logits[:, 4:], alone, tol=1e-5, what="left padding")
    tokens = ids[:, :4]
    generated = peft.generate(tokens, max_new_tokens=4, eos_token_id=None)
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, peft(tokens).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, tokens)
    kept = peft.merge_and_unload().eval()
    assert kept.base_model.peft_mixers()[0].d_state == 16 + 3
    with torch.no_grad():
        assert_rel_close(kept(ids).logits, alone, tol=1e-5, what="merged")


# ---------------------------------------- S0 tuning's settings: the injected scale and the L2 penalty


@pytest.mark.parametrize("build", [lm, lm2], ids=["mamba", "mamba2"])
def test_s0_scale_injects_scale_times_the_learned_state(build):
    """initial_state:scale=a is the float64 formula with H0 = a S (the reference of the plain method, fed a S)."""
    peft = get_peft_model(build(), ["initial_state:scale=0.07"]).double().eval()
    as_if_trained(peft, seed=5)
    plain = get_peft_model(build(), ["initial_state"]).double().eval()
    with torch.no_grad():
        for mine, other in zip(peft.base_model.peft_mixers(), plain.base_model.peft_mixers()):
            for s, o in zip(hook_of(mine).values, hook_of(other).values):
                o.copy_(0.07 * s)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert_rel_close(peft(ids).logits, plain(ids).logits, tol=1e-10, what="scale")
        assert not torch.allclose(peft(ids).logits, build().double()(ids).logits)


def test_s0_l2_adds_its_penalty_gradient_and_leaves_the_loss():
    """With l2, S's gradient is the task loss's plus 2 l2 S (autograd of loss + l2 ||S||^2 as the reference); the
    loss itself, logged and scored, is the task's."""
    ids = torch.randint(0, 64, (2, 9))
    peft = get_peft_model(lm(), ["initial_state:scale=0.5,l2=0.01"]).double().train()
    as_if_trained(peft, seed=6)
    reference = get_peft_model(lm(), ["initial_state:scale=0.5"]).double().train()
    reference.load_state_dict(peft.state_dict())
    out = peft(ids, labels=ids)
    out.loss.backward()
    ref = reference(ids, labels=ids)
    values = [v for m in reference.base_model.peft_mixers() for v in hook_of(m).values]
    (ref.loss + 0.01 * sum((v ** 2).sum() for v in values)).backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    mine = [v for m in peft.base_model.peft_mixers() for v in hook_of(m).values]
    for a, b in zip(mine, values):
        assert_rel_close(a.grad, b.grad, tol=1e-10, what="l2 gradient")


def test_paper_s0_presets():
    from mambapeft.config.presets import all_presets

    presets = all_presets()
    assert presets["s0"] == ["initial_state:scale=0.07,l2=0.0005,lr=0.001"]
    assert presets["s0_mamba2"] == ["initial_state:scale=0.65,l2=0.0005,lr=0.001"]
    peft = get_peft_model(lm(), ["paper/s0"])
    method = peft.methods[0]
    assert (method.config.scale, method.config.l2, method.config.lr) == (0.07, 0.0005, 0.001)
