"""Pretrains the built-in tiny parallel hybrid (src/mambapeft/assets/tiny-falcon-h1): Falcon-H1's layout (attention
and a Mamba-2 mixer side by side in every layer, µP multipliers on every stream) at the built-in models' size.

    .venv/bin/python scripts/pretrain_tiny_falcon_h1.py --threads 1    # deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_falcon_h1.py --steps 20 --out /tmp/tinyf   # a quick smoke run

Everything but the model is scripts/pretrain_tiny_lm.py's (pretrain_on_shared_tokens): the same text, tokenizer
(the tiny Mamba's, copied), AdamW loop, batch, length, learning rate, seed and steps (PRETRAINING_STEPS, 2,000, as
every built-in language model: the models of benchmarks/placement.py have one pretraining budget).

Model: `falcon_h1`, d 128, 4 layers, each with GQA attention (4 heads of 32, 2 key-value heads, RoPE) beside a Mamba-2
mixer (d_ssm 192 = 1.5 d as Falcon-H1-0.5B's 1536 over 1024; 6 heads of 32, state 32, one group), then a gated MLP
of width 192, tied head. The µP multipliers are Falcon-H1-0.5B's (falcon_h1.FALCON_H1_ARCHITECTURES), except the
head's, which µP scales as 1 / width: 0.0390625 x 1024 / 128 = 0.3125. Why the published multipliers and not 1s: the
point of a Falcon-H1 built-in is that every multiplier is far from 1, as in the published checkpoints, so a method or
merge that ignored one would show on the built-in model too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def falcon_h1_config(args, vocab: int, eos: int):
    from transformers import FalconH1Config

    from mambapeft.model.falcon_h1 import FALCON_H1_ARCHITECTURES

    published = FALCON_H1_ARCHITECTURES["falcon-h1-0.5b"]
    multipliers = {k: published[k] for k in (
        "embedding_multiplier", "key_multiplier", "attention_in_multiplier", "attention_out_multiplier",
        "ssm_in_multiplier", "ssm_out_multiplier", "mlp_multipliers", "ssm_multipliers")}
    d_ssm = 3 * args.d // 2
    return FalconH1Config(
        vocab_size=vocab, hidden_size=args.d, num_hidden_layers=args.layers, intermediate_size=args.mlp,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.d // 4, mamba_d_ssm=d_ssm,
        mamba_n_heads=d_ssm // args.head_dim, mamba_d_head=args.head_dim, mamba_d_state=args.d_state,
        mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=64, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_rms_norm=False, mamba_norm_before_gate=False, projectors_bias=False, tie_word_embeddings=True,
        max_position_embeddings=2048, lm_head_multiplier=published["lm_head_multiplier"] * 1024 / args.d,
        **multipliers, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-falcon-h1"), tokenizer_options=False)
    p.add_argument("--head-dim", type=int, default=32, help="Mamba-2 channels per head (P)")
    p.add_argument("--d-state", type=int, default=32, help="Mamba-2 state size per head (N)")
    p.add_argument("--mlp", type=int, default=192, help="width of the MLP after the parallel mixers")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, falcon_h1_config, script="pretrain_tiny_falcon_h1.py",
        describe=lambda c: f"Falcon-H1 layout, d {c.hidden_size}, {c.num_hidden_layers} layers of attention "
                           f"({c.num_attention_heads} heads) beside Mamba-2 ({c.mamba_n_heads} heads x "
                           f"{c.mamba_d_head}, state {c.mamba_d_state}), MLP {c.intermediate_size}")


if __name__ == "__main__":
    main()
