"""The search space file: the paper's default, and every kind of bad entry rejected before training."""

import json

import pytest

from mambapeft.errors import ConfigError
from mambapeft.search.space import SearchSpace, paper_space


def test_paper_space_is_table_9():
    space = paper_space()
    table9 = {"parallel_adapter", "additional_scan", "prompt", "affix", "lora_in_proj", "lora_x_proj", "lora_dt_proj",
              "lora_out_proj", "lora_p_x", "lora_p_z", "lora_p_dt", "lora_p_b", "lora_p_c", "lora_embed", "partial_a",
              "partial_d", "partial_conv1d", "partial_bias", "partial_cls_token", "partial_pos_embed", "sdt"}
    # the 20 switches of Table 9's step 1 (sdt included), and the methods added since: partial_norm (Mamba-2's gated
    # norm), the state-based methods, Memba and ProDiaL, and SVP and Mamba-Adaptor (vision only; each excludes
    # prompt: issue 29)
    added = {"partial_norm", "initial_state", "state_offset", "memba", "prodial", "svp", "mamba_adaptor"}
    assert set(space.step1) == table9 | added, set(space.step1) ^ table9
    assert not {"svp", "mamba_adaptor"} & set(paper_space(vision=False).step1)
    groups = {tuple(members): allowed for members, allowed in space.exclusive_groups()}
    prompt_group = next(allowed for members, allowed in groups.items() if "prompt" in members)
    assert not any("prompt" in subset and ("svp" in subset or "mamba_adaptor" in subset) for subset in prompt_group)
    assert {"svp", "mamba_adaptor"} in [set(subset) for subset in prompt_group]        # the two go together
    assert space.step1["sdt"] == {"warmup_steps": 10}
    assert space.step1["lora_dt_proj"] == {"r": 4, "s": 0.1} and space.step1["affix"] == {"n": 1}
    assert space.step2["lora_p_b"]["r"] == {"int": [4, 12]} and space.step2["lora_p_x"]["r"] == {"int": [4, 16]}
    assert space.step2["affix"]["n"] == {"int": [1, 3]}
    assert "partial_cls_token" not in paper_space(vision=False).step1
    space.validate()


def test_round_trip_through_json_and_yaml(tmp_path):
    space = paper_space(vision=False, step1_trials=5, step2_trials=3)
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space.to_dict()))
    assert SearchSpace.load(path) == space
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space.to_dict()))
    assert SearchSpace.load(path) == space


def base():
    return {"step1": {"trials": 4, "methods": {"lora_p_x": {"r": 8}, "partial_a": {}}},
            "step2": {"trials": 2, "methods": {"lora_p_x": {"r": {"int": [4, 16]}, "lr": {"log": [1e-4, 5e-3]}}}}}


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["step1"]["methods"].update(lora_p_q={}),
     r"step1.methods.lora_p_q: unknown method 'lora_p_q' \(did you mean 'lora_p_"),
    (lambda s: s["step2"]["methods"].update(partial_d={}), "step2.methods.partial_d: partial_d is not among step1"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(r={"int": [16, 4]}),
     r"lora_p_x.r: the range \[16, 4\] is empty"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(r={"choice": []}), "lora_p_x.r: the choice range is empty"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(r={"log": [1.5, 8.0]}),
     "r is a int, so a log range does not fit"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(s={"int": [1, 2]}),
     "s is a float, so an int range does not fit"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(r={"int": [0, 4]}), "r=0 must be >= 1"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(rank={"int": [1, 4]}), "lora_p_x has no option 'rank'"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(lr={"log": [0, 1e-3]}), "log range needs lo > 0"),
    (lambda s: s["step2"]["methods"]["lora_p_x"].update(r={"between": [1, 2]}), "a range is one of"),
    (lambda s: s["step1"]["methods"].update(lora_p_x={"r": "eight"}), "r='eight' is not a valid int"),
    (lambda s: s["step1"]["methods"].update(lora_p_x={"r": {"int": [1, 2]}}), "step 1 takes fixed values"),
    (lambda s: s["step1"].update(trials=0), "step1.trials must be a whole number >= 1"),
    (lambda s: s["step1"].update(methods={}), "step1.methods is empty"),
    (lambda s: s.update(step3={}), "unknown section 'step3'"),
    (lambda s: s["step1"]["methods"].update(full={}), "full fine-tuning cannot be part of a hybrid"),
])
def test_bad_entries_are_named(edit, message, tmp_path):
    data = base()
    edit(data)
    path = tmp_path / "space.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as err:
        SearchSpace.load(path)
    assert str(path) in str(err.value)


def test_unreadable_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as json"):
        SearchSpace.load(path)
    with pytest.raises(ConfigError, match="no search-space file"):
        SearchSpace.load(tmp_path / "missing.json")


@pytest.mark.parametrize("model, absent, present", [
    ("mamba-130m", {"partial_norm"}, {"sdt", "lora_p_x", "initial_state"}),
    ("mamba2-130m", {"sdt", "lora_x_proj", "lora_dt_proj"}, {"partial_norm", "lora_p_x", "state_offset"}),
])
def test_the_default_space_leaves_out_what_the_family_lacks(model, absent, present):
    """`mambapeft search` on a model whose family lacks a method of the registry's space searches without it (and
    says so), instead of failing the space check."""
    from mambapeft.cli.search import check_space_fits_model, default_space
    from mambapeft.train.tasks import get_task

    kind = get_task("language")
    base = kind.resolve({"model": model})
    said = []
    space = default_space(kind, base, log=said.append)
    assert not absent & set(space.step1) and present <= set(space.step1)
    assert all(m in said[0] for m in absent)
    check_space_fits_model(space, base)
