"""Every PEFT method on Vision Mamba: one table, one battery of checks, and the paper's Vim-S counts."""

import pytest
import torch
from conftest import assert_rel_close

from mambapeft import ConfigError
from mambapeft.model.vim import VisionMamba, build_vim, vim_config
from mambapeft.peft import PeftModel, get_peft_model

# spec on the micro Vim (d 32, E 64, R 2, N 16, 2 layers, 16 patches), and whether it starts as the identity
METHODS = [
    ("lora_in_proj:r=4", True), ("lora_x_proj:r=4", True), ("lora_dt_proj:r=2", True), ("lora_out_proj:r=4", True),
    ("lora_p_x:r=4", True), ("lora_p_z:r=4", True), ("lora_p_dt:r=2", True), ("lora_p_b:r=4", True),
    ("lora_p_c:r=4", True), ("lora_embed:r=4", True), ("sll_lora:r=2", True), ("dora_p_x:r=4", True),
    ("partial_a", True), ("partial_d", True), ("partial_conv1d", True), ("partial_bias", True),
    ("partial_cls_token", True), ("partial_pos_embed", True),
    ("parallel_adapter:dim=4", True),
    ("additional_scan:n=2,zero_init=true", True), ("additional_scan:n=2,location=bottom", False),
    ("prompt:n=2,position=prefix", False), ("prompt:n=3,position=infix", False), ("prompt:n=2,position=suffix", False),
    ("prompt:n=4,position=prefix+suffix", False), ("prompt:n=2,projection=true", False),
    ("affix:n=2", False), ("affix:n=2,dual=false", False), ("affix:n=1,where=before_in_proj", False),
    ("affix:n=2,projection=true", False),
    ("full", True), ("linear_probe", True),
]
IDS = [spec for spec, _ in METHODS]
# sdt is left out: in its warm-up phase its sparse tensors are trainable but unused by design (the trainer switches
# phases); tests/test_sdt.py runs it on Vim.


def base_model(seed=0) -> VisionMamba:
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
LABELS = torch.tensor([1, 4, 7])


@pytest.mark.parametrize("spec, identity", METHODS, ids=IDS)
def test_starts_as_the_identity_where_defined(spec, identity):
    base = base_model()
    with torch.no_grad():
        before = base(IMAGES).logits
        peft = get_peft_model(base, [spec]).eval()
        after = peft(IMAGES).logits
    if identity:
        assert_rel_close(after, before, tol=1e-6, what=spec)
    else:
        assert not torch.allclose(after, before, atol=1e-6), f"{spec}: the added tokens or states change nothing"


@pytest.mark.parametrize("spec", IDS)
def test_gradient_reaches_every_trainable_tensor_and_nothing_frozen_moves(spec):
    peft = get_peft_model(base_model(), [spec])
    perturb(peft)
    peft.train()
    names = dict(peft.base_model.named_parameters())
    trainable = {n: p for n, p in names.items() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in names.items() if not p.requires_grad}
    assert trainable
    peft(IMAGES, labels=LABELS).loss.backward()
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{spec}: no gradient reaches {no_grad}"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.optim.AdamW(peft.parameter_groups(lr=1e-2, weight_decay=0.1)).step()
    moved = [n for n, p in names.items() if not p.requires_grad and not torch.equal(p, frozen[n])]
    assert not moved, f"{spec}: frozen weights changed: {moved[:3]}"
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())


@pytest.mark.parametrize("spec", IDS)
def test_save_load_round_trip_is_identical(spec, tmp_path):
    peft = get_peft_model(base_model(), [spec]).eval()
    perturb(peft)
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES).logits, peft(IMAGES).logits)


@pytest.mark.parametrize("spec", ["lora_p_x:r=4", "lora_x_proj:r=4", "lora_embed:r=4", "partial_a", "partial_cls_token",
                                  "partial_pos_embed", "dora_p_x:r=4", "additional_scan:n=2",
                                  "prompt:n=2,position=prefix+suffix,projection=true", "affix:n=2,projection=true"])
def test_merging_keeps_the_outputs(spec):
    peft = get_peft_model(base_model(), [spec]).eval()
    perturb(peft)
    with torch.no_grad():
        expected = peft(IMAGES).logits
        merged = peft.merge_and_unload().eval()
        assert_rel_close(merged(IMAGES).logits, expected, tol=1e-5, what=spec)


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

    with pytest.raises(ConfigError, match="partial_cls_token needs a Vision Mamba"):
        get_peft_model(from_config("tiny", device="meta"), ["partial_cls_token"])


def test_vision_partial_decay_defaults_to_the_base_strength():
    peft = get_peft_model(base_model(), ["partial_pos_embed", "partial_a"])
    decay = {g["method"]: g["weight_decay"] for g in peft.parameter_groups(lr=1e-3, weight_decay=0.0)}
    assert decay == {"partial_pos_embed": 1e-4, "partial_a": 1e-3}


@pytest.mark.parametrize("position", ["prefix", "suffix", "prefix+suffix"])
def test_prompt_tokens_go_after_the_position_embedding_and_the_head_reads_the_class_token(position):
    """The model with prompts equals the blocks run by hand on [prompts | cls-in-the-middle + pos | prompts]."""
    base = base_model()
    peft = get_peft_model(base, [f"prompt:n=2,position={position}"]).eval()
    perturb(peft)
    tokens = peft.base_model.hooks[0].weight.detach()                             # (2, d)
    with torch.no_grad():
        h = base.patch_embed(IMAGES)                                              # (b, 16, d)
        h = torch.cat([h[:, :8], base.cls_token.expand(3, 1, 32), h[:, 8:]], 1) + base.pos_embed
        t = tokens[None].expand(3, -1, -1)
        front, back = {"prefix": (t, t[:, :0]), "suffix": (t[:, :0], t), "prefix+suffix": (t[:, :1], t[:, 1:])}[position]
        h = torch.cat([front, h, back], 1)
        for layer in base.layers:
            h = layer(h)
        expected = base.head(base.norm_f(h)[:, front.shape[1] + 8])
        assert_rel_close(peft(IMAGES).logits, expected, tol=1e-6, what=position)
