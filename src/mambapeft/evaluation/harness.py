"""Bridge to lm-evaluation-harness (optional extra `lm-eval`): our model, with or without an adapter, as an `LM`.

    lm = MambaPeftLM(model, tokenizer)                      # model: MambaLM or PeftModel
    results = run_harness(lm, ["boolq", "piqa"])            # or tasks defined by YAML files under include_path

The harness sends three kinds of requests: loglikelihood (context, continuation) -> (log p, is greedy), the
multiple-choice tasks' path (acc, acc_norm; requests that share a context run it once, see
`multiple_choice.loglikelihoods`); loglikelihood_rolling (text) -> log p of the whole text, in
windows of max_length tokens; generate_until (context, {until, max_gen_toks, ...}) -> greedy text cut at the
first stop string.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import ConfigError
from .multiple_choice import loglikelihoods

try:
    from lm_eval.api.model import LM
except ImportError:                                   # the extra is not installed: fail when used, not on import
    LM = object


def _require():
    if LM is object:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'mambapeft[lm-eval]' (or lm-eval)")


class MambaPeftLM(LM):
    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 2048):
        _require()
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, self.tok, [r.args for r in requests], batch_size=self.batch_size,
                              max_length=self.max_length)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            ids = self.tok(request.args[0], add_special_tokens=False)["input_ids"]
            ids = [self.tok.eos_token_id] + ids                      # the first token is predicted from eos
            total = 0.0
            for start in range(0, len(ids) - 1, self.max_length - 1):
                window = torch.tensor([ids[start:start + self.max_length]], device=self.model.device)
                with torch.no_grad():
                    logp = torch.log_softmax(self.model(window).logits.float(), -1)    # (1, w, vocab)
                total += logp[0, :-1].gather(-1, window[0, 1:, None]).sum().item()
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids[:, -self.max_length:].to(self.model.device)
            tokens = self.model.generate(ids, max_new_tokens=int(kwargs.get("max_gen_toks", 256)))
            text = self.tok.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """Indexing the harness's task YAMLs takes seconds: once per include path and process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], *, include_path=None):
    """The harness's task manager, once every task is known to it (before any model is loaded)."""
    _require()
    manager = _task_manager(str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-evaluation-harness knows no task {', '.join(unknown)}"
                          + ("" if include_path else "; define local ones in YAML files and pass --include-path"))
    for task in tasks:
        entry = getattr(manager, "task_index", {}).get(task)
        yaml_path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        _check_data_files(task, yaml_path)
    return manager


def _check_data_files(task: str, yaml_path) -> None:
    """A task YAML's local data files (dataset_kwargs.data_files) must exist: named now, not as a traceback."""
    if not yaml_path or yaml_path == -1 or not Path(yaml_path).is_file():
        return
    import yaml

    class Lenient(yaml.SafeLoader):          # task YAMLs use tags such as !function
        pass

    Lenient.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        data = yaml.load(Path(yaml_path).read_text(), Loader=Lenient)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError):
        return
    files = ((data or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(data, dict) else None
    named = files.values() if isinstance(files, dict) else [files] if files else []
    for entry in named:
        for file in entry if isinstance(entry, list) else [entry]:
            if isinstance(file, str) and "://" not in file and not any(c in file for c in "*?[") and \
                    not Path(file).expanduser().exists() and not (Path(yaml_path).parent / file).exists():
                raise ConfigError(f"the harness task {task} ({yaml_path}) reads the data file {file}, which does not "
                                  f"exist; fix dataset_kwargs.data_files in that YAML")


NETWORK_SIGNS = ("offline", "connection", "couldn't reach", "could not reach", "localentrynotfound",
                 "name resolution", "max retries", "network")


def run_harness(lm: MambaPeftLM, tasks: list[str], *, include_path=None, limit=None, num_fewshot=None) -> dict:
    """lm_eval.simple_evaluate on our LM; tasks may be defined by YAML files under include_path."""
    import lm_eval

    manager = check_tasks(tasks, include_path=include_path)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       num_fewshot=num_fewshot, log_samples=False)
    except FileNotFoundError as err:
        raise ConfigError(f"the harness task(s) {', '.join(tasks)}: {err}; fix the file names in the task YAML "
                          f"(dataset_kwargs.data_files)") from None
    except Exception as err:
        text = f"{type(err).__name__}: {err}".lower()
        if any(sign in text for sign in NETWORK_SIGNS):
            raise ConfigError(
                f"the harness task(s) {', '.join(tasks)} download their data set from the Hugging Face hub the first "
                f"time they run: that needs the network once (none is reachable, or HF_HUB_OFFLINE / "
                f"HF_DATASETS_OFFLINE is set). Run them once where there is a network (the data is cached), or define "
                f"the task on local files in a YAML under --include-path ({type(err).__name__})") from None
        raise
