"""Read an MLflow experiment into two tidy tables: one row per training run, one row per logged value.

Sweep parent runs (tagged `alignprop.kind=sweep`, or named by other runs' `mlflow.parentRunId`) are not
training runs: they are not rows of the runs table, but their name fills the `sweep` column of their trials,
and their settings (objectives, selection rule) go to `runs.attrs["sweeps"]`.

Each sweep's best run is chosen as the sweep chose it (alignprop_ray/selection.py: the objective under the
sweep's constraints, by default "not collapsed"); runs outside a sweep are compared as one group under the
default rule. The `selection` column says which run is best and why others are not.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from alignprop_ray.errors import UserError
from alignprop_ray.metrics import HELDOUT_PREFIX, TERM_PREFIXES
from alignprop_ray.rewards.spec import split_key
from alignprop_ray.selection import (
    Selection,
    SelectionRule,
    TrialResult,
    default_constraints,
    parse_rule,
    select,
)
from alignprop_ray.tracking import (
    COMPARE_FINAL_TAG,
    COMPARE_METHOD_TAG,
    COMPARE_ROUND_TAG,
    COMPARE_TAG,
    KIND_TAG,
    NAME_TAG,
    PARENT_TAG,
    SELECT_TAG,
    STOP_TAG,
)

MAX_LISTED = 20  # experiment names an error message lists
UNSET = "(unset)"  # the truncation of a run that logged no `truncation` param

# Per run, the value at the last logged step of these metrics becomes a `final_*` column.
FINAL_KEYS = {
    "final_eval_reward": "eval/reward",
    "final_eval_diversity": "eval/diversity",
    "final_eval_diversity_across_prompts": "eval/diversity_across_prompts",
    "final_eval_vendi": "eval/vendi",
    "final_eval_vendi_across_prompts": "eval/vendi_across_prompts",
    "final_train_reward": "train/reward",
}
# The first request to a tracking server fails fast: MLflow's default retries take minutes to give up.
PROBE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
HISTORY_COLUMNS = ["run_id", "name", "truncation", "key", "step", "value", "timestamp"]


def resolve_uri(tracking_uri: str | None) -> str:
    """The explicit URI, else $ALIGNPROP_TRACKING_URI, else $MLFLOW_TRACKING_URI, else the default that
    training uses (the same order as training, which also looks at its config file first)."""
    from alignprop_ray.config import TrackingConfig
    from alignprop_ray.config.overrides import tracking_uri_from_env

    found = tracking_uri_from_env(os.environ)
    return tracking_uri or (found[0] if found else TrackingConfig().uri)


def open_store(tracking_uri: str | None):
    """An MlflowClient on a store that exists and answers; UserError otherwise.

    A missing SQLite file is an error rather than a new empty store (MLflow would create one silently).
    """
    from mlflow import MlflowClient

    from alignprop_ray.config.paths import check_tracking_uri

    uri = resolve_uri(tracking_uri)
    try:
        check_tracking_uri(uri, databases=True)  # a tracking server, or the database behind one
    except ValueError as err:
        raise UserError(f"tracking URI {uri}: {err}") from None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')} (pass --tracking-uri, or set ALIGNPROP_TRACKING_URI or MLFLOW_TRACKING_URI)"
        )
    try:
        client = MlflowClient(tracking_uri=uri)
        with env_defaults(**PROBE_ENV):
            client.search_experiments(max_results=1)
    except Exception as err:  # any backend failure: bad file, server down, wrong scheme
        raise UserError(f"cannot read the MLflow store {uri}: {_first_line(err)}") from err
    return client


@contextmanager
def env_defaults(**values: str) -> Iterator[None]:
    """Set environment variables the user has not set, for the duration of the block."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def find_experiment(client, name: str | None):
    """The named active experiment, or (name None) the most recently created one that has runs."""
    if name is not None:
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "active":
            return found
        names = [e.name for e in client.search_experiments(order_by=["creation_time DESC"])]
        raise UserError(f"no experiment {name!r} in {client.tracking_uri}; available: {_listing(names)}")
    for experiment in client.search_experiments(order_by=["creation_time DESC"]):
        if client.search_runs([experiment.experiment_id], max_results=1):
            return experiment
    raise UserError(f"no experiment with runs in {client.tracking_uri}")


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more if names else "none"


def resolve_experiment(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """The name of the experiment `load_runs` would read (for `mlflow.search_runs(experiment_names=...)`)."""
    return find_experiment(open_store(tracking_uri), experiment).name


def load_runs(
    tracking_uri: str | None = None, experiment: str | None = None, *, keys: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of an experiment's training runs.

    runs: one row per run: run_id, name, sweep, status, stop_reason, truncation, lr, reward, last_step,
    terms (reward term names), base_eval_reward (step 0), final_eval_reward, final_eval_diversity, ...,
    and every MLflow param as `params.<dotted key>`. history: one row per (run, metric, step) with the
    columns in HISTORY_COLUMNS. `keys` keeps only metrics whose name starts with one of them.
    `runs.attrs` holds `experiment` and `tracking_uri`.
    """
    client = open_store(tracking_uri)
    found = find_experiment(client, experiment)
    runs, history = load_experiment(client, found.experiment_id, keys)
    if runs.empty:
        raise UserError(f"experiment {found.name!r} has no training runs yet")
    runs.attrs.update(experiment=found.name, tracking_uri=client.tracking_uri)
    return runs, history


def load_experiment(
    client, experiment_id: str, keys: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """load_runs on an open client; the runs table may be empty."""
    all_runs = _search_all(client, experiment_id)
    parent_ids = {r.data.tags.get(PARENT_TAG) for r in all_runs} - {None}
    parent_ids |= {
        r.info.run_id for r in all_runs if r.data.tags.get(KIND_TAG) == "sweep"
    }  # before any trial
    names = {r.info.run_id: _run_name(r) for r in all_runs}
    trained = [r for r in all_runs if r.info.run_id not in parent_ids]
    runs = pd.DataFrame([_run_row(r, names) for r in trained], columns=None if trained else ["run_id"])
    history = _history(client, trained, runs, keys)
    runs = _add_finals(runs, history)
    runs.attrs["sweeps"] = {
        names[r.info.run_id]: _sweep_settings(r) for r in all_runs if r.info.run_id in parent_ids
    }
    if not runs.empty:
        runs["selection"] = selection_column(runs, history)
    return runs, history


def _sweep_settings(parent) -> dict[str, Any]:
    """What a sweep's parent run says of how it ranks trials: objectives (tune.metric/tune.mode params,
    comma-separated for multi-objective sweeps) and the selection rule it applied (SELECT_TAG)."""
    params, tags = parent.data.params, parent.data.tags
    metrics = [m for m in params.get("tune.metric", "eval/reward").split(",") if m]
    modes = params.get("tune.mode", "max").split(",")
    modes = modes if len(modes) == len(metrics) else ["max"] * len(metrics)
    return {"metrics": metrics, "modes": modes, "rule": tags.get(SELECT_TAG)}


def sweep_rule(settings: dict[str, Any] | None) -> SelectionRule:
    """The rule a sweep's trials are ranked by: the one it logged, else its objective, not collapsed."""
    if settings and settings.get("rule"):
        try:
            return parse_rule(settings["rule"])
        except ValueError:
            pass  # written by another version: rank as the default does
    metric, mode = ("eval/reward", "max") if not settings else (settings["metrics"][0], settings["modes"][0])
    return SelectionRule(metric, mode, default_constraints())


def trial_results(runs: pd.DataFrame, history: pd.DataFrame) -> dict[str, TrialResult]:
    """run_id -> what selection needs of a run: each metric at its last and at its first logged step (the
    base model's evaluation, step 0); completed: FINISHED and not ended by a stopper."""
    ordered = history.sort_values(["run_id", "key", "step"], kind="stable").groupby(["run_id", "key"])
    last = ordered.tail(1).set_index(["run_id", "key"])["value"]
    first = ordered.head(1).set_index(["run_id", "key"])["value"]
    values: dict[str, tuple[dict, dict]] = {run_id: ({}, {}) for run_id in runs["run_id"]}
    for (run_id, key), value in last.items():
        values[run_id][0][key] = value
    for (run_id, key), value in first.items():
        values[run_id][1][key] = value
    return {
        run.run_id: TrialResult(run.name, *values[run.run_id], completed=_completed(run))
        for run in runs.itertuples()
    }


def _completed(run) -> bool:
    return run.status == "FINISHED" and not isinstance(run.stop_reason, str)


def selections(runs: pd.DataFrame, history: pd.DataFrame) -> dict[str, Selection]:
    """Sweep name ("" for runs outside a sweep) -> the selection among its runs under its rule."""
    results = trial_results(runs, history)
    sweeps = runs.attrs.get("sweeps", {})
    found = {}
    for sweep, members in runs.groupby(runs["sweep"].fillna(""), sort=True):
        rule = sweep_rule(sweeps.get(sweep))
        found[sweep] = select([results[run_id] for run_id in members["run_id"]], rule)
    return found


def selection_lines(runs: pd.DataFrame, history: pd.DataFrame) -> list[str]:
    """Per sweep: its rule, the run it picks and why the plain maximum is not that run (if it is not)."""
    lines = []
    for sweep, selection in selections(runs, history).items():
        explained = selection.explain() or ["no run has a result to rank"]
        lines.append(f"{f'sweep {sweep}' if sweep else 'runs outside a sweep'}: {explained[0]}")
        lines += [line.strip() for line in explained[1:]]
    return lines


def selection_column(runs: pd.DataFrame, history: pd.DataFrame) -> list[str]:
    """Per run: `best` (its sweep's choice; `best (fallback)` when no run keeps the rule), why it breaks
    the rule (`collapsed: eval/diversity 0.020 < 0.142`), or empty."""
    marks: dict[str, str] = {}
    for selection in selections(runs, history).values():
        marks.update(selection.broken)
        if selection.best is not None:
            marks[selection.best.id] = "best (fallback)" if selection.fallback else "best"
    return [marks.get(name, "") for name in runs["name"]]


def _search_all(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"]
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _run_name(run) -> str:
    return run.data.tags.get(NAME_TAG) or run.info.run_name or run.info.run_id[:8]


def _run_row(run, names: dict[str, str]) -> dict[str, Any]:
    params, tags = run.data.params, run.data.tags
    parent = tags.get(PARENT_TAG)
    return {
        "run_id": run.info.run_id,
        "name": names[run.info.run_id],
        "sweep": names.get(parent, parent),
        "status": run.info.status,
        "stop_reason": tags.get(STOP_TAG),
        "truncation": params.get("truncation", UNSET),
        "lr": _to_float(params.get("train.lr"))
        * _to_float(params.get("train.lr_scale", "1")),  # the optimizer's
        "reward": reward_label(params),
        # `alignprop-ray compare`: the comparison, method label and round of the run; final: at the pick
        "compare": tags.get(COMPARE_TAG),
        "compare_method": tags.get(COMPARE_METHOD_TAG),
        "compare_round": tags.get(COMPARE_ROUND_TAG),
        "compare_final": tags.get(COMPARE_FINAL_TAG) == "true",
        "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
        **{f"params.{key}": value for key, value in sorted(params.items())},
    }


def reward_label(params: dict[str, str]) -> str:
    """`aesthetic=0.3 + hpsv2=0.7` from `reward.<name>` (shorthand weight) or `reward.<name>.weight` params."""
    weights: dict[str, str] = {}
    for key, value in sorted(params.items()):  # `<name>.objective` sorts before `<name>.weight`
        if not key.startswith("reward."):
            continue
        name, field = split_key(key.removeprefix("reward."))
        if field in ("", "weight"):
            weights[name] = value
        else:
            weights.setdefault(name, "1.0")  # a term given only by its settings weighs 1 (the default)
    return " + ".join(f"{name}={weight}" for name, weight in sorted(weights.items()))


def _history(client, runs: list, table: pd.DataFrame, keys: Sequence[str] | None) -> pd.DataFrame:
    records = []
    truncation = dict(zip(table.get("run_id", []), table.get("truncation", []), strict=True))
    for run in runs:
        run_id, name = run.info.run_id, _run_name(run)
        for key in sorted(_wanted(run.data.metrics, keys)):
            for m in client.get_metric_history(run_id, key):
                records.append((run_id, name, truncation[run_id], key, m.step, m.value, m.timestamp))
    history = pd.DataFrame.from_records(records, columns=HISTORY_COLUMNS)
    history = history.astype({"step": "int64", "value": "float64", "timestamp": "int64"})
    history = history.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    # A resumed run may log a step twice: the later value is the one that counts.
    return history.drop_duplicates(["run_id", "key", "step"], keep="last").reset_index(drop=True)


def _wanted(metric_keys: Iterable[str], prefixes: Sequence[str] | None) -> list[str]:
    return [k for k in metric_keys if prefixes is None or k.startswith(tuple(prefixes))]


def _add_finals(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Columns from the histories: final_* values, base_eval_reward, last_step, reward terms, and per
    held-out reward <name> (`heldout` lists them) `base_heldout/<name>` and `final_heldout/<name>`."""
    # the value at the last step, NaN included (GroupBy.last would skip back to an earlier finite value)
    last = history.groupby(["run_id", "key"]).tail(1).set_index(["run_id", "key"])["value"]
    base = history[history["step"] == 0].set_index(["run_id", "key"])["value"]
    for column, key in FINAL_KEYS.items():
        runs[column] = [last.get((run_id, key), math.nan) for run_id in runs["run_id"]]
    runs["base_eval_reward"] = [base.get((run_id, "eval/reward"), math.nan) for run_id in runs["run_id"]]
    keys = history.groupby("run_id")["key"].unique()
    runs["heldout"] = [heldout_rewards(keys.get(run_id, [])) for run_id in runs["run_id"]]
    for name in sorted({name for names in runs["heldout"] for name in names}):
        for column, values in (("base", base), ("final", last)):
            key = HELDOUT_PREFIX + name
            runs[f"{column}_heldout/{name}"] = [
                values.get((run_id, key), math.nan) for run_id in runs["run_id"]
            ]
    train = history[history["key"].str.startswith("train/")].groupby("run_id")["step"].max()
    runs["last_step"] = [int(train[r]) if r in train else None for r in runs["run_id"]]
    runs["last_step"] = runs["last_step"].astype("Int64")
    runs["terms"] = [reward_terms(keys.get(run_id, [])) for run_id in runs["run_id"]]
    return runs


def heldout_rewards(keys: Iterable[str]) -> list[str]:
    """The held-out reward names among metric keys (`eval/heldout/<name>`)."""
    return sorted({k.removeprefix(HELDOUT_PREFIX) for k in keys if k.startswith(HELDOUT_PREFIX)})


def reward_terms(keys: Iterable[str]) -> list[str]:
    """The reward term names among metric keys (`train/reward/<term>`, `eval/reward/<term>`)."""
    return sorted({k.split("/", 2)[2] for k in keys if k.startswith(TERM_PREFIXES)})


def metric(history: pd.DataFrame, key: str, run_id: str | None = None) -> pd.DataFrame:
    """Rows of one metric (of one run), ordered by step."""
    rows = history[history["key"] == key]
    if run_id is not None:
        rows = rows[rows["run_id"] == run_id]
    return rows.sort_values("step")


SUMMARY_SKIP = ("name", "tracking.", "storage.", "failure.", "truncation", "train.lr", "reward.")


def varying_params(runs: pd.DataFrame) -> list[str]:
    """Dotted param keys whose value differs between runs (what a sweep varied), except those shown anyway."""
    columns = [c for c in runs.columns if c.startswith("params.")]
    keys = [c for c in columns if runs[c].astype(str).nunique(dropna=False) > 1]
    return [c.removeprefix("params.") for c in keys if not c.removeprefix("params.").startswith(SUMMARY_SKIP)]


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One display row per run, best final eval reward first: what the report's table shows."""
    varying = varying_params(runs)
    table = pd.DataFrame(
        {
            "run": runs["name"],
            "truncation": runs["truncation"],
            "lr": runs["lr"],
            "reward": runs["reward"],
            **{key: runs[f"params.{key}"] for key in varying},
            "last step": runs["last_step"],
            "base eval/reward": runs["base_eval_reward"],
            "final eval/reward": runs["final_eval_reward"],
            **{
                f"{when} eval/heldout/{name}": runs[f"{when}_heldout/{name}"]
                for name in sorted({name for names in runs["heldout"] for name in names})
                for when in ("base", "final")
            },
            "final eval/diversity": runs["final_eval_diversity"],
            "final eval/vendi": runs["final_eval_vendi"],
            "status": runs["status"],
            "stop reason": runs["stop_reason"],
            "selection": runs["selection"] if "selection" in runs else "",
        }
    )
    order = runs["final_eval_reward"].fillna(-math.inf).sort_values(ascending=False, kind="stable").index
    return table.loc[order].reset_index(drop=True)


def _to_float(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
