"""Multiple-choice scoring of the built-in task: ours against lm-evaluation-harness's HFLM on transformers.

    python benchmarks/eval.py [--batch-size 16 --threads 2 --repeats 3]

Every test item of the built-in task (its 112 items, one (context, " " + choice) request per choice) is scored
with the built-in model's weights and tokenizer: by ours (`loglikelihoods`: each context runs once, its state
is copied for every choice) and by lm-evaluation-harness's HFLM wrapping transformers' MambaForCausalLM
(`HFLM.loglikelihood` on the same requests, as the harness sends them), at the same batch size. Also timed:
our per-pair path (every pair from its first token), the reference the shared one is tested against.
Ours is timed `--repeats` times after a warm-up run (median); the two slow scorers once.
Prints the time of each, the ratios, and the check that all log-likelihoods agree (1e-4) and the greedy
flags are equal.
Target (issue "decoding and evaluation at the speed a recurrent model allows"): at least 3x the harness.
"""

from __future__ import annotations

import argparse

from _common import machine, setup_threads, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_threads(args.threads)

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import MambaForCausalLM

    import mambapeft
    from mambapeft.assets import BUILTIN_MODEL, builtin_split
    from mambapeft.data.multiple_choice import load_mc_items
    from mambapeft.evaluation.multiple_choice import loglikelihoods, loglikelihoods_per_pair
    from mambapeft.train.language import load_tokenizer

    transformers.logging.set_verbosity_error()
    ours = mambapeft.from_pretrained("builtin").eval()
    theirs = MambaForCausalLM.from_pretrained(str(BUILTIN_MODEL)).eval()
    tokenizer = load_tokenizer("builtin")
    items = load_mc_items(builtin_split("test"))
    requests = [(item.context, continuation) for item in items for continuation in item.continuations()]
    harness = HFLM(pretrained=theirs, tokenizer=tokenizer, batch_size=args.batch_size)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=request, idx=i)
                 for i, request in enumerate(requests)]

    print(f"multiple-choice scoring of the built-in task: {len(items)} items, {len(requests)} requests, "
          f"batch size {args.batch_size}, fp32")
    print(f"machine: {machine()}")
    batch = args.batch_size
    runs = {       # name: (scorer, timed runs); the slow ones once, after one untimed run of ours warmed the caches
        "mambapeft": (lambda: loglikelihoods(ours, tokenizer, requests, batch_size=batch), args.repeats),
        "mambapeft per pair": (lambda: loglikelihoods_per_pair(ours, tokenizer, requests, batch_size=batch), 1),
        "lm-eval HFLM on transformers": (lambda: harness.loglikelihood(instances, disable_tqdm=True), 1),
    }
    results = {}
    print(f"{'scorer':30s} {'time (s)':>9s} {'requests/s':>11s}")
    for name, (run, repeats) in runs.items():
        seconds, scores = timed(run, repeats, warmup=1 if repeats > 1 else 0)
        results[name] = (seconds, scores)
        print(f"{name:30s} {seconds:9.2f} {len(requests) / seconds:11.0f}")

    (t_ours, s_ours), (t_pair, s_pair), (t_hf, s_hf) = results.values()
    for name, other in (("per pair", s_pair), ("the harness", s_hf)):
        diff = max(abs(a[0] - b[0]) for a, b in zip(s_ours, other))
        assert diff <= 1e-4, f"log-likelihoods differ from {name} by up to {diff:.2e}"
        assert [a[1] for a in s_ours] == [b[1] for b in other], f"greedy flags differ from {name}"
        print(f"same scores as {name}: max |difference| of the log-likelihoods {diff:.1e}, greedy flags equal")
    ratio = t_hf / t_ours
    print(f"speed-up over the harness on transformers {ratio:.1f}x (target >= 3x: {'ok' if ratio >= 3 else 'MISSED'}); "
          f"over our per-pair path {t_pair / t_ours:.1f}x")


if __name__ == "__main__":
    main()
