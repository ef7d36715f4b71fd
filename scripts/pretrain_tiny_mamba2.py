"""Pretrains the built-in tiny Mamba-2 (src/mambapeft/assets/tiny-mamba2): the tiny Mamba's recipe, Mamba-2 layers.

    .venv/bin/python scripts/pretrain_tiny_mamba2.py        # about 15 min on one core; deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_mamba2.py --steps 20 --out /tmp/tiny2   # a quick smoke run

Everything but the layers is scripts/pretrain_tiny_lm.py's, imported from it: the same text (pydoc topics minus
the built-in task's, plus the standard library's docstrings), the same AdamW loop, steps, batch, length, learning
rate and seed. The tokenizer is not trained again: the built-in tiny Mamba's tokenizer files are copied, so both
built-in models read the same tokens. Model: Mamba-2, d 128, 4 layers (as the tiny Mamba-1), expand 2, 8 heads of
32 channels, state size 32, one group: about the tiny Mamba-1's parameter count (0.97 M against 0.99 M), with
head_dim and d_state small enough to train quickly on the CPU. Saved in the Hugging Face Mamba-2 format
(config.json + model.safetensors) that `mambapeft.from_pretrained("builtin-mamba2")` and transformers'
Mamba2ForCausalLM both load, with pretraining.json holding the final losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def mamba2_config(args, vocab: int, eos: int):
    from transformers import Mamba2Config

    inner = 2 * args.d
    return Mamba2Config(hidden_size=args.d, num_hidden_layers=args.layers, vocab_size=vocab, expand=2,
                        num_heads=inner // args.head_dim, head_dim=args.head_dim, state_size=args.d_state,
                        n_groups=args.groups, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                        tie_word_embeddings=True)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-mamba2"), tokenizer_options=False)
    p.add_argument("--head-dim", type=int, default=32, help="channels per head (P)")
    p.add_argument("--d-state", type=int, default=32, help="state size per head (N)")
    p.add_argument("--groups", type=int, default=1, help="groups of heads sharing B and C (G)")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, mamba2_config, script="pretrain_tiny_mamba2.py",
        describe=lambda c: f"Mamba-2, d {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_heads} heads x "
                           f"{c.head_dim}, state {c.state_size}")


if __name__ == "__main__":
    main()
