"""One fine-tuning run from a TrainConfig: load, score zero-shot, train, keep the best adapter, score again.

Outputs in config.output_dir: run_config.json (the resolved config, written first), checkpoint-N/ (adapter,
optimiser, scheduler, RNG and trainer state), metrics.jsonl, adapter/ (the best adapter, or the last when
there is no validation set) and results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..assets import BUILTIN_NAME, builtin_split
from ..config.presets import BUILTIN_BASE_LR
from ..errors import ConfigError
from .config import TrainConfig


def load_tokenizer(name_or_path: str):
    """The transformers tokenizer of a model folder or hub id ('builtin' = the packaged model's)."""
    from transformers import AutoTokenizer

    from ..model.loading import resolve_folder

    folder = resolve_folder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise ConfigError(f"no usable tokenizer in {folder} ({type(err).__name__}: {err}); pass --tokenizer with a "
                          f"folder or hub id that has one") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _data_file(name: str | None, split: str) -> str | None:
    return str(builtin_split(split)) if name == BUILTIN_NAME else name


def prepare_data(config: TrainConfig, tokenizer):
    """(train set, validation set or None, validation MC items, test MC items), tokenised."""
    from ..data.instructions import load_examples, split_validation
    from ..data.multiple_choice import items_from_examples, load_mc_items
    from ..data.tokenize import tokenize_examples

    train = load_examples(_data_file(config.data, "train"))
    if config.val_data or config.data == BUILTIN_NAME:
        val = load_examples(_data_file(config.val_data or BUILTIN_NAME, "validation"))
    else:
        size = min(config.val_size, len(train) // 5) if config.val_size > 0 else 0
        if size < config.val_size:
            print(f"note: {len(train)} examples: holding out {size} for validation instead of {config.val_size}")
        train, val = split_validation(train, size, seed=config.seed)
    val_items = items_from_examples(val) if val and all(e.answer and e.choices for e in val) else []
    test_items = load_mc_items(_data_file(config.test_data, "test")) if config.test_data else []
    kwargs = dict(max_length=config.max_length, train_on_prompt=config.train_on_prompt)
    train_set = tokenize_examples(tokenizer, train, what="training", **kwargs)
    val_set = tokenize_examples(tokenizer, val, what="validation", **kwargs) if val else None
    return train_set, val_set, val_items, test_items


def method_config(config: TrainConfig, model):
    """The PEFT config; without --lr, each method with a paper rate for this model size (Table 7) gets it (the
    built-in model has a column of its own)."""
    from ..config import PeftConfig
    from ..config.presets import LANGUAGE_LR
    from ..peft import guess_arch

    arch = BUILTIN_NAME if config.model == BUILTIN_NAME else guess_arch(model)
    methods = PeftConfig.parse(config.method, arch=arch)
    if config.lr is None:
        for spec in methods.methods:
            rate = LANGUAGE_LR.get(spec.method, {}).get(arch)
            if rate is not None and spec.config.lr is None:
                spec.config.lr = rate
    return methods


def training_arguments(config: TrainConfig, has_validation: bool, metric: str):
    from .trainer import trainer_arguments

    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        report_to = "none"
    return trainer_arguments(config, lr=config.lr or (BUILTIN_BASE_LR if config.model == BUILTIN_NAME else 1e-3),
                             warmup_steps=config.warmup_steps, eval_steps=config.eval_steps,
                             has_validation=has_validation, metric=metric, report_to=report_to)


def fine_tune(config: TrainConfig, *, resume: bool = False, callbacks=(), log=print) -> dict:
    """Runs `config`; returns the results (also written to results.json)."""
    from .. import from_pretrained, get_peft_model
    from ..data.tokenize import Collator
    from ..evaluation.multiple_choice import score_items
    from .trainer import JsonlMetrics, MethodPhases, PeftTrainer, open_run_folder

    start = time.time()
    out = Path(config.output_dir)
    checkpoints = open_run_folder(config, resume)

    model = from_pretrained(config.model)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                          f"{model.config.vocab_size}: pass the model's own tokenizer")
    train_set, val_set, val_items, test_items = prepare_data(config, tokenizer)
    log(f"data: {len(train_set)} training examples ({train_set.truncated} truncated at {config.max_length} tokens), "
        f"{len(val_set) if val_set else 0} validation, {len(test_items)} test items")

    methods = method_config(config, model)
    results = {"model": config.model, "methods": methods.to_dict()["methods"]}
    if test_items and not resume:
        before = score_items(model, tokenizer, test_items, batch_size=config.eval_batch_size)
        results["zero_shot"] = {"acc": before["acc"], "acc_norm": before["acc_norm"], "n": before["n"]}
        log(f"zero-shot test accuracy: {before['acc']:.1%} (acc_norm {before['acc_norm']:.1%}, {before['n']} items)")

    peft = get_peft_model(model, methods, seed=config.seed)
    counts = peft.parameter_counts()
    results["parameters"] = counts
    log(f"methods: {', '.join(str(s) for s in peft.peft_config.methods)}; trainable parameters "
        f"{counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.2f}%)")

    metric = "eval_acc" if val_items else "eval_loss"
    trainer = PeftTrainer(
        model=peft,
        args=training_arguments(config, val_set is not None, metric),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[JsonlMetrics(out / "metrics.jsonl"), MethodPhases(log), *callbacks],
        mc_items=val_items,
        tokenizer=tokenizer,
    )
    resume_from = str(checkpoints[-1]) if resume else None
    if resume_from:
        log(f"resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=resume_from)
    peft.save_pretrained(out / "adapter")
    results["best_checkpoint"] = trainer.state.best_model_checkpoint
    results["best_validation"] = trainer.state.best_metric
    results["metric"] = metric
    results["steps"] = trainer.state.global_step

    if test_items:
        after = score_items(peft, tokenizer, test_items, batch_size=config.eval_batch_size)
        results["fine_tuned"] = {"acc": after["acc"], "acc_norm": after["acc_norm"], "n": after["n"]}
        if "zero_shot" in results:
            log(f"test accuracy: zero-shot {results['zero_shot']['acc']:.1%} -> fine-tuned {after['acc']:.1%} "
                f"(acc_norm {results['zero_shot']['acc_norm']:.1%} -> {after['acc_norm']:.1%})")
        else:
            log(f"fine-tuned test accuracy: {after['acc']:.1%} (acc_norm {after['acc_norm']:.1%})")
    results["wall_seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"adapter saved to {out / 'adapter'} ({results['wall_seconds']:.0f} s)")
    return results
