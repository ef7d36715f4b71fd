"""The checks every hybrid family's tests run against transformers' own model with the same weights (Granite 4.0-H,
Bamba, Jamba, Falcon-H1, Nemotron-H, Qwen3-Next, Qwen3.5): plain functions that each family's test file calls with
its own configs, classes and sizes, so that a file says only what differs.

Every check compares against an independent reference: transformers' ...ForCausalLM on its CPU torch path (logits,
loss, gradients, padding, greedy generation with and without its cache, checkpoints both ways, a merged adapter
loaded by transformers), or our own full forward (state continuation, padded generation)."""

from __future__ import annotations

import test_conformance as conformance
import torch
from safetensors.torch import load_file

from mambapeft import get_peft_model

from conftest import assert_rel_close


def twins(hf_class, our_class, cfg, load, seed: int = 0, jitter: float = 0.1, eager_experts: bool = False,
          perturb=None):
    """transformers' model for `cfg` with perturbed random weights, and ours with the same weights (loaded by
    `load(model, state, source)`, the family's strict loader). eager_experts: transformers' own loop over the experts
    (its grouped matmul refuses odd widths on CPU), set once its model is built. perturb(hf): what the jitter of the
    parameters does not reach (buffers)."""
    torch.manual_seed(seed)
    hf = hf_class(cfg).eval()
    if eager_experts:
        cfg._experts_implementation = "eager"
    with torch.no_grad():
        for p in hf.parameters():      # no parameter left at a constant init (norms 1, D 1, ...)
            p.add_(torch.randn_like(p) * jitter)
        if perturb is not None:
            perturb(hf)
    ours = our_class(cfg).eval()
    load(ours, hf.state_dict(), "test")
    return hf, ours


def trainable(model, spec: str) -> int:
    """The trainable parameters of one method spec on `model`."""
    return get_peft_model(model, [spec]).parameter_counts()["trainable"]


def assert_logits_and_loss_equal(hf, ours, length: int, batch: int = 3):
    ids = torch.randint(0, hf.config.vocab_size, (batch, length))
    with torch.no_grad():
        expected = hf(ids, labels=ids, use_cache=False)     # (transformers 5.25 fails to mask an all-Mamba cache)
        got = ours(ids, labels=ids)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


def assert_left_padding_equal(hf, ours, shape: tuple[int, int], padding: dict[int, int]):
    """A batch of `shape` whose row i has padding[i] padding tokens on the left: our logits equal transformers' at
    every real position, and are finite everywhere."""
    ids = torch.randint(0, hf.config.vocab_size, shape)
    mask = torch.ones_like(ids)
    for row, n in padding.items():
        mask[row, :n] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_rel_close(got[real], expected[real], tol=1e-4, what="logits at real positions")
    assert torch.isfinite(got).all()


def assert_gradients_equal(hf, ours):
    """Every parameter's gradient of the loss equals transformers' (the same names; an expert no token was routed to
    gets none or zeros)."""
    hf.train(), ours.train()
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    hf(ids, labels=ids, use_cache=False).loss.backward()
    ours(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_params)
    for n, p in ours.named_parameters():
        if hf_params[n].grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        assert_rel_close(p.grad, hf_params[n].grad, tol=1e-4, what=n)


def assert_greedy_generation_equal(hf, ours, prompt_length: int = 7, new_tokens: int = 8):
    """Our greedy continuation (with our state) is transformers' token for token, with and without its cache."""
    prompt = torch.randint(0, hf.config.vocab_size, (2, prompt_length))
    ours_tokens = ours.generate(prompt, max_new_tokens=new_tokens)
    for use_cache in (True, False):
        expected = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
        assert torch.equal(ours_tokens, expected), use_cache


def assert_state_continuation_equals_full_forward(ours, need_attention: bool = False):
    """The prompt through the state, then three single tokens and a chunk of four: the logits of a full forward, every
    layer's state has seen all 14 tokens, and every KV cache holds 14 keys."""
    ids = torch.randint(0, ours.config.vocab_size, (2, 14))
    with torch.no_grad():
        full = ours(ids).logits
        state = ours.new_state()
        parts = [ours(ids[:, :7], state=state).logits]
        parts += [ours(ids[:, i : i + 1], state=state).logits for i in range(7, 10)]
        parts.append(ours(ids[:, 10:], state=state).logits)
    assert_rel_close(torch.cat(parts, dim=1), full, tol=1e-5)
    assert all(s.offset == 14 for s in state.layers)
    attention = [s for s in state.layers if hasattr(s, "key")]
    assert all(s.key.shape[2] == 14 for s in attention)
    if need_attention:
        assert attention


def assert_padded_generation_equals_each_prompt_alone(ours):
    """Two prompts of 9 and 5 tokens, the shorter left-padded, generated together: each continues as it does alone."""
    vocab = ours.config.vocab_size
    a, b = torch.randint(1, vocab, (1, 9)), torch.randint(1, vocab, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = ours.generate(batch, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(together[0, 9:], ours.generate(a, max_new_tokens=5)[0, 9:])
    assert torch.equal(together[1, 9:], ours.generate(b, max_new_tokens=5)[0, 5:])


def reload_in_transformers(hf_class, folder):
    """transformers' model from a folder we wrote, on its own loop over the experts (as `twins` builds it)."""
    back = hf_class.from_pretrained(folder).eval()
    back.config._experts_implementation = "eager"
    return back


def assert_checkpoints_both_ways(hf, ours, hf_class, load_folder, tmp_path) -> dict[str, torch.Tensor]:
    """Ours saved to tmp_path/ours loads in transformers, transformers' saved to tmp_path/hf loads in ours
    (`load_folder`), both with the logits of the model saved. Returns the tensors we wrote, by name (for a family's
    checks of its published layout)."""
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
    ours.save_pretrained(tmp_path / "ours")
    back = reload_in_transformers(hf_class, tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_folder(tmp_path / "hf")
    with torch.no_grad():
        assert_rel_close(back(ids, use_cache=False).logits, expected, tol=1e-5, what="ours saved, transformers loads")
        assert_rel_close(loaded(ids).logits, expected, tol=1e-5, what="transformers saved, ours loads")
    return load_file(tmp_path / "ours" / "model.safetensors")


def assert_merged_loads_in_transformers(peft, adapted, hf_class, ids, tmp_path):
    """peft (an adapted model whose logits for `ids` are `adapted`) merged, saved to tmp_path, loaded by transformers:
    the adapted model's logits."""
    merged = peft.merge_and_unload()
    merged.save_pretrained(tmp_path)
    back = reload_in_transformers(hf_class, tmp_path)
    with torch.no_grad():
        assert_rel_close(back(ids, use_cache=False).logits, adapted, tol=1e-4, what="merged, in transformers")


def assert_every_method_has_a_case_or_a_reason(family: str, required: set[str]):
    """Every registered method either has a conformance case on this family or a reason that names both (and says
    something: over 50 characters); `required` are methods the family must cover."""
    covered = {method for method, _, _ in conformance.cases(family)}
    for name, reason in conformance.applicability(family).items():
        if reason is None:
            assert name in covered, name
        else:
            assert reason.startswith(f"{name} does not apply to {family} models: ") and len(reason) > 50, reason
    assert required <= covered

