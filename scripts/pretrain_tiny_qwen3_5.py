"""Pretrains the built-in tiny Qwen3.5-layout model (src/mambapeft/assets/tiny-qwen3.5): Qwen3.5's text layout
(three Gated DeltaNet layers per attention layer) at the built-in models' size, on their text.

    .venv/bin/python scripts/pretrain_tiny_qwen3_5.py --threads 1     # about 25 min; deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_qwen3_5.py --steps 20 --out /tmp/tinyq   # a quick smoke run

Everything but the model is scripts/pretrain_tiny_lm.py's (pretrain_on_shared_tokens): the same text, AdamW loop,
batch, length, learning rate and seed, and the tiny Mamba's tokenizer copied file for file, so every built-in
language model reads the same tokens and their task scores compare; the steps too (PRETRAINING_STEPS, 2,000). One
change to the initialisation (--dt-init slow, slow_decay_init): dt_bias as Mamba-2 and fla's Gated DeltaNet set it,
not transformers' constant 1, so the heads start out remembering (the first build, 400 steps from transformers'
init, had every head forgetting within a token or two: docs/hybrids.md).
Model: `qwen3_5_text` as Qwen3.5 lays it out, d 128, 4 layers [linear, linear, linear, full] (Qwen3.5's
3:1 ratio, which at four layers is one attention layer last); Gated DeltaNet with 4 key heads and 8 value heads of
32 channels (the 1:2 key-to-value head ratio of transformers' Qwen3_5TextConfig defaults, a value width of 2 d as the
tiny Mamba-2's expand 2), short convolution 4; output-gated attention with 4 heads of 32 and 2 key-value heads
(GQA), a quarter of each head rotated (Qwen3.5's partial RoPE); a dense gated MLP of width 256 after every layer;
tied head. About the size of the other built-ins (~1.1 M parameters, half of them the embedding). Saved in the
Hugging Face format (config.json with model_type "qwen3_5_text" + model.safetensors) that
`mambapeft.from_pretrained("tiny-qwen3.5")` and transformers' Qwen3_5ForCausalLM both load, with pretraining.json
holding the final losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_lm import parser, pretrain_on_shared_tokens  # noqa: E402


def qwen3_5_config(args, vocab: int, eos: int):
    from transformers import Qwen3_5TextConfig

    layer_types = ["full_attention" if (i + 1) % args.every == 0 else "linear_attention" for i in range(args.layers)]
    return Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=args.d, num_hidden_layers=args.layers, layer_types=layer_types,
        intermediate_size=args.mlp, num_attention_heads=4, num_key_value_heads=2, head_dim=args.d // 4,
        linear_num_key_heads=args.key_heads, linear_num_value_heads=args.value_heads,
        linear_key_head_dim=args.head_dim, linear_value_head_dim=args.head_dim, linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def slow_decay_init(model, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    """Every Gated DeltaNet's dt_bias set so that softplus(dt_bias) is log-uniform in [dt_min, dt_max] per head, as
    Mamba-2 and the flash-linear-attention Gated DeltaNet initialise it (transformers sets dt_bias to 1, which with
    A up to 16 decays the state by up to exp(-21) per token: the built in model trained so forgot within a token or
    two, and a tuned initial state had nothing to carry)."""
    import math

    import torch

    from mambapeft.model.gated_deltanet import GatedDeltaNetMixer

    gen = torch.Generator().manual_seed(0)
    for mixer in (m for m in model.modules() if isinstance(m, GatedDeltaNetMixer)):
        u = torch.rand(mixer.dt_bias.shape, generator=gen)
        dt = (u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).exp()        # (H,)
        with torch.no_grad():
            mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))                        # softplus^-1(dt)


def main(argv=None) -> None:
    p = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-qwen3.5"), tokenizer_options=False)
    p.add_argument("--every", type=int, default=4, help="every how many layers one is full attention (Qwen3.5: 4)")
    p.add_argument("--key-heads", type=int, default=4, help="Gated DeltaNet key (and query) heads")
    p.add_argument("--value-heads", type=int, default=8, help="Gated DeltaNet value heads")
    p.add_argument("--head-dim", type=int, default=32, help="Gated DeltaNet channels per key and per value head")
    p.add_argument("--mlp", type=int, default=256, help="width of the MLP after every layer")
    p.add_argument("--dt-init", choices=("slow", "transformers"), default="slow",
                   help="slow: dt_bias log-uniform in [1e-3, 1e-1] after softplus (Mamba-2, fla); transformers: 1")
    args = p.parse_args(argv)
    pretrain_on_shared_tokens(
        args, argv, qwen3_5_config, script="pretrain_tiny_qwen3_5.py", dt_init=args.dt_init,
        initialise=slow_decay_init if args.dt_init == "slow" else None,
        describe=lambda c: f"Qwen3.5 layout {c.layer_types}, d {c.hidden_size}, Gated DeltaNet "
                           f"{c.linear_num_key_heads} key / {c.linear_num_value_heads} value heads x "
                           f"{c.linear_key_head_dim}, MLP {c.intermediate_size}")


if __name__ == "__main__":
    main()
