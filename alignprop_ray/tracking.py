"""MLflow tracking: one run per training run, found again by name on resume; rank 0 logs into it.

Runs are created by the driver (before any worker starts), so a worker restart or a rerun of the
same command never creates a second run: workers receive the run id and only log into it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NAME_TAG = "alignprop.name"  # our run name; unique within an experiment
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under their parent
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on one param value


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it with an absolute artifact location for SQLite stores.

    MLflow's default artifact root for a database store is `./mlruns` relative to whichever process
    logs first, which for Ray workers is not the user's directory: pin it next to the database.
    """
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another trial: use theirs
        return mlflow_client.get_experiment_by_name(name).experiment_id


def find_run(uri: str, experiment: str, name: str) -> str | None:
    """The id of the run called `name` in `experiment`, if one exists."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def start_run(
    uri: str,
    experiment: str,
    name: str,
    params: Mapping[str, str],
    config_yaml: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """(run id, resumed): the existing run called `name`, or a new one with params and the config."""
    existing = find_run(uri, experiment, name)
    if existing is not None:
        client(uri).update_run(existing, status="RUNNING")
        return existing, True
    mlflow_client = client(uri)
    run = mlflow_client.create_run(
        ensure_experiment(uri, experiment), run_name=name, tags={NAME_TAG: name, **(tags or {})}
    )
    log_params(uri, run.info.run_id, params)
    mlflow_client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id, False


def changed_param(uri: str, run_id: str, params: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first of `params` the run logged with another value, as (key, logged, now); keys the run never
    logged do not count (runs from older versions)."""
    logged = client(uri).get_run(run_id).data.params
    for key, value in params.items():
        if key in logged and logged[key] != value[:MAX_PARAM_CHARS]:
            return key, logged[key], value
    return None


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client(uri).log_batch(run_id, params=items[start : start + 100])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


class RunLogger:
    """Rank 0's handle on the run: metrics, images, eval tables and the adapter.

    `skip_through` is the last step already logged before a restart: training replays the steps after
    the last checkpoint, and their metrics are not logged a second time.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)
        self.skip_through = self.last_logged_step()

    def last_logged_step(self, keys: tuple[str, ...] = ("train/loss", "eval/reward")) -> int:
        steps = [m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image, key: str, step: int) -> None:
        if step > self.skip_through:
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_table(self, table, step: int, folder: str = "eval_tables") -> None:
        """One Parquet file per evaluation (append-only, so a restart can never half-overwrite it)."""
        import pyarrow.parquet as pq

        if step <= self.skip_through:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"step_{step:07d}.parquet")
            pq.write_table(table, path)
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_dir(self, directory: str | os.PathLike, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_json(self, data: Any, name: str) -> None:
        buffer = io.StringIO()
        json.dump(data, buffer, indent=2, sort_keys=True)
        self.client.log_text(self.run_id, buffer.getvalue(), name)
