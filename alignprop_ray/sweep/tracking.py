"""MLflow for sweeps: one parent run per sweep (found again by the sweep name), one child run per trial.

Child runs are created by `run_training` inside each trial, named `<sweep>-<trial id>` and tagged with
the parent's id (`mlflow.parentRunId`), so the UI nests them and a resumed trial finds its run again.
The driver (this module) owns the parent and closes child runs that Tune stopped: a stopped trial's
process is ended before it could mark its run finished.
"""

from __future__ import annotations

import io
import json
from typing import Any

from ray.tune import Callback

from alignprop_ray import tracking
from alignprop_ray.sweep.stoppers import STOP_REASON, TOTAL_STEPS, early_stop_reason, is_final
from alignprop_ray.sweep.summary import error_line

KIND_TAG = "alignprop.kind"  # "sweep" on parent runs
SWEEP_TAG = "alignprop.sweep"
TRIAL_TAG = "alignprop.trial_id"
STOP_TAG = "alignprop.stop_reason"


def child_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def child_tags(sweep: str, trial_id: str, parent_id: str) -> dict[str, str]:
    return {tracking.PARENT_TAG: parent_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id}


def find_parent(uri: str, experiment: str, sweep: str) -> str | None:
    return tracking.find_run(uri, experiment, sweep)


def parent_params(sweep) -> dict[str, str]:
    """The search as MLflow params of the parent run: each space entry, the Tune settings, and every
    base setting the space leaves alone (`base.<field>`; machine-local ones such as tracking. excepted)."""
    from alignprop_ray.train.launch import IGNORED_ON_RESUME

    params = {f"space.{d.field}": d.describe() for d in sweep.domains}
    searched = tuple(d.field for d in sweep.domains)
    for key, value in sweep.reference.flat_params().items():
        overlaps = any(key == f or key.startswith(f"{f}.") or f.startswith(f"{key}.") for f in searched)
        if not (overlaps or key.startswith(IGNORED_ON_RESUME)):
            params[f"base.{key}"] = value
    tune = sweep.config.tune
    params.update(
        {
            "tune.algorithm": tune.algorithm,
            "tune.num_samples": str(tune.num_samples),
            "tune.scheduler": tune.scheduler,
            "tune.metric": ",".join(tune.metrics),
            "tune.mode": ",".join(tune.modes),
        }
    )
    return params


def start_parent(uri: str, experiment: str, sweep, sweep_yaml: str) -> tuple[str, bool]:
    """(run id, resumed): the sweep's parent run, with the space and Tune settings as params."""
    run_id, resumed = tracking.start_run(
        uri,
        experiment,
        sweep.name,
        parent_params(sweep),
        sweep_yaml,
        {KIND_TAG: "sweep", SWEEP_TAG: sweep.name},
    )
    if not resumed:
        client = tracking.client(uri)
        if sweep.source:
            client.log_artifact(run_id, sweep.source)  # the file as written
        space = {d.field: {d.kind: list(d.values)} for d in sweep.domains}
        client.log_text(run_id, json.dumps(space, indent=2, default=str), "space.json")
        client.log_text(run_id, sweep.reference.to_yaml(), "base_experiment.yaml")
    return run_id, resumed


def finish_parent(
    uri: str, run_id: str, rows: list[dict], best: dict | None, pareto: list[dict], status: str
) -> None:
    """The summary table (CSV) and Pareto front as artifacts, the best trial as tags and metrics."""
    client = tracking.client(uri)
    client.log_text(run_id, _csv(rows), "trials.csv")
    if pareto:
        client.log_text(run_id, _csv(pareto), "pareto_front.csv")
    if best:
        client.set_tag(run_id, "alignprop.best_trial", best["trial"])
        if best.get("run_id"):
            client.set_tag(run_id, "alignprop.best_run_id", best["run_id"])
        for key, value in best.items():
            if key.startswith(("eval/", "train/")) and isinstance(value, float):
                client.log_metric(run_id, f"best/{key}", value)
    tracking.end_run(uri, run_id, status)


def _csv(rows: list[dict]) -> str:
    import csv

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class ChildRunCloser(Callback):
    """Marks the MLflow run of a trial that Tune stopped early (KILLED), that failed (FAILED) or that a
    stopper flagged at its last step (left FINISHED) with the reason as the `alignprop.stop_reason` tag.

    Runs in the sweep driver and talks to the tracking store directly (its URI never changes, unlike a
    per-run local server's), so it still works after `Tuner.restore` unpickles it.
    """

    def __init__(self, uri: str, experiment: str, sweep: str, steps: int):
        self.uri, self.experiment, self.sweep, self.steps = uri, experiment, sweep, steps

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        result = trial.last_result or {}
        reason = result.get(STOP_REASON)
        early = not is_final({TOTAL_STEPS: self.steps, **result}) if "step" in result else False
        if reason is None and early:
            reason = early_stop_reason(result, self.steps)
        if reason:  # a trial that ran to its last step has ended its run itself
            self._mark(trial.trial_id, reason, "KILLED" if early else None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._mark(trial.trial_id, f"error: {error_line(trial)}", "FAILED")

    def _mark(self, trial_id: str, reason: str, status: str | None) -> None:
        run_id = tracking.find_run(self.uri, self.experiment, child_name(self.sweep, trial_id))
        if run_id is None:  # the trial died before creating its run
            return
        client = tracking.client(self.uri)
        client.set_tag(run_id, STOP_TAG, reason)
        if status:
            client.set_terminated(run_id, status=status)
