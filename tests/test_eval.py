"""Evaluation: log-likelihoods against transformers, acc/acc_norm by hand and by lm-evaluation-harness itself."""

import json
import os

import pytest
import torch

from mambapeft import from_pretrained, get_peft_model
from mambapeft.assets import BUILTIN_MODEL
from mambapeft.data.multiple_choice import MCItem
from mambapeft.evaluation import multiple_choice as mc


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUILTIN_MODEL))


@pytest.fixture(scope="module")
def peft():
    """The built-in model with a lora_p_x adapter whose Up matrices are random (so the adapter changes outputs)."""
    model = get_peft_model(from_pretrained("builtin"), ["lora_p_x:r=4"], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return model.eval()


def test_loglikelihoods_match_transformers(tokenizer, peft):
    """Batched, length-sorted, right-padded scoring == a plain per-request sum over transformers' logits."""
    from transformers import MambaForCausalLM

    base = from_pretrained("builtin")
    theirs = MambaForCausalLM.from_pretrained(str(BUILTIN_MODEL)).eval()
    requests = [("The for statement", " is used to iterate"), ("x", " = 1"), ("A longer context about the import system",
                " loads modules"), ("", "Hello")]
    ours = mc.loglikelihoods(base, tokenizer, requests, batch_size=3)
    for (context, continuation), (ll, greedy) in zip(requests, ours):
        ctx = tokenizer(context)["input_ids"] or [tokenizer.eos_token_id]
        cont = tokenizer(continuation)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(theirs(ids).logits.double(), -1)[0]
        expected = sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))
        assert ll == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert greedy == all(logp[len(ctx) + j - 1].argmax().item() == t for j, t in enumerate(cont))
    # the adapter changes the scores (it is applied, not bypassed)
    assert abs(mc.loglikelihoods(peft, tokenizer, requests[:1])[0][0] - ours[0][0]) > 0.1


def test_acc_and_acc_norm_as_the_harness_defines_them(monkeypatch):
    items = [MCItem("q1", ["a", "bbbb"], 1), MCItem("q2", ["cc", "d", "e"], 0)]
    fake = {("q1", " a"): -2.0, ("q1", " bbbb"): -4.0, ("q2", " cc"): -3.0, ("q2", " d"): -2.5, ("q2", " e"): -2.9}
    monkeypatch.setattr(mc, "loglikelihoods", lambda model, tok, reqs, **kw: [(fake[r], False) for r in reqs])
    scores = mc.score_items(None, None, items)
    # acc: argmax ll -> item 1 picks "a" (wrong), item 2 picks "d" (wrong)
    # acc_norm: ll / len(choice): item 1: -2/1 vs -4/4 = -1 -> "bbbb" (right); item 2: -1.5, -2.5, -2.9 -> "cc" (right)
    assert scores["acc"] == 0.0 and scores["acc_norm"] == 1.0 and scores["predictions"] == [0, 1]


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


def test_harness_bridge_runs_a_local_task_with_an_adapter(tmp_path, tokenizer, peft, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    from mambapeft.data.multiple_choice import load_mc_items
    from mambapeft.evaluation.harness import MambaPeftLM, run_harness

    rows = [{"question": f"Question {i}: which statement is used to iterate?", "choices": ["for", "import", "del x"],
             "gold": i % 3} for i in range(6)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(TASK_YAML.format(name="local_mc", file=data))
    (tasks / "local_gen.yaml").write_text(GEN_YAML.format(file=data))
    lm = MambaPeftLM(peft, tokenizer, batch_size=4)
    out = run_harness(lm, ["local_mc", "local_gen"], include_path=tasks)
    ours = mc.score_items(peft, tokenizer, load_mc_items(data))
    harness = out["results"]["local_mc"]
    assert harness["acc,none"] == pytest.approx(ours["acc"]) and harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert "exact_match,none" in out["results"]["local_gen"]
    from mambapeft import ConfigError

    with pytest.raises(ConfigError, match="knows no task no_such_task"):
        run_harness(lm, ["no_such_task"], include_path=tasks)


def test_eval_cli_scores_the_builtin_task_with_an_adapter(tmp_path, peft, capsys):
    from mambapeft.cli.main import main

    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "res.json"
    assert main(["eval", "builtin", "--adapter", str(tmp_path / "adapter"), "--tasks", "builtin", "--limit", "8",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())["builtin"]
    assert result["n"] == 8 and 0 <= result["acc"] <= 1
    assert "builtin: acc" in capsys.readouterr().out
    assert main(["eval", "builtin", "--adapter", str(tmp_path / "nope")]) == 2


assert os.environ.get("HF_HUB_OFFLINE") == "1"      # conftest: nothing here may reach the network
