"""Shared test setup: no network, two threads (one per pytest-xdist worker), deterministic seeds, small helpers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # set before transformers/huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

# the suite runs with `-n auto` (pytest-xdist, one worker per core): a worker takes one thread, so the workers do not
# fight over the cores; a plain `pytest` run of one file takes two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_rel_close(actual, expected, tol=1e-5, what=""):
    """Elementwise closeness relative to the largest reference value: |a - e| <= tol * (|e| + max|e|)."""
    expected = expected.detach().double()
    actual = actual.detach().double()
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def twin_models(config, seed=0, jitter=0.1, embed_std=None):
    """transformers' model for `config` with perturbed random weights, and ours with the same weights.

    Mamba, FalconMamba and Mamba-2 configs (ours is then MambaLM or Mamba2LM)."""
    from transformers import FalconMambaForCausalLM, Mamba2ForCausalLM, MambaForCausalLM

    from mambapeft import Mamba2LM, MambaLM
    from mambapeft.model.registry import family_of_model

    torch.manual_seed(seed)
    cls = {"falcon_mamba": FalconMambaForCausalLM, "mamba2": Mamba2ForCausalLM}.get(config.model_type, MambaForCausalLM)
    hf = cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():      # no parameter left at a constant init (norms 1, D 1, ...)
            p.add_(torch.randn_like(p) * jitter)
        if embed_std is not None:
            hf.backbone.embeddings.weight.normal_(std=embed_std)
    ours = (Mamba2LM if config.model_type == "mamba2" else MambaLM)(config).eval()
    family_of_model(ours).load_state(ours, hf.state_dict(), "test")
    return hf, ours


def adamw_losses(peft, steps: int = 5, lr: float = 1e-2, vocab: int = 512):
    """The losses of `steps` AdamW steps of `peft` on one fixed random batch (2 x 12 tokens below `vocab`): how a
    narrowed or quantized base is compared with the float32 run. Returns (losses, the batch)."""
    import torch

    optimizer = torch.optim.AdamW(peft.parameter_groups(lr=lr))
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, ids


def jitter_(model, seed: int = 0, scale: float = 0.1):
    """Every weight of `model` moved off its constant init (norms 1, D 1, ...) by scale x N(0, 1), the same for the
    same seed, so a test cannot pass because some tensor is still all ones or zeros."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
