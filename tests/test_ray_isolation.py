"""Two `alignprop-ray train` commands on one machine, no `ray start`: each gets its own Ray instance, and no
process of either takes the other's instance for its own.

Run "a" starts first; run "b" once a's Ray is up. Then:
- neither log shows Ray's "Found multiple active Ray instances" (Ray's state API, inside Ray Train's own
  actors, looks the cluster up by address "auto": with two instances it failed, and the placement-group
  cleaner of the run that started second died with it);
- Ctrl-C on a ends it with one line (the step it stopped after, its checkpoint, the command that resumes
  it), its MLflow run KILLED;
- b trains on after a's instance is gone (joining a's private instance, what `ray.init(address="auto")`
  does, would have killed b with it);
- with b's driver frozen, b's Train controller is killed: b's placement group is removed, by Ray Train's
  PlacementGroupCleaner inside b's instance.

This test starts two Ray instances at once by design: run it under the CPU lock, alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from alignprop_ray.compat import ray_local_instances

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.own_ray]
STEPS = 500  # more than either run gets to: both are ended by the test
CHECKPOINT_EVERY = 2
MULTIPLE = "Found multiple active Ray instances"


def start_train(tmp: Path, name: str) -> subprocess.Popen:
    """`alignprop-ray train` on the tiny model, in a session of its own (as a command in a terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"  # its log file shows each step as it is printed
    sets = {
        "tracking.uri": f"sqlite:///{tmp}/{name}.db",
        "storage.path": f"{tmp}/runs",
        "train.steps": STEPS,
        "train.eval_every": STEPS,
        "train.checkpoint_every": CHECKPOINT_EVERY,
        "sampling.steps": 4,
        "model.resolution": 32,
        "truncation": "fixed:2",
        "prompts.eval": "tiny",
        "scaling.num_workers": 1,
    }
    command = [sys.executable, "-m", "alignprop_ray.cli", "train", str(ROOT / "sweeps" / "tiny.yaml")]
    command += ["--name", name, *(arg for key, value in sets.items() for arg in ("--set", f"{key}={value}"))]
    with open(tmp / f"{name}.log", "w") as log:
        return subprocess.Popen(
            command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(what: str, condition: Callable[[], object], process: subprocess.Popen, timeout: float = 180.0):
    """`condition()`'s first true value, polled while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"{what}: the process ended first (exit {process.returncode})"
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def new_instance(before: set[str]) -> str | None:
    added = ray_local_instances() - before
    assert len(added) <= 1, added
    return next(iter(added), None)


def last_step(log: Path) -> int:
    steps = re.findall(r"\[alignprop\] step (\d+)/", log.read_text())
    return int(steps[-1]) if steps else 0


# Placement group id -> state in the instance at argv[1], through Ray's state API (its dashboard).
PLACEMENT_GROUPS = """
import json, sys
from ray.util.state import list_placement_groups
print(json.dumps({pg.placement_group_id: pg.state for pg in list_placement_groups(address=sys.argv[1])}))
"""


def placement_groups(gcs_address: str) -> dict[str, str]:
    """Placement group id -> state in the instance at `gcs_address`, asked from a process of its own: Ray
    2.60 starts an instance with token authentication (the user's token, ~/.ray/auth_token), which a
    client that names the address takes only with RAY_AUTH_MODE=token."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # it would win over the address
    env["RAY_AUTH_MODE"] = "token"
    command = [sys.executable, "-c", PLACEMENT_GROUPS, gcs_address]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def controller(driver: subprocess.Popen) -> psutil.Process:
    """The Ray Train controller of a `train` command: a worker process of the raylet the command started."""
    for process in psutil.Process(driver.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.cmdline() and process.cmdline()[0].startswith("ray::TrainController"):
                return process
    raise AssertionError("no Ray Train controller among the command's processes")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    before = ray_local_instances()
    a = start_train(tmp, "a")
    b, b_tree = None, []
    try:
        a_gcs = wait_for("a's Ray instance", lambda: new_instance(before), a)
        b = start_train(tmp, "b")
        b_gcs = wait_for("b's Ray instance", lambda: new_instance(before | {a_gcs}), b)
        wait_for("b's step 2", lambda: last_step(tmp / "b.log") >= 2, b, timeout=300)
        assert a.poll() is None, "a ended before b was training"

        os.killpg(a.pid, signal.SIGINT)  # Ctrl-C in a's terminal
        a_code = a.wait(timeout=120)
        b_step = last_step(tmp / "b.log")
        wait_for("b's next step after a ended", lambda: last_step(tmp / "b.log") > b_step, b, timeout=120)

        b_tree = psutil.Process(b.pid).children(recursive=True)
        b_groups = [pg for pg, state in placement_groups(b_gcs).items() if state == "CREATED"]
        os.kill(b.pid, signal.SIGSTOP)  # frozen, b's driver cannot remove them itself
        controller(b).kill()
        deadline, states = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            states = placement_groups(b_gcs)
            if all(states.get(pg) == "REMOVED" for pg in b_groups):
                break
            time.sleep(1)
        yield SimpleNamespace(tmp=tmp, a=a, a_code=a_code, b_groups=b_groups, b_states=states)
    finally:
        for process in [a, b]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        for process in b_tree:  # b's Ray instance, killed with its driver only when Ray's reaper sees it
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_no_process_of_either_instance_finds_the_other(two_runs):
    for name in ("a", "b"):
        log = (two_runs.tmp / f"{name}.log").read_text()
        assert MULTIPLE not in log, f"{name}.log:\n{log[log.index(MULTIPLE) - 2000 :][:4000]}"


def test_a_dead_controllers_placement_group_is_removed_by_its_own_instance(two_runs):
    assert two_runs.b_groups, "b's run had no placement group"
    assert all(two_runs.b_states.get(pg) == "REMOVED" for pg in two_runs.b_groups), two_runs.b_states


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume_it(two_runs):
    from mlflow import MlflowClient

    log = (two_runs.tmp / "a.log").read_text()
    assert two_runs.a_code == 130, log[-3000:]
    interrupted = [line for line in log.splitlines() if line.startswith("alignprop-ray train: ")]
    assert len(interrupted) == 1, log[-3000:]
    match = re.fullmatch(
        r"alignprop-ray train: interrupted after step (\d+); resume from the checkpoint of step (\d+) with "
        r"`alignprop-ray train (\S+) (--set \S+ )+--name a`",
        interrupted[0],
    )
    assert match, interrupted[0]
    stopped, checkpoint = int(match[1]), int(match[2])
    assert match[3] == str(ROOT / "sweeps" / "tiny.yaml")
    assert checkpoint % CHECKPOINT_EVERY == 0 and 0 < checkpoint <= stopped
    client = MlflowClient(f"sqlite:///{two_runs.tmp}/a.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == stopped
