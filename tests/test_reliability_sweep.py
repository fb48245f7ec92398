"""A sweep driver killed again and again (SIGKILL) at seeded random points, and resumed each time.

The smoke sweep's 4 trials (2 at a time) run as `alignprop-ray sweep` in a subprocess joined to the
session's Ray instance. Every other kill lands just after a trial's run finished: inside the few seconds
before Tune saves that the trial is done, where a resumed sweep used to start the finished trial again
(with zero steps: its MLflow run reopened, then marked stopped early). At the end there must be exactly 4
child runs, each with every step logged once, and a run that had finished before a kill must be exactly as
it was then.

Two forms: 5 kills (`make test-soak`, the RELIABILITY.md row) and one kill (`make test`), which lands in
that state-save window.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def sweep_command(tmp: Path, resume: bool) -> list[str]:
    sets = [arg for item in SMALL for arg in ("--set", item)]
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
                sweep_command(tmp, resume=cycle > 0), cwd=tmp, env=env, stdout=log, stderr=log
            )
        try:
            # Before Tune's first state save a killed sweep cannot be resumed (RELIABILITY.md): kill after it.
            wait_for(lambda: tune.Tuner.can_restore(state), CYCLE_TIMEOUT_S, "Tune's first state save")
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
    resumed = subprocess.run(
        sweep_command(tmp, resume=True),
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=CYCLE_TIMEOUT_S,
    )
    print(f"{count} kills ({'; '.join(kills)}) and the last resume: {time.monotonic() - started:.0f} s")
    return uri, kills, seen, resumed


def test_the_sweep_survives_its_kills(request, killed_again_and_again):
    _, kills, _, resumed = killed_again_and_again
    assert len(kills) == request.node.callspec.params["killed_again_and_again"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = resumed.stdout[resumed.stdout.index("\ntrial ") :].splitlines()
    assert sum(line.rstrip().endswith("completed") for line in table) == 4, table


def test_exactly_four_children_each_with_every_step_once(killed_again_and_again):
    from mlflow import MlflowClient

    uri, *_ = killed_again_and_again
    client, runs = MlflowClient(uri), children(uri)
    assert len(runs) == 4
    for trial, (status, _, run_id) in runs.items():
        assert status == "FINISHED", trial
        for key in ("train/loss", "train/reward", "perf/rss_mb"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, STEPS + 1)), (trial, key, steps)
        for key in ("eval/reward", "eval/diversity"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == [0, 2, 4], (trial, key, steps)


def test_a_finished_trial_stays_finished_and_its_run_untouched(killed_again_and_again):
    uri, _, seen, _ = killed_again_and_again
    assert seen, "no trial had finished before a kill: the test did not reach Tune's state-save window"
    runs = children(uri)
    for trial, run in seen.items():
        assert runs[trial] == run, f"trial {trial}'s run changed after it had finished"
