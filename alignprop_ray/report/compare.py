"""The tables of a comparison (`alignprop-ray compare`): each method's figures with their spread over seeds,
and the selection round that picked each method's lr scale.

    methods = comparison_table(runs, history)    # one row per method, each figure "mean [low, high]"
    picks = selection_table(runs, history)       # one row per selection trial: scale, reward, kept or not
    text = markdown(methods, picks)              # both, as the report's comparison.md

A figure's spread is over the method's runs at its picked scale (report/spread.py: min-max below 5 seeds,
the 95% interval of the mean from 5 on).
"""

from __future__ import annotations

import math

import pandas as pd

from alignprop_ray.report.data import metric
from alignprop_ray.report.plots import comparison_groups, reward_at_cost
from alignprop_ray.report.spread import spread

# column -> (metric, which value of its history, format): the figures of the comparison table
FIGURES = {
    "base eval/reward": ("eval/reward", "first", ".3f"),
    "final eval/reward": ("eval/reward", "last", ".3f"),
    "final eval/diversity": ("eval/diversity", "last", ".3f"),
    "final eval/vendi": ("eval/vendi", "last", ".2f"),
    "training seconds": ("perf/wall_seconds", "last", ".1f"),
    "images generated": ("perf/images_generated", "last", ".0f"),
    "steps": ("step", "last", ".0f"),
}


def value(history: pd.DataFrame, run_id: str, key: str, which: str) -> float:
    """A run's first or last logged value of `key` (`step`: its last training step), NaN if none."""
    if key == "step":
        steps = history[(history["run_id"] == run_id) & history["key"].str.startswith("train/")]["step"]
        return float(steps.max()) if not steps.empty else math.nan
    rows = metric(history, key, run_id)
    if rows.empty:
        return math.nan
    return float(rows["value"].iloc[0 if which == "first" else -1])


def first_reaching(history: pd.DataFrame, run_id: str, cost_key: str, target: float) -> float:
    """The cost (`perf/wall_seconds`, `perf/images_generated`) at the run's first evaluation with eval/reward
    at or above `target`; NaN if it never got there."""
    points = reward_at_cost(history, run_id, cost_key)
    hit = points[points["reward"] >= target]
    return math.nan if hit.empty else float(hit["cost"].iloc[0])


def comparison_table(runs: pd.DataFrame, history: pd.DataFrame, target: float | None = None) -> pd.DataFrame:
    """One row per compared method: its picked lr scale and lr, its seeds, and each figure as `mean [low,
    high]` over them; with `target`, also how many runs reached eval/reward `target` and the training
    seconds and images at their first evaluation there (spread over those runs). Empty when the experiment
    holds no comparison."""
    by_id = runs.set_index("run_id")
    rows = []
    for label, run_ids in comparison_groups(runs).items():
        members = by_id.loc[run_ids]
        seeds = sorted(int(s) for s in members["params.train.seed"])
        first = spread([value(history, r, *FIGURES["base eval/reward"][:2]) for r in run_ids])
        row = {
            "method": label,
            "lr_scale": _joined(members["params.train.lr_scale"]),
            "lr": _joined(members["lr"].map(lambda v: f"{v:.3g}")),
            "seeds": ", ".join(map(str, seeds)),
            "spread": first.kind if len(run_ids) > 1 else "-",
        }
        for column, (key, which, spec) in FIGURES.items():
            row[column] = spread([value(history, r, key, which) for r in run_ids]).format(spec)
            if column == "final eval/reward":  # each method evaluates with its own sampler (reference
                # guidance), so its own base is its baseline: the gain compares across methods
                gains = [value(history, r, key, "last") - value(history, r, key, "first") for r in run_ids]
                row["eval/reward gain"] = spread(gains).format("+.3f")
        if target is not None:
            seconds = [first_reaching(history, r, "perf/wall_seconds", target) for r in run_ids]
            images = [first_reaching(history, r, "perf/images_generated", target) for r in run_ids]
            row[f"reached {target:g}"] = f"{sum(math.isfinite(s) for s in seconds)}/{len(run_ids)}"
            row[f"seconds to {target:g}"] = spread(seconds).format(".1f")
            row[f"images to {target:g}"] = spread(images).format(".0f")
        rows.append(row)
    return pd.DataFrame(rows)


def selection_table(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per selection-round trial: method, lr scale, final eval/reward and eval/diversity, and
    whether its sweep's rule kept it (`best`: the pick) or why not (`collapsed: ...`)."""
    if "compare_round" not in runs:
        return pd.DataFrame()
    trials = runs[runs["compare_round"] == "select"].sort_values("start_time", kind="stable")
    rows = [
        {
            "method": run["compare_method"],
            "lr_scale": run.get("params.train.lr_scale", ""),
            "lr": f"{run['lr']:.3g}",
            "final eval/reward": _num(run["final_eval_reward"], ".3f"),
            "final eval/diversity": _num(run["final_eval_diversity"], ".3f"),
            "steps": "" if pd.isna(run["last_step"]) else str(int(run["last_step"])),
            "picked": "yes" if run["compare_final"] else "",
            "selection": run["selection"] if isinstance(run.get("selection"), str) else "",
        }
        for run in trials.to_dict("records")
    ]
    return pd.DataFrame(rows)


def markdown(methods: pd.DataFrame, picks: pd.DataFrame) -> str:
    """Both tables as Markdown (the report's comparison.md)."""
    parts = []
    if not methods.empty:
        parts += [
            "Each method at its picked lr scale; each figure: mean [min, max] over the seeds "
            "(95% interval of the mean with 5 or more seeds).",
            "",
            _markdown_table(methods),
        ]
    if not picks.empty:
        parts += ["", "The selection round (one seed per scale):", "", _markdown_table(picks)]
    return "\n".join(parts) + "\n"


def _markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _joined(values: pd.Series) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def _num(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)
