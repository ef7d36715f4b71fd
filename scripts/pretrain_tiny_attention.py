"""Pretrains the built-in attention-only model (src/mambapeft/assets/tiny-attention): a Transformer of the built-in
Mamba's size, the other side of the MambaPEFT paper's first comparison (PEFT on Mamba vs on a Transformer of the
same size; benchmarks/placement.py).

    .venv/bin/python scripts/pretrain_tiny_attention.py --threads 1    # deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_attention.py --steps 20 --out /tmp/tinya   # a quick smoke run

Everything but the model is scripts/pretrain_tiny_lm.py's (pretrain_on_shared_tokens), the step count too
(PRETRAINING_STEPS, 2,000): the tiny Mamba-2 it is compared with had the same budget.

Model: Granite 4.0-H's family (`granitemoehybrid`) with every layer "attention", which is a plain pre-norm
Transformer: d 128, 4 layers of GQA attention (4 heads of 32, 2 key-value heads, RoPE) and a gated MLP of width 160,
tied head, every Granite multiplier neutral (embeddings and residuals x1, attention 1/sqrt(head dim), logits /1).
Why a hybrid family's config rather than a new Transformer family: the hybrid families already carry attention,
MLP LoRA and the placement presets, and transformers' GraniteMoeHybridForCausalLM loads the folder. Why MLP 160: it
puts the parameter count (about 0.97 M) between the tiny Mamba's (990,848) and the tiny Mamba-2's (962,528).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def attention_config(args, vocab: int, eos: int):
    from transformers import GraniteMoeHybridConfig

    head_dim = args.d // 4
    return GraniteMoeHybridConfig(
        vocab_size=vocab, hidden_size=args.d, num_hidden_layers=args.layers, layer_types=["attention"] * args.layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=args.mlp, shared_intermediate_size=args.mlp,
        num_local_experts=0, num_experts_per_tok=0, position_embedding_type="rope",
        mamba_n_heads=8, mamba_d_head=32, mamba_d_state=32, mamba_n_groups=1, mamba_expand=2,
        attention_bias=False, rms_norm_eps=1e-5, tie_word_embeddings=True, embedding_multiplier=1.0,
        attention_multiplier=head_dim ** -0.5, residual_multiplier=1.0, logits_scaling=1.0,
        max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-attention"), tokenizer_options=False)
    p.add_argument("--mlp", type=int, default=160, help="width of the MLP after every attention layer")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, attention_config, script="pretrain_tiny_attention.py",
        describe=lambda c: f"attention only, {c.num_hidden_layers} layers, d {c.hidden_size}, MLP "
                           f"{c.intermediate_size}, RoPE")


if __name__ == "__main__":
    main()
