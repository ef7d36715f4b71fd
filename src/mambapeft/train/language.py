"""The language task kind: a Mamba language model fine-tuned on instruction data, scored by multiple choice.

Defaults are the paper's language recipe (SPEC section 3: max length 256, 3 epochs, 100 warm-up steps then linear
decay, AdamW, fp32, 2,000 examples held out for validation, effective batch 16, loss on prompt and response). With the
built-in data (`data: builtin`) the fields the user did not set take `BUILTIN_DEFAULTS`, sized so the default run
finishes in a few minutes on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..assets import BUILTIN_LANGUAGE_MODELS, BUILTIN_NAME, builtin_split
from ..config.presets import run_lr
from ..errors import ConfigError
from ..options import option
from .config import RunConfig, default_of
from .tasks import Prepared, TaskKind, task_kind

# the packaged tiny language models (Mamba-1, Mamba-2, the Granite 4.0-H hybrid): about the same size, the same
# column of learning rates
BUILTIN_MODELS = tuple(BUILTIN_LANGUAGE_MODELS)
# A text every real tokenizer turns into several tokens; one that cannot is not a tokenizer for this model.
PROBE = "The quick brown fox jumps over the lazy dog."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


@dataclass
class TrainConfig(RunConfig):
    kind = "language"

    model: str = default_of("model", "builtin", "('builtin': the packaged tiny Mamba)")
    tokenizer: str | None = option(None, "tokenizer folder or hub id (default: the model's)")
    data: str = option("builtin", "training data: 'builtin' (the packaged task), a commonsense .json or a .jsonl")
    val_data: str | None = option(None, "validation file (default: val_size examples held out from data)")
    test_data: str | None = option(None, "multiple-choice test file scored before and after training")
    max_length: int = option(256, "token cut-off; longer examples are truncated (with a warning, counted)", minimum=8)
    val_size: int = option(2000, "examples held out from data for validation when val_data is not given", minimum=0)
    train_on_prompt: bool = option(True, "compute the loss on the prompt too (LLM-Adapters' default), "
                                   "not only the response")
    warmup_steps: int = option(100, "linear warm-up steps", minimum=0)
    eval_steps: int = option(200, "evaluate on validation and save a checkpoint every this many steps", minimum=1)

    def validate(self, where: str = "the config") -> None:
        super().validate(where)
        default = type(self)().val_size
        if self.val_size != default and (self.data == BUILTIN_NAME or self.val_data):
            used = "the built-in data has its own validation split" if self.data == BUILTIN_NAME else (
                f"val_data {self.val_data} is the validation set")
            raise ConfigError(f"{where}: val_size={self.val_size} does not apply: {used}, so nothing is held out of "
                              f"the training data. Drop val_size, or train on a file (--data) without --val-data")


# The built-in demo: small batches, few warm-up steps and more epochs for the 1M-parameter model, the loss on the
# answer only (the 8 labels are the signal; the passages are a few dozen tokens each). Learning rates: the built-in
# model's column (config/presets.py: 3e-2 for the LoRA family), else 3e-3.
BUILTIN_DEFAULTS = dict(test_data="builtin", max_length=224, epochs=8.0, batch_size=8, micro_batch_size=8,
                        warmup_steps=10, eval_steps=42, logging_steps=21, train_on_prompt=False)


def resolve_config(file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Config file values, then command-line overrides (None = not given), then built-in defaults if data is builtin."""
    values = TrainConfig.from_file(file) if file else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.pop("task", None)
    return LanguageTask().resolve(values, where=file or "the command line")


def load_tokenizer(name_or_path: str):
    """The transformers tokenizer of a model folder or hub id ('builtin' = the packaged model's), checked to work:
    a folder without tokenizer files makes transformers return an empty tokenizer that maps every text to nothing."""
    from transformers import AutoTokenizer

    from ..model.language import language_folder

    folder = language_folder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        tokenizer, error = None, f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        error = ""
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
    if tokenizer is None or len(ids) < 2 or len(tokenizer) <= 2:
        present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
        raise ConfigError(
            f"no usable tokenizer in {folder}{error}: "
            + (f"it has {', '.join(present)} but they do not encode text" if present else
               f"it has none of {', '.join(TOKENIZER_FILES)}")
            + "; pass --tokenizer with a folder or hub id that has the model's tokenizer (e.g. EleutherAI/gpt-neox-20b "
              "for the state-spaces Mamba models)")
    if tokenizer.pad_token_id is None:
        filler = tokenizer.eos_token if tokenizer.eos_token_id is not None else tokenizer.unk_token
        if filler is None:
            raise ConfigError(
                f"the tokenizer in {folder} has no pad, end-of-sequence or unknown token, so batches cannot be padded "
                f"(padding is masked out of the loss and the scores, any token of the vocabulary would do): set "
                f"\"pad_token\" (or \"eos_token\") in its tokenizer_config.json, or pass --tokenizer with the model's "
                f"own tokenizer")
        tokenizer.pad_token = filler
    return tokenizer


def check_vocabulary(tokenizer, model) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                          f"{model.config.vocab_size}: pass the model's own tokenizer (--tokenizer)")


def _data_file(name: str | None, split: str) -> str | None:
    return str(builtin_split(split)) if name == BUILTIN_NAME else name


def prepare_data(config: TrainConfig, tokenizer, log=print):
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
            log(f"note: {len(train)} examples: holding out {size} for validation instead of {config.val_size}")
        train, val = split_validation(train, size, seed=config.seed)
    scorable = [e for e in val or [] if e.answer and e.choices]
    val_items = items_from_examples(val) if val and len(scorable) == len(val) else []
    if scorable and not val_items:
        from ..verbosity import note

        note(f"{len(val) - len(scorable)} of {len(val)} validation examples have no answer with choices, so "
             f"validation accuracy cannot be scored on the set: checkpoints are compared by validation loss instead "
             f"(give every validation record an 'answer' among its 'choices' to compare them by accuracy)")
    test_items = load_mc_items(_data_file(config.test_data, "test")) if config.test_data else []
    kwargs = dict(max_length=config.max_length, train_on_prompt=config.train_on_prompt)
    train_set = tokenize_examples(tokenizer, train, what="training", **kwargs)
    val_set = tokenize_examples(tokenizer, val, what="validation", **kwargs) if val else None
    return train_set, val_set, val_items, test_items


def family_default_method(model: str) -> tuple[str, ...] | None:
    """The default methods of `model`'s family, if it has its own; None where the family cannot be told without a
    download (a hub id no family knows by name) or at all (a missing folder: loading the model then says why)."""
    from ..errors import MambaPeftError
    from ..model.registry import claimed_family

    try:
        family = claimed_family(model)
    except (MambaPeftError, OSError):
        return None
    return family.default_method if family is not None else None


def arch_of(config: TrainConfig, model) -> str | None:
    """The model size's name, for per-size learning rates ("builtin" for the packaged model)."""
    from ..peft import guess_arch

    return BUILTIN_NAME if config.model in BUILTIN_MODELS else guess_arch(model)


def method_config(config: TrainConfig, model):
    """The PEFT config; without --lr, each method with a rate for this model size (Table 7, or the built-in model's
    column) gets it. With --lr, presets (the hybrids' default `placement/both` among them) take it too: their
    per-size rates would otherwise override it silently."""
    from ..config import PeftConfig, fill_size_rates

    arch = arch_of(config, model)
    methods = PeftConfig.parse(config.method, arch=arch, size_rates=config.lr is None)
    return fill_size_rates(methods, arch) if config.lr is None else methods


def training_arguments(config: TrainConfig, has_validation: bool, metric: str):
    """transformers' TrainingArguments of a language run (kept for the tests and for callers who build a Trainer)."""
    from .trainer import trainer_arguments

    arch = BUILTIN_NAME if config.model in BUILTIN_MODELS else None
    return trainer_arguments(config, lr=config.lr or run_lr(arch), warmup_steps=config.warmup_steps,
                             eval_steps=config.eval_steps, has_validation=has_validation, metric=metric)


@task_kind
class LanguageTask(TaskKind):
    name = "language"
    Config = TrainConfig
    builtin_defaults = BUILTIN_DEFAULTS
    # The demo's recipe is 4 epochs (168 steps, half of train's), trials and final alike, so the winner's trial is
    # its final run (7-8 min on 2 cores, from 11). Shorter trials rank noise: at 80 steps PEFT on the
    # built-in model has barely left chance (lora_p_x: ~35% validation; the 80-step winner ended 5 points below the
    # default). Step 2's rates are Table 9's range moved up 10x, to where the built-in model's rates lie.
    search_builtin_recipe = dict(epochs=4.0, save_total_limit=1)
    search_builtin_trial = {}
    search_builtin_trials = (3, 2)
    search_builtin_methods = ("lora_p_x", "lora_in_proj", "lora_out_proj", "lora_p_b", "partial_a", "partial_conv1d",
                              "additional_scan", "affix", "sdt")
    search_builtin_lr = {"log": [1e-3, 5e-2]}

    def is_builtin(self, values: dict) -> bool:
        return values.get("data", BUILTIN_NAME) == BUILTIN_NAME

    def resolve(self, values: dict | None = None, where: str = "the command line") -> TrainConfig:
        """As every task kind, and without a method, the model family's default where it has one (the hybrids:
        every layer type, model/granitemoehybrid `HybridFamily.default_method`)."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        if "method" not in values and (methods := family_default_method(values.get("model", TrainConfig.model))):
            values["method"] = list(methods)
        return super().resolve(values, where)

    def output_dir_data(self, values: dict) -> list[str]:
        data = values.get("data", BUILTIN_NAME)
        return [] if data == BUILTIN_NAME else [Path(str(data)).stem]

    def is_builtin_model(self, config) -> bool:
        return config.data == BUILTIN_NAME and config.model in BUILTIN_MODELS

    def prepare(self, config: TrainConfig, log=print) -> Prepared:
        from ..data.tokenize import Collator

        model = self.load_model(config.model)
        tokenizer = load_tokenizer(config.tokenizer or config.model)
        check_vocabulary(tokenizer, model)
        train_set, val_set, val_items, test_items = prepare_data(config, tokenizer, log)
        log(f"data: {len(train_set)} training examples ({train_set.truncated} truncated at {config.max_length} "
            f"tokens), {len(val_set) if val_set else 0} validation, {len(test_items)} test items")
        return Prepared(
            model=model, peft_config=method_config(config, model), train_set=train_set, val_set=val_set,
            trainer_kwargs=dict(data_collator=Collator(tokenizer.pad_token_id), mc_items=val_items,
                                tokenizer=tokenizer),
            lr=config.lr or run_lr(arch_of(config, model)), warmup_steps=config.warmup_steps,
            eval_steps=config.eval_steps, metric="eval_acc" if val_items else "eval_loss",
            describe={"model": config.model}, test=(tokenizer, test_items))

    def score_test(self, model, prepared: Prepared, config: TrainConfig) -> dict:
        from ..evaluation.multiple_choice import score_items

        tokenizer, items = prepared.test
        if not items:
            return {}
        scores = score_items(model, tokenizer, items, batch_size=config.eval_batch_size)
        return {"acc": scores["acc"], "acc_norm": scores["acc_norm"], "n": scores["n"]}

    def search_trial_values(self, values: dict, with_test: bool) -> dict:
        return values if with_test else {**values, "test_data": None}
