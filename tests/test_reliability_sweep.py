"""A sweep driver killed again and again (SIGKILL) at seeded random points, and resumed each time.

The smoke sweep runs as `alignprop-ray sweep` in a subprocess joined to the session's Ray instance. Every
other kill lands just after a trial's run finished: inside the few seconds before Tune saves that the trial
is done, where a resumed sweep used to start the finished trial again (with zero steps: its MLflow run
reopened, then marked stopped early). At the end there must be one child run per trial, each with every
step logged once, and a run that had finished before a kill must be exactly as it was then.

Two forms: 5 kills of the smoke sweep's 4 trials, 2 at a time (`make test-soak`, the RELIABILITY.md row),
and one kill (`make test`), in that state-save window, of a sweep of 3 trials one at a time. In the short
form trial A errors first (its Train worker killed, no retries), then the driver is killed just after B
finished: resumed, Ray Tune 2.60 starts every restored trial at once (ray-project/ray#40652), and the
sweep's slots must keep it to `tune.max_concurrent_trials` (1, on room for 2).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import psutil
import pytest

from tests.helpers import most_at_once
from tests.test_oversubscribed import training_windows
from tests.test_reliability import wait_for

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
SEED = 12
STEPS = 4
SMALL = [
    f"train.steps={STEPS}",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "sampling.steps=2",
    "model.resolution=32",
    "train.batch_size=1",
]
CYCLE_TIMEOUT_S = 300  # bound on each wait below (a resumed sweep starts training in ~20 s here)


class Form(NamedTuple):
    trials: int
    sets: list[str]  # beyond SMALL
    columns: list[str]  # the swept fields the table shows (a field with one value is no column)
    at_once: int  # trials that may train at once (smoke.yaml's 1-CPU trials on the session's 2 CPUs: 2)


FORMS = {  # by the number of kills
    1: Form(
        trials=3,
        sets=[
            "space.truncation={grid: [full]}",
            "space.train.lr={grid: [3.0e-3, 1.0e-2, 3.0e-2]}",
            "tune.max_concurrent_trials=1",
            "failure.max_failures=0",
        ],
        columns=["train.lr"],
        at_once=1,
    ),
    5: Form(trials=4, sets=[], columns=["truncation", "train.lr"], at_once=2),
}


def sweep_command(tmp: Path, resume: bool, kills: int) -> list[str]:
    sets = [arg for item in [*SMALL, *FORMS[kills].sets] for arg in ("--set", item)]
    smoke = ROOT / "sweeps" / "smoke.yaml"
    return [
        sys.executable,
        "-m",
        "alignprop_ray.cli",
        "sweep",
        str(smoke),
        *sets,
        *(["--resume"] if resume else []),
    ]


def children(uri: str) -> dict[str, tuple[str, int | None, str]]:
    """Trial id -> (status, end time, run id) of the sweep's child runs (empty while the store is busy)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("smoke")
        runs = (
            client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''")
            if experiment
            else []
        )
    except Exception:  # SQLite busy with the sweep's server writing: ask again later
        return {}
    return {r.data.tags["alignprop.trial_id"]: (r.info.status, r.info.end_time, r.info.run_id) for r in runs}


def finished(uri: str) -> dict[str, tuple[str, int | None, str]]:
    return {trial: run for trial, run in children(uri).items() if run[0] == "FINISHED"}


def train_workers() -> list[psutil.Process]:
    """Ray Train's worker processes of the test session's Ray instance (its processes descend from this
    one, which started it)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
    return found


def trial_statuses(path: str) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(path).trials}
    except Exception:  # no state written yet
        return {}


@pytest.fixture(
    scope="module", params=[1, pytest.param(5, marks=pytest.mark.soak)], ids=["1-kill", "5-kills"]
)
def killed_again_and_again(request, ray_session, tmp_path_factory):
    from ray import tune

    count = request.param
    tmp = tmp_path_factory.mktemp("kills")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    uri, state = f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "runs" / "smoke")
    rng, kills, seen = random.Random(SEED), [], {}  # seen: each finished run as first seen
    started = time.monotonic()
    for cycle in range(count):
        with open(tmp / f"driver-{cycle}.log", "w") as log:
            driver = subprocess.Popen(
                sweep_command(tmp, resume=cycle > 0, kills=count), cwd=tmp, env=env, stdout=log, stderr=log
            )
        try:
            # Before Tune's first state save a killed sweep cannot be resumed (RELIABILITY.md): kill after it.
            wait_for(lambda: tune.Tuner.can_restore(state), CYCLE_TIMEOUT_S, "Tune's first state save")
            if count == 1:  # trial A errors: its only worker killed, no retries (failure.max_failures=0)
                (worker,) = wait_for(train_workers, CYCLE_TIMEOUT_S, "trial A's Train worker")
                worker.send_signal(signal.SIGKILL)
                wait_for(lambda: "ERROR" in trial_statuses(state).values(), CYCLE_TIMEOUT_S, "A to error")
            if cycle % 2 or count == 1:  # right after a trial's run finishes: inside Tune's state-save window
                before = set(finished(uri))
                wait_for(lambda done=before: set(finished(uri)) - done, CYCLE_TIMEOUT_S, "a trial to finish")
                delay, where = rng.uniform(0.0, 2.0), "after a trial finished"
            else:
                delay, where = rng.uniform(2.0, 20.0), "after Tune's first save"
            time.sleep(delay)
            assert driver.poll() is None, f"the sweep ended before kill {cycle + 1}: lower the delays"
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
        kills.append(f"{delay:.1f} s {where}")
        for trial, run in finished(uri).items():
            seen.setdefault(trial, run)
    # Ray ends the killed driver's trials (their owner died) a few seconds later; until then a worker may log
    # another step, which is the killed sweep's, not the resumed one's
    wait_for(lambda: not train_workers(), CYCLE_TIMEOUT_S, "the killed sweep's Train workers to end")
    resumed_at = int(time.time() * 1000)
    resumed = subprocess.run(
        sweep_command(tmp, resume=True, kills=count),
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=CYCLE_TIMEOUT_S,
    )
    print(f"{count} kills ({'; '.join(kills)}) and the last resume: {time.monotonic() - started:.0f} s")
    return SimpleNamespace(uri=uri, kills=kills, seen=seen, resumed=resumed, resumed_at=resumed_at, tmp=tmp)


def kills_and_form(request) -> tuple[int, Form]:
    """The form of the test: how many kills, and what they are done to."""
    kills = request.node.callspec.params["killed_again_and_again"]
    return kills, FORMS[kills]


def test_the_sweep_survives_its_kills(request, killed_again_and_again):
    kills, resumed = killed_again_and_again.kills, killed_again_and_again.resumed
    count, form = kills_and_form(request)
    assert len(kills) == count
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = resumed.stdout[resumed.stdout.index("\ntrial ") :].splitlines()
    assert sum(line.rstrip().endswith("completed") for line in table) == form.trials, table


def test_one_child_per_trial_each_with_every_step_once(request, killed_again_and_again):
    from mlflow import MlflowClient

    uri = killed_again_and_again.uri
    client, runs = MlflowClient(uri), children(uri)
    assert len(runs) == kills_and_form(request)[1].trials
    for trial, (status, _, run_id) in runs.items():
        assert status == "FINISHED", trial
        for key in ("train/loss", "train/reward", "perf/rss_mb"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, STEPS + 1)), (trial, key, steps)
        for key in ("eval/reward", "eval/diversity"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == [0, 2, 4], (trial, key, steps)


def test_the_resumed_sweep_keeps_its_concurrency_limit(request, killed_again_and_again):
    """Never more trials training at once after the last resume than the form allows. In the short form the
    errored A and the unstarted C train then, one after the other; after the 5th kill every trial may have
    finished already."""
    run = killed_again_and_again
    windows = training_windows(run.uri, since_ms=run.resumed_at)
    limit = kills_and_form(request)[1].at_once
    assert most_at_once(windows.values()) <= limit, windows
    if limit == 1:
        assert len(windows) == 2, windows


def test_a_finished_trial_stays_finished_and_its_run_untouched(killed_again_and_again):
    uri, seen = killed_again_and_again.uri, killed_again_and_again.seen
    assert seen, "no trial had finished before a kill: the test did not reach Tune's state-save window"
    runs = children(uri)
    for trial, run in seen.items():
        assert runs[trial] == run, f"trial {trial}'s run changed after it had finished"


# --- what the resumed sweep leaves: one parent, its summary, the table, and the refusal of changed settings


def test_one_parent_run_holds_the_children_and_the_sweeps_summary(request, killed_again_and_again):
    from mlflow import MlflowClient

    uri = killed_again_and_again.uri
    trials = kills_and_form(request)[1].trials
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("alignprop.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == trials and len(runs) == trials + 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.info.run_name for c in children}) == trials
    for child in children:
        assert set(child.data.params) >= {"train.lr", "truncation", "model.lora.rank"}
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("alignprop.best_trial")
    assert {"trials.csv", "smoke.yaml", "space.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }


def test_the_resumed_sweep_prints_the_table_and_the_best_adapter(request, killed_again_and_again, tiny_dir):
    from tests.helpers import adapter_change
    from tests.test_sweep import _alive, _server_pids

    uri, out = killed_again_and_again.uri, killed_again_and_again.resumed.stdout
    assert "View run" not in out  # MLflow's links would point at the sweep's server, gone after the sweep
    table = out[out.index("\ntrial ") :].splitlines()
    swept = kills_and_form(request)[1].columns
    assert table[1].split()[: 1 + len(swept)] == ["trial", *swept]
    line = next(line for line in out.splitlines() if line.startswith("best adapter: "))
    adapter = line.removeprefix("best adapter: ").removesuffix(" (what --register registers)")
    assert adapter_change(tiny_dir, adapter) > 1e-2  # the best trial's adapter, trained: a new image
    # the servers are gone, the killed drivers' too (each one's watcher saw its driver die)
    assert not any(_alive(int(pid)) for pid in _server_pids(uri))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=5", f"base.train.steps was {STEPS} when sweep 'smoke' started (now 5)"),
        ("sampling.steps=6", "base.sampling.steps was 2 when sweep 'smoke' started (now 6)"),
    ],
)
def test_resume_refuses_a_changed_base_setting(
    request, killed_again_and_again, monkeypatch, capsys, override, expected
):
    """Tune would resume its pickled trial configs: a changed base setting must not pass silently."""
    from alignprop_ray import cli
    from tests.test_bad_input import store_state

    uri, tmp = killed_again_and_again.uri, killed_again_and_again.tmp
    before = store_state(uri)
    monkeypatch.chdir(tmp)
    command = sweep_command(tmp, resume=True, kills=kills_and_form(request)[0])
    assert cli.main([*command[3:], "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(expected + "; resume it with the same settings, or start another with --set name=...")
    assert len(err.splitlines()) == 1
    assert store_state(uri) == before  # every run's status, params, metrics and tags, and no new run
