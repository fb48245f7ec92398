"""Comparison plots from the tables of `alignprop_ray.report.data`; each returns a Figure, or None without data.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no backend is selected and no global
figure list grows, so the same functions serve the CLI (saved as PNG) and notebooks (`display(fig)`).
Runs are colored by truncation distribution (the paper's central ablation); runs that share one are
told apart by line style. The cost plots (reward against wall-clock time and against images generated)
color by training method instead.
"""

from __future__ import annotations

import math
import re

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from alignprop_ray.engine.methods.registry import METHODS, variant_label
from alignprop_ray.metrics import HELDOUT_PREFIX
from alignprop_ray.report.data import metric, trial_results
from alignprop_ray.report.spread import band
from alignprop_ray.selection import front_pairs, pareto_front

LINESTYLES = ("-", "--", ":", "-.")
MAX_RUN_LEGEND = 16  # above this many runs the legend names truncation groups instead of runs
STOPPED_MARKER = "X"
MAX_K_BINS = 60  # one bin per K value up to this many values


def truncation_order(spec: str) -> tuple:
    """Sort key: fixed:K by K, then uniform/normal ranges, then full, then anything else."""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", spec)]
    kind = spec.split(":", 1)[0]
    rank = {"fixed": 0, "uniform": 1, "normal": 2, "gaussian_index": 3, "full": 4}.get(kind, 5)
    return (rank, numbers, spec)


def truncation_colors(runs: pd.DataFrame) -> dict[str, tuple]:
    groups = sorted(runs["truncation"].unique(), key=truncation_order)
    cmap = matplotlib.colormaps["tab10"]
    return {group: cmap(i % 10) for i, group in enumerate(groups)}


def run_styles(runs: pd.DataFrame) -> dict[str, dict]:
    """run_id -> line kwargs: the truncation's color, a line style per run within the group."""
    colors, styles, seen = truncation_colors(runs), {}, {}
    for run in runs.sort_values("name").itertuples():
        index = seen[run.truncation] = seen.get(run.truncation, -1) + 1
        styles[run.run_id] = {
            "color": colors[run.truncation],
            "linestyle": LINESTYLES[index % len(LINESTYLES)],
        }
    return styles


def run_label(run) -> str:
    stopped = " [stopped]" if isinstance(run.stop_reason, str) else ""  # the reason is in the run table
    return f"{run.name} ({run.truncation}){stopped}"


def smooth(values: pd.Series) -> pd.Series:
    """Debiased exponential moving average over about a tenth of the curve (TensorBoard-like)."""
    return values.ewm(span=max(2.0, len(values) / 10), adjust=True).mean()


def plot_reward_curves(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """train/reward (smoothed), eval/reward, eval/diversity and eval/vendi against step, one line per run."""
    panels = [
        ("train/reward", "train/reward (smoothed; raw faint)"),
        ("eval/reward", "eval/reward"),
        ("eval/diversity", "eval/diversity (falls on collapse)"),
        ("eval/vendi", "eval/vendi (distinct images per prompt)"),
    ]
    if not history["key"].isin([key for key, _ in panels[:2]]).any():
        return None
    fig = Figure(figsize=(19, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    styles = run_styles(runs)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for run in runs.itertuples():
            draw_metric(ax, history, key, run, styles[run.run_id], smoothed=key.startswith("train/"))
        _finish_axes(ax, title, key)
    _legend(fig, runs, styles)
    return fig


def draw_metric(ax: Axes, history: pd.DataFrame, key: str, run, style: dict, smoothed: bool) -> None:
    """One run's curve of `key` (smoothed line, or points); an X on the last point of a run a stopper ended."""
    rows = metric(history, key, run.run_id)
    rows = rows[rows["value"].map(math.isfinite)]
    if rows.empty:
        return
    if smoothed:
        ax.plot(rows["step"], rows["value"], color=style["color"], alpha=0.2, linewidth=0.8)
        ax.plot(rows["step"], smooth(rows["value"]), **style, linewidth=1.8)
    else:
        ax.plot(rows["step"], rows["value"], **style, marker="o", markersize=4, linewidth=1.2)
    if isinstance(run.stop_reason, str):
        ax.plot(
            rows["step"].iloc[-1],
            rows["value"].iloc[-1],
            STOPPED_MARKER,
            color=style["color"],
            markersize=10,
            markeredgecolor="black",
        )


def _finish_axes(ax: Axes, title: str, key: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", color="gray")


def _legend(fig: Figure, runs: pd.DataFrame, styles: dict[str, dict]) -> None:
    if len(runs) <= MAX_RUN_LEGEND:
        ordered = runs.sort_values("name")
        handles = [Line2D([], [], **styles[r.run_id]) for r in ordered.itertuples()]
        labels = [run_label(r) for r in ordered.itertuples()]
    else:  # colors as in styles, which may span more runs than these
        colors = {run.truncation: styles[run.run_id]["color"] for run in runs.itertuples()}
        labels = sorted(colors, key=truncation_order)
        handles = [Line2D([], [], color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="run (truncation)")


def plot_reward_vs_diversity(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """Final eval/reward against final eval/diversity per run: the reward/collapse trade-off.

    A faint path shows each run's evaluations from the base model (hollow circle, step 0) to its
    last one (filled; an X when a stopper ended the run).
    """
    done = runs[
        runs["final_eval_reward"].map(math.isfinite) & runs["final_eval_diversity"].map(math.isfinite)
    ]
    if done.empty:
        return None
    fig = Figure(figsize=(8.5, 6), layout="constrained")
    ax = fig.subplots()
    colors = truncation_colors(runs)
    for run in done.itertuples():
        _draw_trajectory(ax, history, run, colors[run.truncation])
    ax.set_xlabel("final eval/diversity (within prompt; low = mode collapse)")
    ax.set_ylabel("final eval/reward")
    ax.set_title("reward vs diversity: the collapse trade-off", fontsize=10)
    ax.grid(alpha=0.3)
    _tradeoff_legend(ax, {group: colors[group] for group in colors if group in set(done["truncation"])})
    return fig


def _tradeoff_legend(ax: Axes, colors: dict[str, tuple]) -> None:
    handles = [Line2D([], [], color=c, marker="o", linestyle="") for c in colors.values()]
    handles += [
        Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle=""),
        Line2D([], [], color="gray", marker=STOPPED_MARKER, linestyle=""),
    ]
    labels = [*colors, "base model (step 0)", "stopped by a stopper"]
    ax.legend(handles, labels, fontsize=8, title="truncation", loc="best")


def _draw_trajectory(ax: Axes, history: pd.DataFrame, run, color: tuple) -> None:
    reward = metric(history, "eval/reward", run.run_id)[["step", "value"]]
    diversity = metric(history, "eval/diversity", run.run_id)[["step", "value"]]
    path = reward.merge(diversity, on="step", suffixes=("_reward", "_diversity")).dropna()
    if len(path) > 1:
        ax.plot(path["value_diversity"], path["value_reward"], color=color, alpha=0.35, linewidth=1)
        start = path.iloc[0]
        ax.plot(start["value_diversity"], start["value_reward"], "o", color=color, markerfacecolor="none")
    stopped = isinstance(run.stop_reason, str)
    ax.plot(
        run.final_eval_diversity,
        run.final_eval_reward,
        STOPPED_MARKER if stopped else "o",
        color=color,
        markersize=10 if stopped else 8,
        markeredgecolor="black",
    )
    ax.annotate(
        run.name,
        (run.final_eval_diversity, run.final_eval_reward),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=8,
    )


def front_panels(runs: pd.DataFrame) -> list[tuple[list[str], list[str]]]:
    """(metrics, modes) of each Pareto panel: eval/reward against eval/diversity and against each held-out
    reward, then the objectives of each multi-objective sweep (its first two on the axes)."""
    heldout = sorted({HELDOUT_PREFIX + name for names in runs.get("heldout", []) for name in names})
    panels = [
        ([y, x], [y_mode, x_mode]) for y, y_mode, x, x_mode in front_pairs(("eval/reward", "max"), heldout)
    ]
    for settings in runs.attrs.get("sweeps", {}).values():
        if len(settings["metrics"]) > 1 and (settings["metrics"], settings["modes"]) not in panels:
            panels.append((settings["metrics"], settings["modes"]))
    return panels


def pareto_rows(runs: pd.DataFrame, history: pd.DataFrame) -> list[dict]:
    """One row per run for `pareto_front`: name, sweep, completed, truncation and each metric's final value."""
    results = trial_results(runs, history)
    return [
        {
            "trial": run.name,
            "sweep": run.sweep if isinstance(run.sweep, str) else "",
            "truncation": run.truncation,
            "completed": results[run.run_id].completed,
            "best": str(getattr(run, "selection", "")).startswith("best"),
            **results[run.run_id].final,
        }
        for run in runs.itertuples()
    ]


def pareto_fronts(rows: list[dict], metrics: list[str], modes: list[str]) -> set[str]:
    """Names of the runs on their sweep's Pareto front over `metrics` (runs outside a sweep: one group)."""
    on_front: set[str] = set()
    for sweep in {row["sweep"] for row in rows}:
        group = [row for row in rows if row["sweep"] == sweep]
        on_front |= {row["trial"] for row in pareto_front(group, metrics, modes)}
    return on_front


def plot_pareto_fronts(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """Final eval/reward against final eval/diversity and against each held-out reward (and a multi-objective
    sweep's objectives against each other), one point per run; the runs on their sweep's Pareto front
    (no other completed run of the sweep is at least as good on both axes and better on one) are ringed
    and named, and runs a stopper ended are drawn as an X (never on a front)."""
    rows = pareto_rows(runs, history)
    panels = [
        (metrics, modes)
        for metrics, modes in front_panels(runs)
        if sum(_has(row, metrics[:2]) for row in rows) >= 2
    ]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels) + 2.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    colors = truncation_colors(runs)
    for ax, (metrics, modes) in zip(axes, panels, strict=True):
        _draw_front(ax, rows, metrics, modes, colors)
    shown = {row["truncation"] for row in rows if any(_has(row, m[:2]) for m, _ in panels)}
    handles = [Line2D([], [], color=c, marker="o", linestyle="") for t, c in colors.items() if t in shown]
    handles += [
        Line2D([], [], color="gray", marker="o", markersize=12, markerfacecolor="none", linestyle=""),
        Line2D([], [], color="gray", marker=STOPPED_MARKER, linestyle=""),
    ]
    labels = [t for t in colors if t in shown] + ["on its sweep's Pareto front", "stopped by a stopper"]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="truncation")
    return fig


def _has(row: dict, metrics: list[str]) -> bool:
    return all(math.isfinite(row.get(m, math.nan)) for m in metrics)


def _draw_front(ax: Axes, rows: list[dict], metrics: list[str], modes: list[str], colors: dict) -> None:
    y, x = metrics[:2]
    on_front = pareto_fronts(rows, metrics, modes)
    for row in (row for row in rows if _has(row, [x, y])):
        marker = "o" if row["completed"] else STOPPED_MARKER
        color = colors[row["truncation"]]
        ax.plot(row[x], row[y], marker, color=color, markersize=7, markeredgecolor="black")
        if row["trial"] in on_front:
            ax.plot(row[x], row[y], "o", markersize=15, markerfacecolor="none", markeredgecolor="black")
        if row["trial"] in on_front or row["best"]:
            label = row["trial"] + (" (best)" if row["best"] else "")
            ax.annotate(label, (row[x], row[y]), textcoords="offset points", xytext=(7, 5), fontsize=8)
    directions = ", ".join(f"{m} {mode}" for m, mode in zip(metrics, modes, strict=True))
    ax.set_title(f"Pareto front: {directions}", fontsize=9)
    ax.set_xlabel(f"final {x}")
    ax.set_ylabel(f"final {y}")
    ax.grid(alpha=0.3)


def plot_heldout_rewards(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """The trained eval/reward beside each held-out reward (eval.rewards) against step, one panel each, for
    the runs that logged held-out rewards: over-optimization shows as the first rising while others fall."""
    with_heldout = runs[runs["heldout"].map(len) > 0] if "heldout" in runs else runs.iloc[:0]
    if with_heldout.empty:
        return None
    names = sorted({name for names in with_heldout["heldout"] for name in names})
    panels = [("eval/reward", "eval/reward (trained)")]
    panels += [(HELDOUT_PREFIX + name, f"{HELDOUT_PREFIX}{name} (never trained on)") for name in names]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols + 3, 4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    styles = run_styles(runs)  # colors as in the other plots
    for ax, (key, title) in zip(axes, panels, strict=False):
        for run in with_heldout.itertuples():
            draw_metric(ax, history, key, run, styles[run.run_id], smoothed=False)
        _finish_axes(ax, title, key)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _legend(fig, with_heldout, styles)
    return fig


def plot_reward_terms(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """One panel per reward term of the runs with more than one term (mixtures): train (smoothed) and eval."""
    mixtures = runs[runs["terms"].map(len) > 1]
    if mixtures.empty:
        return None
    terms = sorted({term for terms in mixtures["terms"] for term in terms})
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = Figure(figsize=(5 * ncols + 3, 4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    styles = run_styles(runs)  # colors as in the other plots
    for ax, term in zip(axes, terms, strict=False):
        for run in mixtures.itertuples():
            draw_metric(ax, history, f"train/reward/{term}", run, styles[run.run_id], smoothed=True)
            points = {**styles[run.run_id], "linestyle": "none"}  # apart from the train line on top of them
            draw_metric(ax, history, f"eval/reward/{term}", run, points, smoothed=False)
        _finish_axes(ax, f"reward term {term}: train (line), eval (dots)", f"reward/{term}")
    for ax in axes[len(terms) :]:
        ax.set_visible(False)
    _legend(fig, mixtures, styles)
    return fig


def plot_k_histograms(runs: pd.DataFrame, history: pd.DataFrame, ncols: int = 4) -> Figure | None:
    """Histogram of the truncation K drawn at each training step, one panel per run."""
    with_k = [
        r for r in runs.sort_values("name").itertuples() if not metric(history, "train/k", r.run_id).empty
    ]
    if not with_k:
        return None
    ncols = min(ncols, len(with_k))
    nrows = math.ceil(len(with_k) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = truncation_colors(runs)
    for ax, run in zip(axes, with_k, strict=False):
        ks = metric(history, "train/k", run.run_id)["value"]
        # integer-centred bins (K is a mean over micro-batches when grad_accum > 1, so may be fractional)
        bins = [k - 0.5 for k in range(math.floor(ks.min()), math.ceil(ks.max()) + 2)]
        bins = bins if len(bins) <= MAX_K_BINS + 1 else MAX_K_BINS
        ax.hist(ks, bins=bins, color=colors[run.truncation], edgecolor="black", linewidth=0.5)
        ax.set_title(f"{run.name}\n{run.truncation}", fontsize=9)
        ax.set_xlabel("K (steps with gradient)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel("training steps")
    for ax in axes[len(with_k) :]:
        ax.set_visible(False)
    return fig


# --- cost: eval reward against training time and samples, one color per method ---------------------------


def method_label(params: dict) -> str:
    """A run's method as its params name it (`registry.variant_label`: `alignprop`, `draft-K1`, `draft-LV2`,
    `refl`, `ddpo`); runs logged before methods existed are alignprop."""
    name = params.get("params.method.name")
    if not isinstance(name, str):
        return "alignprop"
    keys = ("k", "lv_samples")
    return variant_label({"name": name, **{k: params.get(f"params.method.{k}") for k in keys}})


def method_labels(runs: pd.DataFrame) -> dict[str, str]:
    """run_id -> `method_label`."""
    return {row["run_id"]: method_label(row) for row in runs.to_dict("records")}


def method_order(label: str) -> tuple:
    """Methods in the registry's order (engine/methods/registry.py), then any other, by label."""
    base = label.split("-", 1)[0]
    return (METHODS.index(base) if base in METHODS else len(METHODS), label)


def reward_at_cost(history: pd.DataFrame, run_id: str, cost_key: str) -> pd.DataFrame:
    """A run's evaluations with the cumulative cost at each: columns step, cost, reward. The step-0
    evaluation (the base model) costs 0; evaluations at steps whose cost was not logged are left out."""
    reward = metric(history, "eval/reward", run_id)[["step", "value"]].rename(columns={"value": "reward"})
    cost = metric(history, cost_key, run_id)[["step", "value"]].rename(columns={"value": "cost"})
    cost = pd.concat([pd.DataFrame({"step": [0], "cost": [0.0]}), cost[cost["step"] > 0]])
    joined = reward.merge(cost, on="step").sort_values("step")
    # astype(bool): on a run without evaluations the mask is an empty object Series, which pandas would
    # take for a list of column labels
    finite = joined["reward"].map(math.isfinite).astype(bool)
    return joined[finite][["step", "cost", "reward"]].reset_index(drop=True)


def plot_reward_vs_time(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """eval/reward against perf/wall_seconds (time spent in training steps), one color per method."""
    return _reward_vs_cost(
        runs, history, "perf/wall_seconds", "training wall-clock seconds (perf/wall_seconds)"
    )


def plot_reward_vs_images(runs: pd.DataFrame, history: pd.DataFrame) -> Figure | None:
    """eval/reward against perf/images_generated (chains sampled from noise), one color per method."""
    return _reward_vs_cost(runs, history, "perf/images_generated", "images generated (perf/images_generated)")


def _reward_vs_cost(runs: pd.DataFrame, history: pd.DataFrame, cost_key: str, xlabel: str) -> Figure | None:
    if not (history["key"] == cost_key).any():
        return None
    if comparison_runs(runs).any():
        return _reward_vs_cost_bands(runs, history, cost_key, xlabel)
    labels = method_labels(runs)
    groups = sorted(set(labels.values()), key=method_order)
    cmap = matplotlib.colormaps["tab10"]
    colors = {label: cmap(i % 10) for i, label in enumerate(groups)}
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    seen: dict[str, int] = {}
    for run in runs.sort_values("name").itertuples():
        points = reward_at_cost(history, run.run_id, cost_key)
        if len(points) < 2:
            continue
        label = labels[run.run_id]
        index = seen[label] = seen.get(label, -1) + 1
        style = {"color": colors[label], "linestyle": LINESTYLES[index % len(LINESTYLES)]}
        ax.plot(points["cost"], points["reward"], **style, marker="o", markersize=3, linewidth=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval/reward")
    ax.set_title(f"eval/reward against {cost_key}, one color per method (line style: run)", fontsize=10)
    ax.grid(alpha=0.3)
    shown = [label for label in groups if label in seen]
    ax.legend([Line2D([], [], color=colors[label]) for label in shown], shown, fontsize=8, title="method")
    return fig


def comparison_runs(runs: pd.DataFrame) -> pd.Series:
    """Which runs are a comparison's runs at their method's picked lr scale (`alignprop-ray compare`)."""
    if "compare_final" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["compare_final"].fillna(False).astype(bool)


def comparison_groups(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Method label (`comparison: label` where the experiment holds several comparisons) -> its final runs'
    ids, in the order the comparison lists methods (the first run's start)."""
    final = runs[comparison_runs(runs)].sort_values("start_time", kind="stable")
    several = final["compare"].nunique() > 1
    groups: dict[str, list[str]] = {}
    for run in final.itertuples():
        label = f"{run.compare}: {run.compare_method}" if several else str(run.compare_method)
        groups.setdefault(label, []).append(run.run_id)
    return groups


def _reward_vs_cost_bands(runs: pd.DataFrame, history: pd.DataFrame, cost_key: str, xlabel: str) -> Figure:
    """A comparison's methods: the seeds' mean eval/reward against the cost, their spread as a band
    (min-max; with 5 or more seeds, the 95% interval of the mean: report/spread.py), each seed faint."""
    groups = comparison_groups(runs)
    cmap = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    handles, labels = [], []
    for i, (label, run_ids) in enumerate(groups.items()):
        color = cmap(i % 10)
        curves = [reward_at_cost(history, run_id, cost_key) for run_id in run_ids]
        curves = [c for c in curves if len(c) >= 2]
        for curve in curves:
            ax.plot(curve["cost"], curve["reward"], color=color, alpha=0.3, linewidth=0.8)
        spread = band([(c["cost"], c["reward"]) for c in curves])
        if spread.empty:
            continue
        ax.fill_between(spread["x"], spread["low"], spread["high"], color=color, alpha=0.2, linewidth=0)
        ax.plot(spread["x"], spread["mean"], color=color, linewidth=2)
        handles.append(Line2D([], [], color=color, linewidth=2))
        labels.append(f"{label} ({len(curves)} seeds, {spread['kind'].iloc[0]})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval/reward")
    ax.set_title(
        f"eval/reward against {cost_key}: mean over seeds (line), spread (band), each seed (faint)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8, title="method (seeds, band)")
    return fig
