"""What a sweep found: one row per trial, the best trial, the Pareto front, and the console table.

Rows are plain dicts (trial, status, each searched field, the objective metrics, diversity, adapter),
built from Tune's trials after `fit`. The best trial and the Pareto front are chosen among trials that
ran to completion: a trial stopped for collapse may score high precisely because it collapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignprop_ray.sweep.stoppers import STOP_REASON, TOTAL_STEPS, early_stop_reason, is_final

CHECKPOINT_PATH = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY
DIVERSITY = "eval/diversity"
TRAIN_RUNS = "train_runs"  # below a sweep's folder: each trial's Ray Train run (checkpoints)
UNFINISHED = ("pending", "running", "paused")  # a trial's status in a sweep that was interrupted


@dataclass
class SweepOutcome:
    """A finished (or interrupted) sweep: its trials' rows, the best one and the Pareto front."""

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    experiment_id: str | None = None

    @property
    def interrupted(self) -> bool:
        return any(r["status"] in UNFINISHED for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if any(r["status"] == "error" for r in self.rows) else 0


def trial_rows(trials: list, sweep, run_ids: dict[str, str]) -> list[dict[str, Any]]:
    """One row per Tune trial, in trial order."""
    return [
        _row(trial, sweep, run_ids.get(trial.trial_id)) for trial in sorted(trials, key=lambda t: t.trial_id)
    ]


def _row(trial, sweep, run_id: str | None) -> dict[str, Any]:
    result = trial.last_result or {}
    row: dict[str, Any] = {"trial": trial.trial_id}
    for domain in sweep.domains:
        if domain.field in (trial.config or {}):
            row[domain.field] = domain.decode(trial.config[domain.field])
    row["status"] = _status(trial, result, int(row.get("train.steps", sweep.reference.train.steps)))
    row["error"] = error_line(trial) if trial.status == "ERROR" else None
    for metric in dict.fromkeys([*sweep.config.tune.metrics, "eval/reward", DIVERSITY]):
        row[metric] = _number(result.get(metric))
    row["step"] = result.get("step")
    row["completed"] = row["status"] == "completed"
    row["run_id"] = run_id
    checkpoint = result.get(CHECKPOINT_PATH)
    row["adapter"] = (
        str(Path(checkpoint) / "adapter")
        if checkpoint and "://" not in checkpoint
        else (f"{checkpoint.rstrip('/')}/adapter" if checkpoint else None)
    )
    return row


def _status(trial, result: dict, steps: int) -> str:
    """completed | error | the stopper's reason | a scheduler's early stop | pending/running (interrupted)."""
    if trial.status == "ERROR":
        return "error"
    if result.get(STOP_REASON):
        return str(result[STOP_REASON])
    if trial.status != "TERMINATED":
        return trial.status.lower()
    if not is_final({TOTAL_STEPS: steps, **result}):
        return early_stop_reason(result, steps)
    return "completed"


def error_line(trial) -> str:
    """The last line of a failed trial's error (the exception), for the table and the MLflow tag."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _usable(row: dict, metric: str) -> bool:
    value = row.get(metric)
    return value is not None and math.isfinite(value)


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best completed trial by `metric` (falling back to any trial with a value)."""
    for pool in ([r for r in rows if r["completed"]], rows):
        candidates = [r for r in pool if _usable(r, metric)]
        if candidates:
            pick = max if mode == "max" else min
            return pick(candidates, key=lambda r: r[metric])
    return None


def pareto_front(rows: list[dict], metrics: list[str], modes: list[str]) -> list[dict]:
    """Completed trials that no other completed trial beats on every objective (and strictly on one)."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    pool = [r for r in rows if r["completed"] and all(_usable(r, m) for m in metrics)]

    def score(row: dict) -> list[float]:
        return [s * row[m] for s, m in zip(signs, metrics, strict=True)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(
            x > y for x, y in zip(a, b, strict=True)
        )

    return [r for r in pool if not any(dominates(score(o), score(r)) for o in pool if o is not r)]


def format_table(rows: list[dict], sweep) -> str:
    """Fixed-width console table: trial, searched fields that vary, metrics, status."""
    varying = [d.field for d in sweep.domains if len({repr(r.get(d.field)) for r in rows}) > 1]
    metrics = list(dict.fromkeys([*sweep.config.tune.metrics, "eval/reward", DIVERSITY]))
    columns = ["trial", *varying, *metrics, "step", "status"]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(line[i]) for line in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    lines += [f"{row['trial']} failed: {row['error']}" for row in rows if row.get("error")]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
