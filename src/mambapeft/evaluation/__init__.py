"""Evaluation: multiple-choice log-likelihood scoring (acc, acc_norm as lm-evaluation-harness defines them) and a
bridge to lm-evaluation-harness (harness.py, optional extra `lm-eval`)."""

from .multiple_choice import loglikelihoods, score_items

__all__ = ["loglikelihoods", "score_items"]
