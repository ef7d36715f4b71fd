"""Files shipped with the package: the built-in tiny Mamba and the built-in task (both built offline by scripts/).

    tiny-mamba/     Hugging Face Mamba checkpoint + tokenizer (scripts/pretrain_tiny_lm.py); `from_pretrained("builtin")`
    tiny-mamba2/    the same for Mamba-2, same text and tokenizer (scripts/pretrain_tiny_mamba2.py);
                    `from_pretrained("builtin-mamba2")`
    pydoc-topics/   train / validation / test JSON in LLM-Adapters' commonsense format (scripts/make_builtin_task.py)
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN_MODEL = HERE / "tiny-mamba"
BUILTIN_MAMBA2 = HERE / "tiny-mamba2"
BUILTIN_TASK = HERE / "pydoc-topics"
BUILTIN_NAME = "builtin"


def builtin_split(split: str) -> Path:
    """The file of one split ("train", "validation", "test") of the built-in task."""
    return BUILTIN_TASK / f"{split}.json"
