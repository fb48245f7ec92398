"""Trial stoppers: mode collapse (diversity falls below a threshold), over-optimization (the trained reward
rises while a held-out reward falls) and NaN/inf metrics.

The rules are plain functions of the reported values (unit-tested without Ray). `TrialStopper` applies them
as a Tune stopper and writes its reason into the result it stops on (`stop_reason`): Tune keeps that dict
as the trial's last result, so the reason reaches the summary, the MLflow tag and a resumed sweep. At a
trial's last step it records the reason without stopping, so the trial still saves its adapter.
It is also a Tune callback, only so that Tune saves and restores what it remembers of each trial (its first
evaluation, its evaluations so far) with the experiment state: a resumed sweep compares against the same
reference.
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


EVAL_STEP = "eval/step"  # result key: the step of the evaluation whose eval/* values a result carries


@dataclass(frozen=True)
class OveroptimizationRule:
    """Over-optimization: over the last `window` evaluations, the trained `reward` rises while the
    `heldout` reward falls by more than `margin`.

    Each trend is the change of a least-squares line through the window's values (its slope times the
    evaluations it spans), so one noisy evaluation at either end moves it less than an endpoint difference.
    """

    heldout: str
    margin: float
    window: int = 3
    reward: str = "eval/reward"

    def reason(self, evaluations: list[tuple[int, float, float]]) -> str | None:
        """`evaluations`: (step, reward, held-out reward) of a trial, oldest first."""
        recent = evaluations[-self.window :]
        if len(recent) < self.window or not all(map(math.isfinite, (v for e in recent for v in e[1:]))):
            return None
        rise, fall = _trend([r for _, r, _ in recent]), -_trend([h for *_, h in recent])
        if rise <= 0 or fall <= self.margin:
            return None
        return (
            f"overoptimization: {self.heldout} fell {fall:.4g} (> {self.margin:g}) while {self.reward} rose "
            f"{rise:.4g} over the evaluations at steps {recent[0][0]}-{recent[-1][0]}"
        )


def _trend(values: list[float]) -> float:
    """The change across `values` of the least-squares line through them (at equally spaced points)."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum(
        (i - mean_x) ** 2 for i in range(n)
    )
    return slope * (n - 1)


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
    """Stop a trial on NaN/inf in `nan_metrics`, on collapse or on over-optimization; record why in the
    result."""

    def __init__(
        self,
        collapse: CollapseRule | None,
        nan_metrics: Iterable[str] = (),
        overoptimization: OveroptimizationRule | None = None,
    ):
        self.collapse = collapse
        self.nan_metrics = tuple(nan_metrics)
        self.overoptimization = overoptimization
        self.first: dict[str, float] = {}  # trial id -> first evaluation of the collapse metric
        # trial id -> {eval step: (reward, held-out reward)}; keyed by step, so a trial restarted from a
        # checkpoint that evaluates a step again replaces its value instead of repeating it
        self.evaluations: dict[str, dict[int, tuple[float, float]]] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Stop on a reason, except at the last step, where the reason is only recorded."""
        reason = self.reason(trial_id, result)
        if reason:
            result[STOP_REASON] = reason
        return reason is not None and not is_final(result)

    def reason(self, trial_id: str, result: Mapping[str, Any]) -> str | None:
        reason = nan_reason(result, self.nan_metrics)
        if reason is None and self.collapse is not None and self.collapse.metric in result:
            value = float(result[self.collapse.metric])
            first = self.first.setdefault(trial_id, value)
            reason = self.collapse.reason(value, first)
        return reason or self._overoptimization(trial_id, result)

    def _overoptimization(self, trial_id: str, result: Mapping[str, Any]) -> str | None:
        rule = self.overoptimization
        if rule is None or EVAL_STEP not in result or not {rule.reward, rule.heldout} <= result.keys():
            return None
        seen = self.evaluations.setdefault(trial_id, {})
        step = int(result[EVAL_STEP])
        seen[step] = (float(result[rule.reward]), float(result[rule.heldout]))
        history = [(s, *seen[s]) for s in sorted(seen) if s <= step]
        return rule.reason(history)

    def stop_all(self) -> bool:
        return False

    # Tune callback state: saved with the experiment, restored by Tuner.restore.
    def get_state(self) -> dict | None:
        evaluations = {trial: [[s, *v] for s, v in seen.items()] for trial, seen in self.evaluations.items()}
        return {"first": dict(self.first), "evaluations": evaluations}

    def set_state(self, state: dict) -> None:
        self.first.update(state.get("first", {}))
        for trial, rows in state.get("evaluations", {}).items():
            self.evaluations.setdefault(trial, {}).update({int(s): (r, h) for s, r, h in rows})
