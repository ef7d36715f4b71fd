"""A method registered here, in the test only, shows up everywhere a method should: `mambapeft methods`,
`mambapeft params`, the default search space and the conformance battery, with no other file touched."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from mambapeft.cli.main import main
from mambapeft.methods import REGISTRY, Example, Method, MethodConfig, register
from mambapeft.methods.base import add_parametrization, fold_parametrizations
from mambapeft.options import option


@dataclass
class ToyConfig(MethodConfig):
    scale: float = option(1.0, "how strongly the toy delta acts", exclusive_minimum=0)


class ScaledDelta(nn.Module):
    def __init__(self, like):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))
        self.scale = 1.0

    def forward(self, original):
        return original + self.scale * self.delta


class ToyDTuning(Method):
    """D + scale * delta, through the model interface's tensor roles: works on every family that has a D."""

    name = "toy_d"
    category = "toy"
    description = "a test-only method: a scaled delta on the skip D"
    Config = ToyConfig
    examples = (Example("toy_d:scale=2"),)
    presets = {"toy_d": ["toy_d:scale=0.5"]}
    search_step1 = {"scale": 1.0}
    search_step2 = {"scale": {"log": [0.1, 10.0]}}

    def slots(self, model):
        return [slot for mixer in model.peft_mixers() for slot in mixer.tensors("D")]

    def check(self, model):
        self.slots(model)

    def attach(self, model):
        params = []
        for slot in self.slots(model):
            delta = ScaledDelta(slot.value)
            delta.scale = self.config.scale
            add_parametrization(slot, delta)            # a slot may be one direction's part of a stacked tensor
            params.append(delta.delta)
        return params

    def merge(self, model):
        fold_parametrizations(self.slots(model))


@pytest.fixture
def toy():
    register(ToyDTuning)
    yield ToyDTuning
    del REGISTRY["toy_d"]


def test_listed_by_methods(toy, capsys):
    assert main(["methods", "--json"]) == 0
    described = {d["method"]: d for d in json.loads(capsys.readouterr().out)}
    assert described["toy_d"]["options"]["scale"]["help"] == "how strongly the toy delta acts"


def test_counted_by_params_and_its_preset(toy, capsys):
    assert main(["params", "--arch", "mamba-130m", "-m", "toy_d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 24 * 1536          # D is (E,) per layer
    assert main(["params", "--arch", "vim-small", "-m", "paper/toy_d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 24 * 2 * 768      # one D per scan direction


def test_in_the_default_search_space(toy):
    from mambapeft.search.space import paper_space

    space = paper_space(vision=False)
    assert space.step1["toy_d"] == {"scale": 1.0} and space.step2["toy_d"] == {"scale": {"log": [0.1, 10.0]}}
    space.validate()


def test_runs_the_conformance_battery_on_every_family(toy, tmp_path):
    import test_conformance as conformance

    ran = 0
    for family in conformance.FAMILIES:
        cases = conformance.cases(family, methods=["toy_d"])
        reason = conformance.applicability(family)["toy_d"]
        if reason is not None:              # a family without D (the Gated DeltaNet hybrids) says why, by name
            assert cases == [] and "D" in reason, (family, reason)
            continue
        assert cases == [("toy_d", "toy_d:scale=2", True)]
        for _, spec, identity in cases:
            conformance.run_battery(family, spec, identity, tmp_path / family)
        ran += 1
    assert ran >= len(conformance.FAMILIES) - 2


def test_the_battery_catches_a_broken_method(toy, tmp_path):
    """The same battery fails a method whose delta does not start at zero: the checks can fail."""
    import test_conformance as conformance

    class Broken(ToyDTuning):
        name = "toy_d"

        def attach(self, model):
            params = super().attach(model)
            with torch.no_grad():
                for p in params:
                    p.fill_(1.0)
            return params

    REGISTRY["toy_d"] = Broken
    with pytest.raises(AssertionError, match="at init"):
        conformance.check_identity("mamba", "toy_d:scale=2", True)
