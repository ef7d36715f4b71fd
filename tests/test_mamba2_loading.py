"""Mamba-2 checkpoints written by the tests themselves, in both formats, loaded through mambapeft.from_pretrained."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Mamba2Config, Mamba2ForCausalLM

import mambapeft
from mambapeft import CheckpointError, ConfigError, Mamba2LM

from conftest import assert_rel_close, twin_models

SIZES = dict(hidden_size=24, num_heads=8, head_dim=6, n_groups=2, state_size=5, num_hidden_layers=2, vocab_size=96,
             tie_word_embeddings=True, chunk_size=16)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def hf_model():
    hf, _ = twin_models(Mamba2Config(**SIZES))
    return hf


def save_mamba_ssm_format(hf, folder, vocab_unpadded=83, **ssm_extra):
    """The layout of state-spaces/mamba2-*: mamba_ssm config keys, pytorch_model.bin, backbone.embedding."""
    folder.mkdir()
    config = {"d_model": 24, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab_unpadded,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 5, "headdim": 6, "ngroups": 2, **ssm_extra},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_hugging_face_format_round_trip(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = mambapeft.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, Mamba2LM) and ours.config.n_groups == 2
    ids = torch.randint(0, 96, (2, 19))
    assert_rel_close(logits(ours, ids), logits(hf_model, ids), tol=1e-5)
    assert ours.lm_head.weight is ours.backbone.embeddings.weight
    assert not ours.training and ours.dtype == torch.float32


def test_sharded_safetensors_and_bin(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (1, 11))
    assert_rel_close(logits(mambapeft.from_pretrained(tmp_path / "sharded"), ids), logits(hf_model, ids), tol=1e-5)
    hf_model.config.save_pretrained(tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_rel_close(logits(mambapeft.from_pretrained(tmp_path / "bin"), ids), logits(hf_model, ids), tol=1e-5)


def test_mamba_ssm_format(tmp_path, hf_model):
    folder = save_mamba_ssm_format(hf_model, tmp_path / "orig")
    ours = mambapeft.from_pretrained(folder)
    assert isinstance(ours, Mamba2LM)
    c = ours.config
    assert c.vocab_size == 96          # 83 padded to a multiple of 16, as mamba_ssm does
    assert (c.num_heads, c.head_dim, c.n_groups, c.state_size, c.expand) == (8, 6, 2, 5, 2)
    assert c.tie_word_embeddings and c.eos_token_id == 0
    ids = torch.randint(0, 96, (2, 13))
    assert_rel_close(logits(ours, ids), logits(hf_model, ids), tol=1e-5)


def test_our_save_loads_in_transformers_and_back(tmp_path):
    ours = mambapeft.from_config(Mamba2Config(**SIZES), seed=4)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "mamba2"
    assert "lm_head.weight" not in load_file(str(tmp_path / "ours" / "model.safetensors"))     # tied: saved once
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    again = mambapeft.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 96, (2, 10))
    assert_rel_close(logits(hf, ids), logits(ours.eval(), ids), tol=1e-5)
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_untied_model_round_trip(tmp_path):
    ours = mambapeft.from_config(Mamba2Config(**{**SIZES, "tie_word_embeddings": False}), seed=5)
    ours.save_pretrained(tmp_path / "untied")
    again = mambapeft.from_pretrained(tmp_path / "untied")
    assert again.lm_head.weight is not again.backbone.embeddings.weight
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(logits(again, ids), logits(ours.eval(), ids))


def test_dtype_option(tmp_path, hf_model):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert mambapeft.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert mambapeft.from_pretrained(tmp_path / "bf16").dtype == torch.float32


def test_saving_refuses_a_model_carrying_adapters(tmp_path):
    ours = mambapeft.from_config("mamba2-tiny", seed=0)
    ours.backbone.layers[0].mixer.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="carries PEFT adapters"):
        ours.save_pretrained(tmp_path / "x")


# ---------------------------------------------------------------- bad input: clear errors naming file and problem


def test_missing_misshapen_and_unexpected_tensors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    state = load_file(str(file))
    save_file({k: v for k, v in state.items() if k != "backbone.layers.1.mixer.dt_bias"}, str(file))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(first: backbone\.layers\.1\.mixer\.dt_bias\)"):
        mambapeft.from_pretrained(tmp_path / "m")
    save_file({**state, "backbone.layers.0.mixer.A_log": torch.zeros(7)}, str(file))
    with pytest.raises(CheckpointError, match=r"A_log has shape \(7,\), the config implies \(8,\)"):
        mambapeft.from_pretrained(tmp_path / "m")
    save_file({**state, "backbone.layers.0.mixer.x_proj.weight": torch.zeros(3, 3)}, str(file))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors \(first: backbone\.layers\.0\.mixer\.x_proj"):
        mambapeft.from_pretrained(tmp_path / "m")


def test_weights_of_other_sizes_than_the_config(tmp_path, hf_model):
    """A mamba_ssm config saying one group while the weights have two: in_proj and conv shapes are named."""
    folder = save_mamba_ssm_format(hf_model, tmp_path / "orig")
    config = json.loads((folder / "config.json").read_text())
    config["ssm_cfg"]["ngroups"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"in_proj\.weight has shape \(124, 24\), the config implies \(114, 24\)"):
        mambapeft.from_pretrained(folder)


def test_invalid_hugging_face_configs(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "num_heads": 5}))
    with pytest.raises(ConfigError, match=r"(?s)config\.json is not a valid Mamba-2 config: .*must equal num_heads"):
        mambapeft.from_pretrained(tmp_path / "m")
    file.write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        mambapeft.from_pretrained(tmp_path / "m")
    file.write_text(json.dumps({**config, "n_groups": 3}))
    with pytest.raises(ConfigError, match="num_heads 8 is not a multiple of n_groups 3"):
        mambapeft.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ssm_cfg": {"D_has_hdim": True}}, "D_has_hdim"),
        ({"ssm_cfg": {"norm_before_gate": True}}, "norm_before_gate=false"),
        ({"ssm_cfg": {"rmsnorm": False}}, "norm_before_gate=false"),
        ({"ssm_cfg": {"d_ssm": 24}}, "d_ssm 24"),
        ({"ssm_cfg": {"rope_fraction": 0.5}}, r"ssm_cfg options \['rope_fraction'\] are not supported"),
        ({"d_intermediate": 64}, "d_intermediate > 0"),
        ({"attn_layer_idx": [1]}, "attention layers"),
        ({"rms_norm": False}, "rms_norm is false"),
        ({"norm_epsilon": 1e-6}, "norm_epsilon 1e-06 differs"),
    ],
)
def test_unsupported_mamba_ssm_variants_are_named(tmp_path, hf_model, change, message):
    folder = save_mamba_ssm_format(hf_model, tmp_path / "orig")
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if key == "ssm_cfg" else value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        mambapeft.from_pretrained(folder)


def test_truncated_files(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        mambapeft.from_pretrained(tmp_path / "m")
    folder = save_mamba_ssm_format(hf_model, tmp_path / "orig")
    (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        mambapeft.from_pretrained(folder)


def test_hub_names_map_to_the_original_checkpoints():
    """No download in tests (HF_HUB_OFFLINE): the error names the hub id the short name stands for."""
    with pytest.raises(CheckpointError, match="state-spaces/mamba2-130m"):
        mambapeft.from_pretrained("mamba2-130m")


def test_builtin_mamba2():
    from mambapeft.assets import BUILTIN_MAMBA2, BUILTIN_MODEL

    model = mambapeft.from_pretrained("builtin-mamba2")
    assert isinstance(model, Mamba2LM)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.state_size, c.vocab_size) == (128, 4, 32, 32, 4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):       # the built-in Mamba-1's tokenizer, as is
        assert (BUILTIN_MAMBA2 / name).read_bytes() == (BUILTIN_MODEL / name).read_bytes()
    report = json.loads((BUILTIN_MAMBA2 / "pretraining.json").read_text())
    assert report["final_train_loss"] < 4.5
    ids = torch.tensor([[0, 11, 12, 13]])
    assert model.generate(ids, 5).shape == (1, 9)


def test_the_builtin_models_answer_to_their_tiny_names():
    """`--model tiny-mamba2` (like tiny-vim and tiny-vmamba) is the built-in Mamba-2; tiny-mamba the built-in Mamba."""
    from mambapeft.peft import count_parameters
    from mambapeft.train.language import BUILTIN_MODELS

    assert isinstance(mambapeft.from_pretrained("tiny-mamba2"), Mamba2LM)
    assert type(mambapeft.from_pretrained("tiny-mamba")) is type(mambapeft.from_pretrained("builtin"))
    assert {"tiny-mamba", "tiny-mamba2"} <= set(BUILTIN_MODELS)                   # the built-in rates apply
    assert count_parameters("tiny-mamba2", ["lora_p_x:r=8"])["trainable"] == 4 * 8 * (128 + 256)   # d 128 -> X 256
