"""What a sweep found: one row per trial, the best trial, the Pareto fronts, and the console table.

Rows are plain dicts (trial, status, each searched field, the objective metrics, diversity, held-out
rewards, adapter), built from Tune's trials after `fit`. The best trial is chosen by the sweep's selection
rule (alignprop_ray/selection.py: the objective under constraints, by default "not collapsed"), completed
trials first; the Pareto fronts are drawn from trials that ran to completion: a trial stopped for collapse
may score high precisely because it collapsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignprop_ray.selection import Selection, SelectionRule, TrialResult, front_pairs, pareto_front, select
from alignprop_ray.sweep.stoppers import STOP_REASON, TOTAL_STEPS, early_stop_reason, is_final

CHECKPOINT_PATH = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY
DIVERSITY = "eval/diversity"
TRAIN_RUNS = "train_runs"  # below a sweep's folder: each trial's Ray Train run (checkpoints)
SELECTION = "selection"  # row key: why the trial breaks the selection rule (None: it keeps it)
UNFINISHED = ("pending", "running", "paused")  # statuses of a trial that has not ended (an interrupted sweep)


@dataclass
class SweepOutcome:
    """A finished (or interrupted) sweep: its trials' rows, the best one, how it was chosen, and the Pareto
    fronts (label -> rows on it: the objectives' front, or the objective against diversity and against
    each held-out reward)."""

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    experiment_id: str | None = None
    selection: Selection | None = None

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
    for metric in row_metrics(sweep):
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


def row_metrics(sweep) -> list[str]:
    """The metrics each row carries: the objectives, eval/reward, diversity, what the selection rule reads,
    and the held-out rewards."""
    rule = sweep.selection_rule.metrics
    return list(
        dict.fromkeys([*sweep.config.tune.metrics, "eval/reward", DIVERSITY, *rule, *sweep.heldout_metrics])
    )


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


def choose(
    rows: list[dict], rule: SelectionRule, firsts: Mapping[str, Mapping[str, float]]
) -> tuple[dict | None, Selection]:
    """The best row under `rule` and the selection behind it; marks each row that breaks the rule
    (row["selection"]). `firsts`: trial id -> {metric: value at the trial's first evaluation}."""
    selection = select([_trial_result(r, rule, firsts) for r in rows], rule)
    for row in rows:
        row[SELECTION] = selection.broken.get(row["trial"])
    return _row_of(rows, selection.best), selection


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best completed trial by `metric` alone (falling back to any trial with a value)."""
    rule = SelectionRule(metric, mode)
    return _row_of(rows, select([_trial_result(r, rule, {}) for r in rows], rule).best)


def _trial_result(row: dict, rule: SelectionRule, firsts: Mapping[str, Mapping[str, float]]) -> TrialResult:
    final = {m: row.get(m) for m in rule.metrics}
    return TrialResult(row["trial"], final, firsts.get(row["trial"], {}), row["completed"])


def _row_of(rows: list[dict], trial: TrialResult | None) -> dict | None:
    return next(r for r in rows if r["trial"] == trial.id) if trial else None


def fronts(rows: list[dict], sweep) -> dict[str, list[dict]]:
    """label -> the rows on a Pareto front: the objectives' front for a multi-objective sweep, else the
    objective against eval/diversity and against each held-out reward."""
    tune = sweep.config.tune
    if tune.objectives:
        return {", ".join(tune.metrics): pareto_front(rows, tune.metrics, tune.modes)}
    found = {}
    for y, y_mode, x, x_mode in front_pairs(tune.best_metric, sweep.heldout_metrics):
        found[f"{y}, {x}"] = pareto_front(rows, [y, x], [y_mode, x_mode])
    return {label: front for label, front in found.items() if front}


def format_table(rows: list[dict], sweep) -> str:
    """Fixed-width console table: trial, searched fields that vary, metrics, status."""
    varying = [d.field for d in sweep.domains if len({repr(r.get(d.field)) for r in rows}) > 1]
    metrics = list(dict.fromkeys([*sweep.config.tune.metrics, "eval/reward", DIVERSITY]))
    metrics += [m for m in sweep.selection_rule.metrics if m not in metrics]
    columns = ["trial", *varying, *metrics, "step", "status"]
    if any(row.get(SELECTION) for row in rows):  # why a trial is not eligible as the best
        columns.append(SELECTION)
    cells = [[_cell(row.get(c)) if c != SELECTION else row.get(c) or "" for c in columns] for row in rows]
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
