"""Pretrains the built-in tiny sequential hybrid (src/mambapeft/assets/tiny-jamba): Jamba's layout (Mamba-1 layers
with one attention layer among them, an MLP after every mixer) at the built-in models' size.

    .venv/bin/python scripts/pretrain_tiny_jamba.py --threads 1    # deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_jamba.py --steps 20 --out /tmp/tinyj   # a quick smoke run

Everything but the model is scripts/pretrain_tiny_lm.py's (pretrain_on_shared_tokens), the step count too
(PRETRAINING_STEPS, 2,000, as every built-in language model): the models of benchmarks/placement.py have one
pretraining budget.

Model: `jamba`, d 128, 4 layers [mamba, mamba, attention, mamba] (attn_layer_period 4, offset 2: Jamba keeps one
attention layer in eight; at four layers that rounds to one), Mamba-1 mixers as the tiny Mamba's (expand 2, state 16,
dt rank 8 = d / 16) with Jamba's RMS norms on dt, B and C; attention 4 heads of 32 with 2 key-value heads and no
position embedding (Jamba has none); MoE off (num_experts 1: a dense gated MLP of width 256 after every mixer), so
the comparison is about the layer types and not the router; tied head.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def jamba_config(args, vocab: int, eos: int):
    from transformers import JambaConfig

    return JambaConfig(
        vocab_size=vocab, hidden_size=args.d, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts=1, num_experts_per_tok=1,
        expert_layer_period=1, expert_layer_offset=0, attn_layer_period=args.layers,
        attn_layer_offset=args.attention_at,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=args.d // 16, mamba_conv_bias=True,
        mamba_proj_bias=False, use_mamba_kernels=False, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-jamba"), tokenizer_options=False)
    p.add_argument("--attention-at", type=int, default=2, help="index of the attention layer")
    p.add_argument("--mlp", type=int, default=256, help="width of the MLP after every mixer")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, jamba_config, script="pretrain_tiny_jamba.py",
        describe=lambda c: f"Jamba layout {c.layers_block_type}, d {c.hidden_size}, MLP {c.intermediate_size}")


if __name__ == "__main__":
    main()
