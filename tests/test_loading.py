"""Checkpoints saved by the tests themselves, in both formats, loaded through mambapeft.from_pretrained."""

import json

import pytest
import torch
from transformers import FalconMambaConfig, MambaConfig, MambaForCausalLM

import mambapeft
from mambapeft import CheckpointError, ConfigError

from conftest import assert_rel_close, twin_models

CONFIG = dict(hidden_size=40, num_hidden_layers=2, vocab_size=96, state_size=8)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def hf_model():
    hf, _ = twin_models(MambaConfig(**CONFIG))
    return hf


def save_mamba_ssm_format(hf, folder, vocab_unpadded=93):
    """The layout of state-spaces/mamba-*: mamba_ssm config keys, pytorch_model.bin, backbone.embedding."""
    folder.mkdir()
    config = {"d_model": 40, "n_layer": 2, "vocab_size": vocab_unpadded, "ssm_cfg": {"d_state": 8},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
              "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")


def test_hugging_face_format_round_trip(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = mambapeft.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 19))
    assert_rel_close(logits(ours, ids), logits(hf_model, ids), tol=1e-5)
    assert ours.lm_head.weight is ours.backbone.embeddings.weight
    assert not ours.training and ours.dtype == torch.float32


def test_sharded_safetensors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = mambapeft.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 96, (1, 11))
    assert_rel_close(logits(ours, ids), logits(hf_model, ids), tol=1e-5)


def test_mamba_ssm_format(tmp_path, hf_model):
    save_mamba_ssm_format(hf_model, tmp_path / "orig")
    ours = mambapeft.from_pretrained(tmp_path / "orig")
    assert ours.config.vocab_size == 96          # 93 padded to a multiple of 8, as mamba_ssm does
    ids = torch.randint(0, 96, (2, 13))
    assert_rel_close(logits(ours, ids), logits(hf_model, ids), tol=1e-5)


def test_falcon_mamba_round_trip(tmp_path):
    hf, _ = twin_models(FalconMambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4))
    hf.save_pretrained(tmp_path / "falcon")
    ours = mambapeft.from_pretrained(tmp_path / "falcon")
    ids = torch.randint(0, 64, (2, 9))
    assert_rel_close(logits(ours, ids), logits(hf, ids), tol=1e-5)


def test_our_save_loads_in_transformers_and_back(tmp_path):
    ours = mambapeft.from_config(MambaConfig(**CONFIG), seed=4)
    ours.save_pretrained(tmp_path / "ours")
    hf = MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    again = mambapeft.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 96, (2, 10))
    assert_rel_close(logits(hf, ids), logits(ours, ids), tol=1e-5)
    assert torch.equal(logits(again, ids), logits(ours.eval(), ids))


def test_dtype_option(tmp_path, hf_model):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert mambapeft.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert mambapeft.from_pretrained(tmp_path / "bf16").dtype == torch.float32


# ---------------------------------------------------------------- bad input: clear errors naming file and problem


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no folder ./does/not/exist"):
        mambapeft.from_pretrained("./does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json in .*empty"):
        mambapeft.from_pretrained(tmp_path / "empty")


def test_config_that_is_not_mamba(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ConfigError, match=r"gpt2/config\.json describes a 'gpt2' model, not Mamba-1"):
        mambapeft.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(CheckpointError, match="no weights in"):     # a Mamba-2 folder now (test_mamba2_loading.py)
        mambapeft.from_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "mamba", "hidden_size": ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        mambapeft.from_pretrained(folder)


def test_unsupported_mamba_ssm_variants_are_named(tmp_path, hf_model):
    save_mamba_ssm_format(hf_model, tmp_path / "orig")
    config_file = tmp_path / "orig" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "attn_layer_idx": [1]}))
    with pytest.raises(ConfigError, match="attention layers"):
        mambapeft.from_pretrained(tmp_path / "orig")
    config_file.write_text(json.dumps({**config, "ssm_cfg": {"layer": "Mamba3"}}))
    with pytest.raises(ConfigError, match="Mamba1 and Mamba2 layers only"):
        mambapeft.from_pretrained(tmp_path / "orig")


def test_missing_weights(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors"):
        mambapeft.from_pretrained(tmp_path / "m")


def test_truncated_safetensors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        mambapeft.from_pretrained(tmp_path / "m")


def test_truncated_bin(tmp_path, hf_model):
    save_mamba_ssm_format(hf_model, tmp_path / "orig")
    file = tmp_path / "orig" / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin cannot be read"):
        mambapeft.from_pretrained(tmp_path / "orig")


class NotATensor:
    pass


def test_bin_with_arbitrary_objects_is_refused_unexecuted(tmp_path, hf_model):
    save_mamba_ssm_format(hf_model, tmp_path / "orig")
    torch.save({"backbone.norm_f.weight": NotATensor()}, tmp_path / "orig" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="asks to unpickle test_loading.NotATensor, which is not one of tensors"):
        mambapeft.from_pretrained(tmp_path / "orig")


def test_missing_tensor_is_named(tmp_path, hf_model):
    save_mamba_ssm_format(hf_model, tmp_path / "orig")
    file = tmp_path / "orig" / "pytorch_model.bin"
    state = torch.load(file)
    del state["backbone.layers.1.mixer.A_log"]
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(first: backbone\.layers\.1\.mixer\.A_log\)"):
        mambapeft.from_pretrained(tmp_path / "orig")


def test_shape_mismatch_is_named(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "state_size": 16}))
    with pytest.raises(CheckpointError,
                       match=r"backbone\.layers\.0\.mixer\.A_log has shape \(80, 8\), the config implies \(80, 16\)"):
        mambapeft.from_pretrained(tmp_path / "m")


def test_hub_id_offline_says_it_needs_the_network():
    with pytest.raises(CheckpointError, match="needs the network .* or pass the path of a local folder"):
        mambapeft.from_pretrained("state-spaces/mamba-130m-hf", local_files_only=True)


def test_saving_a_model_with_adapters_is_refused(tmp_path):
    model = mambapeft.from_config("tiny")
    model.backbone.layers[0].mixer.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="carries PEFT adapters"):
        model.save_pretrained(tmp_path / "x")
