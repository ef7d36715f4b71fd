"""Pretrains the built-in tiny Mamba (src/mambapeft/assets/tiny-mamba) on the text every Python carries.

    .venv/bin/python scripts/pretrain_tiny_lm.py            # about 13 min on one core; deterministic (seed 0, 1 thread)
    .venv/bin/python scripts/pretrain_tiny_lm.py --steps 20 --out /tmp/tiny   # a quick smoke run

Text (mambapeft.data.pydoc_text.pretraining_documents, 1.76 M characters, 486k tokens): `pydoc_data.topics` minus the
held-out topics of the built-in task, plus the standard library's docstrings, minus anything sharing 8 consecutive
words with the task topics, so the task's passages are never seen in pretraining. Tokenizer: byte-level BPE trained
with the `tokenizers` library on the same text, saved as tokenizer.json (+ tokenizer_config.json) that transformers'
AutoTokenizer / PreTrainedTokenizerFast load. Model: Mamba-1, d 128, 4 layers, saved in the Hugging Face format
(config.json + model.safetensors) that `mambapeft.from_pretrained` and transformers' MambaForCausalLM both load. 2,000
steps of 8 x 128 tokens (about 4 passes over the text); the loss on the held-out task text levels off at about 5.3
from step 1,500. (The first version, 200 steps on the pydoc topics alone, 76k tokens, gave a model that PEFT could not
teach the built-in task: longer runs memorised the text.) The loop is a plain AdamW loop on random windows of the
token stream: a one-off asset build, not the fine-tuning path (mambapeft.train, on the Trainer). The final losses are
written to the output folder's pretraining.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mambapeft.assets import PRETRAINING_STEPS  # noqa: E402
from mambapeft.data.pydoc_text import pretraining_documents, task_passages  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE (as GPT-2/NeoX) trained on `documents`; wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=2048)


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, length: int, max_windows: int = 64) -> float:
    """Mean next-token loss over up to `max_windows` evenly spaced windows of the token stream."""
    starts = list(range(0, len(stream) - length, length))
    starts = starts[:: max(1, len(starts) // max_windows)][:max_windows]
    windows = torch.stack([stream[s:s + length] for s in starts])                    # (w, L)
    return sum(model(w, labels=w).loss.item() for w in windows.split(16)) / len(windows.split(16))


def parser(description: str, out: str, tokenizer_options: bool = True) -> argparse.ArgumentParser:
    """The options of this script; scripts/pretrain_tiny_mamba2.py (which reuses the tokenizer) adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="output folder")
    if tokenizer_options:
        p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="number of Mamba blocks")
    p.add_argument("--steps", type=int, default=PRETRAINING_STEPS, help="optimiser steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (30 warm-up steps, cosine to 10%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: reproducible, and fastest on a busy machine)")
    return p


def token_streams(tokenizer, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pretraining token stream, held-out task text stream), documents separated by the end-of-text token."""
    eos = tokenizer.eos_token_id
    stream = []
    for doc in documents:
        stream += tokenizer(doc)["input_ids"] + [eos]
    held_out = [t for ps in task_passages().values() for t in tokenizer(" ".join(ps))["input_ids"] + [eos]]
    return torch.tensor(stream), torch.tensor(held_out)


def pretrain(model, stream: torch.Tensor, held_out: torch.Tensor, args, start: float) -> None:
    """The AdamW loop on random windows of the stream (warm-up, cosine to 10%, clipping at 1)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = 30

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    smoothed = None
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.length, (args.batch,), generator=gen)
        batch = torch.stack([stream[s:s + args.length] for s in starts.tolist()])      # (b, L)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if step % 100 == 99:
            model.eval()
            print(f"step {step:4d}  loss on held-out task text {mean_loss(model, held_out, args.length, 16):.3f}")
            model.train()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  (smoothed {smoothed:.3f})  "
                  f"{time.time() - start:.0f}s", flush=True)


def save_with_report(model, tokenizer, stream, held_out, args, argv, start: float, script: str, **extra) -> None:
    """Saves model and tokenizer to args.out with pretraining.json (command, sizes, final losses, time)."""
    model.eval()
    train_loss = mean_loss(model, stream, args.length)
    held_loss = mean_loss(model, held_out, args.length)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "command": f"python scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()), **extra,
        "pretraining_tokens": len(stream), "steps": args.steps, "batch": args.batch, "length": args.length,
        "lr": args.lr, "seed": args.seed, "final_train_loss": round(train_loss, 4),
        "held_out_task_text_loss": round(held_loss, 4), "wall_seconds": round(time.time() - start, 1),
    }
    (out / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


TOKENIZER_FROM = ROOT / "src/mambapeft/assets/tiny-mamba"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pretrain_on_shared_tokens(args, argv, make_config, describe, script: str, initialise=None, **extra) -> None:
    """Pretrains another built-in language model exactly as the tiny Mamba was, reading the tiny Mamba's tokens.

    make_config(args, vocab, eos) returns the transformers config of the new layout; describe(config) the line that
    names it; initialise(model), if given, changes the random initialisation before the first step (`extra` goes to
    pretraining.json). The tokenizer is not trained again but copied file for file (save_pretrained would add
    loading-time keys), so every built-in language model reads the same tokens and their scores compare.
    """
    from transformers import PreTrainedTokenizerFast

    from mambapeft import from_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    documents = pretraining_documents()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_FROM))
    stream, held_out = token_streams(tokenizer, documents)
    print(f"{len(documents)} documents, {sum(map(len, documents)):,} characters, {len(stream):,} tokens, "
          f"vocab {len(tokenizer)} (tokenizer of {TOKENIZER_FROM.name})", flush=True)
    vocab = -(-len(tokenizer) // 8) * 8
    config = make_config(args, vocab, tokenizer.eos_token_id)
    model = from_config(config, seed=args.seed).train()
    if initialise is not None:
        initialise(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {describe(config)}, vocab {vocab}, {n_params:,} parameters", flush=True)
    pretrain(model, stream, held_out, args, start)
    save_with_report(model, tokenizer, stream, held_out, args, argv, start, script, tokenizer_from=TOKENIZER_FROM.name,
                     **extra)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_FROM / name, Path(args.out) / name)


def main(argv=None) -> None:
    args = parser(__doc__, str(ROOT / "src/mambapeft/assets/tiny-mamba")).parse_args(argv)

    from transformers import MambaConfig

    from mambapeft import from_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    documents = pretraining_documents()
    tokenizer = train_tokenizer(documents, args.vocab)
    eos = tokenizer.eos_token_id
    stream, held_out = token_streams(tokenizer, documents)
    print(f"{len(documents)} documents, {sum(map(len, documents)):,} characters, {len(stream):,} tokens, "
          f"vocab {len(tokenizer)}", flush=True)

    vocab = -(-len(tokenizer) // 8) * 8
    config = MambaConfig(hidden_size=args.d, num_hidden_layers=args.layers, vocab_size=vocab,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    model = from_config(config, seed=args.seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d {args.d}, {args.layers} layers, vocab {vocab}, {n_params:,} parameters", flush=True)
    pretrain(model, stream, held_out, args, start)
    save_with_report(model, tokenizer, stream, held_out, args, argv, start, "pretrain_tiny_lm.py")

if __name__ == "__main__":
    main()
