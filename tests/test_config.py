"""Method specs and PEFT configs: text, dicts and JSON round trips, presets, and clear errors."""

import pytest

from mambapeft import ConfigError, MethodSpec, PeftConfig
from mambapeft.config import all_presets, expand_preset

PRESETS = all_presets()


def test_spec_text_and_dict_agree():
    text = MethodSpec.parse("lora_p_x:r=64,s=0.1,lr=1e-3")
    data = MethodSpec.from_dict({"method": "lora_p_x", "r": 64, "s": 0.1, "lr": 0.001})
    assert text == data
    assert (text.config.r, text.config.s, text.config.lr, text.config.dropout) == (64, 0.1, 1e-3, 0.1)
    assert MethodSpec.parse(str(text)) == text                         # str() writes what differs from defaults
    assert str(MethodSpec.parse("lora_p_x")) == "lora_p_x"


def test_types_are_converted_and_checked():
    spec = MethodSpec.parse("additional_scan:n=4,zero_init=yes,location=bottom")
    assert spec.config.n == 4 and spec.config.zero_init is True and spec.config.location == "bottom"
    assert MethodSpec.parse("lora_p_x:r=1e1").config.r == 10
    for bad, message in [("lora_p_x:r=2.5", "not a valid int"), ("additional_scan:zero_init=maybe", "not a valid bool"),
                         ("lora_p_x:r", "write options as key=value"), ("lora_p_x:s=-1", "must be > 0"),
                         ("lora_p_x:lr=0", "must be > 0"), ("lora_p_x:weight_decay=-1", "must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            MethodSpec.parse(bad)


def test_config_json_round_trip(tmp_path):
    config = PeftConfig.parse(["lora_p_x:r=16,lr=2e-3", {"method": "additional_scan", "n": 3},
                               "affix:n=2,weight_decay=1e-4", "partial_a"])
    again = PeftConfig.from_json(config.to_json())
    assert again == config
    path = tmp_path / "peft.json"
    config.save(path)
    assert PeftConfig.load(path) == config
    assert str(config) == "lora_p_x:r=16,lr=0.002 + additional_scan:n=3 + affix:n=2,weight_decay=0.0001 + partial_a"


def test_bad_config_files(tmp_path):
    path = tmp_path / "peft.json"
    path.write_text("{\"methods\": [")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftConfig.load(path)
    path.write_text("{\"methods\": \"lora_p_x\"}")
    with pytest.raises(ConfigError, match="must be a list"):
        PeftConfig.load(path)
    path.write_text("{\"methods\": [{\"r\": 8}]}")
    with pytest.raises(ConfigError, match="'method' key"):
        PeftConfig.load(path)
    with pytest.raises(ConfigError, match="no PEFT config file"):
        PeftConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_expands(name):
    specs = expand_preset(f"paper/{name}")
    assert specs and all(isinstance(s, MethodSpec) for s in specs)


def test_presets_carry_the_paper_settings():
    (spec,) = expand_preset("paper/lora_p_x", "mamba-130m")
    assert (spec.config.r, spec.config.s, spec.config.lr) == (64, 0.1, 1e-3)
    (spec,) = expand_preset("paper/additional_scan", "mamba-1.4b")
    assert (spec.config.n, spec.config.location, spec.config.init, spec.config.lr) == (6, "top", "neighbour", 1e-4)
    (spec,) = expand_preset("paper/affix", "mamba-370m")
    assert (spec.config.n, spec.config.where, spec.config.projection, spec.config.lr) == \
        (3, "after_in_proj", False, 1e-5)
    (spec,) = expand_preset("paper/full", "mamba-790m")
    assert spec.config.lr == 5e-5
    (spec,) = expand_preset("paper/sll_lora", "mamba-1.4b")
    assert (spec.config.r, spec.config.s) == (64, 1.0)
    (spec,) = expand_preset("paper/lora_p_x")                          # size unknown: the run's lr applies
    assert spec.config.lr is None


def test_a_run_saved_before_a_field_existed_resumes_with_its_default():
    """run_config.json files written by an older version lack newer fields (e.g. base_dtype): the run used the
    field's default, so resuming with the default is no change, and resuming with another value is."""
    from mambapeft.train.language import TrainConfig

    config = TrainConfig()
    saved = config.to_dict()
    del saved["base_dtype"]
    assert config.differences(saved) == []
    narrow = TrainConfig(base_dtype="bfloat16")
    assert narrow.differences(saved) == ["base_dtype: 'float32' -> 'bfloat16'"]
