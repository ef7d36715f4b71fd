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
    requests = [("The for statement", " is used to iterate"), ("x", " = 1"),
                ("A longer context about the import system", " loads modules"), ("", "Hello")]
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


# ---------------------------------------------------------------- shared-context scoring == per pair


def assert_same_scores(shared, per_pair, what):
    assert len(shared) == len(per_pair)
    for n, ((ll, greedy), (ll_ref, greedy_ref)) in enumerate(zip(shared, per_pair)):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-5), f"{what}: request {n}"
        assert greedy == greedy_ref, f"{what}: greedy flag of request {n}"


def test_shared_context_scoring_equals_per_pair_on_the_builtin_task(tokenizer):
    from mambapeft.assets import builtin_split
    from mambapeft.data.multiple_choice import load_mc_items
    from mambapeft.train.language import load_tokenizer

    model = from_pretrained("builtin").eval()
    tok = load_tokenizer("builtin")
    items = load_mc_items(builtin_split("test"))[:40]
    requests = [(item.context, c) for item in items for c in item.continuations()]
    lengths = {len(tok(item.context)["input_ids"]) for item in items}
    assert len(lengths) > 8                           # contexts of many lengths: batches run in several segments
    shared = mc.loglikelihoods(model, tok, requests, batch_size=8)
    assert_same_scores(shared, mc.loglikelihoods_per_pair(model, tok, requests, batch_size=8), "builtin task")
    assert mc.score_items(model, tok, items, batch_size=8)["predictions"] == [
        max(range(len(item.choices)), key=lambda c: shared[4 * i + c][0]) for i, item in enumerate(items)]


def random_requests(tokenizer, model, seed=0):
    """Contexts of many lengths (one empty, several shared by up to 5 continuations of 1-6 tokens), plus
    continuations that are the model's own greedy tokens, so that some greedy flags are true."""
    g = torch.Generator().manual_seed(seed)
    words = ["for", "import", "the", "loop", "x", "=", "1", "def", "class", "return", "while", "list", "(", ")"]

    def text(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    requests = []
    for k in range(9):
        context = "" if k == 0 else text(int(torch.randint(1, 12, (1,), generator=g)))
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            requests.append((context, " " + text(int(torch.randint(1, 5, (1,), generator=g)))))
        ids = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=3, eos_token_id=None)[0, len(ids):]
        requests.append((context, tokenizer.decode(greedy)))
    return requests


@pytest.mark.parametrize("model_name, specs", [
    ("builtin", ["prompt:n=3", "affix:n=2", "additional_scan:n=4", "lora_p_x:r=4"]),
    ("builtin", ["initial_state", "state_offset", "lora_p_x:r=4"]),
    ("tiny-mamba2", ["affix:n=2", "additional_scan:n=4", "state_offset:variant=y", "lora_p_x:r=4"]),
])
def test_shared_context_scoring_equals_per_pair_with_soft_tokens_and_extra_states(tokenizer, model_name, specs):
    """Prompt tokens, affix tokens, extra scan states (Mamba-2: with a conv state of their own) and learned states
    all live in the recurrent state that is shared (the built-in Mamba-2 has the built-in Mamba's tokenizer)."""
    peft = get_peft_model(from_pretrained(model_name), specs, seed=0).eval()
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    requests = random_requests(tokenizer, peft)
    reference = mc.loglikelihoods_per_pair(peft, tokenizer, requests, batch_size=5)
    assert any(greedy for _, greedy in reference) and not all(greedy for _, greedy in reference)
    assert_same_scores(mc.loglikelihoods(peft, tokenizer, requests, batch_size=5), reference, "adapter")
    # the adapter is applied: without it the scores differ
    plain = mc.loglikelihoods(from_pretrained(model_name).eval(), tokenizer, requests[:3])
    assert all(abs(a[0] - b[0]) > 1e-2 for a, b in zip(plain, reference[:3]))


def test_shared_context_scoring_keeps_the_left_cut_and_empty_continuations(tokenizer):
    model = from_pretrained("builtin").eval()
    requests = random_requests(tokenizer, model, seed=1) + [("for x in", ""), ("", "")]
    longest = max(len(tokenizer(c + x)["input_ids"]) for c, x in requests)
    for max_length in (8, 12, longest):               # 8 and 12 cut many requests on the left, longest none
        assert_same_scores(mc.loglikelihoods(model, tokenizer, requests, batch_size=4, max_length=max_length),
                           mc.loglikelihoods_per_pair(model, tokenizer, requests, batch_size=4, max_length=max_length),
                           f"max_length {max_length}")


def test_a_context_is_read_once_for_all_its_choices(tokenizer):
    model = from_pretrained("builtin").eval()
    seen = []                                         # (rows, length) of every batch the embedding receives
    model.backbone.embeddings.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    context, choices = "The for statement is used to", [" iterate", " import a module", " x", " define a class here"]
    mc.loglikelihoods(model, tokenizer, [(context, c) for c in choices])
    cont_lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    assert seen == [(1, len(tokenizer(context)["input_ids"])), (4, max(cont_lengths) - 1)]


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
    from lm_eval.api.instance import Instance

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
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(r["question"], " " + c), idx=0)
                for r in rows for c in r["choices"]]
    reference = mc.loglikelihoods_per_pair(peft, tokenizer, [r.args for r in requests])
    assert_same_scores(lm.loglikelihood(requests), reference, "harness bridge")
    harness = out["results"]["local_mc"]
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
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
