"""Methods on a tiny random language model, beyond the shared battery (tests/test_conformance.py): all methods at
once, optimiser groups, the decay toward the pretrained value, additional scan's and DoRA's initialisation, and bad
specs. The parameter counts of the paper are in test_param_counts.py."""

import pytest
import torch
from transformers import MambaConfig

import mambapeft
from mambapeft import NotApplicable, PeftModel, get_peft_model
from mambapeft.methods import REGISTRY

from conftest import assert_rel_close


def base_model(seed=0):
    return mambapeft.from_config(MambaConfig(hidden_size=24, num_hidden_layers=2, vocab_size=97, state_size=5,
                                             expand=2, time_step_rank=3, tie_word_embeddings=True), seed=seed).eval()


@torch.no_grad()
def randomize_adapter(peft):
    """Move every trainable tensor off its initial value, so no zero-initialised factor hides a gradient."""
    torch.manual_seed(2)
    for t in peft.base_model.parameters():
        if t.requires_grad:
            t.add_(torch.randn_like(t) * 0.05)


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def applies_to_language_models(spec):
    try:
        get_peft_model(base_model(), [spec])
        return True
    except NotApplicable:
        return False


# every method that applies to a language model, each at its first example, except those that cannot share:
# full (trains everything), DoRA (alone on its rows) and sdt (alone on A_log, and phased)
ALL_AT_ONCE = [cls.examples[0].spec for name, cls in REGISTRY.items()
               if name not in ("full", "sdt") and not name.startswith("dora_")
               and applies_to_language_models(cls.examples[0].spec)]


def test_all_methods_at_once(tmp_path):
    torch.manual_seed(1)
    peft = get_peft_model(base_model(), ALL_AT_ONCE).eval()
    assert len(peft.methods) == len(ALL_AT_ONCE)
    randomize_adapter(peft)
    peft.train()
    peft(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.base_model.parameters() if p.requires_grad)
    peft.eval()
    expected = peft(IDS).logits
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert torch.equal(loaded(IDS).logits, expected)
    generated = loaded.generate(IDS[:, :4], max_new_tokens=3, eos_token_id=None)
    tokens = IDS[:, :4]
    with torch.no_grad():
        for _ in range(3):
            tokens = torch.cat([tokens, loaded(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)
    merged = loaded.merge_and_unload().eval()
    assert_rel_close(merged(IDS).logits, expected, tol=1e-5, what="all at once")
    assert {m.name for m in merged.methods} == {"parallel_adapter", "prompt", "affix", "initial_state", "state_offset",
                                                "memba"}            # Memba's LoRA merges, its neurons stay


def test_parameter_groups_carry_method_settings():
    torch.manual_seed(1)
    peft = get_peft_model(base_model(), ["lora_p_x:r=4,lr=3e-3", "partial_a", "partial_bias",
                                         "additional_scan:n=2,weight_decay=0.05"])
    groups = peft.parameter_groups(lr=1e-4, weight_decay=0.01)
    by_method = {}
    for g in groups:
        by_method.setdefault(g["method"], []).append(g)
    assert [(g["lr"], g["weight_decay"]) for g in by_method["lora_p_x"]] == [(3e-3, 0.01)]
    assert [(g["lr"], g["weight_decay"]) for g in by_method["partial_a"]] == [(1e-4, 1e-3)]     # official x10
    assert [(g["lr"], g["weight_decay"]) for g in by_method["partial_bias"]] == [(1e-4, 1e-2)]  # official x100
    a_group, bc_group = by_method["additional_scan"]
    assert a_group["weight_decay"] == 0.0 and bc_group["weight_decay"] == 0.05                 # new A: no decay
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in peft.base_model.parameters())


def test_partial_decay_pulls_toward_the_pretrained_value():
    """AdamW's decay acts on the delta, so with no gradient the tensor moves toward W0, not toward 0."""
    peft = get_peft_model(base_model(), ["partial_d:weight_decay=0.5"])
    mixer = peft.base_model.backbone.layers[0].mixer
    pretrained = mixer.D.detach().clone()
    delta = mixer.parametrizations.D[0].delta
    with torch.no_grad():
        delta.fill_(1.0)
    optimizer = torch.optim.AdamW(peft.parameter_groups(lr=0.1), lr=0.1)
    delta.grad = torch.zeros_like(delta)
    for p in peft.base_model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(delta.detach(), torch.full_like(delta, 1.0 - 0.1 * 0.5))
    torch.testing.assert_close(mixer.D.detach(), pretrained + delta.detach())


def test_additional_scan_keeps_the_pretrained_states_and_inits_a():
    torch.manual_seed(1)
    for location, column in (("top", 0), ("bottom", -1)):
        base = base_model()
        A_log = base.backbone.layers[0].mixer.A_log.detach().clone()
        peft = get_peft_model(base, [f"additional_scan:n=3,location={location}"])
        hook = peft.base_model.backbone.layers[0].mixer.hooks[0]
        assert torch.equal(hook.A_log[0], A_log[:, [column]].expand(-1, 3))
    peft = get_peft_model(base_model(), ["additional_scan:n=2,init=s4d"])
    expected = torch.log(torch.tensor([6.0, 7.0])).expand(48, 2)           # N = 5: S4D continues at 6, 7
    assert torch.equal(peft.base_model.backbone.layers[0].mixer.hooks[0].A_log[0], expected)
    peft = get_peft_model(base_model(), ["additional_scan:n=2,init=constant,a_value=0.1"])
    assert torch.allclose(peft.base_model.backbone.layers[0].mixer.hooks[0].A_log[0].exp(), torch.tensor(0.1))


def test_dora_starts_at_the_pretrained_magnitude_and_merges():
    base = base_model()
    w = base.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    peft = get_peft_model(base, ["dora_p_x:r=2,s=0.5"])
    delta = peft.base_model.backbone.layers[0].mixer.in_proj.deltas["dora_p_x"]
    assert torch.allclose(delta.magnitude, w[:48].norm(dim=1))
    randomize_adapter(peft)
    with torch.no_grad():
        v = w[:48] + 0.5 * delta.up @ delta.down
        expected = torch.cat([v * (delta.magnitude / v.norm(dim=1))[:, None], w[48:]])
    merged = peft.merge_and_unload()
    torch.testing.assert_close(merged.backbone.layers[0].mixer.in_proj.weight, expected)


@pytest.mark.parametrize("specs, message", [
    (["lora_pp_x"], "did you mean 'lora_p_x'"),
    (["lora_p_x:r=0"], "r=0 must be >= 1"),
    (["lora_p_x:rank=4"], "has no option 'rank'"),
    (["lora_p_x:r=four"], "not a valid int"),
    (["additional_scan:location=middle"], "not one of top, bottom"),
    (["dora_p_x", "lora_p_x"], "clash"),
    (["lora_in_proj", "dora_p_x"], "clash"),
    (["lora_p_x", "lora_p_x:r=2"], "appears twice"),
    (["full", "lora_p_x"], "full trains every weight"),
    (["paper/lora_pq"], "unknown preset"),
    ([], "names no method"),
])
def test_bad_specs_fail_clearly(specs, message):
    with pytest.raises(mambapeft.ConfigError, match=message):
        get_peft_model(base_model(), specs)


def test_adapter_for_another_base_is_refused(tmp_path):
    get_peft_model(base_model(), ["lora_p_x:r=2"]).save_pretrained(tmp_path)
    other = mambapeft.from_config(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=97, state_size=5,
                                              time_step_rank=3))
    with pytest.raises(mambapeft.CheckpointError, match="made for another base model: hidden_size 24"):
        PeftModel.from_pretrained(other, tmp_path)


def test_truncated_or_missing_adapter_files_are_refused(tmp_path):
    get_peft_model(base_model(), ["lora_p_x:r=2"]).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(mambapeft.CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(base_model(), tmp_path)
    weights.unlink()
    with pytest.raises(mambapeft.CheckpointError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(base_model(), tmp_path)
    with pytest.raises(mambapeft.CheckpointError, match="no adapter folder"):
        PeftModel.from_pretrained(base_model(), tmp_path / "nowhere")


def test_additional_scan_is_refused_on_falcon_mamba():
    from transformers import FalconMambaConfig

    model = mambapeft.from_config(FalconMambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=50))
    with pytest.raises(mambapeft.ConfigError, match="FalconMamba"):
        get_peft_model(model, ["additional_scan"])


def test_adapter_for_another_architecture_is_refused(tmp_path):
    vim = mambapeft.from_config("vim-micro", seed=0)
    get_peft_model(vim, ["lora_p_x:r=2"]).save_pretrained(tmp_path)
    with pytest.raises(mambapeft.CheckpointError, match="made for another base model: .*model_type 'vim'"):
        PeftModel.from_pretrained(base_model(), tmp_path)


def test_vision_only_target_on_a_language_model_is_refused():
    expected = "partial_pos_embed does not apply to mamba models: .* no pos_embed"
    with pytest.raises(mambapeft.NotApplicable, match=expected):
        get_peft_model(base_model(), ["partial_pos_embed"])
