"""Served rewards on Ray Serve, in the shared Ray instance: one pool of deployments for the direct checks,
one 2-trial sweep for the shared pool and a replica that crashes mid-run, one sweep whose reward cannot start.

The design's math and the config are checked without Ray in tests/test_served_rewards.py.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time

import pytest
import torch
import yaml

from alignprop_ray.cli import main
from alignprop_ray.config import parse_experiment
from alignprop_ray.rewards.mixture import build_reward
from alignprop_ray.serving.client import served_reward
from alignprop_ray.serving.deployment import EXIT_HOOK_ENV
from alignprop_ray.serving.specs import APP_PREFIX, SERVED_TAG, served_terms
from tests.helpers import most_at_once, perturb, tiny_learner, tiny_sweep, train_steps
from tests.served_probe import SCALE_ENV
from tests.test_config import BASE

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]

# num_cpus 0: the shared instance has 2 CPUs, and the trials' workers take them
AESTHETIC = {"arch": "tiny", "objective": "target", "target": 10.0}
SERVE = {"num_cpus": 0, "max_batch_size": 4}
PROBE = "tests.served_probe:env_scaled_brightness"


def served_spec(**runtime_env) -> dict:
    return {"aesthetic": {**AESTHETIC, "serve": {**SERVE, "runtime_env": runtime_env}}}


def experiment_of(reward: dict):
    data = copy.deepcopy(BASE)
    data["reward"] = reward
    return parse_experiment(data, None, env={}, check_files=False)


def reward_apps() -> dict:
    from alignprop_ray.serving.pool import serve_status  # under the lock the sweep's own calls hold

    return {name: app for name, app in serve_status().applications.items() if name.startswith(APP_PREFIX)}


@pytest.fixture(scope="module")
def pool(ray_session):
    """The tiny aesthetic and the env-reading probe plugin (its runtime_env sets the scale to 3), served."""
    from alignprop_ray.serving.pool import reward_pool

    reward = {**served_spec(), PROBE: {"serve": {**SERVE, "runtime_env": {"env_vars": {SCALE_ENV: "3"}}}}}
    with reward_pool(served_terms(experiment_of(reward))):
        yield reward


def test_served_reward_gives_the_local_reward_and_lora_gradient(pool):
    """One AlignProp step on the tiny model (lr 0, a perturbed adapter so both LoRA factors get gradient),
    scored by the tiny aesthetic in this process and through its deployment. Tolerance: the reward to
    1e-6 and the LoRA gradient to rtol 1e-4 in float32 (the replica runs the same float32 model on its own
    torch threads; the worker multiplies the returned dR/dpixels by the upstream gradient)."""
    results, grads = [], []
    for served in (None, served_reward):
        reward = build_reward(served_spec(), device="cpu", dtype=torch.float32, served=served)
        learner = tiny_learner(reward, lr=0.0)
        perturb(learner.params)
        results += train_steps(learner, 1, truncation="fixed:3")
        grads.append(torch.cat([p.grad.flatten() for p in learner.params]))
    local, remote = results
    assert remote.reward == pytest.approx(local.reward, abs=1e-6)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * float(grads[0].abs().max()))


def test_a_reward_sees_its_runtime_env_and_the_trainer_does_not(pool):
    """The probe multiplies by $ALIGNPROP_TEST_REWARD_SCALE: 3 in its replica (runtime_env), unset here."""
    images = torch.rand(2, 3, 16, 16)
    spec = {PROBE: pool[PROBE]}
    served = build_reward(spec, device="cpu", dtype=torch.float32, for_training=False, served=served_reward)
    local = build_reward({PROBE: {}}, device="cpu", dtype=torch.float32, for_training=False)
    assert SCALE_ENV not in os.environ
    torch.testing.assert_close(served(images, ["a", "b"]).total, 3 * local(images, ["a", "b"]).total)


# --- a sweep: one deployment for two concurrent trials, and a replica that crashes while they run ------


@pytest.fixture(scope="module")
def sweep_run(ray_session, tmp_path_factory):
    """2 trials at once on one served tiny aesthetic whose replica exits while it holds its 11th request (the
    test hook, set through the reward's runtime_env): 10 are the two trials' first evaluations (5 prompts x
    2 seeds, 2 images a request), so the 11th is about a first training step's. A thread records the reward
    applications and their running replicas every 0.2 s while the sweep runs."""
    from alignprop_ray.sweep.config import parse_sweep
    from alignprop_ray.sweep.launch import run_sweep

    tmp = tmp_path_factory.mktemp("served-sweep")
    marker = tmp / "replica-exited"
    reward = served_spec(env_vars={EXIT_HOOK_ENV: f"{marker}:11"})
    data = tiny_sweep(
        {"train.lr": {"grid": [0.01, 0.02]}},
        base={"reward": reward, "train": {"steps": 2, "eval_every": 2, "checkpoint_every": 2}},
        name="served",
        tune={"algorithm": "grid", "max_concurrent_trials": 2},
    )
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = parse_sweep(data, tmp, [f"tracking.uri={uri}", f"storage.path={tmp / 'runs'}"], env={})
    seen, done = [], threading.Event()
    others = set(reward_apps())  # the `pool` fixture's, when its tests ran first

    def watch():
        while not done.wait(0.2):
            apps = {name: app for name, app in reward_apps().items() if name not in others}
            running = {
                name: app.deployments[name].replica_states.get("RUNNING", 0)
                for name, app in apps.items()
                if name in app.deployments
            }
            seen.append(running)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outcome = run_sweep(sweep)
    finally:
        done.set()
        watcher.join()
    return outcome, uri, marker, seen, served_terms(sweep.reference)[0].app


def test_two_concurrent_trials_share_one_deployment(sweep_run):
    from mlflow import MlflowClient

    outcome, uri, _, seen, app = sweep_run
    assert outcome.exit_code == 0 and [row["status"] for row in outcome.rows] == ["completed"] * 2
    assert {name for snapshot in seen for name in snapshot} == {app}  # one application, started once
    assert max(sum(snapshot.values()) for snapshot in seen) == 1  # never more than one replica
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    windows = [(r.info.start_time, r.info.end_time) for r in children]
    assert len(children) == 2 and most_at_once(windows) == 2, windows  # the trials ran side by side
    for run in runs:  # the parent and both trials record the served reward and its settings
        served = json.loads(run.data.tags[SERVED_TAG])
        assert list(served) == [app] and served[app]["serve"]["max_batch_size"] == 4
    assert app not in reward_apps()  # the sweep stopped it at the end


def test_a_crashed_replica_is_restarted_and_the_step_retries_once(sweep_run):
    from alignprop_ray.compat import ray_logs_dir

    outcome, _, marker, _, app = sweep_run
    assert marker.exists(), "the replica never exited"
    # the only replica died mid-request, the trials finished: Serve started another, and the retry reached it
    retry = f"reward aesthetic: request to {app} failed (ActorDiedError"
    logs = [path.read_text(errors="replace") for path in ray_logs_dir().glob("worker-*.out")]
    assert any(retry in text and "retrying once" in text for text in logs)
    assert outcome.exit_code == 0


def test_a_runtime_env_that_does_not_build_stops_the_sweep_before_any_trial(
    ray_session, tmp_path, monkeypatch, capsys
):
    """A working_dir the replicas' node cannot fetch (a package URI whose file is not there): one line, exit
    2, no MLflow run, no reward application left. Not a pip requirement: from inside a virtualenv, Ray first
    copies the whole virtualenv for the replicas (7 GB here, with torch), more than a CI disk may hold."""
    monkeypatch.chdir(tmp_path)
    reward = served_spec(working_dir=f"file://{tmp_path / 'missing-0.1.zip'}")
    data = tiny_sweep({"train.lr": {"grid": [0.01]}}, base={"reward": reward}, name="unbuilt")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    started, before = time.monotonic(), set(reward_apps())
    assert main(["sweep", "s.yaml", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("alignprop-ray")]  # not MLflow's INFO
    assert len(err) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert (
        err[0].startswith("alignprop-ray sweep: error: reward.aesthetic.serve: ") and "missing-0.1" in err[0]
    )
    assert "did not start: FileNotFoundError" in err[0], err[0]
    assert set(reward_apps()) == before
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]  # no experiment, no run
    assert time.monotonic() - started < 120
