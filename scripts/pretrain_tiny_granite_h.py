"""Pretrains the built-in tiny hybrid (src/mambapeft/assets/tiny-granite-h): Granite 4.0-H's layout at the built-in
models' size, on their text.

    .venv/bin/python scripts/pretrain_tiny_granite_h.py --threads 1   # about 20 min; deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_granite_h.py --steps 20 --out /tmp/tinyh   # a quick smoke run

Everything but the model is scripts/pretrain_tiny_lm.py's, imported from it: the same text (pydoc topics minus the
built-in task's, plus the standard library's docstrings), the same AdamW loop, batch, length, learning rate, seed and
steps (PRETRAINING_STEPS, 2,000; the first build had 1,000, and short PEFT recipes could not teach it the built-in
task). The tokenizer is the built-in tiny Mamba's, copied, so every
built-in language model reads the same tokens. Model: `granitemoehybrid` as Granite 4.0-H lays it out (Mamba-2 layers
with one attention layer among them, a dense shared MLP after every mixer, no position embedding (NoPE), tied head,
Granite's embedding / residual / attention / logits multipliers), d 128, 4 layers [mamba, mamba, attention, mamba];
the Mamba-2 mixers as the tiny Mamba-2's (expand 2, 8 heads of 32 channels, state 32, one group); attention 4 heads of
32 with 2 key-value heads (GQA as the published sizes); MLP width 256. Why four layers with one attention layer: the
published models keep about one attention layer per nine Mamba-2 layers, which at four layers rounds to one, and the
placement presets (`paper/placement/attention`, `.../ssm`, `.../both`) need both layer types to mean something.
Saved in the Hugging Face format (config.json + model.safetensors with the published tensor names) that
`mambapeft.from_pretrained("tiny-granite-h")` and transformers' GraniteMoeHybridForCausalLM both load, with
pretraining.json holding the final losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def granite_h_config(args, vocab: int, eos: int):
    from transformers import GraniteMoeHybridConfig

    layer_types = ["attention" if i in args.attention_at else "mamba" for i in range(args.layers)]
    # Granite 4.0-H's multipliers scaled to this width as the published configs do: embeddings x12, attention
    # 1/head_dim, residual branches x0.246 (350m's value), logits / 3 (granite-4.0-h-350m's)
    return GraniteMoeHybridConfig(
        vocab_size=vocab, hidden_size=args.d, num_hidden_layers=args.layers, layer_types=layer_types,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=args.mlp, shared_intermediate_size=args.mlp,
        num_local_experts=0, num_experts_per_tok=0, position_embedding_type="nope",
        mamba_n_heads=2 * args.d // args.head_dim, mamba_d_head=args.head_dim, mamba_d_state=args.d_state,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_chunk_size=64, attention_bias=False, rms_norm_eps=1e-5, tie_word_embeddings=True,
        embedding_multiplier=12.0, attention_multiplier=1 / (args.d // 4), residual_multiplier=0.246,
        logits_scaling=3.0, max_position_embeddings=2048, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-granite-h"), tokenizer_options=False)
    p.add_argument("--attention-at", type=int, nargs="*", default=[2], help="indices of the attention layers")
    p.add_argument("--head-dim", type=int, default=32, help="Mamba-2 channels per head (P)")
    p.add_argument("--d-state", type=int, default=32, help="Mamba-2 state size per head (N)")
    p.add_argument("--mlp", type=int, default=256, help="width of the shared MLP after every mixer")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, granite_h_config, script="pretrain_tiny_granite_h.py",
        describe=lambda c: f"Granite 4.0-H layout {c.layer_types}, d {c.hidden_size}, Mamba-2 {c.mamba_n_heads} "
                           f"heads x {c.mamba_d_head}, state {c.mamba_d_state}, MLP {c.intermediate_size}")


if __name__ == "__main__":
    main()
