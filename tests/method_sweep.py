"""The one sweep over the method rows, shared by two test files (the `method_sweep` fixture, tests/conftest.py):

- tests/test_methods.py: every row that trains the tiny sd model, on 2 Ray workers in sync;
- tests/test_mlflow_ui.py: the finished sweep as a user meets it, its console and links, in a browser.

It runs as a user runs it: `alignprop-ray sweep` in a subprocess joined to the session's Ray instance, with
--ui-url and --register; then `--resume --verbose` on the finished sweep, which trains nothing but prints
Tune's console in full. From the repository root: the Ray workers import docs/extending.md's no-op method,
a row named by import path (tests/noop_method.py), from the driver's working directory, as Ray puts it on
their path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from tests.helpers import free_port, tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
MODEL = "methods-best"  # --register's model name
EXPERIMENT = "methods"
STEPS = 3


def sweep_data(tmp: Path, rows) -> dict:
    """A grid over `rows` ((method row, its settings) pairs): one 2-worker trial each."""
    base = {
        "model": {"resolution": 32},
        "truncation": None,
        "reward": {"saturation": 1.0},
        "train": {"steps": STEPS, "eval_every": STEPS, "checkpoint_every": STEPS},
        # half a CPU a worker: two 2-worker trials at once on 2 cores, so that one trial's start-up (process
        # starts, imports, the first evaluation) overlaps the other's training
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "tracking": {"experiment": EXPERIMENT, "uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "storage": {"path": str(tmp / "runs")},
    }
    grid = [{"name": row.name, **settings} for row, settings in rows]
    tune = {"algorithm": "grid", "max_concurrent_trials": 2}
    return tiny_sweep({"method": {"grid": grid}}, base=base, tune=tune, name=EXPERIMENT)


def run_method_sweep(ray_session, tmp: Path, rows) -> SimpleNamespace:
    from mlflow import MlflowClient

    data = sweep_data(tmp, rows)
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(path)]

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    first = run("--ui-url", f"http://127.0.0.1:{port}", "--register", MODEL, timeout=900)
    again = run("--resume", "--verbose", timeout=600)
    uri = data["base"]["tracking"]["uri"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return SimpleNamespace(
        tmp=tmp,
        uri=uri,
        port=port,
        first=first,
        again=again,
        client=client,
        experiment=experiment,
        parent=client.get_run(parent.info.run_id),  # after the resume
        children=children,
        trials={run.data.params["method.name"]: run for run in children},
    )
