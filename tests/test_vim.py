"""Vision Mamba: forward against a plainly written float64 reference, architectures, and safe, strict loading."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from mambapeft import CheckpointError, ConfigError, NotApplicable, from_config
from mambapeft.model.vim.loading import load_vim, resize_pos_embed, save_vim, with_image_size
from mambapeft.model.vim.modeling import VIM_ARCHITECTURES, VimConfig, VisionMamba, build_vim, vim_config
from mambapeft.peft import PeftModel, get_peft_model

from conftest import assert_rel_close


def jittered(config: VimConfig, seed=0, jitter=0.1) -> VisionMamba:
    """A Vim with random weights and no tensor left at a constant init (norms 1, D 1, biases 0, ...)."""
    torch.manual_seed(seed)
    model = VisionMamba(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


# ---------------------------------------------------------------- the float64 reference, written plainly


def silu(t):
    return t / (1 + torch.exp(-t))


def ref_rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_direction(p, suffix, xz, E, R, N, K):
    """One scan direction over xz (L, 2E): causal conv, silu, x_proj, dt, a step-by-step scan, gate."""
    L = xz.shape[0]
    x, z = xz[:, :E], xz[:, E:]
    w, b = p[f"conv1d{suffix}.weight"][:, 0, :], p[f"conv1d{suffix}.bias"]          # (E, K), (E,)
    xc = torch.zeros(L, E, dtype=torch.float64)
    for t in range(L):
        acc = b.clone()
        for k in range(K):                   # tap k sees input t - (K - 1 - k): only the past
            if t - (K - 1 - k) >= 0:
                acc = acc + w[:, k] * x[t - (K - 1 - k)]
        xc[t] = silu(acc)
    dbc = xc @ p[f"x_proj{suffix}.weight"].T
    dt_low, B, C = dbc[:, :R], dbc[:, R : R + N], dbc[:, R + N :]
    dt = F.softplus(dt_low @ p[f"dt_proj{suffix}.weight"].T + p[f"dt_proj{suffix}.bias"])   # (L, E)
    A = -torch.exp(p["A_log" if not suffix else "A_b_log"])                                 # (E, N)
    D = p["D" if not suffix else "D_b"]
    s = torch.zeros(E, N, dtype=torch.float64)
    y = torch.zeros(L, E, dtype=torch.float64)
    for t in range(L):
        s = torch.exp(dt[t][:, None] * A) * s + dt[t][:, None] * B[t][None, :] * xc[t][:, None]
        y[t] = s @ C[t] + D * xc[t]
    return y * silu(z)


def reference_vim(model: VisionMamba, images: torch.Tensor) -> torch.Tensor:
    """Logits of Vim for images (b, C, H, W), in float64 with loops, from the state dict alone."""
    c = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    E, R, N, K, d = c.expand * c.d_model, c.dt_rank, c.d_state, c.d_conv, c.d_model
    W = sd["patch_embed.proj.weight"].reshape(d, -1)
    logits = []
    for img in images.double():
        tokens = []
        for i in range(c.grid_size):
            for j in range(c.grid_size):
                patch = img[:, i * c.stride : i * c.stride + c.patch_size, j * c.stride : j * c.stride + c.patch_size]
                tokens.append(W @ patch.reshape(-1) + sd["patch_embed.proj.bias"])
        middle = len(tokens) // 2
        tokens = tokens[:middle] + [sd["cls_token"][0, 0]] + tokens[middle:]
        h = torch.stack(tokens) + sd["pos_embed"][0]                               # (M + 1, d)
        for layer in range(c.depth):
            prefix = f"layers.{layer}.mixer."
            p = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
            xz = ref_rms(h, sd[f"layers.{layer}.norm.weight"], c.norm_eps) @ p["in_proj.weight"].T
            y_f = ref_direction(p, "", xz, E, R, N, K)
            y_b = ref_direction(p, "_b", xz.flip(0), E, R, N, K).flip(0)
            h = h + ((y_f + y_b) / 2) @ p["out_proj.weight"].T
        cls = ref_rms(h, sd["norm_f.weight"], c.norm_eps)[middle]
        logits.append(sd["head.weight"] @ cls + sd["head.bias"])
    return torch.stack(logits)


@pytest.mark.parametrize("overrides", [
    dict(),                                   # 16 patches, class token at 8
    dict(img_size=24, patch_size=8, stride=4),  # overlapping patches, a 5x5 grid: class token at 12 of 26
])
def test_forward_matches_float64_reference(overrides):
    config = vim_config("vim-micro", **overrides)
    model = jittered(config)
    images = torch.randn(2, 3, config.img_size, config.img_size)
    with torch.no_grad():
        ours = model(images).logits
    assert_rel_close(ours, reference_vim(model, images), tol=1e-5, what="Vim logits")


def test_class_token_sits_in_the_middle_and_reaches_the_head():
    """Only the middle position feeds the head: changing the class token changes the logits."""
    model = jittered(vim_config("vim-micro"))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(images).logits
        model.cls_token.add_(1.0)
        after = model(images).logits
    assert not torch.allclose(before, after)
    assert model.config.cls_position == 8 and model.config.num_patches == 16


def test_loss_is_cross_entropy():
    model = jittered(vim_config("vim-micro"))
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 9])
    out = model(images, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))


def test_wrong_image_size_is_a_clear_error():
    model = build_vim("vim-micro", seed=0)
    with pytest.raises(ValueError, match="img_size=48"):
        model(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------- named architectures


def hand_count(d, depth, grid, patch=16, classes=1000, N=16, K=4):
    E, R = 2 * d, math.ceil(d / 16)
    direction = (E * K + E) + E * (R + 2 * N) + (R * E + E) + E * N + E     # conv1d, x_proj, dt_proj, A, D
    layer = d * 2 * E + 2 * direction + E * d + d                           # in_proj, 2 directions, out_proj, norm
    return 3 * patch * patch * d + d + d + (grid * grid + 1) * d + depth * layer + d + d * classes + classes


@pytest.mark.parametrize("name, d, grid", [
    ("vim-tiny", 192, 14), ("vim-small", 384, 14), ("vim-base", 768, 14),
    ("vim-tiny-stride8", 192, 27), ("vim-small-stride8", 384, 27), ("vim-base-stride8", 768, 27),
])
def test_named_architectures_build_on_meta_with_hand_counted_sizes(name, d, grid):
    model = from_config(name, device="meta")
    assert isinstance(model, VisionMamba) and model.config.depth == 24 and model.config.img_size == 224
    assert model.config.grid_size == grid and model.pos_embed.shape == (1, grid * grid + 1, d)
    assert sum(p.numel() for p in model.parameters()) == hand_count(d, 24, grid)


def test_vim_small_is_the_papers_26m_model():
    model = from_config("vim-small", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 25_796_584          # Vim-S: 26M in the Vim paper
    assert model.peft_mixers()[0].dt_rank == 24


def test_state_dict_keys_are_those_of_the_released_checkpoints():
    keys = set(from_config("vim-micro", device="meta").state_dict())
    layer = {"norm.weight"} | {f"mixer.{k}" for k in (
        "A_log", "A_b_log", "D", "D_b", "in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias",
        "conv1d_b.weight", "conv1d_b.bias", "x_proj.weight", "x_proj_b.weight", "dt_proj.weight", "dt_proj.bias",
        "dt_proj_b.weight", "dt_proj_b.bias")}
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight",
                "head.weight", "head.bias"} | {f"layers.{i}.{k}" for i in range(2) for k in layer}
    assert keys == expected


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ConfigError, match="vim-small"):
        vim_config("vim-smal")
    assert "vim-micro" in VIM_ARCHITECTURES


# ---------------------------------------------------------------- loading


def save_released_layout(model: VisionMamba, path, model_name="vim_micro_patch8_32_bimambav2_midclstok_div2"):
    """What the released .pth files hold: the weights under "model", training args as an argparse.Namespace."""
    args = argparse.Namespace(model=model_name, input_size=model.config.img_size, lr=5e-4, batch_size=64)
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "args": args}, path)


def test_released_pickle_layout_loads_with_identical_outputs(tmp_path):
    model = jittered(vim_config("vim-micro"))
    save_released_layout(model, tmp_path / "vim_micro.pth")
    loaded = load_vim(tmp_path / "vim_micro.pth")
    assert loaded.config == model.config
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)


def test_ddp_prefix_is_stripped(tmp_path):
    model = jittered(vim_config("vim-micro"))
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth")
    assert torch.equal(load_vim(tmp_path / "ddp.pth").pos_embed, model.pos_embed)


def test_stride_and_image_size_come_from_the_training_args(tmp_path):
    model = jittered(vim_config("vim-micro", img_size=26, patch_size=8, stride=4))     # 26 px: a 5 x 5 grid, as 24 px
    save_released_layout(model, tmp_path / "s.pth", "vim_micro_patch8_stride4_24_bimambav2_midclstok_div2")
    assert load_vim(tmp_path / "s.pth").config == model.config


class RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_asking_for_other_globals_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = jittered(vim_config("vim-micro"))
    torch.save({"model": model.state_dict(), "args": RunsCodeOnLoad(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"asks to unpickle .*system.*refusing"):
        load_vim(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_legacy_pickle_is_still_loaded_restricted(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "args": RunsCodeOnLoad(marker)}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="asks to unpickle .*system.*nothing in it was run"):
        load_vim(tmp_path / "old.pth")
    assert not marker.exists()


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    model = jittered(vim_config("vim-micro"))
    state = model.state_dict()
    bad = dict(state)
    del bad["layers.1.mixer.D_b"]
    torch.save({"model": bad}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="layers.1.mixer.D_b"):
        load_vim(tmp_path / "missing.pth")
    bad = dict(state, **{"layers.0.mixer.extra": torch.zeros(1)})
    torch.save({"model": bad}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected 1 tensors .*layers.0.mixer.extra"):
        load_vim(tmp_path / "extra.pth")
    bad = dict(state, **{"layers.0.mixer.D": torch.zeros(3)})
    torch.save({"model": bad}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"layers.0.mixer.D has shape \(3,\)"):
        load_vim(tmp_path / "shape.pth")
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no Vim state dict"):
        load_vim(tmp_path / "other.pth")


def test_new_head_keeps_the_features(tmp_path):
    model = jittered(vim_config("vim-micro"))
    save_released_layout(model, tmp_path / "v.pth")
    loaded = load_vim(tmp_path / "v.pth", num_classes=5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = loaded(images), model(images)
    assert out.logits.shape == (2, 5) and loaded.config.num_classes == 5
    assert torch.equal(out.features, ref.features)


def test_pos_embed_resize_keeps_the_class_row_and_the_grid_orientation():
    d, g, G = 4, 4, 6
    rows = torch.arange(g, dtype=torch.float32).repeat_interleave(g)            # patch (i, j) -> i: varies by row
    patches = rows[:, None].expand(g * g, d).clone()
    cls = torch.full((1, d), -7.0)
    pos = torch.cat([patches[: g * g // 2], cls, patches[g * g // 2 :]])[None]  # (1, 17, d)
    assert torch.equal(resize_pos_embed(pos, g), pos)
    new = resize_pos_embed(pos, G)[0]                                         # (37, d)
    c = G * G // 2
    assert new.shape == (G * G + 1, d) and torch.equal(new[c], cls[0])
    grid = torch.cat([new[:c], new[c + 1 :]]).reshape(G, G, d)
    assert torch.allclose(grid, grid[:, :1].expand(G, G, d), atol=1e-5)        # constant along each row
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()                            # increasing down the rows
    assert (grid[:, 0, 0] > -0.5).all()                                       # the class row did not leak in


def test_other_image_size_runs_and_keeps_every_other_weight(tmp_path):
    model = jittered(vim_config("vim-micro"))
    save_released_layout(model, tmp_path / "v.pth")
    big = load_vim(tmp_path / "v.pth", img_size=48)
    assert big.config.img_size == 48 and big.pos_embed.shape == (1, 37, 32)
    assert torch.equal(big.layers[1].mixer.A_b_log, model.layers[1].mixer.A_b_log)
    assert big(torch.randn(1, 3, 48, 48)).logits.shape == (1, 10)
    same = with_image_size(model, 32)
    assert torch.equal(same.pos_embed, model.pos_embed)


def test_own_folder_round_trip(tmp_path):
    model = jittered(vim_config("vim-micro"))
    save_vim(model, tmp_path / "vim")
    loaded = load_vim(tmp_path / "vim")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)


def test_hub_id_offline_says_how_to_get_the_file():
    with pytest.raises(CheckpointError, match="network"):
        load_vim("vim-small")
    with pytest.raises(CheckpointError, match="architecture"):
        load_vim("vim-micro")
    with pytest.raises(CheckpointError, match="no file or folder"):
        load_vim("./missing/vim.pth")


# ---------------------------------------------------------------- the built-in tiny Vim (scripts/pretrain_tiny_vim.py)


def test_builtin_tiny_vim_loads_and_classifies_the_builtin_task_images():
    from mambapeft.data.images import collate_images
    from mambapeft.data.vtab import BUILTIN_ROOT, BUILTIN_TASK, vtab_split

    vim = load_vim("tiny-vim")
    c = vim.config
    assert (c.d_model, c.depth, c.img_size, c.patch_size, c.num_classes) == (64, 4, 32, 8, 10)
    test = vtab_split(BUILTIN_ROOT, BUILTIN_TASK, "test", image_size=c.img_size)
    batch = collate_images([test[i] for i in range(8)])
    with torch.no_grad():
        assert vim(**batch).logits.shape == (8, 10)
    four = load_vim("tiny-vim", num_classes=4)
    assert four.head.out_features == 4 and torch.equal(four.pos_embed, vim.pos_embed)


def test_builtin_tiny_vim_is_small_enough_to_ship():
    from mambapeft.model.vim.loading import BUILTIN

    size = sum(f.stat().st_size for f in BUILTIN["tiny-vim"].iterdir())
    assert size < 20 * 2**20


def test_looks_like_vim_tells_vision_checkpoints_from_language_ones(tmp_path):
    from mambapeft.model.vim.loading import looks_like_vim

    model = jittered(vim_config("vim-micro"))
    save_vim(model, tmp_path / "vim")
    save_released_layout(model, tmp_path / "v.pth")
    vision = ["vim-small", "tiny-vim", "hustvl/Vim-base-midclstok", tmp_path / "vim", tmp_path / "v.pth"]
    assert all(map(looks_like_vim, vision))
    assert not any(map(looks_like_vim, ["state-spaces/mamba-130m-hf", "tiny", tmp_path]))


# ---------------------------------------------------------------- PEFT on Vision Mamba (the shared battery of every
# method runs in test_conformance.py; here: what only Vim has)


def peft_base(seed=0) -> VisionMamba:
    """The micro Vim with every weight jittered away from its constant init; the same for the same seed."""
    torch.manual_seed(seed)
    model = VisionMamba(vim_config("vim-micro"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def perturb(peft: PeftModel, seed=1) -> None:
    """Moves every trainable tensor off its init, so that zero-initialised parts pass gradients on."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_per_direction_parts_get_one_copy_per_direction():
    """x_proj, dt_proj, A, D and conv1d exist per scan direction; in_proj and out_proj are shared."""
    def count(spec):
        return get_peft_model(build_vim("vim-micro", device="meta"), [spec]).parameter_counts()["trainable"]

    E, R, N, layers = 64, 2, 16, 2
    assert count("lora_x_proj:r=4") == layers * 2 * (4 * E + (R + 2 * N) * 4)
    assert count("lora_in_proj:r=4") == layers * (4 * 32 + 2 * E * 4)
    assert count("partial_a") == layers * 2 * E * N
    assert count("affix:n=2") == layers * 2 * 2 * 2 * E              # dual: tokens per direction
    assert count("affix:n=2,dual=false") == layers * 2 * 2 * E


# the paper's Table 1 (Vim-S, classification head excluded)
VIM_S_COUNTS = {
    "lora_p_x:r=64": 1_769_472, "lora_p_z:r=64": 1_769_472, "lora_in_proj:r=32": 1_474_560,
    "lora_out_proj:r=96": 2_654_208, "lora_x_proj:r=64": 2_531_328, "lora_dt_proj:r=64": 2_433_024,
    "lora_p_b:r=64": 2_408_448, "lora_p_c:r=64": 2_408_448, "lora_p_dt:r=64": 2_433_024,
    "partial_a": 589_824, "partial_conv1d": 147_456, "partial_d": 36_864, "partial_pos_embed": 75_648,
    "partial_cls_token": 384, "lora_embed:r=32": 36_864, "additional_scan:n=6": 663_552,
    "affix:n=3,projection=false,dual=true": 221_184, "prompt:n=8,projection=false": 3_072,
}


@pytest.mark.parametrize("spec, expected", VIM_S_COUNTS.items(), ids=list(VIM_S_COUNTS))
def test_vim_small_counts_of_the_paper(spec, expected):
    peft = get_peft_model(build_vim("vim-small", device="meta"), [spec])
    assert peft.parameter_counts()["trainable"] == expected


def test_head_is_counted_only_when_trained():
    peft = get_peft_model(build_vim("vim-small", device="meta"), ["lora_p_x:r=64", "linear_probe"])
    assert peft.parameter_counts()["trainable"] == 1_769_472 + 384 * 1000 + 1000


def test_vision_methods_refuse_a_language_model():
    from mambapeft import from_config

    with pytest.raises(NotApplicable, match="partial_cls_token does not apply to mamba models: .*no cls_token"):
        get_peft_model(from_config("tiny", device="meta"), ["partial_cls_token"])


def test_vision_partial_decay_defaults_to_the_base_strength():
    peft = get_peft_model(peft_base(), ["partial_pos_embed", "partial_a"])
    decay = {g["method"]: g["weight_decay"] for g in peft.parameter_groups(lr=1e-3, weight_decay=0.0)}
    assert decay == {"partial_pos_embed": 1e-4, "partial_a": 1e-3}


@pytest.mark.parametrize("position", ["prefix", "suffix", "prefix+suffix"])
def test_prompt_tokens_go_after_the_position_embedding_and_the_head_reads_the_class_token(position):
    """The model with prompts equals the blocks run by hand on [prompts | cls-in-the-middle + pos | prompts]."""
    base = peft_base()
    peft = get_peft_model(base, [f"prompt:n=2,position={position}"]).eval()
    perturb(peft)
    tokens = peft.base_model.hooks[0].weight.detach()                             # (2, d)
    with torch.no_grad():
        h = base.patch_embed(IMAGES)                                              # (b, 16, d)
        h = torch.cat([h[:, :8], base.cls_token.expand(3, 1, 32), h[:, 8:]], 1) + base.pos_embed
        t = tokens[None].expand(3, -1, -1)
        front, back = {"prefix": (t, t[:, :0]), "suffix": (t[:, :0], t),
                       "prefix+suffix": (t[:, :1], t[:, 1:])}[position]
        h = torch.cat([front, h, back], 1)
        for layer in base.layers:
            h = layer(h)
        expected = base.head(base.norm_f(h)[:, front.shape[1] + 8])
        assert_rel_close(peft(IMAGES).logits, expected, tol=1e-6, what=position)
