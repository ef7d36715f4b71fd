"""VMamba: logits and gradients against a loop-based float64 reference, sizes, PEFT hooks, safe and strict loading."""

import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambapeft import CheckpointError, ConfigError, from_config
from mambapeft.model.hooks import PeftHook
from mambapeft.model.vmamba.loading import load_vmamba, looks_like_vmamba, save_vmamba
from mambapeft.model.vmamba.modeling import (
    VMAMBA_ARCHITECTURES,
    VMamba,
    VMambaConfig,
    build_vmamba,
    cross_merge,
    cross_scan,
    vmamba_config,
)

from conftest import assert_rel_close


def jittered(config: VMambaConfig, seed=0, jitter=0.1) -> VMamba:
    """A VMamba with random weights and no tensor left at a constant init (norms 1, D 1, the zero head, ...)."""
    torch.manual_seed(seed)
    model = VMamba(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


# ---------------------------------------------------------------- the float64 reference, written plainly


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu(x):
    return x / (1 + torch.exp(-x))


def scan_orders(H, W):
    """The grid positions each direction visits, in order: row-major, column-major and both reversed."""
    rows = [(i, j) for i in range(H) for j in range(W)]
    cols = [(i, j) for j in range(W) for i in range(H)]
    return [rows, cols, rows[::-1], cols[::-1]]


def ref_ss2d(p, x, N, R, eps, *, x_proj=None, tokens=None, h0=None, h_offset=None, y_offset=None):
    """SS2D on x (b, H, W, d), direction by direction, one grid position at a time, in float64 from the mixer's
    tensors `p`; for the PEFT tests (test_vmamba_peft.py), optionally with, per direction k:
    x_proj[k] (R+2N, E) in place of x_proj_weight[k]; tokens[k] (n, E) read before the first grid position (they
    skip in_proj, the conv and SiLU; their outputs are not kept); h0[k] (E, N) the state before the first input;
    h_offset[k] (E, N) adding C_t h' to every output; y_offset[k] (E) adding y'."""
    b, H, W, _ = x.shape
    E = p["in_proj.weight"].shape[0]
    xi = (x @ p["in_proj.weight"].T).permute(0, 3, 1, 2)                 # (b, E, H, W)
    w = p["conv2d.weight"][:, 0]                                          # (E, K, K)
    K = w.shape[-1]
    r = K // 2
    padded = F.pad(xi, (r, r, r, r))
    conv = sum(w[:, di, dj, None, None] * padded[:, :, di : di + H, dj : dj + W] for di in range(K) for dj in range(K))
    xc = silu(conv).permute(0, 2, 3, 1)                                   # (b, H, W, E)
    y = torch.zeros(b, H, W, E, dtype=torch.float64)
    for k, order in enumerate(scan_orders(H, W)):
        Wx = x_proj[k] if x_proj is not None else p["x_proj_weight"][k]
        Wdt, bias = p["dt_projs_weight"][k], p["dt_projs_bias"][k]
        A = -torch.exp(p["A_logs"][k * E : (k + 1) * E])                   # (E, N)
        D = p["Ds"][k * E : (k + 1) * E]
        s = (h0[k].expand(b, E, N) if h0 is not None else torch.zeros(b, E, N, dtype=torch.float64)).clone()
        inputs = [(None, tok.expand(b, E)) for tok in (tokens[k] if tokens is not None else [])]
        inputs += [((i, j), xc[:, i, j]) for i, j in order]
        for where, u in inputs:                                           # u (b, E)
            dbc = u @ Wx.T
            dt_low, B, C = dbc[:, :R], dbc[:, R : R + N], dbc[:, R + N :]
            delta = torch.log1p(torch.exp(dt_low @ Wdt.T + bias))         # softplus
            s = torch.exp(delta[:, :, None] * A) * s + (delta * u)[:, :, None] * B[:, None, :]
            out = (s * C[:, None, :]).sum(-1) + D * u
            if h_offset is not None:
                out = out + (h_offset[k] * C[:, None, :]).sum(-1)
            if y_offset is not None:
                out = out + y_offset[k]
            if where is not None:                                         # a soft token's output is dropped
                y[:, where[0], where[1]] += out
    y = ln(y, p["out_norm.weight"], p["out_norm.bias"], eps)
    return y @ p["out_proj.weight"].T


def reference_vmamba(model: VMamba, images: torch.Tensor, params: dict) -> torch.Tensor:
    """Logits of VMamba for images (b, C, H, W) in float64, from `params` (the state dict) alone."""
    c = model.config
    eps, N = c.norm_eps, c.d_state
    stride = c.patch_size // 2
    h = F.conv2d(images.double(), params["patch_embed.0.weight"], params["patch_embed.0.bias"], stride=stride,
                 padding=1)
    h = gelu(ln(h.permute(0, 2, 3, 1), params["patch_embed.2.weight"], params["patch_embed.2.bias"], eps))
    h = F.conv2d(h.permute(0, 3, 1, 2), params["patch_embed.5.weight"], params["patch_embed.5.bias"], stride=stride,
                 padding=1)
    h = ln(h.permute(0, 2, 3, 1), params["patch_embed.7.weight"], params["patch_embed.7.bias"], eps)
    for i, depth in enumerate(c.depths):
        d = c.dims[i]
        R = c.dt_rank or math.ceil(d / 16)
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}."
            p = {k.removeprefix(pre): v for k, v in params.items() if k.startswith(pre)}
            op = {k.removeprefix("op."): v for k, v in p.items() if k.startswith("op.")}
            h = h + ref_ss2d(op, ln(h, p["norm.weight"], p["norm.bias"], eps), N, R, eps)
            m = ln(h, p["norm2.weight"], p["norm2.bias"], eps)
            h = h + gelu(m @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
        if i < len(c.depths) - 1:
            pre = f"layers.{i}.downsample."
            h = F.conv2d(h.permute(0, 3, 1, 2), params[pre + "1.weight"], params[pre + "1.bias"], stride=2, padding=1)
            h = ln(h.permute(0, 2, 3, 1), params[pre + "3.weight"], params[pre + "3.bias"], eps)
    features = ln(h, params["classifier.norm.weight"], params["classifier.norm.bias"], eps).mean(dim=(1, 2))
    return features @ params["classifier.head.weight"].T + params["classifier.head.bias"]


@pytest.mark.parametrize("overrides, size", [
    (dict(), (32, 32)),                                  # grids 8x8, 4x4, 2x2, 1x1; N = 1
    (dict(d_state=2, ssm_ratio=1.5), (40, 24)),          # non-square grids (10x6 ... 2x1), N = 2, E = 1.5 d
])
def test_logits_and_gradients_match_float64_reference(overrides, size):
    model = jittered(vmamba_config("vmamba-micro", **overrides))
    images = torch.randn(2, 3, *size)
    weights = torch.randn(2, model.config.num_classes, dtype=torch.float64)

    logits = model(images).logits
    (logits.double() * weights).sum().backward()
    params = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    ref = reference_vmamba(model, images, params)
    (ref * weights).sum().backward()

    assert_rel_close(logits, ref, tol=1e-5, what="VMamba logits")
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, params[name].grad, tol=1e-4, what=f"grad of {name}")


def test_cross_scan_orders_and_merge_is_its_adjoint():
    """k0 row-major, k1 column-major, k2/k3 reversed; merging four copies of a scan gives 4 x the input."""
    b, H, W, E = 1, 3, 5, 2
    x = torch.arange(b * H * W * E, dtype=torch.float32).reshape(b, H, W, E)
    xs = cross_scan(x)
    for k, order in enumerate(scan_orders(H, W)):
        expected = torch.stack([x[0, i, j] for i, j in order])
        assert torch.equal(xs[0, k], expected), k
    assert torch.equal(cross_merge(xs, H, W), 4 * x)


# ---------------------------------------------------------------- sizes, names, drop path


def count(model, head=False):
    return sum(p.numel() for n, p in model.named_parameters() if head or not n.startswith("classifier.head."))


@pytest.mark.parametrize("name, params", [("vmamba-small", 49_378_752), ("vmamba-base", 87_532_800)])
def test_full_fine_tuning_counts_of_table_5(name, params):
    model = from_config(name, device="meta")
    assert isinstance(model, VMamba)
    assert count(model) == params                              # Table 5's "Full" rows: without the head
    assert count(model, head=True) == params + (8 * model.config.embed_dim + 1) * 1000
    assert len(model.state_dict()) == 402


def test_state_dict_keys_and_shapes_are_those_of_vssm_small_0229():
    sd = from_config("vmamba-small", device="meta").state_dict()
    shapes = {
        "patch_embed.0.weight": (48, 3, 3, 3), "patch_embed.2.weight": (48,), "patch_embed.5.weight": (96, 48, 3, 3),
        "patch_embed.7.bias": (96,), "layers.0.blocks.0.norm.weight": (96,),
        "layers.0.blocks.0.op.in_proj.weight": (192, 96), "layers.0.blocks.0.op.conv2d.weight": (192, 1, 3, 3),
        "layers.0.blocks.0.op.x_proj_weight": (4, 8, 192), "layers.0.blocks.0.op.dt_projs_weight": (4, 192, 6),
        "layers.0.blocks.0.op.dt_projs_bias": (4, 192), "layers.0.blocks.0.op.A_logs": (768, 1),
        "layers.0.blocks.0.op.Ds": (768,), "layers.0.blocks.0.op.out_norm.weight": (192,),
        "layers.0.blocks.0.op.out_proj.weight": (96, 192), "layers.0.blocks.0.mlp.fc1.weight": (384, 96),
        "layers.0.blocks.0.mlp.fc2.weight": (96, 384), "layers.3.blocks.1.op.x_proj_weight": (4, 50, 1536),
        "layers.3.blocks.1.op.dt_projs_weight": (4, 1536, 48), "layers.3.blocks.1.op.A_logs": (6144, 1),
        "layers.2.downsample.1.weight": (768, 384, 3, 3), "layers.2.downsample.3.weight": (768,),
        "classifier.norm.weight": (768,), "classifier.head.weight": (1000, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layers.3.downsample.1.weight" not in sd and "layers.2.blocks.14.op.Ds" in sd
    assert not any("conv2d.bias" in k or "in_proj.bias" in k for k in sd)


def test_model_api():
    model = build_vmamba("vmamba-micro", seed=0)
    assert model.d_model == 8 and model.is_causal is False and model.embedding_path == "patch_embed.0"
    assert model.get_submodule(model.head_path) is model.classifier.head
    assert len(model.peft_mixers()) == 5 and model.peft_mixers()[2].d_inner == 64
    assert "drop_path_rate" not in model.peft_fingerprint() and model.peft_fingerprint()["depths"] == [1, 1, 2, 1]
    assert torch.count_nonzero(model.classifier.head.weight) == 0           # zero-initialised head
    model.reset_head(3)
    assert model.classifier.head.out_features == 3 and model.config.num_classes == 3
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 1])
    out = model(images, labels=labels)
    assert out.logits.shape == (3, 3) and out.features.shape == (3, 64)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 32, 32))


def test_drop_path_is_linear_over_the_blocks_and_only_in_train_mode():
    model = jittered(vmamba_config("vmamba-micro", drop_path_rate=0.5))
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert vmamba_config("vmamba-small").drop_path_rate == 0.3 and vmamba_config("vmamba-base").drop_path_rate == 0.6
    plain = VMamba(vmamba_config("vmamba-micro"))
    plain.load_state_dict(model.state_dict())
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images).logits, plain.eval()(images).logits)
        model.train()
        torch.manual_seed(1)
        a = model(images).logits
        torch.manual_seed(2)
        b = model(images).logits
    assert not torch.allclose(a, b)


def test_unknown_names_and_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="vmamba-small"):
        vmamba_config("vmamba-smal")
    with pytest.raises(ConfigError, match="patch_size"):
        VMambaConfig(patch_size=3)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        VMambaConfig(drop_path_rate=1.5)
    assert set(VMAMBA_ARCHITECTURES) >= {"vmamba-tiny", "vmamba-small", "vmamba-base", "vmamba-micro"}


# ---------------------------------------------------------------- PEFT readiness


class ExtraState(PeftHook):
    """One extra state with B = 0: it never fills, so the outputs must not change."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def extend_state(self, direction, x, A_log, B, C):
        self.seen.append((direction, tuple(x.shape), tuple(A_log.shape), tuple(B.shape)))
        pad = lambda t: torch.cat([t, torch.zeros_like(t[..., :1])], dim=-1)  # noqa: E731
        return torch.cat([A_log, A_log[:, :1]], dim=1), pad(B), torch.cat([C, torch.ones_like(C[..., :1])], dim=-1)


class Prefix(PeftHook):
    def __init__(self, n, width):
        super().__init__()
        self.tokens_ = nn.Parameter(torch.randn(n, width))
        self.asked = []

    def tokens(self, stage, direction, length, offset):
        self.asked.append((stage, direction, length))
        return self.tokens_, torch.arange(self.tokens_.shape[0])


def test_hooks_are_called_per_direction_and_change_what_they_should():
    model = jittered(vmamba_config("vmamba-micro"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(images).logits
        mixer = model.peft_mixers()[0]
        extra = ExtraState()
        mixer.hooks.append(extra)
        assert_rel_close(model(images).logits, base, tol=1e-6, what="a zero-input extra state")
        assert [s[0] for s in extra.seen] == [0, 1, 2, 3]
        assert extra.seen[0][1:] == ((2, 64, 16), (16, 1), (2, 64, 1))
        mixer.hooks.pop(0)
        prefix = Prefix(3, mixer.d_inner)
        mixer.hooks.append(prefix)
        with_prefix = model(images).logits
    assert [a[:2] for a in prefix.asked] == [("after_cross_scan", k) for k in range(4)] and prefix.asked[0][2] == 64
    assert with_prefix.shape == base.shape and not torch.allclose(with_prefix, base)
    model(images).logits.sum().backward()
    assert prefix.tokens_.grad is not None and prefix.tokens_.grad.abs().sum() > 0


def test_parametrizations_and_wrappers_are_not_bypassed():
    """A delta parametrized onto each stacked tensor gets exactly that tensor's gradient (so it is read at every
    call), and a wrapper around each called module changes the output."""
    from torch.nn.utils import parametrize

    model = jittered(vmamba_config("vmamba-micro"))
    images = torch.randn(1, 3, 32, 32)
    mixer = model.peft_mixers()[0]
    names = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
    model(images).logits.pow(2).sum().backward()
    direct = {name: getattr(mixer, name).grad.clone() for name in names}
    with torch.no_grad():
        base = model(images).logits

    class Delta(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.delta = nn.Parameter(torch.zeros(shape))

        def forward(self, w):
            return w + self.delta

    for name in names:
        parametrize.register_parametrization(mixer, name, Delta(getattr(mixer, name).shape))
    model.zero_grad()
    model(images).logits.pow(2).sum().backward()
    for name in names:
        delta = getattr(mixer.parametrizations, name)[0].delta
        assert delta.grad.abs().sum() > 0, name
        torch.testing.assert_close(delta.grad, direct[name], msg=name)

    class Doubled(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return 2 * self.base(x)

    for name in ("in_proj", "out_proj", "conv2d", "out_norm"):
        original = getattr(mixer, name)
        setattr(mixer, name, Doubled(original))
        with torch.no_grad():
            assert not torch.allclose(model(images).logits, base), name
        setattr(mixer, name, original)


# ---------------------------------------------------------------- loading


@pytest.fixture
def yacs_cfgnode(monkeypatch):
    """A CfgNode that pickles under yacs.config.CfgNode as the real one does (a dict subclass keeping its flags in
    the instance dict); the fake module is removed again before loading, so the loader cannot rely on it."""
    if "yacs" in sys.modules:
        pytest.skip("a real yacs is imported")
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, new_allowed=False):
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init_dict or {}).items()})
            self.__dict__["__immutable__"] = False
            self.__dict__["__new_allowed__"] = new_allowed

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode, package.config = CfgNode, module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    yield CfgNode


def released_cfg(CfgNode, **vssm):
    return CfgNode({
        "MODEL": {"TYPE": "vssm", "NAME": "vssm_micro_0229", "DROP_PATH_RATE": 0.25, "NUM_CLASSES": 10,
                  "VSSM": {"EMBED_DIM": 8, "DEPTHS": [1, 1, 2, 1], "SSM_D_STATE": 1, "SSM_FORWARDTYPE": "v05_noz",
                           "PATCHEMBED": "v2", "DOWNSAMPLE": "v3", "NORM_LAYER": "ln2d", **vssm}},
        "DATA": {"IMG_SIZE": 32, "BATCH_SIZE": 128},
        "TRAIN": {"EPOCHS": 300, "BASE_LR": 1e-3},
    })


def save_released_layout(model: VMamba, path, cfg, state=None):
    """What the released .pth files hold (upstream save_checkpoint_ema): the weights under "model" beside the
    optimizer, scheduler and scaler states, the epoch, the accuracy and the yacs config."""
    state = model.state_dict() if state is None else state
    first = next(iter(state.values()))
    torch.save({
        "model": state,
        "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]},
        "lr_scheduler": {"t_initial": 300, "lr_min": 1e-5, "base_values": [1e-3], "noise_range_t": None},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        "max_accuracy": 83.6, "epoch": 222, "config": cfg,
        "model_ema": state, "max_accuray_e": 83.5,
    }, path)


def test_released_layout_loads_with_the_same_features_and_a_fresh_head(tmp_path, yacs_cfgnode, monkeypatch):
    model = jittered(vmamba_config("vmamba-micro"))
    save_released_layout(model, tmp_path / "vssm_micro.pth", released_cfg(yacs_cfgnode))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "vssm_micro.pth")) == [
        "yacs.config.CfgNode"]
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    with pytest.warns(UserWarning, match="10-class head .* dropped"):
        loaded = load_vmamba(tmp_path / "vssm_micro.pth", num_classes=4)
    assert loaded.config == vmamba_config("vmamba-micro", num_classes=4, drop_path_rate=0.25)
    assert torch.count_nonzero(loaded.classifier.head.weight) == 0 and loaded.classifier.head.out_features == 4
    loaded.reset_head(10)
    loaded.classifier.head.load_state_dict(model.classifier.head.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)


def test_channel_first_linear2d_weights_and_ddp_prefix_load(tmp_path):
    model = jittered(vmamba_config("vmamba-micro"))
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")):
            v = v[:, :, None, None]                       # Linear2d: a 1x1 conv weight
        state[f"module.{k}"] = v
    torch.save({"model": state}, tmp_path / "cf.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_vmamba(tmp_path / "cf.pth")
    assert torch.equal(loaded.layers[2].blocks[1].mlp.fc1.weight, model.layers[2].blocks[1].mlp.fc1.weight)
    assert loaded.config.drop_path_rate == 0.0 and loaded.config.num_classes == 10


class RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_asking_for_other_globals_is_refused_by_name_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = jittered(vmamba_config("vmamba-micro"))
    torch.save({"model": model.state_dict(), "config": RunsCodeOnLoad(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"asks to unpickle .*system.*refusing") as info:
        load_vmamba(tmp_path / "evil.pth")
    assert "weights_only" not in str(info.value) and not marker.exists()
    torch.save({"model": {}, "config": RunsCodeOnLoad(marker)}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)         # legacy format: no listing, the restricted load refuses
    with pytest.raises(CheckpointError, match=r"unpickle .*system.*refusing") as info:
        load_vmamba(tmp_path / "old.pth")
    assert "weights_only" not in str(info.value) and not marker.exists()


def test_truncated_and_mismatched_files_are_named(tmp_path):
    model = jittered(vmamba_config("vmamba-micro"))
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read as a VMamba checkpoint"):
        load_vmamba(tmp_path / "cut.pth")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "layers.2.blocks.1.op.Ds"}, "layers.2.blocks.1.op.Ds"),
        "extra": (dict(state, **{"layers.0.blocks.0.op.lora": torch.zeros(1)}), "unexpected 1 tensors"),
        "shape": (dict(state, **{"layers.1.blocks.0.op.dt_projs_bias": torch.zeros(4, 3)}),
                  r"dt_projs_bias has shape \(4, 3\)"),
        "z gate": (dict(state, **{"layers.0.blocks.0.op.in_proj.weight": torch.zeros(32, 8)}), "z gate"),
        "not vmamba": ({"weight": torch.zeros(1)}, "not a VMamba"),
    }
    for name, (bad, message) in cases.items():
        torch.save({"model": bad}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_vmamba(tmp_path / f"{name}.pth")
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no VMamba state dict"):
        load_vmamba(tmp_path / "other.pth")


def test_other_training_variants_are_refused_by_their_config(tmp_path, yacs_cfgnode):
    model = jittered(vmamba_config("vmamba-micro"))
    save_released_layout(model, tmp_path / "v.pth", released_cfg(yacs_cfgnode, SSM_FORWARDTYPE="v05_noz_oact"))
    with pytest.raises(CheckpointError, match="SSM_FORWARDTYPE = 'v05_noz_oact'"):
        load_vmamba(tmp_path / "v.pth")


def test_own_folder_round_trip_keeps_the_head(tmp_path):
    model = jittered(vmamba_config("vmamba-micro", drop_path_rate=0.1))
    save_vmamba(model, tmp_path / "vm")
    loaded = load_vmamba(tmp_path / "vm")
    assert loaded.config == model.config
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)
    assert load_vmamba(tmp_path / "vm", num_classes=3).classifier.head.weight.abs().sum() == 0
    assert looks_like_vmamba(tmp_path / "vm") and not looks_like_vmamba(tmp_path)


def test_names_without_local_files_say_where_the_weights_are():
    with pytest.raises(CheckpointError, match=r"GitHub release assets.*vssm_small_0229_ckpt_epoch_222\.pth"):
        load_vmamba("vmamba-small")
    with pytest.raises(CheckpointError, match="GitHub release"):
        load_vmamba("vssm_base_0229")
    with pytest.raises(CheckpointError, match="no file or folder"):
        load_vmamba("./missing/vssm.pth")


# ---------------------------------------------------------------- the built-in tiny VMamba (pretrain_tiny_vmamba.py)


def test_builtin_tiny_vmamba_loads_and_classifies_the_builtin_task_images():
    from mambapeft.data.images import collate_images
    from mambapeft.data.vtab import BUILTIN_ROOT, BUILTIN_TASK, vtab_split

    model = load_vmamba("tiny-vmamba")
    c = model.config
    assert (c.embed_dim, c.depths, c.img_size, c.d_state, c.num_classes) == (16, (1, 1, 2, 1), 32, 1, 10)
    test = vtab_split(BUILTIN_ROOT, BUILTIN_TASK, "test", image_size=c.img_size)
    batch = collate_images([test[i] for i in range(8)])
    with torch.no_grad():
        assert model(**batch).logits.shape == (8, 10)
    four = load_vmamba("tiny-vmamba", num_classes=4)
    assert four.classifier.head.out_features == 4
    assert torch.equal(four.layers[0].blocks[0].op.A_logs, model.layers[0].blocks[0].op.A_logs)
    assert looks_like_vmamba("tiny-vmamba")
