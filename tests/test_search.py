"""`mambapeft search` end to end with real (very short) training on the packaged tiny model: the best config
reproduces its trial, a killed search resumes, two workers share a study, and the report appears."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import optuna
import pytest

from mambapeft.assets import builtin_split
from mambapeft.cli.main import main
from mambapeft.search.hybrid import (
    SearchSettings,
    SurplusTrial,
    check_not_surplus,
    fail_orphans,
    open_storage,
    open_study,
)

SPACE = {
    "step1": {"trials": 3, "methods": {"lora_p_x": {"r": 2}, "partial_d": {}, "lora_out_proj": {"r": 2}}},
    "step2": {"trials": 2, "methods": {"lora_p_x": {"r": {"int": [1, 4]}, "lr": {"log": [1e-3, 1e-2]}}}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search_data")
    train = json.loads(builtin_split("train").read_text())[:16]
    val = json.loads(builtin_split("validation").read_text())[:6]
    test = json.loads(builtin_split("test").read_text())[:6]
    for name, data in (("train", train), ("val", val), ("test", test)):
        (folder / f"{name}.json").write_text(json.dumps(data))
    run = {"model": "builtin", "data": str(folder / "train.json"), "val_data": str(folder / "val.json"),
           "test_data": str(folder / "test.json"), "max_steps": 2, "eval_steps": 1, "warmup_steps": 0,
           "batch_size": 2, "micro_batch_size": 2, "max_length": 48, "logging_steps": 1, "save_total_limit": 1,
           "eval_batch_size": 8, "lr": 5e-3}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "space.json").write_text(json.dumps(SPACE))
    return folder


def states(out, step):
    settings = SearchSettings(storage=f"sqlite:///{out}/search.db")
    trials = open_study(settings, open_storage(settings), step).get_trials()
    return [t.state for t in trials], trials


def test_search_reports_and_its_best_config_reproduces(setup, tmp_path, capsys):
    out = tmp_path / "run"
    # a trial budget that differs from the recipe only in its logging: the final run is trained again, and must
    # reproduce its trial
    run = {**json.loads((setup / "run.json").read_text()), "trial": {"logging_steps": 2}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    code = main(["search", "--config", str(tmp_path / "run.json"), "--space", str(setup / "space.json"),
                 "--output-dir", str(out), "--no-prune"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "best configuration:" in printed
    for name in ("trials.md", "trials.csv", "importances.json", "history.png", "pareto.png"):
        assert (out / "report" / name).stat().st_size > 0
    _, step1 = states(out, 1)
    kept = set(max((t for t in step1 if t.value is not None), key=lambda t: t.value).user_attrs["methods"])
    _, step2 = states(out, 2)
    assert all(set(t.user_attrs["methods"]) <= kept for t in step2)
    best = max((t for t in step2 if t.value is not None), key=lambda t: t.value)
    for trial in step1 + step2:             # pruning sees what the trial is scored on: validation accuracy
        if trial.value is not None:
            assert trial.intermediate_values and trial.value == max(trial.intermediate_values.values())
    # the final run is the best config, retrained with the same seed: the same validation score
    results = json.loads((out / "final" / "results.json").read_text())
    assert "trained_as" not in results and "the winner then trains with the full recipe" in printed
    assert results["best_validation"] == pytest.approx(best.value, abs=1e-6)
    config = json.loads((out / "best_config.json").read_text())
    assert config["test_data"] == str(setup / "test.json") and "fine_tuned" in results
    # best_config.json holds the winner, or the default where the default scored higher on validation with the
    # same full recipe (the summary says which; the test set plays no part in that choice)
    summary = json.loads((out / "report" / "summary.json").read_text())
    winner_val, default_val = summary["winner"]["validation"], summary["default"]["validation"]
    assert summary["kept"] == ("default" if default_val > winner_val else "winner")
    kept_methods = ([c["method"] for c in best.user_attrs["config"]] if summary["kept"] == "winner"
                    else summary["default"]["methods"])
    assert [spec.split(":")[0] for spec in config["method"]] == kept_methods


def test_a_winner_whose_trial_ran_the_full_recipe_is_not_trained_again(setup, tmp_path, capsys):
    """Trials that run the full recipe (the built-in language demo's) already trained the winner's final run: final/
    is that trial's run (the adapter byte for byte), scored on the test set as a trained final run would be."""
    from mambapeft.cli.eval import load_model
    from mambapeft.data.multiple_choice import load_mc_items
    from mambapeft.evaluation.multiple_choice import score_items
    from mambapeft.train.language import load_tokenizer

    out = tmp_path / "run"
    code = main(["search", "--config", str(setup / "run.json"), "--space", str(setup / "space.json"),
                 "--output-dir", str(out), "--no-prune", "--no-baseline"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trials run the full recipe, so the winner's run is its trial's" in printed
    results = json.loads((out / "final" / "results.json").read_text())
    trial = out / results["trained_as"]          # relative to the search folder
    assert trial.parent.parent.name == "trials"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "final" / "adapter" / name).read_bytes() == (trial / "adapter" / name).read_bytes()
    model = load_model("builtin", str(out / "final" / "adapter"))
    expected = score_items(model, load_tokenizer("builtin"), load_mc_items(str(setup / "test.json")), batch_size=8)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert results["fine_tuned"]["acc"] == summary["winner"]["test"] == pytest.approx(expected["acc"])
    assert summary["winner"]["validation"] == pytest.approx(summary["winner"]["search_validation"], abs=1e-6)


def test_jobs_run_trials_in_two_processes_and_the_final_runs_side_by_side(setup, tmp_path, capsys):
    """--jobs 2: a helper process joins the study (its trials carry its own pid), the search ends with every trial
    counted once, and the winner's and the default's final runs (one in a fresh process) both report."""
    out = tmp_path / "run"
    code = main(["search", "--config", str(setup / "run.json"), "--space", str(setup / "space.json"),
                 "--output-dir", str(out), "--no-prune", "--jobs", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 helper process run trials beside this one (1 thread each" in printed
    helper_log = (out / "workers" / "worker-1.log").read_text()
    _, step1 = states(out, 1)
    _, step2 = states(out, 2)
    finished = [t for t in step1 + step2 if t.state == optuna.trial.TrialState.COMPLETE]
    assert len([t for t in step1 if t.state == optuna.trial.TrialState.COMPLETE]) == SPACE["step1"]["trials"]
    assert len([t for t in step2 if t.state == optuna.trial.TrialState.COMPLETE]) == SPACE["step2"]["trials"]
    assert all(t.user_attrs["worker"] for t in finished)
    # the helper joined the same study and ended with the same result (on a busy machine it may start too late to
    # run any of these two-step trials: that is timing, not a fault)
    best_line = next(line for line in printed.splitlines() if line.startswith("best (step"))
    assert best_line in helper_log and "step 2: 2/2 trials finished" in helper_log
    summary = json.loads((out / "report" / "summary.json").read_text())
    for who, folder in (("winner", "final"), ("default", "baseline")):
        results = json.loads((out / folder / "results.json").read_text())
        assert summary[who]["test"] == pytest.approx(results["fine_tuned"]["acc"])


def test_jobs_below_one_are_refused(capsys):
    assert main(["search", "--jobs", "0"]) == 2
    assert "--jobs 0: give 1 or more processes" in capsys.readouterr().err


def test_the_search_keeps_the_default_only_when_it_validates_higher():
    from mambapeft.cli.search import kept, summary_line

    summary = {"winner": {"methods": ["lora_in_proj"], "validation": 0.64, "test": 0.60},
               "default": {"methods": ["lora_p_x"], "validation": 0.67, "test": 0.65}}
    assert kept(summary) == "default"
    summary["kept"] = "default"
    assert "best_config.json holds the default" in summary_line(summary)
    summary["winner"]["validation"] = 0.67                                # a tie keeps the winner
    assert kept(summary) == "winner"
    summary["default"]["validation"] = None                               # nothing to compare: the winner
    assert kept(summary) == "winner"


def command(setup, out, *extra):
    return [sys.executable, "-m", "mambapeft", "search", "--config", str(setup / "run.json"), "--space",
            str(setup / "space.json"), "--output-dir", str(out), "--step2-trials", "0", "--no-final",
            "--heartbeat", "1", "--grace", "3", *extra]


def test_killed_search_resumes_without_loss_or_duplicates(setup, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(setup, out, "--step1-trials", "4"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    training = ("select state, exists(select 1 from trial_user_attributes a where a.trial_id = t.trial_id and "
                "a.key = 'config') from trials t")
    while time.time() < deadline:       # kill it in its second trial, after one finished, once it trains: its
        time.sleep(0.5)                 # parameters are all chosen (a retry keeps those the dead trial had)
        if (out / "search.db").exists():
            with sqlite3.connect(out / "search.db") as db:
                try:
                    rows = db.execute(training).fetchall()
                except sqlite3.OperationalError:
                    continue
            done = sum(r[0] in ("COMPLETE", "PRUNED") for r in rows)
            if done >= 1 and any(r[0] == "RUNNING" and r[1] for r in rows):
                break
    else:
        proc.kill()
        pytest.fail("the search never reached its second trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted, _ = states(out, 1)
    assert optuna.trial.TrialState.RUNNING in interrupted
    finished_before = interrupted.count(optuna.trial.TrialState.COMPLETE)

    again = subprocess.run(command(setup, out, "--step1-trials", "4"), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    final, trials = states(out, 1)
    assert final.count(optuna.trial.TrialState.COMPLETE) + final.count(optuna.trial.TrialState.PRUNED) == 4
    assert optuna.trial.TrialState.RUNNING not in final and optuna.trial.TrialState.WAITING not in final
    assert final.count(optuna.trial.TrialState.FAIL) == 1                     # the killed one, retried
    failed = next(t for t in trials if t.state == optuna.trial.TrialState.FAIL)
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retried) == 1 and retried[0].params == failed.params
    assert final.count(optuna.trial.TrialState.COMPLETE) >= finished_before


def test_two_workers_complete_one_study(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command(setup, out, "--step1-trials", "4"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    second = subprocess.Popen(command(setup, out, "--step1-trials", "4", "--worker"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in (first, second):
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-2000:]
    final, trials = states(out, 1)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4                         # one study, its trials exactly (if both start the last one,
    assert optuna.trial.TrialState.RUNNING not in final   # the later is surplus: failed before training)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == optuna.trial.TrialState.FAIL)
    workers = {t.user_attrs.get("worker") for t in finished if "worker" in t.user_attrs}
    assert len(workers) == 2                          # both processes ran trials of the same study


def test_orphans_are_failed_once_and_retried_with_the_same_parameters(tmp_path):
    """Without training: a trial whose worker died before its first heartbeat (Optuna's stale check skips it) is
    failed after the grace period and retried with its parameters but without the dead worker's name; a trial
    with a fresh heartbeat is left alone; a trial that starts when the step has its trials is surplus."""
    settings = SearchSettings(storage=f"sqlite:///{tmp_path}/search.db", heartbeat_interval=1, grace_period=1)
    study = open_study(settings, open_storage(settings), 1)
    warnings.filterwarnings("ignore", "Heartbeat of storage")       # ask() outside optimize(), as a killed worker
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})       # RUNNING, never a heartbeat
    orphan.set_user_attr("worker", "another-host:1")
    alive = study.ask()
    study._storage.record_heartbeat(alive._trial_id)
    time.sleep(1.5)
    study._storage.record_heartbeat(alive._trial_id)
    fail_orphans(study, 1)
    fail_orphans(study, 1)                            # a second look (another worker's) changes nothing
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].system_attrs["failed_trial"] == 0 and trials[2].params == trials[0].params
    assert "worker" not in trials[2].user_attrs
    study.tell(alive, 0.5)
    retry = study.ask()                              # the waiting retry: it takes the failed trial's place
    assert retry.number == 2 and retry.params == trials[0].params
    check_not_surplus(retry, 2)
    late = study.ask()                               # trial 3, while 1 is complete and 2 runs: one too many
    with pytest.raises(SurplusTrial):
        check_not_surplus(late, 2)
    assert late.user_attrs == {"surplus": True}
    check_not_surplus(late, 3)


def test_the_language_and_vision_demos_have_folders_of_their_own():
    """A folder holding a search with other settings is refused, so `mambapeft search` followed by `mambapeft
    search --task vision` (no other arguments) must not share one."""
    from mambapeft.cli.search import default_output_dir
    from mambapeft.train import language, vision  # noqa: F401  (registers both task kinds)
    from mambapeft.train.tasks import get_task

    folders = {default_output_dir(get_task(name)) for name in ("language", "vision")}
    assert folders == {"runs/search", "runs/search-vision"}
