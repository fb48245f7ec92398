"""Two `alignprop-ray train` commands on one machine, no `ray start`: each gets its own Ray instance.

The shorter run starts first; the longer one starts once the first one's Ray is up. Joining the first
one's private instance (what `ray.init(address="auto")` does) would kill the second run when the first
exits.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignprop_ray.compat import ray_local_instances

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.own_ray]


def start_train(tmp: Path, name: str, steps: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable,
        "-m",
        "alignprop_ray.cli",
        "train",
        str(ROOT / "sweeps" / "tiny.yaml"),
        "--name",
        name,
        "--set",
        f"tracking.uri=sqlite:///{tmp}/{name}.db",
        "--set",
        f"storage.path={tmp}/runs",
        "--set",
        f"train.steps={steps}",
        "--set",
        f"train.eval_every={steps}",
        "--set",
        f"train.checkpoint_every={steps}",
        "--set",
        "sampling.steps=4",
        "--set",
        "truncation=fixed:2",
        "--set",
        "prompts.eval=tiny",
    ]
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_new_ray(before: set[str], process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray_local_instances() - before:
            return
        assert process.poll() is None, "the first run ended before its Ray instance was seen"
        time.sleep(0.5)
    raise AssertionError(f"no new Ray instance within {timeout:.0f} s")


def finished_run(tmp: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/{name}.db")
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_two_concurrent_train_commands_both_finish(tmp_path):
    before = ray_local_instances()
    short = start_train(tmp_path, "a", steps=2)
    processes = [short]
    try:
        wait_for_new_ray(before, short)
        processes.append(start_train(tmp_path, "b", steps=6))
        codes = [p.wait(timeout=420) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b")}
    assert codes == [0, 0], f"exit codes {codes}; last lines of b:\n{logs['b'][-2000:]}"
    for name, steps in (("a", 2), ("b", 6)):
        client, run = finished_run(tmp_path, name)
        assert run.info.status == "FINISHED"
        losses = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, steps + 1))
