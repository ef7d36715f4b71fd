"""Data: LLM-Adapters' format read exactly, clear errors, the length cut-off, padding, and the built-in assets."""

import json
import re

import pytest
import torch

from mambapeft import ConfigError
from mambapeft.assets import BUILTIN_MODEL, builtin_split
from mambapeft.data.instructions import format_prompt, load_examples, split_validation
from mambapeft.data.multiple_choice import items_from_examples, load_mc_items
from mambapeft.data.tokenize import IGNORE, pad_batch, tokenize_examples


def write(path, records):
    path.write_text(json.dumps(records))
    return path


RECORD = {"instruction": "Is water wet?\n\nAnswer format: true/false", "input": "",
          "output": "the correct answer is true", "answer": "true"}


def test_commonsense_record_uses_llm_adapters_template(tmp_path):
    (ex,) = load_examples(write(tmp_path / "d.json", [RECORD]))
    # LLM-Adapters' generate_prompt, written out by hand
    assert ex.prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                         "the request.\n\n### Instruction:\nIs water wet?\n\nAnswer format: true/false\n\n"
                         "### Response:\n")
    assert ex.response == "the correct answer is true" and ex.answer == "true" and ex.choices == ["true", "false"]
    with_input = format_prompt("Do it", "some context")
    assert "paired with an input" in with_input and with_input.endswith("### Input:\nsome context\n\n### Response:\n")
    (item,) = items_from_examples([ex])
    assert item.context == ex.prompt + "the correct answer is" and item.continuations() == [" true", " false"]
    assert item.gold == 0


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n", "is empty"),
    ("[]", "holds no examples"),
    ('{"instruction": "x"}', "JSON list"),
    ("[{", "not valid JSON"),
    (json.dumps([{"instruction": "x"}]), "no 'output' field"),
    (json.dumps([{"output": "x"}]), "no 'instruction' field"),
    (json.dumps([{"instruction": 3, "output": "x"}]), "must be a string"),
    (json.dumps([{**RECORD, "answer": "maybe"}]), "'maybe' is not among its choices"),
])
def test_bad_commonsense_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_examples(path)


def test_jsonl_formats_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Q: 1+1?\\nA:", "completion": " 2"}\n\n{"instruction": "Say hi", "output": "hi"}\n')
    a, b = load_examples(path)
    assert (a.prompt, a.response) == ("Q: 1+1?\nA:", " 2")
    assert b.prompt == format_prompt("Say hi") and b.response == "hi"
    path.write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_examples(path)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="no 'completion' field"):
        load_examples(path)
    with pytest.raises(ConfigError, match="unknown data format"):
        load_examples(write(tmp_path / "d.txt", []))
    with pytest.raises(ConfigError, match="no data file"):
        load_examples(tmp_path / "missing.json")


def test_multiple_choice_jsonl(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "2+2 =", "choices": ["3", "4"], "gold": 1}\n'
                    '{"context": "sky is", "choices": ["blue", "green"], "answer": "blue"}\n')
    a, b = load_mc_items(path)
    assert (a.gold, b.gold, a.continuations()) == (1, 0, [" 3", " 4"])
    for line, message in [('{"question": "q", "choices": ["a", "b"], "gold": 2}', "not an index"),
                          ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "not among its choices"),
                          ('{"question": "q", "choices": ["a"], "gold": 0}', "at least two"),
                          ('{"choices": ["a", "b"], "gold": 0}', "no 'question'"),
                          ('{"question": "q", "choices": ["a", "b"]}', "no 'gold'")]:
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_mc_items(path)


def test_split_validation_is_deterministic_and_disjoint():
    data = list(range(100))
    train, val = split_validation(data, 20, seed=3)
    assert len(val) == 20 and sorted(train + val) == data
    assert split_validation(data, 20, seed=3) == (train, val) and split_validation(data, 20, seed=4)[1] != val
    assert len(split_validation(data, 0.1)[1]) == 10
    with pytest.raises(ConfigError, match="cannot hold out"):
        split_validation(data, 100)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUILTIN_MODEL))


def test_tokenize_labels_and_truncation(tokenizer, capsys):
    (ex,) = load_examples(builtin_split("test"))[:1]
    full = tokenize_examples(tokenizer, [ex], max_length=1000)
    prompt_ids = tokenizer(ex.prompt)["input_ids"]
    response_ids = tokenizer(ex.response)["input_ids"]
    assert full.input_ids[0] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert full.labels[0] == full.input_ids[0] and full.truncated == 0
    masked = tokenize_examples(tokenizer, [ex], max_length=1000, train_on_prompt=False)
    assert masked.labels[0] == [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    cut = tokenize_examples(tokenizer, [ex, type(ex)("a", "b")], max_length=20)
    assert "warning: 1 of 2 training examples are longer than max_length 20" in capsys.readouterr().err
    assert cut.truncated == 1 and len(cut.input_ids[0]) == 20 and cut.input_ids[0] == full.input_ids[0][:20]


def test_right_padding_leaves_each_sequence_loss_unchanged():
    """Batch loss with right padding == the token-weighted mean of each sequence's own unpadded loss."""
    from mambapeft import from_config

    model = from_config("tiny", seed=0)
    seqs = [torch.randint(0, 1024, (n,)).tolist() for n in (5, 12, 9)]
    batch = pad_batch([{"input_ids": s, "labels": s} for s in seqs], pad_id=0)
    assert batch["labels"][0, 5:].eq(IGNORE).all() and batch["attention_mask"].sum().item() == 26
    padded = model(**batch)
    total = 0.0
    for i, s in enumerate(seqs):
        x = torch.tensor([s])
        alone = model(x, labels=x)
        total += alone.loss.item() * (len(s) - 1)
        torch.testing.assert_close(padded.logits[i, :len(s)], alone.logits[0], rtol=1e-5, atol=1e-5)
    assert padded.loss.item() == pytest.approx(total / sum(len(s) - 1 for s in seqs), rel=1e-5)


def _same_python_as_the_assets(exact: bool = False):
    """pydoc_data's topics change between Python versions, the stdlib's docstrings between releases (exact=True)."""
    import platform

    built = json.loads((BUILTIN_MODEL / "pretraining.json").read_text())["python"]
    ours = platform.python_version()
    if (exact and built != ours) or built.rsplit(".", 1)[0] != ours.rsplit(".", 1)[0]:
        pytest.skip(f"the built-in assets were made from Python {built}'s "
                    + ("standard library" if exact else "pydoc topics") + f"; this is {ours}")


# ------------------------------------------------------------------ the built-in model and task


def test_builtin_task_splits_are_valid_and_disjoint():
    _same_python_as_the_assets()
    from mambapeft.data.pydoc_text import TASK_TOPICS, pretraining_documents

    splits = {name: load_examples(builtin_split(name)) for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 334, "validation": 64, "test": 112}
    labels = set(TASK_TOPICS.values())
    passages = {}
    for name, examples in splits.items():
        for item in items_from_examples(examples):
            assert len(item.choices) == 4 and set(item.choices) <= labels
        passages[name] = {re.search(r"Passage: (.*)\n\n### Response", e.prompt).group(1) for e in examples}
    assert not passages["train"] & passages["test"] and not passages["validation"] & passages["test"]
    assert not passages["train"] & passages["validation"]
    golds = [e.choices.index(e.answer) for e in splits["test"]]
    assert all(golds.count(i) >= 15 for i in range(4))                # gold position spread: chance is 25%
    documents = pretraining_documents()
    pretraining = re.sub(r"\s+", " ", " ".join(documents))
    assert not any(p in pretraining for ps in passages.values() for p in ps)   # task text never pretrained on
    seen = set()                                                                # nor any run of 8 of its words
    for doc in documents:                                                       # (documents end with EOS)
        words = doc.split()
        seen |= {tuple(words[i:i + 8]) for i in range(len(words) - 7)}
    for p in set().union(*passages.values()):
        w = p.split()
        assert not any(tuple(w[i:i + 8]) in seen for i in range(len(w) - 7)), p


def test_builtin_task_is_reproducible():
    _same_python_as_the_assets()
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_task",
                                                  Path(__file__).parents[1] / "scripts/make_builtin_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, records in module.build().items():
        assert records == json.loads(builtin_split(name).read_text())


def test_builtin_model_loads_like_a_hub_model(tokenizer):
    from transformers import MambaForCausalLM

    import mambapeft

    files = {p.name: p.stat().st_size for p in BUILTIN_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert sum(files.values()) < 20 * 2**20
    ours = mambapeft.from_pretrained("builtin")
    theirs = MambaForCausalLM.from_pretrained(str(BUILTIN_MODEL)).eval()
    ids = tokenizer("The for statement is used to iterate", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(ids[0]) == "The for statement is used to iterate"


def test_builtin_tokenizer_is_reproduced_from_the_pretraining_text(tokenizer):
    _same_python_as_the_assets(exact=True)
    import importlib.util
    from pathlib import Path

    from mambapeft.data.pydoc_text import pretraining_documents

    spec = importlib.util.spec_from_file_location("pretrain", Path(__file__).parents[1] / "scripts/pretrain_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.train_tokenizer(pretraining_documents(), 4096)
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
