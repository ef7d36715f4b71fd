"""Data: instruction and multiple-choice text sets for language models, VTAB-style image folders for Vision Mamba.

    instructions.py      LLM-Adapters' commonsense JSON and JSONL instruction data -> Example (prompt, response)
    multiple_choice.py   multiple-choice sets (context, choices, gold) as lm-evaluation-harness scores them
    tokenize.py          tokenisation with a length cut-off, right padding with labels -100 (why that is safe)
    pydoc_text.py        the offline text of the built-in model and task (Python's documentation topics)
"""
