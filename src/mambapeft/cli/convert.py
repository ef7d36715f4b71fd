"""`mambapeft export`, `mambapeft import` and `mambapeft merge`: adapters to and from Hugging Face peft's format, and
complete merged models (weights, config and tokenizer in one folder that transformers and the harness load)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..outputs import atomic_folder, check_output_folder


def add_parser(commands):
    export = commands.add_parser(
        "export", help="write an adapter in Hugging Face peft's format",
        description="Write a mambapeft adapter as a Hugging Face peft adapter (LoRA / DoRA), which "
        "peft.PeftModel.from_pretrained(MambaForCausalLM...) and lm-evaluation-harness's peft= load. Methods peft "
        "cannot express are refused by name, or folded into a base checkpoint written beside the adapter "
        "(--merge-rest).")
    export.add_argument("adapter", help="a mambapeft adapter folder (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("--to", choices=("peft",), default="peft", help="the format (Hugging Face peft)")
    export.add_argument("--output", required=True, help="the folder to write")
    export.add_argument("--base", help="the base model (default: the one the adapter names)")
    export.add_argument("--tokenizer", help="tokenizer for the merged base (default: the base's)")
    export.add_argument("--merge-rest", action="store_true", help="fold what peft cannot express into a base "
                        "checkpoint in OUTPUT/base, which the exported adapter then names as its base")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    export.set_defaults(run=run_export)

    imp = commands.add_parser(
        "import", help="read a Hugging Face peft LoRA / DoRA adapter into mambapeft's format",
        description="Read a peft LoRA or DoRA adapter trained on a Mamba model (in_proj, x_proj, dt_proj, out_proj, "
        "embeddings) into a mambapeft adapter folder with the same outputs.")
    imp.add_argument("adapter", help="a peft adapter folder")
    imp.add_argument("--output", required=True, help="the mambapeft adapter folder to write")
    imp.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    imp.set_defaults(run=run_import)

    merge = commands.add_parser(
        "merge", help="merge an adapter into its base and write a complete model folder",
        description="Fold every mergeable method into the weights and write a complete model: weights and config "
        "(the Hugging Face format, which transformers loads), the tokenizer files, and, when some methods cannot "
        "merge (soft tokens, the parallel adapter), the small remaining adapter beside them with a note.")
    merge.add_argument("model", help="the base model: 'builtin', 'tiny-vim', a folder or a hub id")
    merge.add_argument("--adapter", required=True, help="the adapter folder")
    merge.add_argument("--output", required=True, help="the folder to write")
    merge.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    merge.set_defaults(run=run_merge)


def fresh_output(path: str, overwrite: bool) -> Path:
    """The --output folder, checked (writable; empty unless --overwrite) before anything is loaded; nothing is deleted
    here: the old folder is replaced only once the new one is complete (outputs.atomic_folder)."""
    return check_output_folder(path, overwrite)


def load_base(name: str, adapter: Path | None = None):
    """A base model by any name `train` accepts (every family), fitted to `adapter` where the run that made it
    changed more than the adapter holds (a vision run's task head for its classes)."""
    from ..model.registry import family_of
    from ..peft import read_adapter_config

    family = family_of(name)
    model = family.load(name)
    if adapter is not None:
        model = family.fit_to_adapter(model, read_adapter_config(adapter)["base_model"]["architecture"])
    return model


def base_tokenizer(model, name: str, tokenizer: str | None):
    """The tokenizer a merged folder carries: --tokenizer, else the base's (None for families without one)."""
    from ..model.registry import family_of_model
    from ..train.language import load_tokenizer

    if not family_of_model(model).has_tokenizer:
        if tokenizer:
            raise ConfigError(f"--tokenizer {tokenizer}: {name} is a {family_of_model(model).title} model, which has "
                              f"no tokenizer; drop --tokenizer")
        return None
    return load_tokenizer(tokenizer or name)


def adapter_base(adapter: Path, given: str | None) -> str:
    from ..peft import read_adapter_config

    if given:
        return given
    name = read_adapter_config(adapter)["base_model"].get("name_or_path")
    if not name:
        raise ConfigError(f"{adapter / 'adapter_config.json'} does not name its base model; pass --base")
    return name


def hf_name(name: str) -> str:
    """What transformers' from_pretrained takes for one of our names ('builtin' is a packaged folder)."""
    from ..model.language import language_folder
    from ..model.registry import builtin_names

    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else (str(language_folder(name)) if name in builtin_names() else name)


def run_export(args) -> int:
    from ..interop import export_peft
    from ..peft import PeftModel

    adapter = Path(args.adapter)
    base_name = adapter_base(adapter, args.base)
    out = fresh_output(args.output, args.overwrite)
    model = PeftModel.from_pretrained(load_base(base_name, adapter), adapter)
    tokenizer = base_tokenizer(model.base_model, base_name, args.tokenizer) if args.merge_rest else None
    result = export_peft(model, out, base_name_or_path=hf_name(base_name), merge_rest=args.merge_rest,
                         tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"exported {', '.join(result['exported'])} to {out} in Hugging Face peft's format (base: {result['base']})")
    if result.get("note"):
        print(result["note"])
    if result["merged"]:
        print(f"merged into the base in {out / 'base'}: {', '.join(result['merged'])}")
    return 0


def run_import(args) -> int:
    from ..interop import import_peft

    adapter = Path(args.adapter)
    config_file = adapter / "adapter_config.json"
    base_name = args.base
    if base_name is None and config_file.is_file():
        try:
            base_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
        except ValueError:
            base_name = None
    if not base_name:
        raise ConfigError(f"{config_file} names no base model (base_model_name_or_path); pass --base")
    out = fresh_output(args.output, args.overwrite)
    model = import_peft(load_base(base_name), adapter)
    model.base_model.name_or_path = base_name
    with atomic_folder(out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
    print(f"imported {adapter} as {model.peft_config} into {out} (base: {base_name})")
    return 0


def run_merge(args) -> int:
    from ..interop import merge_to_folder
    from ..peft import PeftModel

    out = fresh_output(args.output, args.overwrite)
    base = load_base(args.model, Path(args.adapter))
    model = PeftModel.from_pretrained(base, args.adapter)
    tokenizer = base_tokenizer(base, args.model, args.tokenizer)
    result = merge_to_folder(model, out, tokenizer, overwrite=args.overwrite)
    print(f"merged {', '.join(result['merged']) or 'nothing'} into {out}"
          + (" with the tokenizer" if tokenizer is not None else ""))
    if result["note"]:
        print(result["note"])
    return 0
