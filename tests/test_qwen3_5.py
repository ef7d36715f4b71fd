"""Qwen3.5's text model (`qwen3_5`) against transformers' Qwen3_5ForCausalLM for the same weights: logits and loss
(left padding too), greedy generation with and without the cache, checkpoints both ways (and the published
vision-language layout's text part), the roles of its Gated DeltaNet mixers and MLPs, parameter counts of the
published 0.8B size by hand, and every registered method through the conformance battery.

transformers runs its torch path here: flash-linear-attention's kernels are CUDA-only, and its kernel wrapper
(integrations/hub_kernels.py) sends CPU inputs to torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule."""

from __future__ import annotations

import json

import hybrid_checks as checks
import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.qwen3_5 import Qwen3_5LM, load_qwen3_5
from mambapeft.model.registry import get_family

from conftest import assert_rel_close

VOCAB = 43
CONFIGS = {
    # 2 key heads shared by 6 value heads, GQA, half of each attention head rotated, two attention layers
    "LLAL-gqa-partial": dict(hidden_size=20, num_hidden_layers=4, intermediate_size=9, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=6,
                             layer_types=["linear_attention", "linear_attention", "full_attention",
                                          "linear_attention"],
                             linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=4,
                             linear_value_head_dim=3, linear_conv_kernel_dim=3,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.5}),
    # attention first, MQA with biases, one key head per value head, a tied head, the default quarter rotated
    "ALL-mqa-tied": dict(hidden_size=18, num_hidden_layers=3, intermediate_size=7, num_attention_heads=3,
                         num_key_value_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=True,
                         layer_types=["full_attention", "linear_attention", "linear_attention"],
                         linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=5,
                         linear_value_head_dim=4, linear_conv_kernel_dim=4),
}

NAMES = list(CONFIGS)


def config(name: str, **extra) -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(**{"vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                                **CONFIGS[name], **extra})


def twins(cfg, seed: int = 0, jitter: float = 0.1):
    return checks.twins(Qwen3_5ForCausalLM, Qwen3_5LM, cfg, get_family("qwen3_5").load_state, seed=seed,
                        jitter=jitter)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=70)     # two of transformers' 64-token chunks


def test_left_padded_batch_equals_transformers_at_real_positions():
    checks.assert_left_padding_equal(*twins(config("LLAL-gqa-partial")), (2, 12), {1: 5})


@pytest.mark.parametrize("name", CONFIGS)
def test_every_gradient_equals_transformers(name):
    checks.assert_gradients_equal(*twins(config(name)))


def test_state_continuation_equals_the_full_forward():
    checks.assert_state_continuation_equals_full_forward(twins(config(NAMES[0]))[1])


def test_padded_generation_equals_each_prompt_alone():
    checks.assert_padded_generation_equals_each_prompt_alone(twins(config(NAMES[0]), jitter=0.3)[1])


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3), prompt_length=6, new_tokens=6)


def test_checkpoints_both_ways(tmp_path):
    checks.assert_checkpoints_both_ways(*twins(config("ALL-mqa-tied")), Qwen3_5ForCausalLM, load_qwen3_5, tmp_path)


def test_published_vision_language_layout_loads_its_text_model(tmp_path):
    """A folder as Qwen/Qwen3.5-* publish it: model_type "qwen3_5" with a text_config, the text model's tensors
    under model.language_model., a vision tower and an MTP head beside them (left out)."""
    cfg = config("LLAL-gqa-partial")
    hf, _ = twins(cfg)
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v.contiguous()
             for k, v in hf.state_dict().items()}
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    state["mtp.fc.weight"] = torch.zeros(4, 4)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "tie_word_embeddings": False,
                                                      "text_config": cfg.to_dict(), "vision_config": {}}))
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_rel_close(load_qwen3_5(tmp_path)(ids).logits, hf(ids, use_cache=False).logits, tol=1e-6,
                         what="published layout")


def test_mixer_and_mlp_roles_counted_by_hand():
    _, ours = twins(config("LLAL-gqa-partial"))      # 3 linear-attention layers: d 20, H_k 2 x d_k 4, H 6 x d_v 3
    d, K, V, H = 20, 8, 18, 6

    def trainable(spec):
        return checks.trainable(ours, spec)

    # in_proj: its four layers, qkv (d -> 2K + V), z (d -> V), b and a (d -> H)
    assert trainable("lora_in_proj:r=2") == 3 * 2 * ((d + 2 * K + V) + (d + V) + 2 * (d + H))
    assert trainable("lora_p_x:r=2") == 3 * 2 * (d + V)                 # the v rows of in_proj_qkv
    assert trainable("lora_p_b:r=2") == 3 * 2 * (d + K)                 # B = k rows
    assert trainable("lora_out_proj:r=2") == 3 * 2 * (V + d)
    assert trainable("lora_mlp:r=2") == 4 * 2 * 3 * (d + 9)             # every layer's gated MLP: 20 -> 9 -> 20
    # q_proj holds query and output gate: 4 heads x 6 x 2 rows; k and v 2 x 6; o 24 -> 20
    assert trainable("lora_attn:r=2") == 2 * ((d + 48) + 2 * (d + 12) + (24 + d))
    assert trainable("initial_state") == 3 * H * 4 * 3                  # one (H, d_k, d_v) state per layer
    with pytest.raises(NotApplicable, match="no experts"):
        ours.layer_tensors("router")
    with pytest.raises(NotApplicable, match="matrix"):
        get_peft_model(ours, ["additional_scan:n=2"])


def test_published_0_8b_on_meta_counts_by_hand(capsys):
    """Qwen/Qwen3.5-0.8B's text model (the meta device: no weights) and `mambapeft params ... -m initial_state`."""
    from mambapeft.cli.main import main
    from mambapeft.model import from_config

    model = from_config("qwen3.5-0.8b", device="meta")
    assert model.layer_types().count("attention") == 6 and len(model.peft_mixers()) == 18
    d, Hk, H, dk, dv, K = 1024, 16, 16, 128, 128, 4
    conv = 2 * Hk * dk + H * dv
    # in_proj_qkv, _z, _b, _a; conv; A_log, dt_bias; norm; out_proj
    linear = d * conv + d * H * dv + 2 * d * H + conv * K + 2 * H + dv + H * dv * d
    attention = d * 8 * 256 * 2 + 2 * d * 2 * 256 + 8 * 256 * d + 2 * 256          # q (with gate), k, v, o, q/k norm
    mlp = 3 * d * 3584
    total = 248320 * d + 18 * linear + 6 * attention + 24 * (mlp + 2 * d) + d
    assert sum(p.numel() for p in model.parameters()) == total                      # the tied head counted once
    assert 0.7e9 < total < 0.8e9
    assert main(["params", "qwen3.5-0.8b", "-m", "initial_state"]) == 0
    assert f"{18 * H * dk * dv:,}" in capsys.readouterr().out          # one 16 x 128 x 128 state per linear layer


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "qwen3_5", {"initial_state", "state_offset", "lora_p_x", "lora_in_proj", "prompt", "lora_attn", "lora_mlp",
                    "dora_mlp"})
