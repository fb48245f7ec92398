"""What a sweep prints after Tune's console (alignprop_ray/console.py): its outcome and the MLflow links."""

from __future__ import annotations

import posixpath

from alignprop_ray.sweep.summary import TRAIN_RUNS, UNFINISHED, SweepOutcome


def print_outcome(outcome: SweepOutcome, sweep, resume_command: str, ui_url: str | None = None) -> None:
    """The table of trials, the best one, and where to look at them in the MLflow UI (`ui_url`: the
    address the user will open, default the tracking server, or `mlflow ui`'s for a database store)."""
    from alignprop_ray.sweep.summary import format_table

    print("\n" + format_table(outcome.rows, sweep))
    if outcome.fronts:
        print()
    for label, front in outcome.fronts.items():
        print(f"Pareto front ({label}): {', '.join(r['trial'] for r in front)}")
    if outcome.best:
        best = outcome.best
        print("\n" + "\n".join(outcome.selection.explain()))
        print(f"best adapter: {best['adapter'] or '(no checkpoint)'} (what --register registers)")
        if best.get("run_id"):
            print(f"  also in MLflow: runs:/{best['run_id']}/adapter")
    if outcome.interrupted:
        print(f"\ninterrupted: {where_trials_stopped(outcome, sweep)}; continue with `{resume_command}`")
    print(f"\nMLflow: parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    print_ui_links(outcome, sweep.config.tune.best_metric, ui_url)


def where_trials_stopped(outcome: SweepOutcome, sweep) -> str:
    """Each unfinished trial's last step and the checkpoint it resumes from, in one line."""
    from alignprop_ray.compat import mlflow_latest_metric_steps
    from alignprop_ray.sweep.tracking import child_name
    from alignprop_ray.tracking import client
    from alignprop_ray.train.launch import last_checkpoint_step

    storage = posixpath.join(outcome.experiment_path, TRAIN_RUNS)
    parts, waiting = [], 0
    for row in outcome.rows:
        if row["status"] not in UNFINISHED:
            continue
        logged = (
            mlflow_latest_metric_steps(client(outcome.tracking_uri), row["run_id"]) if row["run_id"] else {}
        )
        if not any(logged.values()):
            waiting += 1
            continue
        checkpoint = last_checkpoint_step(storage, child_name(sweep.name, row["trial"]))
        resumes = f"its checkpoint of step {checkpoint}" if checkpoint else "its start (no checkpoint yet)"
        parts.append(
            f"trial {row['trial']} stopped after step {max(logged.values())}, resumes from {resumes}"
        )
    if waiting:
        parts.append(f"{waiting} trial{'s' * (waiting > 1)} not started")
    return "; ".join(parts)


def print_ui_links(outcome: SweepOutcome, best_metric: tuple[str, str], ui_url: str | None = None) -> None:
    """How to open the UI on the store, then links to the experiment's runs table (best `best_metric`
    first: a (metric, mode) pair) and to the compare page of every trial that has a run."""
    from alignprop_ray.sweep.tracking import compare_url, runs_table_url, ui_base
    from alignprop_ray.tracking import ui_command

    uri = outcome.tracking_uri
    if uri.startswith("databricks") or outcome.experiment_id is None:  # Databricks links differ
        return
    base = ui_base(uri, ui_url)
    command = ui_command(uri, base)
    if command:
        print(f"  open the UI:     {command}")
    print(f"  runs table:      {runs_table_url(base, outcome.experiment_id, *best_metric)}")
    run_ids = [row["run_id"] for row in outcome.rows if row.get("run_id")]
    if run_ids:
        print(f"  compare trials:  {compare_url(base, run_ids, [outcome.experiment_id])}")
