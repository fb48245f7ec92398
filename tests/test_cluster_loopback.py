"""A real two-node Ray cluster on loopback runs the smoke sweep submitted with `ray job submit`, and a
2-worker training run survives losing its worker node (RELIABILITY.md).

Head (127.0.0.2) and worker (127.0.0.3) are separate `ray start` processes; MLflow is an `mlflow
server` on 127.0.0.1 and is read back over its REST API. This is clusters/aws.yaml in miniature: the
job driver runs on the head, Train workers land on both nodes, tracking goes over HTTP. A node is lost
by killing all of its processes at once (SIGKILL), as when a spot instance is reclaimed.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.own_ray]
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "clusters" / "local_loopback.sh"


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix socket paths under this folder must stay below 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="apl-", dir="/tmp"))
    env = {
        **os.environ,
        "LOOPBACK_DIR": str(state),
        "HEAD_CPUS": "1",
        "WORKER_CPUS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=240)
    try:
        exported = subprocess.run(
            ["bash", str(SCRIPT), "env"], env=env, check=True, capture_output=True, text=True
        )
        for line in exported.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def mlflow_api(env, path, body=None):
    url = env["ALIGNPROP_TRACKING_URI"] + "/api/2.0/mlflow/" + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_smoke_sweep_submitted_as_a_job_on_two_nodes(cluster):
    experiment = f"loopback-{uuid.uuid4().hex[:6]}"
    # Two trials (the truncation extremes), one Train worker each: one on each node at the same time.
    job = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--working-dir",
            str(ROOT),
            "--",
            "alignprop-ray",
            "sweep",
            "sweeps/smoke.yaml",
            "--set",
            f"name={experiment}",
            "--set",
            f"base.tracking.experiment={experiment}",
            "--set",
            "space.train.lr={grid: [0.01]}",
            # the job and its placement are under test, not training: half the shipped size and length
            "--set",
            "base.model.resolution=32",
            "--set",
            "base.sampling.steps=4",
            "--set",
            "base.train.steps=4",
        ],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    found = mlflow_api(cluster, f"experiments/get-by-name?experiment_name={experiment}")
    experiment_id = found["experiment"]["experiment_id"]
    runs = mlflow_api(cluster, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    children = [r for r, t in zip(runs, tags, strict=True) if "mlflow.parentRunId" in t]
    parents = [r for r, t in zip(runs, tags, strict=True) if "mlflow.parentRunId" not in t]
    assert len(parents) == 1 and len(children) >= 2
    for run in children:
        assert run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"].get("metrics", [])}
        assert {"train/reward", "eval/reward", "eval/diversity"} <= keys


# --- a lost worker node --------------------------------------------------------------------------------

# Two workers of one CPU each on two one-CPU nodes: one worker on each. Checkpoints every 4 steps. 40 steps of
# 8 sampling steps (about 0.3 s a step here): the node is lost mid-run, not after a run that already ended.
STEPS = 40
TWO_WORKERS = [
    "scaling.num_workers=2",
    "model.resolution=32",
    "sampling.steps=8",
    "truncation=fixed:1",
    "train.batch_size=1",
    "prompts.train=tiny",
    "prompts.eval=tiny",
    f"train.steps={STEPS}",
    "train.eval_every=8",
    "train.checkpoint_every=4",
    "failure.max_failures=2",
]
JOB_TIMEOUT_S = 600  # bound on a job's end once its node is lost (~1-2 minutes here)


def submit_train(cluster, name: str, *extra: str, env_vars: dict | None = None) -> None:
    sets = [arg for item in [*TWO_WORKERS, f"tracking.experiment={name}", *extra] for arg in ("--set", item)]
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    command = [
        "ray",
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        name,
        "--working-dir",
        str(ROOT),
        *runtime,
    ]
    command += ["--", "alignprop-ray", "train", "sweeps/tiny.yaml", "--name", name, *sets]
    done = subprocess.run(command, env=cluster, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def jobs_api(cluster, path: str, method: str = "GET") -> dict:
    """Ray's Jobs REST API on the head (the dashboard), with the cluster's token. Its JSON is stable where
    `ray job status` text is not: Ray 2.60 prints a finished job as "Job 'x' succeeded"."""
    token = Path(cluster["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(
        f"{cluster['RAY_ADDRESS']}/api/jobs/{path}",
        method=method,
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def job_status(cluster, name: str) -> str:
    return jobs_api(cluster, name)["status"]


def wait_for_job(cluster, name: str, timeout: float) -> tuple[str, str]:
    """(final status, logs) of a job; the job is stopped if it runs past `timeout`."""
    deadline, status = time.monotonic() + timeout, "UNKNOWN"
    while time.monotonic() < deadline:
        status = job_status(cluster, name)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    else:
        jobs_api(cluster, f"{name}/stop", method="POST")
    return status, jobs_api(cluster, f"{name}/logs")["logs"]


def outline(logs: str) -> str:
    """A job's log without its step lines and Ray's own chatter: headers, failures, the last lines."""
    kept = [
        line
        for line in logs.splitlines()
        if ("[alignprop]" in line and " step " not in line) or "rror" in line or "fail" in line.lower()
    ]
    return "\n".join(kept[-60:]) + "\n...\n" + logs[-1500:]


def logged_steps(cluster, name: str, key: str) -> list[int]:
    """Steps of `key` in the run called `name` (its own experiment), from the MLflow server."""
    try:
        found = mlflow_api(cluster, f"experiments/get-by-name?experiment_name={name}")
        body = {"experiment_ids": [found["experiment"]["experiment_id"]], "max_results": 1}
        run_id = mlflow_api(cluster, "runs/search", body)["runs"][0]["info"]["run_id"]
        history = mlflow_api(
            cluster, f"metrics/get-history?run_id={run_id}&metric_key={key}&max_results=1000"
        )
    except Exception:  # not created yet
        return []
    return sorted(int(m.get("step", 0)) for m in history.get("metrics", []))


def run_status(cluster, name: str) -> str:
    found = mlflow_api(cluster, f"experiments/get-by-name?experiment_name={name}")
    body = {"experiment_ids": [found["experiment"]["experiment_id"]], "max_results": 1}
    return mlflow_api(cluster, "runs/search", body)["runs"][0]["info"]["status"]


def wait_for_step(cluster, name: str, step: int, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(cluster, name, "train/loss"), default=0) < step:
        assert time.monotonic() < deadline, f"{name} did not reach step {step}"
        assert job_status(cluster, name) in ("PENDING", "RUNNING"), wait_for_job(cluster, name, 0)
        time.sleep(1)


def lose_worker_node(cluster) -> None:
    """SIGKILL every process of the worker node at once (its raylet, agents and Train worker), as when a
    spot instance is reclaimed. Killing the raylet alone is not that: its workers outlive it for a while,
    and a short run could finish before the head notices."""
    group = (Path(cluster["LOOPBACK_DIR"]) / "worker.pid").read_text().strip()
    listed = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "-g", group], capture_output=True, text=True, timeout=10
    )
    print(f"the worker node's processes, all killed:\n{listed.stdout}")
    assert "RayTrainWorker" in listed.stdout, listed.stdout  # the run has a worker there
    os.killpg(int(group), signal.SIGKILL)


def restart_worker_node(cluster) -> None:
    subprocess.run(["bash", str(SCRIPT), "restart-worker"], env=cluster, check=True, timeout=240)


@pytest.mark.soak  # short forms in make test: the next test (a node lost for good) and test_reliability_outage's killed worker
def test_a_lost_worker_node_costs_only_the_steps_since_the_last_checkpoint(cluster):
    name = f"lost-node-{uuid.uuid4().hex[:6]}"
    submit_train(cluster, name)
    wait_for_step(cluster, name, 6)  # past the checkpoint of step 4
    lose_worker_node(cluster)
    restart_worker_node(cluster)  # as an autoscaler replaces a reclaimed spot node
    status, logs = wait_for_job(cluster, name, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", logs[-3000:]
    resumed = re.search(r"resuming after step (\d+)\b", logs)
    assert resumed and int(resumed[1]) % 4 == 0 and 4 <= int(resumed[1]) < STEPS, outline(logs)
    assert run_status(cluster, name) == "FINISHED"
    assert logged_steps(cluster, name, "train/loss") == list(range(1, STEPS + 1))  # each step once
    assert logged_steps(cluster, name, "eval/reward") == list(range(0, STEPS + 1, 8))


@pytest.mark.soak  # short form in make test: test_room.py's restart bound, without Ray
def test_a_lost_worker_node_that_never_comes_back_fails_within_the_wait_saying_how_to_resume(cluster):
    name = f"node-gone-{uuid.uuid4().hex[:6]}"
    # Ray Train's start timeout cut to 20 s, so one try of 20 s is the whole wait (default: 60 s a try).
    submit_train(
        cluster,
        name,
        "failure.wait_for_workers_s=20",
        env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"},
    )
    try:
        wait_for_step(cluster, name, 6)
        lose_worker_node(cluster)
        lost = time.monotonic()
        status, logs = wait_for_job(cluster, name, JOB_TIMEOUT_S)
        print(f"the run ended {time.monotonic() - lost:.0f} s after its node was lost")
    finally:
        restart_worker_node(cluster)  # for the tests after this one
    assert status == "FAILED", logs[-3000:]
    line = next(line for line in reversed(logs.splitlines()) if line.startswith("alignprop-ray train: "))
    assert line.startswith(
        "alignprop-ray train: training failed: the cluster had no room for the run's 2 workers within "
        "failure.wait_for_workers_s (a lost node not replaced, or too few resources); resume from the "
        "checkpoint of step "
    ), line
    assert line.endswith(f" --name {name}`"), line
    assert run_status(cluster, name) == "FAILED"
