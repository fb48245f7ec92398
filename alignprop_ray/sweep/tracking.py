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
from alignprop_ray.sweep.summary import SELECTION, UNFINISHED, SweepOutcome, error_line
from alignprop_ray.tracking import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    DEFAULT_UI_URL,
    EXCLUDED_TAG,
    KIND_TAG,
    PARETO_TAG,
    SELECT_TAG,
    SELECTION_TAG,
    STOP_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)


def child_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def child_tags(sweep: str, trial_id: str, parent_id: str) -> dict[str, str]:
    return {tracking.PARENT_TAG: parent_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id}


def find_parent(uri: str, experiment: str, sweep: str) -> str | None:
    return tracking.find_run(uri, experiment, sweep)


def parent_params(sweep) -> dict[str, str]:
    """The search as MLflow params of the parent run: each space entry, the Tune settings, and every
    base setting the space leaves alone (`base.<field>`; machine-local ones such as tracking. excepted)."""
    params = {f"space.{d.field}": d.describe() for d in sweep.domains}
    searched = tuple(d.field for d in sweep.domains)
    for key, value in sweep.reference.flat_params().items():
        overlaps = any(key == f or key.startswith(f"{f}.") or f.startswith(f"{key}.") for f in searched)
        if not (overlaps or key.startswith(tracking.IGNORED_ON_RESUME)):
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


def finish_parent(uri: str, run_id: str, outcome: SweepOutcome, status: str, searched: list[str]) -> None:
    """The summary table (CSV) and Pareto fronts as artifacts, the best trial and how it was chosen as tags,
    each ended trial that breaks the selection rule tagged on its own run; and once the sweep has
    FINISHED, the best trial's searched params and final metrics under the trials' own names.

    So in the MLflow runs table the sweep's row reads as its best trial, in the same columns as the
    trials. Only a finished sweep's best is final: a resumed sweep may find another, and MLflow never
    changes a logged param.
    """
    client = tracking.client(uri)
    rows, best, selection = outcome.rows, outcome.best, outcome.selection
    client.log_text(run_id, _csv(rows), "trials.csv")
    if outcome.fronts:
        front_rows = [{"front": label, **row} for label, front in outcome.fronts.items() for row in front]
        client.log_text(run_id, _csv(front_rows), "pareto_front.csv")
        listed = (
            f"{label}: {', '.join(r['trial'] for r in front)}" for label, front in outcome.fronts.items()
        )
        client.set_tag(run_id, PARETO_TAG, "\n".join(listed))
    if selection:
        client.set_tag(run_id, SELECT_TAG, str(selection.rule))
        client.set_tag(
            run_id, SELECTION_TAG, "\n".join(selection.explain()) or "no trial has a result to rank"
        )
    for row in rows:
        if row.get(SELECTION) and row.get("run_id") and row["status"] not in UNFINISHED:
            client.set_tag(row["run_id"], EXCLUDED_TAG, row[SELECTION])
    if best:
        client.set_tag(run_id, BEST_TRIAL_TAG, best["trial"])
        if best.get("run_id"):
            client.set_tag(run_id, BEST_RUN_TAG, best["run_id"])
            if status == "FINISHED":
                carry_run(uri, best["run_id"], run_id, searched)
    tracking.end_run(uri, run_id, status)


def first_values(uri: str, rows: list[dict], metrics: list[str]) -> dict[str, dict[str, float]]:
    """Trial id -> {metric: its value at the trial's first evaluation}, from each trial's MLflow history
    (every evaluation is logged at its step; the first is step 0, the base model)."""
    client = tracking.client(uri)
    found: dict[str, dict[str, float]] = {}
    for row in rows:
        if not (metrics and row.get("run_id")):
            continue
        values = found.setdefault(row["trial"], {})
        for metric in metrics:
            history = client.get_metric_history(row["run_id"], metric)
            if history:  # a step logged twice (a resumed run): the later value counts, as in the report
                values[metric] = min(history, key=lambda m: (m.step, -m.timestamp)).value
    return found


def carry_run(uri: str, source_id: str, target_id: str, fields: list[str]) -> None:
    """Log onto run `target_id` the params of run `source_id` that set one of `fields` (a field, or a
    section's keys below it), and the last value of each of its metrics at the step it was logged.

    Repeating it logs nothing twice (RunLogger's metrics are idempotent; an identical param is accepted).
    """
    from alignprop_ray.compat import mlflow_latest_metric_steps

    mlflow_client = tracking.client(uri)
    source = mlflow_client.get_run(source_id).data
    params = {
        key: value
        for key, value in source.params.items()
        if any(key == field or key.startswith(f"{field}.") for field in fields)
    }
    tracking.log_params(uri, target_id, params)
    steps = mlflow_latest_metric_steps(mlflow_client, source_id)
    by_step: dict[int, dict[str, float]] = {}
    for key, value in source.metrics.items():
        by_step.setdefault(steps[key], {})[key] = value
    logger = tracking.RunLogger(uri, target_id)
    for step, metrics in sorted(by_step.items()):
        logger.log_metrics(metrics, step)


def _csv(rows: list[dict]) -> str:
    import csv

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- links into the MLflow UI ------------------------------------------------------------------------


def check_ui_url(url: str) -> str:
    """`url` without a trailing slash if it can be the address of an MLflow UI; UserError otherwise."""
    from urllib.parse import urlsplit

    from alignprop_ray.errors import UserError

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and parts.hostname and not (parts.query or parts.fragment)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0-65535
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"--ui-url must look like http://HOST[:PORT][/PATH], got {url!r}")
    return url.rstrip("/")


def ui_base(uri: str, ui_url: str | None) -> str:
    """The UI the user will open: `ui_url`, else the tracking server itself, else `mlflow ui`'s address."""
    if ui_url:
        return ui_url.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


def runs_table_url(base: str, experiment_id: str, metric: str | None = None, mode: str = "max") -> str:
    """The experiment's runs table, best `metric` first (MLflow 3's UI opens an experiment on its GenAI
    view unless the URL asks for model training; sorted by a metric, it lists child runs flat)."""
    from urllib.parse import quote

    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if metric:
        url += f"&orderByKey={quote(f'metrics.`{metric}`', safe='')}&orderByAsc={str(mode == 'min').lower()}"
    return url


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's compare page of `run_ids`: params side by side, parallel coordinates, scatter plots.

    Its route takes JSON lists (`?runs=["a","b"]&experiments=["1"]`), percent-encoded here so that the
    link survives a terminal's link detection and a copy into a shell.
    """
    from urllib.parse import quote

    def as_list(items: list[str]) -> str:
        return quote(json.dumps(list(items), separators=(",", ":")), safe="")

    return f"{base}/#/compare-runs?runs={as_list(run_ids)}&experiments={as_list(experiment_ids)}"


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
