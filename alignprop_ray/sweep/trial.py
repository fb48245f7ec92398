"""One Tune trial = one Ray Train run (Ray 2.60's Train-inside-Tune pattern).

`run_trial` is the Tune function trainable. It turns the sampled point into an experiment, then calls
`run_training`, whose Ray Train reports reach Tune through `EvalReportCallback`. The Train run and
its MLflow child run are named after the trial id, so a restarted or resumed trial continues both (Train
restores its last checkpoint from storage; MLflow finds the run by name) instead of starting over.

A trial trains only while it holds one of the sweep's slots (slots.py: after `--resume`, Tune alone
would start every restored trial at once), and its workers wait for room in the cluster as long as
failure.wait_for_room_s allows (train/placement.py): a trial without room waits, it does not fail.

A trial can be started again after its run finished: Tune saves its state every few seconds, and a sweep
driver killed in between resumes with the trial still marked running. Its Train run then has nothing to
train and reports nothing, so the trial hands Tune the run's last result again (from the run's last
checkpoint in storage); its MLflow run, already FINISHED, is not touched.
"""

from __future__ import annotations

import os
import posixpath
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from alignprop_ray.sweep.slots import trial_slot
from alignprop_ray.sweep.stoppers import TOTAL_STEPS
from alignprop_ray.sweep.tracking import child_name, child_tags


@dataclass
class TrialContext:
    """What every trial needs besides its point (handed over with `tune.with_parameters`)."""

    sweep: Any  # alignprop_ray.sweep.config.Sweep
    parent_run_id: str
    tracking_uri: str  # the store, or a local MLflow server in front of it (mlflow_server.py)
    train_storage: str  # where each trial's Ray Train run keeps its checkpoints
    slots: Any = None  # the sweep's TrialSlots actor (slots.py): no more trials train at once than this
    concurrency: int = 1  # how many slots it has

    def experiment_for(self, point: dict[str, Any]):
        decoded = {d.field: d.decode(point[d.field]) for d in self.sweep.domains if d.field in point}
        overrides = [f"tracking.uri={self.tracking_uri}", f"storage.path={self.train_storage}"]
        return self.sweep.experiment(decoded, overrides)


def run_trial(point: dict[str, Any], context: TrialContext) -> None:
    """Tune trainable: train the experiment for `point` to completion (or until Tune stops it)."""
    import ray.tune

    from alignprop_ray.train.launch import run_training

    if context.tracking_uri != context.sweep.reference.tracking.uri:
        # a local server in front of SQLite that ends with the sweep: MLflow's "View run at" links would die
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = context.experiment_for(point)
    name = child_name(context.sweep.name, trial_id)
    done = final_result(cfg, name)  # the Train run had reached its last step before this attempt
    if done is None or not _run_finished(cfg, name):
        slot = trial_slot(context.slots, trial_id, context.concurrency) if context.slots else nullcontext()
        with slot:
            run_training(
                cfg,
                name,
                tags=child_tags(context.sweep.name, trial_id, context.parent_run_id),
                callbacks=[EvalReportCallback(cfg.train.steps)],
            )
    if done is not None:  # nothing was trained, so nothing reported: Tune gets the last result again
        ray.tune.report(done)


def final_result(cfg, name: str) -> dict[str, Any] | None:
    """The result the trial forwarded to Tune at its last step, rebuilt from the last checkpoint of its
    Train run (Ray keeps each checkpoint's reported metrics with it); None if the run has not finished."""
    from ray.train import Result

    try:
        result = Result.from_path(posixpath.join(cfg.storage.path, name))
    except Exception:  # no run folder yet, or no checkpoint in it
        return None
    steps = cfg.train.steps
    if result.checkpoint is None or (result.metrics or {}).get("step") != steps:
        return None
    # As EvalReportCallback builds it: the last step evaluates, so its metrics hold every eval/* value.
    return {
        **result.metrics,
        "eval/step": steps,
        TOTAL_STEPS: steps,
        CHECKPOINT_PATH_KEY: result.checkpoint.path,
    }


def _run_finished(cfg, name: str) -> bool:
    from alignprop_ray import tracking

    uri = cfg.tracking.uri
    run_id = tracking.retried(uri, tracking.find_run, uri, cfg.tracking.experiment, name)
    return (
        run_id is not None
        and tracking.retried(uri, tracking.client(uri).get_run, run_id).info.status == "FINISHED"
    )


class EvalReportCallback(TuneReportCallback):
    """Forward Train reports to Tune from the first evaluation on, with the latest eval metrics carried.

    Workers report every step but evaluate every `train.eval_every` steps, and Tune requires its metric in
    every result: so each forwarded result holds the newest value of every metric seen so far (eval/*
    from the last evaluation, `checkpoint_path` of the last checkpoint), and `eval/step` says when that
    evaluation ran, `total_steps` how many steps the trial has. Steps before the first evaluation are not
    forwarded.
    """

    def __init__(self, total_steps: int):
        super().__init__()
        self._latest: dict[str, Any] = {TOTAL_STEPS: total_steps}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = dict(metrics[0])
        if any(key.startswith("eval/") for key in report):
            report["eval/step"] = report.get("step")
        self._latest.update(report)
        if checkpoint:
            self._latest[CHECKPOINT_PATH_KEY] = checkpoint.path
        if "eval/step" in self._latest:
            super().after_report(run_context, [dict(self._latest)], None)
