"""Every registered method on every model family, through one battery of checks.

The cases come from the methods themselves (`Method.examples`), the families from the family registry
(model/registry.py): adding
a method or a family adds its cases here without editing this file.

Completeness, per family: every method either attaches (then each of its examples runs the battery) or raises
NotApplicable with its reason. The battery: identity at init (where the method starts as one; otherwise the output
must change), a gradient on every trainable tensor, the same gradients under per-block gradient checkpointing, frozen
weights bit-identical after an optimiser step, a save / load round trip, merging, the merged checkpoint in the family's
reference implementation, and step-by-step generation for causal families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import mambapeft
from mambapeft import NotApplicable, PeftModel, get_peft_model
from mambapeft.methods import REGISTRY
from mambapeft.model.registry import FAMILIES as MODEL_FAMILIES

from conftest import assert_rel_close, jitter_


def jittered(model, seed):
    return jitter_(model, seed).eval()


def load_in_transformers(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def load_in_float64_loop(folder):
    """VMamba has no second implementation here: the merged checkpoint, read back, runs through the float64 loop
    restatement of tests/test_vmamba.py (direction by direction, one grid position at a time)."""
    from types import SimpleNamespace

    from test_vmamba import reference_vmamba

    from mambapeft.model.vmamba.loading import load_vmamba

    model = load_vmamba(folder)
    params = {k: v.double() for k, v in model.state_dict().items()}

    def run(pixel_values):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)          # thousands of tiny ops: on a busy machine, thread hand-offs cost 100x more
        try:
            return SimpleNamespace(logits=reference_vmamba(model, pixel_values, params))
        finally:
            torch.set_num_threads(threads)

    return run


# the family's reference implementation, loading a merged model saved with save_pretrained (where one exists)
REFERENCES = {"mamba": load_in_transformers, "mamba2": load_in_transformers, "vmamba": load_in_float64_loop,
              "granitemoehybrid": load_in_transformers, "nemotron_h": load_in_transformers,
              "bamba": load_in_transformers, "qwen3_5": load_in_transformers, "qwen3_next": load_in_transformers,
              "falcon_h1": load_in_transformers, "jamba": load_in_transformers}


@dataclass
class Family:
    name: str
    arch: str

    def build(self, seed: int = 0):
        """The family's small architecture with random, jittered weights (the same for the same seed)."""
        return jittered(mambapeft.from_config(self.arch, seed=seed), seed)

    @property
    def reference(self) -> Callable | None:
        return REFERENCES.get(self.name)


class Families(dict):
    """The families as the registry has them now (a family registered by a test, tests/test_new_family.py, runs the
    same battery); iterating gives the ones registered when this module was collected (the parametrization)."""

    def __missing__(self, name: str) -> Family:
        return Family(name, MODEL_FAMILIES[name].check_architecture)


FAMILIES = Families({name: Family(name, family.check_architecture) for name, family in MODEL_FAMILIES.items()})


def applicable(family: str, spec: str) -> bool:
    try:
        get_peft_model(FAMILIES[family].build(0), [spec])
        return True
    except NotApplicable:
        return False


def cases(family: str, methods=None) -> list[tuple[str, str, bool]]:
    """(method, spec, identity) of the examples of every method (or of `methods`) that apply to the family; examples
    of positions only a non-causal model accepts are left out on causal families."""
    causal = FAMILIES[family].build(0).is_causal
    chosen = REGISTRY if methods is None else {m: REGISTRY[m] for m in methods}
    return [(name, ex.spec, ex.identity) for name, cls in chosen.items() for ex in cls.examples
            if not (ex.non_causal_only and causal) and applicable(family, ex.spec)]


ALL = [(family, *case) for family in FAMILIES for case in cases(family)]
IDS = [f"{family}-{spec}" for family, _, spec, _ in ALL]


def make_peft(family: str, spec: str, seed: int = 0) -> PeftModel:
    torch.manual_seed(1)
    peft = get_peft_model(FAMILIES[family].build(seed), [spec])
    peft.on_step_end(1)                   # one optimiser step has passed: phased methods (SDT) move on
    return peft.eval()


@torch.no_grad()
def randomize_adapter(peft):
    """Moves every trainable tensor off its initial value, so no zero-initialised factor hides a gradient."""
    torch.manual_seed(2)
    for t in peft.base_model.parameters():
        if t.requires_grad:
            t.add_(torch.randn_like(t) * 0.05)


def inputs_of(model):
    return model.peft_inputs(batch=2, seed=0)


def logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


# ------------------------------------------------------------------ completeness


def applicability(family: str) -> dict[str, str | None]:
    """method -> None if it attaches to the family, else the NotApplicable reason."""
    found = {}
    for name, cls in REGISTRY.items():
        specs = [ex.spec for ex in cls.examples]
        assert specs, f"{name} declares no examples (Method.examples) for the conformance test"
        try:
            get_peft_model(FAMILIES[family].build(0), [specs[0]])
            found[name] = None
        except NotApplicable as err:
            found[name] = str(err)
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_has_a_case_or_a_reason(family):
    """A method that attaches runs the battery on this family; one that does not says why, by name."""
    covered = {method for fam, method, _, _ in ALL if fam == family}
    for name, reason in applicability(family).items():
        if reason is None:
            assert name in covered, f"{name} attaches to {family} but none of its examples runs the battery"
        else:
            assert reason.startswith(f"{name} does not apply to {family} models: ") and len(reason) > 50, reason


def test_every_method_applies_to_some_family():
    attached = {name for family in FAMILIES for name, reason in applicability(family).items() if reason is None}
    assert attached == set(REGISTRY)


# ------------------------------------------------------------------ the battery


def check_identity(family, spec, identity):
    base = FAMILIES[family].build(0)
    inputs = inputs_of(base)
    expected = logits(base, inputs)
    got = logits(make_peft(family, spec), inputs)
    if identity:
        assert_rel_close(got, expected, tol=1e-6, what=f"{family} {spec} at init")
    else:
        assert not torch.allclose(got, expected, atol=1e-6), f"{family} {spec}: the added parts change nothing"


def check_gradients_and_step(family, spec):
    peft = make_peft(family, spec)
    randomize_adapter(peft)
    peft.train()
    names = dict(peft.base_model.named_parameters())
    trainable = {n: p for n, p in names.items() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in names.items() if not p.requires_grad}
    assert trainable, f"{family} {spec}: nothing to train"
    inputs = inputs_of(peft.base_model)
    torch.manual_seed(3)
    peft(**inputs).loss.backward()
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{family} {spec}: no gradient reaches {no_grad[:4]}"
    check_checkpointed_gradients(family, spec, peft, inputs, trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.optim.AdamW(peft.parameter_groups(lr=1e-2, weight_decay=0.1)).step()
    moved = [n for n, p in names.items() if not p.requires_grad and not torch.equal(p, frozen[n])]
    assert not moved, f"{family} {spec}: frozen weights changed: {moved[:3]}"
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items()), f"{family} {spec}: nothing trained"


def check_checkpointed_gradients(family, spec, peft, inputs, trainable):
    """The same forward and backward with per-block gradient checkpointing gives the same gradients (the same seed:
    dropout must draw the same masks when a block is recomputed); the gradients of the plain run are left in place."""
    plain = {n: p.grad for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = None
    peft.gradient_checkpointing_enable()
    assert peft.is_gradient_checkpointing
    try:
        torch.manual_seed(3)
        peft(**inputs).loss.backward()
        for name, p in trainable.items():
            assert p.grad is not None, f"{family} {spec}: no gradient reaches {name} under checkpointing"
            assert_rel_close(p.grad, plain[name], tol=1e-5, what=f"{family} {spec} checkpointed gradient of {name}")
    finally:
        peft.gradient_checkpointing_disable()
    assert not peft.is_gradient_checkpointing
    for name, p in trainable.items():
        p.grad = plain[name]


def check_save_load(family, spec, folder):
    peft = make_peft(family, spec)
    randomize_adapter(peft)
    inputs = inputs_of(peft.base_model)
    expected = logits(peft, inputs)
    peft.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(FAMILIES[family].build(0), folder).eval()
    assert torch.equal(logits(loaded, inputs), expected), f"{family} {spec}: reloaded adapter differs"
    assert loaded.parameter_counts() == peft.parameter_counts()


def check_merge(family, spec, folder):
    peft = make_peft(family, spec)
    randomize_adapter(peft)
    inputs = inputs_of(peft.base_model)
    expected = logits(peft, inputs)
    base_class = type(FAMILIES[family].build(0))
    all_mergeable = all(m.mergeable for m in peft.methods)
    merged = peft.merge_and_unload().eval()
    assert_rel_close(logits(merged, inputs), expected, tol=1e-5, what=f"{family} {spec} merged")
    if all_mergeable:
        assert type(merged) is base_class
        reference = FAMILIES[family].reference
        if reference is not None:
            MODEL_FAMILIES[family].save(merged, folder)
            assert_rel_close(logits(reference(folder), inputs), expected, tol=1e-4, what=f"{family} {spec} reference")


def check_generation(family, spec):
    peft = make_peft(family, spec)
    if not peft.base_model.is_causal:
        return
    randomize_adapter(peft)
    prompt = inputs_of(peft.base_model)["input_ids"][:, :5]
    generated = peft.generate(prompt, max_new_tokens=4, eos_token_id=None)
    tokens = prompt
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, peft(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens), f"{family} {spec}: step-by-step generation differs from full forwards"


def run_battery(family: str, spec: str, identity: bool, folder) -> None:
    check_identity(family, spec, identity)
    check_gradients_and_step(family, spec)
    check_save_load(family, spec, folder / "adapter")
    check_merge(family, spec, folder / "merged")
    check_generation(family, spec)


@pytest.mark.parametrize("family, method, spec, identity", ALL, ids=IDS)
def test_battery(family, method, spec, identity, tmp_path):
    run_battery(family, spec, identity, tmp_path)
