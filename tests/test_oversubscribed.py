"""Sweeps with more trials than the cluster can place at once: the trials without room wait, none fails.

- The command of issue 22 as a test (`make test-soak`): its 4 trials at once asked for, room for one (each
  trial's worker asks for 2 CPUs of a 2-CPU instance), and `failure.wait_for_workers_s=30`, which bounded a
  trial's first start before (3 of the 4 trials errored). Ray Train's own start timeout is cut to 15 s a
  try, so a trial waits through several tries. Its short form in `make test` is tests/test_autoscaling.py's
  sweep: the same settings, 4 trials at once asked for on a cluster that grows to room for 2.
- Ray's fake autoscaler, from zero to 2 nodes: 6 trials, 4 at once (`make test-soak`; the short form is
  tests/test_autoscaling.py's sweep, 4 trials at once on 2 nodes); the trials without a node wait while
  their pending placement groups make the autoscaler add the nodes.
- `--resume` after a trial errored and the sweep driver was killed (Ray Tune starts every restored trial at
  once, ray-project/ray#40652): tests/test_reliability_sweep.py, whose short form kills a trial's worker and
  then the driver of a sweep run one trial at a time.
The same without Ray: tests/test_room.py.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import most_at_once
from tests.test_autoscaling import CLUSTER_FACTS, MAX_NODES, child_runs, start_cluster_from_zero

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # a trial of a few seconds' training: the waits are the point
    "train.steps": 4,
    "train.eval_every": 4,
    "train.checkpoint_every": 4,
    "sampling.steps": 2,
    "model.resolution": 32,
    "train.batch_size": 1,
    "stop.collapse": "null",
}
TRY_S = "15"  # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S: one try of a worker-group start
TIMEOUT_S = 600


def sweep_command(sets: dict, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(ROOT / "sweeps" / "smoke.yaml")]
    sets = [arg for key, value in {**SMALL, **sets}.items() for arg in ("--set", f"{key}={value}")]
    return command + sets + list(extra)


def table(output: str) -> list[str]:
    assert "\ntrial " in output, output[-4000:]
    return output[output.index("\ntrial ") :].splitlines()


def training_windows(uri: str, since_ms: int = 0) -> dict[str, tuple[int, int]]:
    """Run id -> (first, last) timestamp in ms of the per-step metrics rank 0 logged after `since_ms`."""
    from mlflow import MlflowClient

    client, windows = MlflowClient(uri), {}
    for run in child_runs(uri):
        stamps = [
            m.timestamp
            for m in client.get_metric_history(run.info.run_id, "train/loss")
            if m.timestamp >= since_ms
        ]
        if stamps:
            windows[run.info.run_id] = (min(stamps), max(stamps))
    return windows


@pytest.mark.ray
@pytest.mark.own_ray
@pytest.mark.soak
def test_more_trials_at_once_than_fit_wait_and_all_complete(tmp_path):
    trials, room = 4, max(1, (os.cpu_count() or 2) // 2)  # room: trials whose worker fits this machine's Ray
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "name": "oversub",
        "tracking.uri": uri,
        "storage.path": tmp_path / "runs",
        "space.train.lr": "{grid: [1.0e-3, 1.0e-2]}",  # x 2 truncations: smoke.yaml's 4 trials
        "tune.max_concurrent_trials": trials,
        "base.scaling.resources_per_worker.CPU": 2,
        "base.failure.wait_for_workers_s": 30,
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private instance of its own
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = TRY_S
    sweep = subprocess.run(
        sweep_command(sets), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-4000:]
    rows = table(out)
    assert sum(row.rstrip().endswith("completed") for row in rows) == trials, "\n".join(rows)
    assert f"up to {trials} at a time (tune.max_concurrent_trials)" in out
    assert "waiting for resources: the cluster has no room yet for 1 worker(s)" in out, out[-4000:]
    windows = training_windows(uri)
    assert len(windows) == trials
    assert most_at_once(windows.values()) <= room, windows
    # MLflow shows who waited: every trial that had to wait says when it was placed
    placed = [run.data.tags.get("alignprop.placement", "") for run in child_runs(uri)]
    assert sum(tag.startswith("placed after ") for tag in placed) >= trials - room, placed


@pytest.mark.ray
@pytest.mark.own_ray
@pytest.mark.soak
def test_trials_beyond_the_nodes_wait_and_the_autoscaler_still_adds_the_nodes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "name": "oversub-autoscaler",
        "tracking.uri": uri,
        "storage.path": tmp_path / "runs",
        "scaling.resources_per_worker": "{CPU: 1, fake_gpu: 1}",
        "space.train.seed": "{grid: [0, 1, 2]}",  # x 2 truncations: 6 trials
        "space.train.lr": "{grid: [1.0e-2]}",
        "tune.max_concurrent_trials": 4,
        "failure.wait_for_workers_s": 30,
        # 10 steps: about 5 s of training at 32 px, so two trials placed together overlap in MLflow's
        # timestamps (with 2 steps, half a second each, the windows of a pair started 1 s apart did not)
        "train.steps": 10,
        "train.eval_every": 10,
        "train.checkpoint_every": 10,
    }
    with start_cluster_from_zero({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": TRY_S}) as env:
        sweep = subprocess.run(
            sweep_command(sets), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        facts = subprocess.run(
            [sys.executable, "-c", CLUSTER_FACTS], env=env, capture_output=True, text=True, timeout=120
        )
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-4000:]
    rows = table(out)
    assert sum(row.rstrip().endswith("completed") for row in rows) == 6, "\n".join(rows)
    assert facts.returncode == 0, facts.stderr[-3000:]
    cluster = json.loads(facts.stdout.strip().splitlines()[-1])
    added = {n["id"] for n in cluster["nodes"] if n["resources"].get("fake_gpu")}
    assert len(added) == MAX_NODES, cluster["nodes"]  # grown to its limit while trials waited
    assert set(cluster["worker_nodes"]) <= added
    windows = training_windows(uri).values()
    assert len(windows) == 6
    assert most_at_once(windows) == MAX_NODES, sorted(windows)  # side by side, never more than nodes


def test_most_at_once_counts_overlaps():
    assert most_at_once([(0, 10), (10, 20), (20, 30)]) == 1
    assert most_at_once([(0, 10), (5, 20), (6, 7)]) == 3
    assert most_at_once(itertools.chain([(0, 1)], [(2, 3)])) == 1
