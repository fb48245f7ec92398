"""A real two-node Ray cluster on loopback runs the smoke sweep submitted with `ray job submit`.

Head (127.0.0.2) and worker (127.0.0.3) are separate `ray start` processes; MLflow is an `mlflow
server` on 127.0.0.1 and is read back over its REST API. This is clusters/aws.yaml in miniature: the
job driver runs on the head, Train workers land on both nodes, tracking goes over HTTP.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
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
