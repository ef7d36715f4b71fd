"""One command for whoever has a GPU: every CUDA path against the CPU path, and the speed of training and decoding.

    python benchmarks/gpu_check.py                   # on a machine with CUDA (under 5 minutes on one GPU)
    python benchmarks/gpu_check.py --device cpu      # the same checks, CPU against the CPU's float64 reference

Checks (each a row: the largest relative difference of outputs and gradients, and whether it is within tolerance):
  * the Mamba-1 scan: the backend chosen for the device (mamba_ssm's kernel on CUDA when installed) against the
    float64 reference, outputs and the gradients of every input;
  * every registered model family (model/registry.py), a few methods attached: forward and backward on the device
    against the same model on the CPU;
  * greedy generation on the device against the CPU (the same tokens);
then times a training step and decoding on the device, and, where mamba_ssm is installed, mamba_ssm's own fused
model with the same weights beside them. Without CUDA (and without --device cpu) it says so and exits 0. The
comparison logic runs on the CPU in tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = ["lora_p_x:r=4", "additional_scan:n=2", "affix:n=2", "state_offset", "partial_a",
           "lora_ssm:r=2"]            # lora_ssm: S4D's (none of the others applies there)


@dataclass
class Row:
    check: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error == self.error and self.error <= self.tolerance           # NaN is never ok


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare_outputs_and_grads(run, inputs_a: dict, inputs_b: dict) -> float:
    """Runs `run(**inputs)` for both input sets (the tensors requiring grad get gradients of sum(out * weights));
    returns the largest relative difference over the output and every input gradient."""
    out_a, out_b = run(**inputs_a), run(**inputs_b)
    weights = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out_a.double() * weights.to(out_a.device)).sum().backward()
    (out_b.double() * weights.to(out_b.device)).sum().backward()
    errors = [rel(out_a, out_b)]
    for name, a in inputs_a.items():
        if isinstance(a, torch.Tensor) and a.requires_grad:
            errors.append(rel(a.grad, inputs_b[name].grad))
    return max(errors)


def scan_row(device: str) -> Row:
    from mambapeft.scan import choose_backend, selective_scan, selective_scan_reference

    g = torch.Generator().manual_seed(1)
    b, E, N, L = 2, 64, 16, 300
    data = dict(u=torch.randn(b, E, L, generator=g), delta=torch.randn(b, E, L, generator=g) * 0.5,
                A=-torch.rand(E, N, generator=g) - 0.5, B=torch.randn(b, N, L, generator=g),
                C=torch.randn(b, N, L, generator=g), D=torch.randn(E, generator=g), z=torch.randn(b, E, L, generator=g),
                delta_bias=torch.randn(E, generator=g) * 0.1)

    def inputs(on, dtype):
        return {k: v.detach().to(on, dtype).clone().requires_grad_(True) for k, v in data.items()}

    def run_fast(**kw):
        return selective_scan(**kw, delta_softplus=True)

    def run_reference(**kw):
        return selective_scan_reference(**kw, delta_softplus=True)

    fast, ref = inputs(device, torch.float32), inputs("cpu", torch.float64)
    out_fast, out_ref = run_fast(**fast), run_reference(**ref)
    weights = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out_fast.double() * weights.to(out_fast.device)).sum().backward()
    (out_ref * weights).sum().backward()
    error = max([rel(out_fast, out_ref)] + [rel(fast[k].grad, ref[k].grad) for k in data])
    return Row(f"scan ({choose_backend(fast['u'], None)} backend) vs float64 reference", error, 1e-4)


@contextmanager
def scan_backend(name: str | None):
    """MAMBAPEFT_SCAN_BACKEND for the duration (None: the automatic choice)."""
    before = os.environ.pop("MAMBAPEFT_SCAN_BACKEND", None)
    if name:
        os.environ["MAMBAPEFT_SCAN_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("MAMBAPEFT_SCAN_BACKEND", None)
        if before is not None:
            os.environ["MAMBAPEFT_SCAN_BACKEND"] = before


def family_rows(device: str, reference_device: str, backends=(None, None)) -> list[Row]:
    """Each family with the METHODS that apply to it: logits and every trainable gradient, device vs reference
    (`backends`: the scan backend of each side; on the CPU, the float64 reference against the sequential backend)."""
    import mambapeft
    from mambapeft import NotApplicable, get_peft_model
    from mambapeft.model.registry import FAMILIES

    rows = []
    for family, arch in ((name, record.check_architecture) for name, record in FAMILIES.items()):
        base = mambapeft.from_config(arch, seed=0)
        specs = []
        for spec in METHODS:
            try:
                get_peft_model(copy.deepcopy(base), specs + [spec])
                specs.append(spec)
            except (NotApplicable, mambapeft.ConfigError):
                continue
        torch.manual_seed(1)
        peft = get_peft_model(base, specs)
        with torch.no_grad():
            for p in peft.base_model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        peft.eval()
        inputs = peft.base_model.peft_inputs(batch=2, seed=0)
        models = {"a": peft.to(device), "b": copy.deepcopy(peft).to(reference_device)}
        grads, outs = {}, {}
        for (key, model), backend in zip(models.items(), backends):
            batch = {k: v.to(model.device) for k, v in inputs.items()}
            with scan_backend(backend):
                out = model(**batch)
                out.loss.backward()
            outs[key] = out.logits
            grads[key] = {n: p.grad for n, p in model.base_model.named_parameters() if p.requires_grad}
        error = max([rel(outs["a"], outs["b"])] + [rel(grads["a"][n], grads["b"][n]) for n in grads["b"]
                                                   if grads["b"][n] is not None])
        rows.append(Row(f"{family} ({arch}) + {' + '.join(s.split(':')[0] for s in specs)}: forward and backward",
                        error, 1e-3))
        if peft.base_model.is_causal:
            prompt = inputs["input_ids"][:, :5]
            tokens = {}
            for (key, model), backend in zip(models.items(), backends):
                with scan_backend(backend):
                    tokens[key] = model.generate(prompt.to(model.device), max_new_tokens=8, eos_token_id=None).cpu()
            rows.append(Row(f"{family}: greedy generation, the same tokens", float((tokens["a"] != tokens["b"]).sum()),
                            0.0))
    return rows


def speed_rows(device: str) -> list[Row]:
    """A training step and decoding of mamba-130m on the device (and mamba_ssm's fused model, where installed)."""
    import mambapeft
    from mambapeft import get_peft_model

    rows = []
    model = mambapeft.from_config("mamba-130m", seed=0, device=device)
    peft = get_peft_model(model, ["lora_p_x:r=8"])
    ids = torch.randint(0, 50280, (8, 512), device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        peft(ids, labels=ids).loss.backward()
        sync()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    rows.append(Row("mamba-130m training step, 8 x 512 tokens", (time.perf_counter() - start) / 3, float("inf"),
                    "seconds (ours)"))
    prompt = ids[:1, :16]
    peft.eval()
    peft.generate(prompt, max_new_tokens=4, eos_token_id=None)
    sync()
    start = time.perf_counter()
    peft.generate(prompt, max_new_tokens=64, eos_token_id=None)
    sync()
    rows.append(Row("mamba-130m greedy decoding, batch 1", 64 / (time.perf_counter() - start), float("inf"),
                    "tokens/s (ours)"))
    rows += fused_reference_rows(model, ids, device)
    return rows


def fused_reference_rows(model, ids, device: str) -> list[Row]:
    """mamba_ssm's own model (its fused kernels) with the same weights: the same training step and decoding."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return [Row("mamba_ssm fused reference", 0.0, float("inf"), "not installed: no comparison")]
    try:
        c = model.config
        fused = MambaLMHeadModel(SsmConfig(d_model=c.hidden_size, n_layer=c.num_hidden_layers, vocab_size=c.vocab_size,
                                           ssm_cfg={"layer": "Mamba1"}, pad_vocab_size_multiple=8), device=device)
        state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()
                 if ".deltas." not in k and ".base." not in k}
        fused.load_state_dict(state, strict=False)

        def step():
            logits = fused(ids).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            torch.cuda.synchronize()

        step()
        start = time.perf_counter()
        for _ in range(3):
            step()
        rows = [Row("mamba_ssm fused model, the same training step", (time.perf_counter() - start) / 3,
                    float("inf"), "seconds (every weight trainable: no adapters in its fused path)")]
        fused.eval()
        start = time.perf_counter()
        fused.generate(ids[:1, :16], max_length=16 + 64, cg=True)
        torch.cuda.synchronize()
        rows.append(Row("mamba_ssm fused decoding, batch 1 (CUDA graphs)", 64 / (time.perf_counter() - start),
                        float("inf"), "tokens/s"))
        return rows
    except Exception as err:                    # report, do not stop the check: this path is untested here
        return [Row("mamba_ssm fused reference", float("nan"), float("inf"), f"failed: {type(err).__name__}: {err}")]


def run_checks(device: str, reference_device: str, speed: bool = True) -> list[Row]:
    backends = ("reference", "sequential") if device == "cpu" else (None, None)
    rows = [scan_row(device)] + family_rows(device, reference_device, backends)
    if speed:
        rows += speed_rows(device)
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    for r in rows:
        if r.tolerance == float("inf"):
            print(f"{r.check:<{width}}  {r.error:>12.4g}  {r.note}")
        else:
            print(f"{r.check:<{width}}  {r.error:>12.3g}  {'ok' if r.ok else 'FAIL'} (tolerance {r.tolerance:g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the comparison itself)")
    parser.add_argument("--no-speed", action="store_true", help="only the correctness rows")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run with --device cpu to exercise the checks on the CPU)")
        return 0
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = run_checks(args.device, "cpu", speed=not args.no_speed)
    print_table(rows)
    failed = [r for r in rows if r.tolerance != float("inf") and not r.ok]
    print(f"{len(failed)} check(s) failed" if failed else "every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
