"""The two-step driver on a cheap, deterministic scoring function (the real training objective is tested in
test_search.py): step 2 builds on step 1's best, never switches on what step 1 switched off, and removes."""

import optuna
import pytest

from mambapeft.search.hybrid import NONE, SearchSettings, open_storage, open_study, run_search, step2_trial
from mambapeft.search.space import SearchSpace

GOOD = {"lora_p_x": 1.0, "partial_a": 0.5}
BAD = {"lora_out_proj": -1.0, "partial_d": -0.7}


def scored(calls):
    def objective(specs, report, tag):
        calls.append([s.to_dict() for s in specs])
        score = sum({**GOOD, **BAD}[s.method] for s in specs)
        for spec in specs:
            if spec.method == "lora_p_x":
                score += 0.01 * spec.config.r           # step 2 can improve on step 1
        report(1, score)
        return {"score": score, "trainable": 100 * len(specs)}
    return objective


def space(step2_trials=8):
    return SearchSpace.from_dict({
        "step1": {"trials": 16, "methods": {"lora_p_x": {"r": 8, "s": 0.1}, "partial_a": {"weight_decay": 1e-3},
                                             "lora_out_proj": {"r": 8}, "partial_d": {}}},
        "step2": {"trials": step2_trials, "methods": {
            "lora_p_x": {"r": {"int": [4, 16]}, "s": {"log": [0.01, 1.0]}, "lr": {"log": [1e-4, 5e-3]}},
            "partial_a": {"weight_decay": {"log": [1e-5, 1e-2]}}, "lora_out_proj": {"r": {"int": [4, 16]}}}},
    })


def settings(tmp_path, **kw):
    return SearchSettings(storage=f"sqlite:///{tmp_path}/search.db", seed=0, prune=False, **kw)


def test_step2_builds_on_step1_best_and_removes(tmp_path):
    calls = []
    s = settings(tmp_path)
    result = run_search(space(), scored(calls), s)
    storage = open_storage(s)
    step1 = open_study(s, storage, 1).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert result.combination == max(step1, key=lambda t: t.value).user_attrs["methods"]
    assert "lora_p_x" in result.combination and "lora_out_proj" not in result.combination
    combination = set(result.combination)
    step2 = open_study(s, storage, 2).get_trials()
    assert len(step2) == 8
    first = step2[0]
    assert first.user_attrs["removed"] == NONE                      # Algorithm 1, line 20: defaults first
    assert first.user_attrs["config"][0]["r"] == 8 and first.user_attrs["config"][0]["s"] == pytest.approx(0.1)
    removed_some = False
    for t in step2:
        methods = set(t.user_attrs["methods"])
        assert methods <= combination                               # never a method step 1 switched off
        if t.user_attrs["removed"] != NONE:
            removed_some = True
            assert t.user_attrs["removed"] not in methods and len(methods) == len(combination) - 1
        else:
            assert methods == combination
    assert removed_some or len(combination) == 1
    best = max((t for t in step2 if t.value is not None), key=lambda t: t.value)
    assert result.best_config == best.user_attrs["config"] and result.best_score == best.value
    assert result.best_score >= first.value


def test_the_result_is_never_worse_than_step_1(tmp_path):
    """A step 2 that only finds worse settings (here: any lr it sets hurts) leaves step 1's best as the result."""
    def objective(specs, report, tag):
        score = sum({**GOOD, **BAD}[s.method] for s in specs) - sum(1.0 for s in specs if s.config.lr is not None)
        report(1, score)
        return {"score": score, "trainable": 100 * len(specs)}

    result = run_search(space(step2_trials=3), objective, settings(tmp_path))
    step1 = open_study(settings(tmp_path), open_storage(settings(tmp_path)), 1)
    assert result.best_step == 1 and result.best_score == step1.best_value                 # a tie keeps step 1's
    assert result.best_config == step1.best_trial.user_attrs["config"]


def test_empty_combination_is_not_scored(tmp_path):
    calls = []
    run_search(space(step2_trials=0), scored(calls), settings(tmp_path))
    assert all(calls)                                               # the objective never saw an empty config


def test_a_second_run_resumes_and_adds_nothing(tmp_path):
    calls = []
    s = settings(tmp_path)
    first = run_search(space(), scored(calls), s)
    n = len(calls)
    again = run_search(space(), scored(calls), s)
    assert len(calls) == n and again.combination == first.combination
    storage = open_storage(s)
    assert len(open_study(s, storage, 1).get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED))) == 16


def test_the_removed_method_is_left_out():
    calls = []
    trial = optuna.trial.FixedTrial({"remove": "partial_a", "lora_p_x.r": 12, "lora_p_x.s": 0.5,
                                     "lora_p_x.lr": 1e-3, "partial_a.weight_decay": 1e-4})
    score = step2_trial(space(), ["lora_p_x", "partial_a"], scored(calls), SearchSettings(prune=False))(trial)
    assert calls == [[{"method": "lora_p_x", "r": 12, "s": 0.5, "dropout": 0.1, "dropout_at": "input", "lr": 1e-3,
                       "weight_decay": None}]]
    assert score == pytest.approx(1.0 + 0.12)


def test_clashing_methods_are_one_choice_so_no_trial_is_lost(tmp_path):
    calls = []
    clashing = SearchSpace.from_dict({"step1": {"trials": 12, "methods": {"sdt": {"warmup_steps": 1},
                                                                         "partial_a": {}, "lora_p_x": {}}},
                                      "step2": {"trials": 0}})
    assert clashing.exclusive_groups() == [(["sdt", "partial_a"], [(), ("sdt",), ("partial_a",)])]

    def objective(specs, report, tag):
        calls.append({s.method for s in specs})
        return {"score": float(len(specs)), "trainable": 1}

    run_search(clashing, objective, settings(tmp_path))
    assert calls and not any({"sdt", "partial_a"} <= c for c in calls)
    trials = open_study(settings(tmp_path), open_storage(settings(tmp_path)), 1).get_trials()
    assert all("choose:sdt|partial_a" in t.params for t in trials)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get("methods")]


def test_no_sampled_trial_of_the_default_space_clashes():
    """Many samples of step 1 on the default space (every method of the registry): not one clash."""
    from mambapeft.methods import REGISTRY
    from mambapeft.peft import check_combination
    from mambapeft.search.hybrid import step1_trial
    from mambapeft.search.space import paper_space

    for vision in (False, True):
        space = paper_space(vision=vision)
        assert any(set(members) == {"partial_a", "sdt"} for members, _ in space.exclusive_groups())
        seen = []

        def objective(specs, report, tag, seen=seen):
            check_combination([REGISTRY[s.method](s.config) for s in specs])     # raises on a clash
            seen.append({s.method for s in specs})
            return {"score": float(len(specs)), "trainable": 1}

        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
        study.optimize(step1_trial(space, objective, SearchSettings(prune=False)), n_trials=300)
        failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
        assert not failed and len(seen) >= 290
        assert any("sdt" in c for c in seen) and any("partial_a" in c for c in seen)


def test_step2_starts_from_exactly_step_1s_best(tmp_path):
    """Its first trial is step 1's best configuration as the trial ran it (the learning rates the run filled in
    included), even where that lies outside the step-2 ranges."""
    tags = []

    def objective(specs, report, tag):
        tags.append(tag)
        ran = [{**s.to_dict(), "lr": s.config.lr or 0.03} for s in specs]        # the run's rate, written out
        score = sum({**GOOD, **BAD}[s.method] for s in specs)
        report(1, score)
        return {"score": score, "trainable": 1, "config": ran}

    s = settings(tmp_path)
    result = run_search(space(step2_trials=4), objective, s)
    storage = open_storage(s)
    step1 = open_study(s, storage, 1).best_trial
    first = open_study(s, storage, 2).get_trials()[0]
    assert first.user_attrs["config"] == step1.user_attrs["config"] and first.value == step1.value
    # replayed, not trained again: same evaluations for the pruner, and the run folder it names is step 1's
    assert first.intermediate_values == step1.intermediate_values and "step2-trial0" not in tags
    assert first.user_attrs["replayed"] == f"step1-trial{step1.number}"
    assert sum(t.startswith("step2") for t in tags) == 3
    assert first.params.get("lora_p_x.lr") == 0.03                                 # outside [1e-4, 5e-3]: as it ran
    assert result.best_score >= step1.value


def test_step2_starts_from_step_1s_best_where_optuna_cannot_record_a_value(tmp_path):
    """Step 1's setting may hold a value a step-2 range cannot record (a weight decay of 0 in a log range, a rank
    that is not among the choices): the first trial still runs that configuration exactly, without the parameter."""
    calls = []
    s = settings(tmp_path)
    odd = SearchSpace.from_dict({
        "step1": {"trials": 6, "methods": {"lora_p_x": {"r": 8}, "partial_a": {"weight_decay": 0.0}}},
        "step2": {"trials": 3, "methods": {"lora_p_x": {"r": {"choice": [4, 16]}},
                                           "partial_a": {"weight_decay": {"log": [1e-5, 1e-2]}}}},
    })
    result = run_search(odd, scored(calls), s)
    storage = open_storage(s)
    step1 = open_study(s, storage, 1).best_trial
    first = open_study(s, storage, 2).get_trials()[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert first.user_attrs["config"] == step1.user_attrs["config"] and first.value == step1.value
    assert {c["method"]: c for c in first.user_attrs["config"]}["partial_a"]["weight_decay"] == 0.0
    assert "partial_a.weight_decay" not in first.params and "lora_p_x.r" not in first.params
    assert len(open_study(s, storage, 2).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    assert result.best_score >= step1.value
