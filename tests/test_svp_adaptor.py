"""Selective Visual Prompting (methods/svp.py) and Mamba-Adaptor (methods/mamba_adaptor.py) against float64
restatements of their formulas, finite-difference gradients, save / load, and hand-counted parameters.

The restatements are written from the equations (the modules' docstrings), not from the modules: SVP's prompts are
added by hand between the blocks of a twin model that carries no method; Adaptor-T's read is a loop over positions,
groups and points with the two-neighbour interpolation written out; Adaptor-S is a loop over the k x k taps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mambapeft
from mambapeft import ConfigError, NotApplicable, PeftModel, get_peft_model
from mambapeft.methods.base import projections
from mambapeft.model.vim.modeling import build_vim
from mambapeft.model.vmamba.modeling import build_vmamba

from conftest import assert_rel_close

torch.set_num_threads(1)


def tiny_vim(seed=0, **overrides):
    """A Vim of d 8, 2 blocks, a 2 x 2 patch grid plus the class token (5 tokens), float64."""
    sizes = dict(d_model=8, depth=2, img_size=16, patch_size=8, stride=8, d_state=4, num_classes=3,
                 residual_in_fp32=False)         # float64 throughout (an fp32 residual would round to 1e-7)
    model = build_vim("vim-micro", seed=seed, dtype=torch.float64, **{**sizes, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_vmamba(seed=0):
    model = build_vmamba("vmamba-micro", seed=seed, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@torch.no_grad()
def randomize(peft, scale=0.3, seed=5):
    torch.manual_seed(seed)
    for t in peft.base_model.parameters():
        if t.requires_grad:
            t.add_(torch.randn_like(t) * scale)


def pixels(model, batch=2, seed=0):
    return model.peft_inputs(batch=batch, seed=seed)["pixel_values"].double()


# ------------------------------------------------------------------ SVP


def svp_reference(base, svp_state, config, images):
    """The Vim forward with SVP's prompts added by hand (float64): h += P_0(emb) before block 0, and each mixer
    output m_{i-1} += P_i(m_{i-1}) before the residual add of block i-1; the class token gets no prompt."""
    s = {k: v.double() for k, v in svp_state.items()}
    rank, shared = config["rank"], config["shared_layers"]

    def prompt(i, u):
        out = torch.zeros_like(u)
        if "inner_scale" in s:
            down = u @ s[f"inner.{i}.0.weight"].T + s[f"inner.{i}.0.bias"]                  # (b, L, rank)
            assert down.shape[-1] == rank
            up = down @ s[f"inner.{i}.1.weight"].T + s[f"inner.{i}.1.bias"]                 # (b, L, d)
            out = out + up * torch.sigmoid(up) * s["inner_scale"][i]
        if "cross_scale" in s:
            g = i // shared
            c = u @ s[f"cross.{g}.weight"].T + s[f"cross.{g}.bias"]
            out = out + c * torch.sigmoid(c) * s["cross_scale"][g]
        out[:, base.config.cls_position] = 0
        return out

    h = base.patch_embed(images)
    b, m, _ = h.shape
    c = m // 2
    h = torch.cat([h[:, :c], base.cls_token.expand(b, -1, -1), h[:, c:]], dim=1) + base.pos_embed
    h = h + prompt(0, h)
    for i, layer in enumerate(base.layers):
        branch = layer.mixer(layer.norm(h))
        if i + 1 < len(base.layers):
            branch = branch + prompt(i + 1, branch)
        h = h + branch
    return base.head(base.norm_f(h)[:, c])


@pytest.mark.parametrize("spec, config", [
    ("svp:rank=3,shared_layers=1", dict(rank=3, shared_layers=1)),
    ("svp:rank=2,shared_layers=2", dict(rank=2, shared_layers=2)),
    ("svp:rank=2,shared_layers=2,cross=false", dict(rank=2, shared_layers=2)),
    ("svp:rank=2,shared_layers=1,inner=false", dict(rank=2, shared_layers=1)),
])
def test_svp_matches_float64_restatement(spec, config):
    base = tiny_vim(depth=3)
    twin = copy.deepcopy(base)
    peft = get_peft_model(base, [spec]).eval()
    randomize(peft)
    images = pixels(base)
    with torch.no_grad():
        got = peft(pixel_values=images).logits
        state = {k.removeprefix("svp."): v for k, v in peft.adapter_tensors().items() if k.startswith("svp.")}
        expected = svp_reference(twin, state, config, images)
    # Vim's scan and logits run in float32 whatever the weights' dtype: both sides round alike to ~1e-7
    assert_rel_close(got, expected, tol=1e-6, what=spec)


def test_svp_starts_as_identity_and_keeps_class_token():
    base = tiny_vim()
    twin = copy.deepcopy(base)
    peft = get_peft_model(base, ["svp:rank=2,shared_layers=1"]).eval()
    images = pixels(base)
    with torch.no_grad():
        assert torch.equal(peft(pixel_values=images).logits, twin(pixel_values=images).logits)
    # the prompt of the class-token position is zero whatever the prompters hold
    randomize(peft)
    u = torch.randn(2, base.config.num_patches + 1, 8, dtype=torch.float64)
    p = base.svp.prompt(1, u)
    assert torch.equal(p[:, base.config.cls_position], torch.zeros_like(p[:, 0]))
    assert p.abs().sum() > 0


def test_svp_gradcheck():
    """Finite differences through the prompts of blocks 0 and 1 (u and every prompter tensor, float64). The prompters
    are taken alone: Vim's scan and logits run in float32 whatever the weights' dtype, which finite differences at
    1e-6 cannot see through; the wiring into the model is what the restatement above checks."""
    base = tiny_vim()
    peft = get_peft_model(base, ["svp:rank=2,shared_layers=1,dropout=0"]).eval()
    randomize(peft)
    prompters = base.svp
    named = dict(prompters.named_parameters())
    names = list(named)
    torch.manual_seed(1)
    u = torch.randn(1, base.config.num_patches + 1, 8, dtype=torch.float64, requires_grad=True)

    def f(u, *tensors):
        return torch.cat([torch.func.functional_call(prompters, dict(zip(names, tensors)), (i, u), strict=False)
                          for i in (0, 1)])

    values = tuple(named[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, (u, *values), eps=1e-6, atol=1e-6)


def test_svp_parameter_count_vim_small():
    """Hand count from the official code's modules (mlp384*64, shared_layers 8, depth 24, d 384):
    inner per block: 384*64 + 64 + 64*384 + 384 weights and biases + 384 scale = 49,984; x 24 = 1,199,616;
    cross per group of 8 blocks: 384*384 + 384 + 384 scale = 148,224; x 3 = 444,672. Total 1,644,288
    (plus the head the runs train; not counted here)."""
    peft = get_peft_model(build_vim("vim-small", device="meta"), ["paper/svp"])
    assert peft.trainable_by_method()["svp"] == 24 * (384 * 64 + 64 + 64 * 384 + 384 + 384) + 3 * (384 * 384 + 2 * 384)
    assert peft.trainable_by_method()["svp"] == 1_644_288


def test_svp_groups_when_depth_does_not_divide():
    """depth 3 with shared_layers 2: blocks 0 and 1 share cross prompter 0, block 2 has cross prompter 1."""
    peft = get_peft_model(tiny_vim(depth=3), ["svp:rank=2,shared_layers=2"])
    assert len(peft.base_model.svp.cross) == math.ceil(3 / 2)


def test_svp_refuses_other_families_and_soft_tokens():
    with pytest.raises(NotApplicable, match="svp does not apply to vmamba models: .*class token"):
        get_peft_model(tiny_vmamba(), ["svp"])
    with pytest.raises(ConfigError, match="svp and prompt cannot be combined"):
        get_peft_model(tiny_vim(), ["svp:rank=2", "prompt:n=2"])
    peft = get_peft_model(tiny_vim(), ["svp:rank=2"])
    with pytest.raises(ConfigError, match="another method inserts tokens"):       # the forward's own check
        peft.base_model.svp.prompt(0, torch.zeros(1, 7, 8, dtype=torch.float64))
    assert get_peft_model(tiny_vim(), ["svp:rank=2", "affix:n=2"])               # affix is dropped before out_proj
    with pytest.raises(ConfigError, match="nothing to train"):
        get_peft_model(tiny_vim(), ["svp:inner=false,cross=false"])


# ------------------------------------------------------------------ Mamba-Adaptor


def read_reference(y, positions):
    """y (L, c) read at the real position q: (1 - (q - j)) y_j + (q - j) y_{j+1}, j = floor(q), 0 outside."""
    L = y.shape[0]
    j = math.floor(q := float(positions.detach()))
    w = q - j
    out = torch.zeros_like(y[0])
    if 0 <= j < L:
        out = out + (1 - w) * y[j]
    if 0 <= j + 1 < L:
        out = out + w * y[j + 1]
    return out


def adaptor_t_reference(module, y):
    """T(y)_i = gamma * concat_s sum_k softmax_k(phi_c y_i)^s_k y^s(i + (phi_p y_i)^s_k), by loops."""
    b, L, E = y.shape
    S, K = module.S, module.K
    c = E // S
    Wp, bp = module.offsets.weight.double(), module.offsets.bias.double()
    Wc, bc = module.weights.weight.double(), module.weights.bias.double()
    out = torch.zeros_like(y)
    for n in range(b):
        for i in range(L):
            p = (Wp @ y[n, i] + bp).view(S, K)
            logits = (Wc @ y[n, i] + bc).view(S, K)
            for s in range(S):
                weights = torch.exp(logits[s]) / torch.exp(logits[s]).sum()
                for k in range(K):
                    out[n, i, s * c:(s + 1) * c] += weights[k] * read_reference(y[n, :, s * c:(s + 1) * c],
                                                                                 i + p[s, k])
    return out * module.gamma.double()


def adaptor_s_reference(module, grid):
    """S(y)(i, j) = sum_r sum_{u, v} w_r[u, v] y(i + r (u - k//2), j + r (v - k//2)), 0 outside the grid."""
    b, H, W, E = grid.shape
    k = module.kernel
    out = torch.zeros_like(grid)
    for w, r in zip(module.weight.double(), module.rates):
        for u in range(k):
            for v in range(k):
                di, dj = r * (u - k // 2), r * (v - k // 2)
                for i in range(H):
                    for j in range(W):
                        if 0 <= i + di < H and 0 <= j + dj < W:
                            out[:, i, j] += w[:, 0, u, v] * grid[:, i + di, j + dj]
    return out


def adaptor_modules(peft):
    return [m for m in peft.base_model.modules() if type(m).__name__ == "AdaptorBranch"]


@pytest.mark.parametrize("spec", ["mamba_adaptor:points=3,groups=2", "mamba_adaptor:points=2,groups=4,kernel=3",
                                  "mamba_adaptor:temporal=false,dilations=1+2"])
def test_adaptor_branches_match_loops(spec):
    base = tiny_vim()
    peft = get_peft_model(base, [spec])
    randomize(peft)
    torch.manual_seed(0)
    for branch in adaptor_modules(peft):
        E = branch._base[0].in_features
        y = torch.randn(2, 5, E, dtype=torch.float64)
        out = torch.zeros(2, 5, 8, dtype=torch.float64)
        with torch.no_grad():
            got = branch(y, out)
        delta = torch.zeros_like(y)
        if branch.temporal is not None:
            delta += adaptor_t_reference(branch.temporal, y)
        if branch.spatial is not None:
            cls = base.config.cls_position
            patches = torch.cat([y[:, :cls], y[:, cls + 1:]], dim=1).view(2, 2, 2, E)
            s = adaptor_s_reference(branch.spatial, patches).reshape(2, 4, E)
            delta += torch.cat([s[:, :cls], torch.zeros_like(s[:, :1]), s[:, cls:]], dim=1)
        assert_rel_close(got, delta @ branch._base[0].weight.double().T, tol=1e-10, what=spec)


def test_adaptor_vmamba_branch_matches_loops():
    peft = get_peft_model(tiny_vmamba(), ["mamba_adaptor:points=2,groups=2"])
    randomize(peft)
    torch.manual_seed(0)
    for branch in adaptor_modules(peft)[:2]:
        E = branch._base[0].in_features
        y = torch.randn(1, 3, 4, E, dtype=torch.float64)     # a 3 x 4 grid, raster order along the scan
        with torch.no_grad():
            got = branch(y, torch.zeros(1, 3, 4, branch._base[0].out_features, dtype=torch.float64))
        delta = adaptor_t_reference(branch.temporal, y.reshape(1, 12, E)).view(1, 3, 4, E)
        delta += adaptor_s_reference(branch.spatial, y)
        assert_rel_close(got, delta @ branch._base[0].weight.double().T, tol=1e-10, what="vmamba branch")


def test_adaptor_whole_model_is_out_proj_of_adapted_y():
    """Wiring: the adapted model equals the twin model with each out_proj replaced by y -> W (y + T(y) + S(y))."""
    base = tiny_vim()
    twin = copy.deepcopy(base)
    peft = get_peft_model(base, ["mamba_adaptor:points=2,groups=2"]).eval()
    randomize(peft)
    images = pixels(base)
    branches = adaptor_modules(peft)
    assert len(branches) == len(base.layers)
    for layer, branch in zip(twin.layers, branches):
        W = layer.mixer.out_proj.weight

        def reference(y, branch=branch, W=W):
            delta = adaptor_t_reference(branch.temporal, y)
            if branch.spatial is not None:
                cls = base.config.cls_position
                patches = torch.cat([y[:, :cls], y[:, cls + 1:]], dim=1).view(y.shape[0], 2, 2, -1)
                s = adaptor_s_reference(branch.spatial, patches).reshape(y.shape[0], 4, -1)
                delta = delta + torch.cat([s[:, :cls], torch.zeros_like(s[:, :1]), s[:, cls:]], dim=1)
            return F.linear(y + delta, W)

        layer.mixer.out_proj.forward = reference
    with torch.no_grad():
        assert_rel_close(peft(pixel_values=images).logits, twin(pixel_values=images).logits, tol=1e-6,
                         what="mamba_adaptor on tiny Vim")      # the scan runs in float32 on both sides
    # the last Vim block has no spatial part: the head reads only the class token, which S leaves alone
    assert branches[-1].spatial is None and branches[0].spatial is not None


@pytest.mark.parametrize("family", ["vim", "vmamba"])
def test_adaptor_gradcheck(family):
    """Finite differences through one branch (the whole VMamba runs its scan's A in float32, so the branch is taken
    alone there): in y and every trainable tensor, with offsets off the integers (interpolation has kinks there)."""
    base = tiny_vim() if family == "vim" else tiny_vmamba()
    peft = get_peft_model(base, ["mamba_adaptor:points=2,groups=2,dilations=1+2"]).eval()
    randomize(peft)
    branch = adaptor_modules(peft)[0]
    E, d = branch._base[0].in_features, branch._base[0].out_features
    torch.manual_seed(1)
    y = torch.randn(1, 5, E, dtype=torch.float64) if family == "vim" else torch.randn(1, 2, 3, E, dtype=torch.float64)
    out = torch.zeros(*y.shape[:-1], d, dtype=torch.float64)
    named = dict(branch.named_parameters())
    names = list(named)

    def f(y, *tensors):
        return torch.func.functional_call(branch, dict(zip(names, tensors)), (y, out))

    values = tuple(named[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, (y.requires_grad_(True), *values), eps=1e-6, atol=1e-6)


def test_adaptor_parameter_counts():
    """Hand counts. Vim-S (d 384, E 768, 24 blocks), the preset (K 4, S 4, 3 x 3 kernels at dilations 1, 2, 3):
    T per block: 2 (768 * 16 + 16) + 768 gamma = 25,376; S per block: 3 * 768 * 9 = 20,736; the last block has no S:
    24 * 25,376 + 23 * 20,736 = 1,085,952."""
    peft = get_peft_model(build_vim("vim-small", device="meta"), ["paper/mamba_adaptor"])
    t, s = 2 * (768 * 16 + 16) + 768, 3 * 768 * 9
    assert peft.trainable_by_method()["mamba_adaptor"] == 24 * t + 23 * s == 1_085_952
    # VMamba-micro: one adaptor per SS2D block, widths E of its stages (ssm_ratio * dim)
    vm = get_peft_model(build_vmamba("vmamba-micro", device="meta"), ["mamba_adaptor:points=2,groups=2"])
    widths = [p.layer.in_features for p in projections(vm.base_model, "out_proj")]
    expected = sum(2 * (E * 4 + 4) + E + 3 * E * 9 for E in widths)
    assert vm.trainable_by_method()["mamba_adaptor"] == expected


def test_adaptor_save_load_round_trip(tmp_path):
    peft = get_peft_model(tiny_vim(), ["mamba_adaptor:points=2,groups=2", "svp:rank=2"]).eval()
    randomize(peft)
    images = pixels(peft.base_model)
    with torch.no_grad():
        expected = peft(pixel_values=images).logits
    peft.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_vim(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).logits, expected)
    merged = peft.merge_and_unload().eval()        # neither merges: both stay as the remainder
    assert isinstance(merged, PeftModel) and {m.name for m in merged.methods} == {"mamba_adaptor", "svp"}
    with torch.no_grad():
        assert torch.equal(merged(pixel_values=images).logits, expected)


def test_adaptor_refusals():
    with pytest.raises(NotApplicable, match="mamba_adaptor does not apply to mamba models: .*2-D"):
        get_peft_model(mambapeft.from_config("mamba-micro", seed=0), ["mamba_adaptor"])
    with pytest.raises(ConfigError, match="must divide"):
        get_peft_model(tiny_vim(), ["mamba_adaptor:groups=3"])
    with pytest.raises(ConfigError, match="dilations"):
        get_peft_model(tiny_vim(), ["mamba_adaptor:dilations=1+1"])
    with pytest.raises(ConfigError, match="odd"):
        get_peft_model(tiny_vim(), ["mamba_adaptor:kernel=2"])
    with pytest.raises(ConfigError, match="mamba_adaptor and prompt cannot be combined"):
        get_peft_model(tiny_vim(), ["mamba_adaptor:points=2,groups=2", "prompt:n=2"])
    branch = adaptor_modules(get_peft_model(tiny_vim(), ["mamba_adaptor:points=2,groups=2"]))[0]
    with pytest.raises(ConfigError, match="another method inserts tokens"):       # the forward's own check
        branch(torch.zeros(1, 7, 16, dtype=torch.float64), torch.zeros(1, 7, 8, dtype=torch.float64))
