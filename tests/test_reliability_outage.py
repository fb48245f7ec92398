"""Long runs and a tracking outage (RELIABILITY.md), in one module that runs both at once.

Two forms of the same scenario: the long one (`make test-soak`, marker `soak`) is the RELIABILITY.md row:
300 steps, a 5-minute outage, 5 kills; the short one (`make test`) asserts the same claims on 40 steps, a
20 s outage and one kill. In the long form (the short form's numbers in brackets):

Two 300-step [40] runs on the tiny model train side by side (one CPU each):
- "uninterrupted" logs to SQLite and is never disturbed: the reference, and the leak check (one worker
  process for all 300 steps: its resident memory after step 50 and after step 300 must be within 10%; the
  resumed run's workers never live past 50 steps, so they cannot show a leak);
- "resumed" logs to a real `mlflow server` on a loopback port, and its worker is killed one step after
  each checkpoint (steps 50, 100, ..., 250): Ray restarts it from that checkpoint. Once it has logged a
  few steps the server is killed (SIGKILL to its process group) and started again 5 minutes later.
The resumed run must train through the outage (no step held up by logging), lose and double nothing
(each step's metrics and images exactly once, once the server is back), and end with exactly the
metrics of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_reliability import MlflowServer, wait_for
from tests.test_reliability_train import TINY

pytestmark = pytest.mark.ray

# Runs run_training in a subprocess, for the fault hook that kills the worker at given steps.
RUN_WITH_FAULTS = """
import json, sys
from alignprop_ray.config import load_experiment
from alignprop_ray.train.launch import run_training
spec = json.loads(sys.argv[1])
cfg = load_experiment(spec["config"], spec["overrides"])
run_training(cfg, spec["name"], fail_at_step=spec["fail_at"], fail_marker=spec["marker"])
"""


@dataclass(frozen=True)
class Form:
    steps: int
    eval_every: int
    checkpoint_every: int
    outage_s: int
    kills: int  # the worker is killed one step after each of the first `kills` checkpoints
    min_during: int  # steps that must run while the server is down

    @property
    def killed_at(self) -> list[int]:
        # One step past each checkpoint: a worker killed right after reporting a checkpoint may die before
        # Ray's controller has collected it (RELIABILITY.md); the next step's report waits until it has.
        every = self.checkpoint_every
        return list(range(every + 1, self.steps, every))[: self.kills]

    def overrides(self) -> list[str]:
        return [
            "model.resolution=32",
            "sampling.steps=2",
            "truncation=fixed:1",
            "train.batch_size=1",
            "scaling.num_workers=1",
            "prompts.train=tiny",
            "prompts.eval=tiny",
            f"train.steps={self.steps}",
            f"train.eval_every={self.eval_every}",
            f"train.checkpoint_every={self.checkpoint_every}",
            "failure.max_failures=5",
            "tracking.experiment=long",
        ]


LONG = Form(steps=300, eval_every=25, checkpoint_every=50, outage_s=300, kills=5, min_during=150)
# The short form's kill (step 21) comes after the outage's first steps: a restart on a loaded 2-core box
# can take longer than its 20 s outage, and then too few steps would run inside it to show anything.
SHORT = Form(steps=40, eval_every=10, checkpoint_every=20, outage_s=20, kills=1, min_during=5)
RUN_TIMEOUT_S = 600  # bound on a run once the server is back (the long ones take ~2-3 minutes here)
COMPARED = ["train/reward", "train/loss", "train/k", "train/grad_norm", "eval/reward", "eval/diversity"]


def start(command: list[str], tmp: Path, name: str, env: dict) -> subprocess.Popen:
    with open(tmp / f"{name}.log", "w") as log:  # a pipe nobody reads would stall the run
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_of(uri: str, name: str):
    from mlflow import MlflowClient

    from alignprop_ray.tracking import find_run

    run_id = find_run(uri, "long", name)
    return MlflowClient(uri), run_id


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def last_step(uri: str, name: str) -> int:
    try:
        client, run_id = run_of(uri, name)
        return max((m.step for m in history(client, run_id, "train/loss")), default=0) if run_id else 0
    except Exception:  # the server is still starting
        return 0


FAILED, RECOVERED = "MLflow logging failed (", "MLflow logging recovered after "
WORKER_LINE = re.compile(r"\(RayTrainWorker pid=(\d+)\)\S* \[alignprop\] (.*)")


def said_by_each_worker(log: str) -> dict[int, list[str]]:
    """The console lines of each training worker process in `log`, in the order the processes started."""
    said: dict[int, list[str]] = {}
    for match in map(WORKER_LINE.search, log.splitlines()):
        if match:
            said.setdefault(int(match[1]), []).append(match[2])
    return said


@pytest.fixture(
    scope="module", params=[SHORT, pytest.param(LONG, marks=pytest.mark.soak)], ids=["short", "long"]
)
def runs(request, ray_session, tmp_path_factory):
    form = request.param
    tmp = tmp_path_factory.mktemp("long")
    server = MlflowServer(tmp / "server")
    server.start()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sqlite = f"sqlite:///{tmp / 'mlflow.db'}"
    sets = [
        arg
        for item in [*form.overrides(), f"tracking.uri={sqlite}", f"storage.path={tmp / 'runs'}"]
        for arg in ("--set", item)
    ]
    train = [sys.executable, "-m", "alignprop_ray.cli", "train", str(TINY), "--name", "uninterrupted", *sets]
    spec = {
        "config": str(TINY),
        "overrides": [*form.overrides(), f"tracking.uri={server.uri}", f"storage.path={tmp / 'runs'}"],
        "name": "resumed",
        "fail_at": form.killed_at,
        "marker": str(tmp / "killed"),
    }
    started = time.monotonic()
    reference = start(train, tmp, "uninterrupted", env)
    resumed = start([sys.executable, "-c", RUN_WITH_FAULTS, json.dumps(spec)], tmp, "resumed", env)
    try:
        wait_for(lambda: last_step(server.uri, "resumed") >= 3, 300, "the resumed run's third step")
        server.crash()
        outage = (time.time(), time.time() + form.outage_s)
        while time.time() < outage[1]:
            assert resumed.poll() is None, (tmp / "resumed.log").read_text()[-3000:]  # still there
            time.sleep(1)
        server.start()
        codes = finish(resumed, RUN_TIMEOUT_S), finish(reference, RUN_TIMEOUT_S)
    finally:
        for process in (resumed, reference):
            if process.poll() is None:
                process.kill()
    print(f"two {form.steps}-step runs and a {form.outage_s} s outage: {time.monotonic() - started:.0f} s")
    yield form, tmp, server, sqlite, outage, codes
    server.stop()


def test_both_runs_finish(runs):
    form, tmp, _, _, _, codes = runs
    for name, code in zip(("resumed", "uninterrupted"), codes, strict=True):
        assert code == 0, (tmp / f"{name}.log").read_text()[-3000:]
    assert len((tmp / "killed").read_text().splitlines()) == form.kills


def test_the_resumed_run_trains_through_the_outage_without_waiting_on_mlflow(runs):
    form, tmp, server, _, (down, up), _ = runs
    client, run_id = run_of(server.uri, "resumed")
    stamps = {m.step: m.timestamp / 1000 for m in history(client, run_id, "train/loss")}  # when each step ran
    during = [step for step, at in stamps.items() if down < at < up]
    assert len(during) >= form.min_during, f"only steps {during[:1]}..{during[-1:]} ran during the outage"
    # Between two steps of one worker process, no wait for the server. (A restart replays the step after
    # its checkpoint: that step's time includes the restart.)
    gaps = [stamps[s] - stamps[s - 1] for s in during if s - 1 in stamps and (s - 1) % form.checkpoint_every]
    print(f"steps during the outage: {len(during)}; longest gap between two: {max(gaps):.2f} s")
    assert max(gaps) < 10.0, sorted(gaps)[-5:]
    said = said_by_each_worker((tmp / "resumed.log").read_text())
    assert any(FAILED in line for lines in said.values() for line in lines), said
    # The worker that ends the run sends everything before it ends: if it saw the outage, it says it is over.
    # (A worker killed before its next try after the outage, up to RETRY_WAIT_S[1] later, never learns that:
    # on a loaded box the kill after the outage can come first, and its successor finds the server up.)
    last = list(said.values())[-1]
    if any(FAILED in line for line in last):
        failed_at = max(i for i, line in enumerate(last) if FAILED in line)
        assert any(RECOVERED in line for line in last[failed_at:]), last


def test_nothing_is_lost_or_doubled(runs):
    from alignprop_ray.compat import mlflow_logged_image_step

    form, _, server, sqlite, _, _ = runs
    for uri, name in ((server.uri, "resumed"), (sqlite, "uninterrupted")):
        client, run_id = run_of(uri, name)
        assert client.get_run(run_id).info.status == "FINISHED", name
        assert [m.step for m in history(client, run_id, "train/loss")] == list(range(1, form.steps + 1)), name
        evaluations = list(range(0, form.steps + 1, form.eval_every))
        assert [m.step for m in history(client, run_id, "eval/reward")] == evaluations, name
        images = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
        assert sorted(s for n in images if (s := mlflow_logged_image_step(n, "eval/images")) is not None) == (
            evaluations
        ), name
        tables = [Path(a.path).name for a in client.list_artifacts(run_id, "eval_tables")]
        assert tables == [f"step_{s:07d}.parquet" for s in evaluations], name


def test_the_resumed_run_ends_with_the_metrics_of_the_uninterrupted_one(runs):
    _, _, server, sqlite, _, _ = runs
    resumed, reference = run_of(server.uri, "resumed"), run_of(sqlite, "uninterrupted")
    for key in COMPARED:
        values = [
            [(m.step, m.value) for m in history(client, run_id, key)]
            for client, run_id in (resumed, reference)
        ]
        assert values[0] == values[1], key


def test_memory_at_the_last_step_is_within_10_percent_of_the_first_checkpoint(runs):
    """The leak check: one worker process through all 300 [40] steps, the uninterrupted run's (the resumed
    run's workers are restarted at checkpoints, so none of its processes is as old: no evidence)."""
    form, _, _, sqlite, _, _ = runs
    client, run_id = run_of(sqlite, "uninterrupted")
    rss = {m.step: m.value for m in history(client, run_id, "perf/rss_mb")}
    early, late = rss[form.checkpoint_every], rss[form.steps]
    print(
        f"uninterrupted: RSS {early:.0f} MB after step {form.checkpoint_every}, {late:.0f} after {form.steps}"
    )
    assert abs(late - early) <= 0.1 * early, (early, late)
