"""`alignprop-ray report`: the comparison plots as PNGs and an index.html that shows them with a run table."""

from __future__ import annotations

import argparse
import html
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from alignprop_ray.compat import mlflow_logged_image_step
from alignprop_ray.errors import UserError
from alignprop_ray.report.data import env_defaults, load_runs, open_store, selection_lines, summary_table
from alignprop_ray.report.plots import (
    plot_heldout_rewards,
    plot_k_histograms,
    plot_pareto_fronts,
    plot_reward_curves,
    plot_reward_terms,
    plot_reward_vs_diversity,
    plot_reward_vs_images,
    plot_reward_vs_time,
)

COMPARISON_NOTE = (
    "In a comparison (alignprop-ray compare), only each method's runs at its picked lr scale: the line is "
    "their mean, the band their spread (min-max; with 5 or more seeds, the 95% interval of the mean), "
    "up to the first of them to stop."
)
COMPARISON_FILE = "comparison.md"
# (file, plot, title, caption); a plot without data (e.g. no mixtures) is left out of the page.
PLOTS: list[tuple[str, Callable, str, str]] = [
    (
        "reward_vs_step.png",
        plot_reward_curves,
        "Reward and diversity vs step",
        "One line per run, colored by truncation distribution (runs sharing one differ by line style). "
        "Train reward is smoothed; eval points use fixed prompts and seeds; step 0 is the base model. "
        "X marks the last point of a run a stopper ended.",
    ),
    (
        "reward_vs_diversity.png",
        plot_reward_vs_diversity,
        "Final reward vs diversity",
        "Each run's path from the base model (hollow circle) to its last evaluation: up is more reward, "
        "left is less within-prompt diversity (mode collapse).",
    ),
    (
        "pareto_fronts.png",
        plot_pareto_fronts,
        "Pareto fronts: reward against diversity and held-out rewards",
        "One point per run at its last evaluation. Ringed and named: the runs on their sweep's Pareto front, "
        "which no other completed run of the sweep matches on both axes and beats on one; X: ended by a "
        "stopper. A front that gains reward only by losing diversity or held-out reward is "
        "over-optimization; the sweep's best run (the table's selection column) is the best reward among "
        "the runs that did not collapse.",
    ),
    (
        "heldout_rewards.png",
        plot_heldout_rewards,
        "Trained vs held-out rewards",
        "The trained reward (eval/reward) beside each held-out reward (eval.rewards: evaluated on the same "
        "eval images, never trained on), one line per run; step 0 is the base model. A trained reward that "
        "rises while held-out ones fall is reward over-optimization.",
    ),
    (
        "reward_vs_time.png",
        plot_reward_vs_time,
        "Eval reward vs training time",
        "Each evaluation at the wall-clock seconds its run had spent in training steps (evaluation, logging "
        "and checkpoints excluded), one color per training method; 0 is the base model. " + COMPARISON_NOTE,
    ),
    (
        "reward_vs_images.png",
        plot_reward_vs_images,
        "Eval reward vs images generated",
        "Each evaluation at the number of images (denoising chains from fresh noise, all workers) its run had "
        "sampled for training, one color per training method. " + COMPARISON_NOTE,
    ),
    (
        "reward_terms.png",
        plot_reward_terms,
        "Reward terms of mixtures",
        "One panel per reward term, for runs whose reward has more than one term.",
    ),
    (
        "k_histogram.png",
        plot_k_histograms,
        "Truncation K drawn per training step",
        "How many final denoising steps carried gradient at each training step.",
    ),
]
GRIDS_DIR = "eval_grids"
GRID_KEY = "eval/images"  # the image key training logs its eval grids under (train/loop.py)
DPI = 110


def cmd_report(args: argparse.Namespace) -> int:
    out = _check_out(Path(args.out))
    runs, history = load_runs(args.tracking_uri, args.experiment)
    paths = write_report_files(runs, history, out, target=args.target)
    print(format_summary(summary_table(runs)).to_string(index=False))
    print("\n".join(selection_lines(runs, history)))
    if (out / COMPARISON_FILE).is_file():
        print("\n" + (out / COMPARISON_FILE).read_text(encoding="utf-8"), end="")
    print(f"wrote {len(paths)} files; open {out / 'index.html'}")
    return 0


def write_report(tracking_uri: str | None, experiment: str | None, out_dir: str | Path) -> list[Path]:
    """Write the plots, the first and last eval grids, runs.csv and index.html into out_dir; their paths.

    `experiment` None reads the most recently created experiment that has runs; `tracking_uri` None
    reads $ALIGNPROP_TRACKING_URI or sqlite:///mlflow.db. Raises UserError on bad input.
    """
    out = _check_out(Path(out_dir))
    return write_report_files(*load_runs(tracking_uri, experiment), out)


def write_report_files(
    runs: pd.DataFrame, history: pd.DataFrame, out: Path, target: float | None = None
) -> list[Path]:
    """write_report on tables already loaded by `load_runs` (PNGs first, index.html last); `target`: the
    eval/reward whose time and images to reach a comparison's table adds."""
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    written = write_plots(runs, history, out)
    grids = fetch_eval_grids(open_store(runs.attrs["tracking_uri"]), runs, out)
    table = summary_table(runs)
    table.to_csv(out / "runs.csv", index=False)
    tables = comparison_tables(runs, history, target)
    compared = write_comparison(tables, out)
    page = out / "index.html"
    lines = selection_lines(runs, history)
    html_page = render_html(runs, table, [p.name for p in written], grids, lines, tables)
    page.write_text(html_page, encoding="utf-8")
    return [
        *written,
        *(path for pairs in grids.values() for _, path in pairs),
        out / "runs.csv",
        *compared,
        page,
    ]


def comparison_tables(
    runs: pd.DataFrame, history: pd.DataFrame, target: float | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per method, selection round) of a comparison in the experiment; both empty without one."""
    from alignprop_ray.report.compare import comparison_table, selection_table

    return comparison_table(runs, history, target), selection_table(runs, history)


def write_comparison(tables: tuple[pd.DataFrame, pd.DataFrame], out: Path) -> list[Path]:
    """comparison.md and comparison.csv where the experiment holds a comparison (alignprop-ray compare)."""
    from alignprop_ray.report.compare import markdown

    methods, picks = tables
    if methods.empty and picks.empty:
        return []
    (out / COMPARISON_FILE).write_text(markdown(methods, picks), encoding="utf-8")
    methods.to_csv(out / "comparison.csv", index=False)
    return [out / COMPARISON_FILE, out / "comparison.csv"]


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    for part in out.parents:  # created only once the runs are read: bad input leaves nothing behind
        if part.exists():
            if not part.is_dir():
                raise UserError(f"--out {out}: {part} is a file, not a directory")
            break
    return out


def _remove_stale(out: Path) -> None:
    """A plot left out this time (no data) must not linger from an earlier report."""
    for name in [*(name for name, *_ in PLOTS), COMPARISON_FILE, "comparison.csv"]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / GRIDS_DIR, ignore_errors=True)


def write_plots(runs: pd.DataFrame, history: pd.DataFrame, out: Path) -> list[Path]:
    """Save every plot that has data as a PNG in `out`."""
    written = []
    for name, plot, *_ in PLOTS:
        figure = plot(runs, history)
        if figure is not None:
            figure.savefig(out / name, dpi=DPI)
            written.append(out / name)
    return written


def fetch_eval_grids(client, runs: pd.DataFrame, out: Path) -> dict[str, list[tuple[int, Path]]]:
    """run_id -> [(step, PNG)] for the first (base model) and last eval image grid of each run.

    Artifacts that cannot be read are skipped with a warning: the plots do not depend on them.
    """
    grids = {}
    for run in runs.itertuples():
        try:
            with env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # one bar per file
                grids[run.run_id] = _fetch_run_grids(
                    client, run.run_id, _slug(run.name, run.run_id), out / GRIDS_DIR
                )
        except Exception as err:  # e.g. an object store this machine has no credentials for
            print(f"warning: eval grids of run {run.name}: {err}", file=sys.stderr)
    return {run_id: pairs for run_id, pairs in grids.items() if pairs}


def _fetch_run_grids(client, run_id: str, slug: str, folder: Path) -> list[tuple[int, Path]]:
    found = {}
    for artifact in client.list_artifacts(run_id, "images"):
        step = mlflow_logged_image_step(Path(artifact.path).name, GRID_KEY)
        if step is not None:
            found.setdefault(step, artifact.path)
    steps = sorted(found)
    chosen = sorted({steps[0], steps[-1]}) if steps else []
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in chosen:
            local = client.download_artifacts(run_id, found[step], tmp)
            target = folder / f"{slug}_step{step}.png"
            shutil.copyfile(local, target)
            pairs.append((step, target))
    return pairs


def _slug(name: str, run_id: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}_{run_id[:8]}"


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The summary table as text cells: lr as %g, rewards to 4 decimals, blanks for missing values."""
    shown = table.astype(object).copy()
    for column in table.columns:
        if column == "lr":
            shown[column] = [_number(v, "g") for v in table[column]]
        elif table[column].dtype.kind == "f":
            shown[column] = [_number(v, ".4f") for v in table[column]]
        else:
            shown[column] = [
                "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)
                for v in table[column]
            ]
    return shown


def _number(value: float, spec: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def render_html(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    plots: list[str],
    grids: dict[str, list[tuple[int, Path]]],
    selection: list[str] = (),
    comparison: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> str:
    """The report page: header, run table, which run each sweep picks and why (`selection`), each plot with
    its caption, base vs final eval grids."""
    experiment = html.escape(str(runs.attrs.get("experiment", "")))
    sweeps = sorted({s for s in runs["sweep"] if isinstance(s, str)})
    meta = (
        f"{len(runs)} training runs · store <code>{html.escape(str(runs.attrs.get('tracking_uri', '')))}</code>"
        + (f" · sweep {html.escape(', '.join(sweeps))}" if sweeps else "")
        + f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    parts = [
        f"<h1>AlignProp report: {experiment}</h1>",
        f"<p class='meta'>{meta}</p>",
        "<h2>Runs</h2>",
        "<p>Best final eval reward first. Step 0 of eval is the base model.</p>",
        format_summary(table).to_html(index=False, escape=True, border=0, classes="runs"),
    ]
    if selection:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in selection)
        parts += [
            "<p>The best run of each sweep: the best objective among the runs that keep the sweep's "
            "constraints (by default, not collapsed: eval/diversity at least half its step-0 value).</p>",
            f"<ul class='selection'>{items}</ul>",
        ]
    parts += _comparison_section(comparison)
    for name, _, title, caption in PLOTS:
        if name in plots:
            parts += [
                f"<h2>{html.escape(title)}</h2>",
                f"<p>{html.escape(caption)}</p>",
                f"<img src='{name}' alt='{html.escape(title)}'>",
            ]
    parts += _grid_section(runs, grids)
    return PAGE.format(title=f"AlignProp report: {experiment}", body="\n".join(parts))


def _comparison_section(comparison: tuple[pd.DataFrame, pd.DataFrame] | None) -> list[str]:
    methods, picks = comparison if comparison is not None else (pd.DataFrame(), pd.DataFrame())
    parts = []
    if not methods.empty:
        parts += [
            "<h2>Comparison: each method at its picked lr scale</h2>",
            "<p>Each figure: mean [min, max] over the seeds (with 5 or more seeds, the 95% interval of the "
            "mean). The scale is the one its selection round picked.</p>",
            methods.to_html(index=False, escape=True, border=0, classes="runs"),
        ]
    if not picks.empty:
        parts += [
            "<h2>Comparison: the selection round</h2>",
            "<p>One trial per lr scale on the first seed; the pick is the best final objective among the "
            "trials its sweep's rule keeps (by default, not collapsed).</p>",
            picks.to_html(index=False, escape=True, border=0, classes="runs"),
        ]
    return parts


def _grid_section(runs: pd.DataFrame, grids: dict[str, list[tuple[int, Path]]]) -> list[str]:
    if not grids:
        return []
    rows = []
    for run in runs.sort_values("name").itertuples():
        cells = "".join(
            f"<figure><a href='{GRIDS_DIR}/{html.escape(path.name)}'><img src='{GRIDS_DIR}/{html.escape(path.name)}'>"
            f"</a><figcaption>step {step} (click for full size)</figcaption></figure>"
            for step, path in grids.get(run.run_id, [])
        )
        if cells:
            rows.append(
                f"<tr><th>{html.escape(run.name)}<br><small>{html.escape(run.truncation)}</small></th>"
                f"<td>{cells}</td></tr>"
            )
    return [
        "<h2>Eval images: base model and last evaluation</h2>",
        "<p>In each grid a row is one eval prompt and its columns are the eval seeds: "
        "near-identical images along a row mean the model collapsed onto one image per prompt.</p>",
        f"<table class='grids'>{''.join(rows)}</table>",
    ]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1500px; color: #222; }}
.meta {{ color: #666; }}
table.runs {{ border-collapse: collapse; font-size: 0.9em; }}
table.runs th, table.runs td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: left; }}
img {{ max-width: 100%; }}
figure {{ display: inline-block; margin: 0 1em 0 0; }}
table.grids th {{ text-align: left; vertical-align: top; padding-right: 1em; }}
table.grids img {{ max-height: 480px; image-rendering: pixelated; }}
</style></head>
<body>
{body}
</body></html>
"""
