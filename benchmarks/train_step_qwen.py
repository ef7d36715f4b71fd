"""One training step of a Qwen3.5 stack on the CPU (the `qwen3.5-*` rows of benchmarks/train_step.py): ours against
transformers' Qwen3_5ForCausalLM with the same weights, side by side in one process.

    python benchmarks/train_step.py --arch qwen3.5-4l [--tokens 128 --threads 2 --repeats 3]

`qwen3.5-4l` is Qwen/Qwen3.5-0.8B's layer shapes (d 1024, Gated DeltaNet 16 + 16 heads of 128 x 128, attention
8 heads / 2 KV of 256, MLP 3584) in one block of its pattern, 4 layers [linear x 3, full], with a 32,768-token
vocabulary instead of 248,320 (the head and the embedding would otherwise be most of the step and of the memory);
`qwen3.5-tiny` is the built-in tiny-qwen3.5's shape. Trainable: the Gated DeltaNet input projections (in_proj_qkv,
in_proj_z, in_proj_b, in_proj_a), the part in_proj plays in the Mamba rows; forward + backward of the LM loss.

transformers runs its torch path (flash-linear-attention is CUDA-only): torch_chunk_gated_delta_rule, autograd
through its loop over chunks, and the torch causal conv. Attention, MLPs, norms and the head are transformers'
modules in both models, so the difference is the Gated DeltaNet mixer.

Bounds, both printed:
  * projections (as the Mamba rows): the multiply-adds of every projection and the head, forward and backward
    (input gradients everywhere after layer 0's input projections, weight gradients of the trainable ones), over
    the GEMM rate this machine reaches on the step's shapes;
  * products: every matrix product our step runs (recorded with their shapes under a TorchDispatchMode, the
    scan's chunk products and attention's included) timed alone on fresh operands: what our step would take
    if it did nothing but its own products.
"""

from __future__ import annotations

import statistics
import time

import torch

QWEN_SIZES = {
    "qwen3.5-4l": dict(base="qwen3.5-0.8b", num_hidden_layers=4, vocab_size=32768,
                       layer_types=["linear_attention"] * 3 + ["full_attention"]),
    "qwen3.5-tiny": dict(base=None, vocab_size=4096, hidden_size=128, num_hidden_layers=4,
                         layer_types=["linear_attention"] * 3 + ["full_attention"], intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=4,
                         linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
}
TARGET_SPEEDUP = 1.0          # ours faster than transformers' torch path
TARGET_BOUND = 1.3            # and within 1.3x of the step's shape-aware matmul bound
TRAINABLE = (".in_proj_qkv.", ".in_proj_z.", ".in_proj_b.", ".in_proj_a.")


def qwen_config(arch: str):
    from transformers import Qwen3_5TextConfig

    from mambapeft.model.qwen3_5 import QWEN3_5_ARCHITECTURES

    sizes = dict(QWEN_SIZES[arch])
    base = sizes.pop("base")
    values = {**(QWEN3_5_ARCHITECTURES[base] if base else {}), **sizes,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return Qwen3_5TextConfig(**values)


def projection_flops(c, tokens: int) -> tuple[float, float]:
    """(forward, backward) multiply-add FLOPs of the step's projections and head, only TRAINABLE trained."""
    d, T = c.hidden_size, tokens
    key, value, H = c.linear_num_key_heads * c.linear_key_head_dim, \
        c.linear_num_value_heads * c.linear_value_head_dim, c.linear_num_value_heads
    gdn_in = 2 * T * d * (2 * key + 2 * value + 2 * H)
    gdn = gdn_in + 2 * T * value * d
    hd = c.head_dim
    attn = 2 * T * d * (2 * c.num_attention_heads * hd + 2 * c.num_key_value_heads * hd) \
        + 2 * T * c.num_attention_heads * hd * d
    mlp = 3 * 2 * T * d * c.intermediate_size
    n_gdn = c.layer_types.count("linear_attention")
    forward = n_gdn * gdn + (c.num_hidden_layers - n_gdn) * attn + c.num_hidden_layers * mlp + 2 * T * d * c.vocab_size
    first_in = gdn_in if c.layer_types[0] == "linear_attention" else 0
    backward = (forward - first_in) + n_gdn * gdn_in
    return forward, backward


def benchmark_qwen(arch: str, args) -> None:
    from _common import peak_memory, rel_err
    from scan_gated_delta import RecordProducts, product_bound
    from train_step import gemm_rate, trim
    from transformers import Qwen3_5ForCausalLM

    from mambapeft.model.qwen3_5 import Qwen3_5LM
    from mambapeft.model.registry import get_family

    c = qwen_config(arch)
    torch.manual_seed(0)
    theirs = Qwen3_5ForCausalLM(c).train()
    ours = Qwen3_5LM(c).train()
    get_family("qwen3_5").load_state(ours, theirs.state_dict(), arch)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            p.requires_grad_(any(t in name for t in TRAINABLE))
    ids = torch.randint(0, c.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def step(model):
        model.zero_grad(set_to_none=True)
        kwargs = {} if model is ours else {"use_cache": False}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss.detach()

    n = sum(p.numel() for p in ours.parameters())
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    print(f"\none training step, {arch} ({c.layer_types}, d {c.hidden_size}, {n / 1e6:.1f} M parameters, "
          f"{trainable / 1e6:.1f} M trainable: the Gated DeltaNet input projections), batch 1 x {args.tokens} "
          f"tokens, fp32")
    for model in (ours, theirs):                                                  # warm-up
        step(model)
    times = {"mambapeft": [], "transformers": []}
    for _ in range(args.repeats):                                                 # alternately, on a shared machine
        for name, model in (("mambapeft", ours), ("transformers", theirs)):
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, model in (("mambapeft", ours), ("transformers", theirs)):
        trim()
        model.zero_grad(set_to_none=True)
        trim()
        memory, loss = peak_memory(lambda model=model: step(model))
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[name] = (statistics.median(times[name]), memory, loss, grads)
    (t_ours, _, l_ours, g_ours), (t_hf, _, l_hf, g_hf) = results["mambapeft"], results["transformers"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"{'model':14s} {'step (s)':>9s} {'tokens/s':>9s} {'peak memory':>12s}   (median of {args.repeats})")
    for name, (seconds, memory, _, _) in results.items():
        print(f"{name:14s} {seconds:9.3f} {args.tokens / seconds:9.0f} {mib(memory):>12s}")
    grad_err = max(rel_err(a, b) for a, b in zip(g_ours, g_hf))
    print(f"same result: loss {l_ours.item():.6f} vs {l_hf.item():.6f}, max rel. diff of the trainable "
          f"gradients {grad_err:.1e}")
    speedup = t_hf / t_ours
    print(f"speed-up {speedup:.2f}x (target > {TARGET_SPEEDUP:g}x): {'ok' if speedup > TARGET_SPEEDUP else 'MISSED'}")

    forward, backward = projection_flops(c, args.tokens)
    d, V, T = c.hidden_size, c.vocab_size, args.tokens
    value = c.linear_num_value_heads * c.linear_value_head_dim
    qkv = 2 * c.linear_num_key_heads * c.linear_key_head_dim + value
    shaped = gemm_rate([(T, d, qkv), (T, value, d), (T, d, c.intermediate_size), (T, c.intermediate_size, d),
                        (T, d, V), (d, T, qkv)])
    total = forward + backward
    projections = total / shaped / 1e9
    with RecordProducts() as recorder:
        step(ours)
    products, gflop = product_bound(recorder.shapes)
    print(f"matmul work of the projections and head: {total / 1e9:.2f} GFLOP (forward {forward / 1e9:.2f}, "
          f"backward {backward / 1e9:.2f}) at {shaped:.0f} GFLOP/s on their shapes = {projections * 1e3:.0f} ms")
    print(f"every product our step runs ({sum(recorder.shapes.values())} products, {gflop:.2f} GFLOP), timed "
          f"alone: {products * 1e3:.0f} ms")
    for what, bound in (("projections", projections), ("products", products)):
        ratio = t_ours / bound
        print(f"ours {t_ours * 1e3:.0f} ms = {ratio:.2f}x the {what} bound (target <= {TARGET_BOUND}x): "
              f"{'ok' if ratio <= TARGET_BOUND else 'MISSED'}; transformers {t_hf / bound:.2f}x")
