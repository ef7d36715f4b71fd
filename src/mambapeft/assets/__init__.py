"""Files shipped with the package: the built-in tiny Mamba and the built-in task (both built offline by scripts/).

    tiny-mamba/     Hugging Face Mamba checkpoint + tokenizer (scripts/pretrain_tiny_lm.py);
                    `from_pretrained("builtin")` or "tiny-mamba"
    tiny-mamba2/    the same for Mamba-2, same text and tokenizer (scripts/pretrain_tiny_mamba2.py);
                    `from_pretrained("tiny-mamba2")` or "builtin-mamba2"
    tiny-granite-h/ a hybrid in Granite 4.0-H's layout (Mamba-2 layers and one attention layer), same text and
                    tokenizer (scripts/pretrain_tiny_granite_h.py); `from_pretrained("tiny-granite-h")`
    tiny-qwen3.5/   a hybrid in Qwen3.5's layout (three Gated DeltaNet layers, one attention layer), same text and
                    tokenizer (scripts/pretrain_tiny_qwen3_5.py); `from_pretrained("tiny-qwen3.5")`
    tiny-falcon-h1/, tiny-jamba/, tiny-attention/   the placement benchmark's models (benchmarks/placement.py): a
                    parallel hybrid (Falcon-H1's layout), a sequential one (Jamba's) and an attention-only Transformer
                    of the tiny Mamba's size, same text and tokenizer, one pretraining budget for the three
                    (scripts/pretrain_tiny_falcon_h1.py, pretrain_tiny_jamba.py, pretrain_tiny_attention.py)
    pydoc-topics/   train / validation / test JSON in LLM-Adapters' commonsense format (scripts/make_builtin_task.py)
    tiny-vim/, tiny-vmamba/, vtab-tiny/   the vision defaults (scripts/pretrain_tiny_vim.py, pretrain_tiny_vmamba.py);
                    `load_vim("tiny-vim")`, `load_vmamba("tiny-vmamba")`
    digits.npz      the sequence task's data (scripts/make_digits.py): the 1,797 8x8 handwritten digits (pixel counts
                    0-16, uint8) and labels of the UCI "Optical Recognition of Handwritten Digits" data set's test part
                    (E. Alpaydin, C. Kaynak, 1998; https://archive.ics.uci.edu/dataset/80; licence CC BY 4.0), taken
                    from the copy scikit-learn ships (`sklearn.datasets.load_digits`); read by data/sequences.py
    tiny-s4d/       the sequence default: s4d-pixels pretrained on digits 0-4 read by rows (scripts/pretrain_tiny_s4d.py);
                    `load_s4d("tiny-s4d")`
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN_MODEL = HERE / "tiny-mamba"
BUILTIN_MAMBA2 = HERE / "tiny-mamba2"
BUILTIN_GRANITE_H = HERE / "tiny-granite-h"
BUILTIN_QWEN3_5 = HERE / "tiny-qwen3.5"
BUILTIN_FALCON_H1 = HERE / "tiny-falcon-h1"
BUILTIN_JAMBA = HERE / "tiny-jamba"
BUILTIN_ATTENTION = HERE / "tiny-attention"
BUILTIN_TASK = HERE / "pydoc-topics"
# every built-in language model's pretraining steps (scripts/pretrain_tiny_*.py): one budget, so their task scores
# compare; the hybrids and the Transformer first had 300 to 1,000, and no short PEFT recipe taught them the built-in
# task (docs/hybrids.md)
PRETRAINING_STEPS = 2000
BUILTIN_NAME = "builtin"
# the built-in language models by every name they answer to
BUILTIN_LANGUAGE_MODELS = {"builtin": BUILTIN_MODEL, "tiny-mamba": BUILTIN_MODEL,
                           "tiny-mamba2": BUILTIN_MAMBA2, "builtin-mamba2": BUILTIN_MAMBA2,
                           "tiny-granite-h": BUILTIN_GRANITE_H, "tiny-qwen3.5": BUILTIN_QWEN3_5,
                           "tiny-falcon-h1": BUILTIN_FALCON_H1, "tiny-jamba": BUILTIN_JAMBA,
                           "tiny-attention": BUILTIN_ATTENTION}


def builtin_split(split: str) -> Path:
    """The file of one split ("train", "validation", "test") of the built-in task."""
    return BUILTIN_TASK / f"{split}.json"
