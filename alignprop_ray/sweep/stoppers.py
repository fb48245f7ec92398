"""Trial stoppers: mode collapse (diversity falls below a threshold) and NaN/inf metrics.

The rules are plain functions of the reported values (unit-tested without Ray). `TrialStopper` applies them
as a Tune stopper and writes its reason into the result it stops on (`stop_reason`): Tune keeps that dict
as the trial's last result, so the reason reaches the summary, the MLflow tag and a resumed sweep. At a
trial's last step it records the reason without stopping, so the trial still saves its adapter.
It is also a Tune callback, only so that Tune saves and restores the first evaluation of each trial with
the experiment state (a resumed sweep compares against the same reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback, Stopper

STOP_REASON = "stop_reason"  # result key (and, as alignprop.stop_reason, the MLflow tag)
TOTAL_STEPS = "total_steps"  # result key: the trial's train.steps (added by trial.EvalReportCallback)


def is_final(result: Mapping[str, Any]) -> bool:
    """The result of the trial's last step: stopping it then would only cut its final save short."""
    return result.get("step", 0) >= result.get(TOTAL_STEPS, math.inf)


@dataclass(frozen=True)
class CollapseRule:
    """Collapse: `metric` (within-prompt diversity) below `min_absolute`, or below a fraction of its first value."""

    metric: str = "eval/diversity"
    min_absolute: float | None = None
    min_relative_to_first: float | None = None

    def reason(self, value: float, first: float | None) -> str | None:
        if not math.isfinite(value):
            return None  # the NaN rule reports that
        if self.min_absolute is not None and value < self.min_absolute:
            return f"collapse: {self.metric} {value:.4g} < {self.min_absolute:g}"
        if self.min_relative_to_first is not None and first is not None and math.isfinite(first):
            limit = self.min_relative_to_first * first
            if value < limit:
                return (
                    f"collapse: {self.metric} {value:.4g} < {self.min_relative_to_first:g} x first "
                    f"evaluation {first:.4g}"
                )
        return None


def nan_reason(result: Mapping[str, Any], metrics: Iterable[str]) -> str | None:
    """The first of `metrics` present in `result` with a NaN/inf value, as a reason."""
    for name in metrics:
        value = result.get(name)
        if isinstance(value, int | float) and not math.isfinite(value):
            return f"nan: {name} is {value}"
    return None


def early_stop_reason(result: Mapping[str, Any], default_steps: int) -> str:
    """Why a trial without a stopper's reason ended before its last step: a scheduler (ASHA) cut it."""
    total = int(result.get(TOTAL_STEPS, default_steps))
    return f"scheduler: stopped early at step {int(result.get('step', 0))} of {total}"


class TrialStopper(Stopper, Callback):
    """Stop a trial on NaN/inf in `nan_metrics` or on collapse; record why in the result."""

    def __init__(self, collapse: CollapseRule | None, nan_metrics: Iterable[str] = ()):
        self.collapse = collapse
        self.nan_metrics = tuple(nan_metrics)
        self.first: dict[str, float] = {}  # trial id -> first evaluation of the collapse metric

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Stop on a reason, except at the last step, where the reason is only recorded."""
        reason = self.reason(trial_id, result)
        if reason:
            result[STOP_REASON] = reason
        return reason is not None and not is_final(result)

    def reason(self, trial_id: str, result: Mapping[str, Any]) -> str | None:
        reason = nan_reason(result, self.nan_metrics)
        if reason or self.collapse is None or self.collapse.metric not in result:
            return reason
        value = float(result[self.collapse.metric])
        first = self.first.setdefault(trial_id, value)
        return self.collapse.reason(value, first)

    def stop_all(self) -> bool:
        return False

    # Tune callback state: saved with the experiment, restored by Tuner.restore.
    def get_state(self) -> dict | None:
        return {"first": dict(self.first)}

    def set_state(self, state: dict) -> None:
        self.first.update(state.get("first", {}))
