"""`mambapeft search` on a real PostgreSQL server, as spread over machines: one main process and two `--worker`
processes share the storage, one worker is killed (SIGKILL) in the middle of a trial, and the search still ends
with exactly the requested trials, the dead worker's trial failed and retried with the same parameters, and a
report that matches the storage.

The fixture starts a private server from the PostgreSQL binaries (Debian: /usr/lib/postgresql/<version>/bin) in a
temporary folder, on a free port, with trust authentication on 127.0.0.1, and removes it afterwards. The server
refuses to run as root, so as root it runs as the `postgres` user (runuser). Without a server to start the test
skips, saying why; with MAMBAPEFT_REQUIRE_POSTGRES=1 (CI) it fails instead.
"""

import csv
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mambapeft.assets import builtin_split
from mambapeft.search.hybrid import SearchSettings, open_storage, open_study

SPACE = {
    "step1": {"trials": 6, "methods": {"lora_p_x": {"r": 2}, "partial_d": {}, "lora_out_proj": {"r": 2}}},
    "step2": {"trials": 2, "methods": {"lora_p_x": {"r": {"int": [1, 4]}, "lr": {"log": [1e-3, 1e-2]}}}},
}
STEP1, STEP2 = 6, 2


def unavailable(reason: str):
    if os.environ.get("MAMBAPEFT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"MAMBAPEFT_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def server_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (Debian), else those on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    on_path = shutil.which("pg_ctl")
    candidates += [Path(on_path).resolve().parent] if on_path else []
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, version: str):
        self.port, self.version = port, version

    def database(self, name: str) -> str:
        """A new empty database; its URL (psycopg2 named, as optuna.load_study and optuna-dashboard need it with
        SQLAlchemy >= 2.1)."""
        import psycopg2

        db = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        db.autocommit = True
        with db.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        db.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL server (stopped and removed after the module)."""
    try:
        import psycopg2
    except ImportError:
        unavailable("psycopg2 (the PostgreSQL driver Optuna uses) is not installed: pip install -e '.[postgres]'")
    bin_dir = server_binaries()
    if bin_dir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH; "
                    "install them: apt-get install postgresql")
    as_user = []
    if os.geteuid() == 0:                               # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to run the server as")
        if shutil.which("runuser") is None:
            unavailable("running as root and runuser is missing (needed to run the server as 'postgres')")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="mambapeft-pg-"))
    if as_user:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, log = folder / "data", folder / "server.log"

    def run(*command):
        return subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)

    try:
        done = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync")
        if done.returncode != 0:
            unavailable(f"initdb failed: {(done.stdout + done.stderr)[-1000:]}")
        for _ in range(3):                              # the free port may be taken in between: try another
            port = free_port()
            options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            done = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options,
                       "start")
            if done.returncode == 0:
                break
        else:
            tail = log.read_text()[-1000:] if log.exists() else ""
            unavailable(f"pg_ctl could not start the server: {done.stdout + done.stderr}{tail}")
        try:
            db = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            with db.cursor() as cursor:
                cursor.execute("SHOW server_version")
                version = cursor.fetchone()[0]
            db.close()
            print(f"PostgreSQL {version} ({bin_dir}) on port {port}")
            yield Server(port, version)
        finally:                                        # the data is thrown away: no clean shutdown needed
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_starting_together_on_an_empty_database(postgres):
    """All of them create Optuna's tables at once; PostgreSQL lets one win and the others retry."""
    storage = postgres.database("together")
    settings = SearchSettings(storage=storage.replace("+psycopg2", ""))      # the plain form: a driver is picked
    start, errors = threading.Barrier(4), []

    def worker():
        try:
            start.wait()
            open_study(settings, open_storage(settings), 1)
        except Exception as err:                        # reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["hybridpeft-step1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search_pg_data")
    train = json.loads(builtin_split("train").read_text())[:16]
    val = json.loads(builtin_split("validation").read_text())[:6]
    for name, data in (("train", train), ("val", val)):
        (folder / f"{name}.json").write_text(json.dumps(data))
    run = {"model": "builtin", "data": str(folder / "train.json"), "val_data": str(folder / "val.json"),
           "max_steps": 2, "eval_steps": 2, "warmup_steps": 0, "batch_size": 2, "micro_batch_size": 2,
           "max_length": 48, "logging_steps": 1, "save_total_limit": 1, "eval_batch_size": 8, "lr": 5e-3}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "space.json").write_text(json.dumps(SPACE))
    return folder


def search(setup, out, storage, *extra):
    """A `mambapeft search` process (its own run folder, as on its own machine); its output goes to out.log."""
    command = [sys.executable, "-m", "mambapeft", "search", "--config", str(setup / "run.json"), "--space",
               str(setup / "space.json"), "--output-dir", str(out), "--storage", storage, "--no-final",
               "--heartbeat", "1", "--grace", "3", *extra]
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                                stdout=log, stderr=subprocess.STDOUT)


def output(out) -> str:
    return Path(f"{out}.log").read_text()


def load(storage, step: int) -> optuna.Study:
    return optuna.load_study(study_name=f"hybridpeft-step{step}", storage=storage)


def running_trial_of(storage, pids: dict[int, subprocess.Popen]):
    """(process, trial) for a step-1 trial that a worker in `pids` is training (its configuration chosen)."""
    try:
        trials = load(storage, 1).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:                                    # the study does not exist yet
        return None
    for trial in trials:
        pid = trial.user_attrs.get("worker", "").rpartition(":")[2]
        if pid.isdigit() and int(pid) in pids and "config" in trial.user_attrs:
            return pids[int(pid)], trial
    return None


def test_search_on_postgres_survives_a_killed_worker(postgres, setup, tmp_path):
    url = postgres.database("search")
    folders = [tmp_path / "main", tmp_path / "worker0", tmp_path / "worker1"]
    main = search(setup, folders[0], url.replace("+psycopg2", ""))      # the plain form: mambapeft picks a driver
    workers = [search(setup, folder, url, "--worker") for folder in folders[1:]]
    procs = [main, *workers]
    try:
        storage = open_storage(SearchSettings(storage=url))    # one connection pool for all the looking
        deadline, found = time.time() + 240, None
        while found is None and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
            found = running_trial_of(storage, {w.pid: w for w in workers})
        if found is None:
            pytest.fail("no worker was seen training a trial:\n" + "\n".join(output(f)[-1500:] for f in folders))
        victim, killed = found
        # SIGKILL, and the dead process is not reaped until the end: a zombie still "exists" for the same-host
        # check, so the other processes must find the dead trial by its stale heartbeat, as for a worker on
        # another machine (--heartbeat 1, --grace 3)
        os.kill(victim.pid, signal.SIGKILL)
        for proc, folder in zip(procs, folders):
            if proc is not victim:
                proc.wait(timeout=300)
                assert proc.returncode == 0, output(folder)[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    trials = {step: load(storage, step).get_trials() for step in (1, 2)}
    for step, wanted in ((1, STEP1), (2, STEP2)):
        states = [t.state for t in trials[step]]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == wanted, (step, states)
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states, (step, states)
    # the killed trial failed and ran again with the same parameters; no other trial failed
    step1 = trials[1]
    failed = [t for t in step1 if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    assert [t.number for t in failed] == [killed.number]
    assert all(t.state == TrialState.FAIL for t in trials[1] + trials[2] if t.user_attrs.get("surplus"))
    assert not [t for t in trials[2] if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    retried = [t for t in step1 if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == killed.params and retried[0].params
    assert retried[0].user_attrs["worker"] != killed.user_attrs["worker"]

    # the report written by the main process is the storage's content
    report = tmp_path / "main" / "report"
    with open(report / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    stored = [(str(step), str(t.number), t.state.name.lower(), "" if t.value is None else str(round(t.value, 6)))
              for step in (1, 2) for t in trials[step]]
    assert [(r["step"], r["trial"], r["state"], r["score"]) for r in rows] == stored
    table = (report / "trials.md").read_text().splitlines()[2:]
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [row["step"], row["trial"], row["state"]] and cells[-2] == row["score"]

    # what the search printed are the real study names: optuna.load_study opens them
    printed = re.search(r"\(studies (\S+), (\S+)\)", output(folders[0]))
    assert printed, output(folders[0])[-2000:]
    for step, name in ((1, printed[1]), (2, printed[2])):
        study = optuna.load_study(study_name=name, storage=url)
        assert [t.number for t in study.get_trials()] == [t.number for t in trials[step]]
