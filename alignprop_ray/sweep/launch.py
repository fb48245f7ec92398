"""`alignprop-ray sweep FILE [--set ...] [--resume]` and `alignprop-ray demo`: run a sweep on Ray Tune.

    sweep file -> load_sweep (every problem, before any work) -> parent MLflow run -> Tuner.fit
      (or Tuner.restore with --resume) -> one trial = one TorchTrainer run = one child MLflow run
      -> table of trials, best adapter, Pareto front; summary logged to the parent run

Tune's results live in `<storage>/<sweep name>/` (storage: tune.storage_path, default the base
experiment's storage.path); each trial's Train run keeps its checkpoints in `train_runs/` below it.
"""

from __future__ import annotations

import argparse
import contextlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignprop_ray.errors import UserError

DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}  # Tune needs a non-empty request; the workers hold the CPUs
TRAIN_RUNS = "train_runs"


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return any(r["status"] in ("pending", "running", "paused") for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if any(r["status"] == "error" for r in self.rows) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from alignprop_ray.sweep.config import load_sweep

    sweep = load_sweep(args.config, args.overrides)
    outcome = run_sweep(sweep, resume=args.resume)
    print_outcome(outcome, sweep, resume_command=f"alignprop-ray sweep {args.config} --resume")
    return outcome.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    """The smoke sweep on the tiny model, everything written under --workdir; rerunning resumes it."""
    from alignprop_ray.sweep.config import load_sweep

    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sweep = load_sweep(smoke_file(), [f"tracking.uri={uri}", f"storage.path={workdir / 'runs'}"])
    outcome = run_sweep(sweep, resume=can_resume(sweep))
    print_outcome(outcome, sweep, resume_command=f"alignprop-ray demo --workdir {args.workdir}")
    print(f"MLflow store: {workdir / 'mlflow.db'} (artifacts: {workdir / 'mlartifacts'})")
    return outcome.exit_code


def smoke_file() -> Path:
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "sweeps" / "smoke.yaml").is_file():
            return root / "sweeps" / "smoke.yaml"
    raise UserError("sweeps/smoke.yaml not found: run the demo from a clone of the repository")


def experiment_path(sweep) -> str:
    return posixpath.join(sweep.storage_path.rstrip("/"), sweep.name)


def can_resume(sweep) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment_path(sweep))


def run_sweep(sweep, *, resume: bool = False, say: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or with `resume`, continue) the sweep on Ray and return its trials; raises UserError early."""
    from alignprop_ray import tracking
    from alignprop_ray.sweep import tracking as sweep_tracking
    from alignprop_ray.train.launch import connect_ray

    uri, experiment = sweep.reference.tracking.uri, sweep.reference.tracking.experiment
    path = experiment_path(sweep)
    _check_state(sweep, path, uri, experiment, resume)
    connect_ray()
    concurrency = sweep.config.tune.max_concurrent_trials or _capacity(sweep, say)
    tracking.ensure_experiment(uri, experiment)  # before any server: pins the artifact folder
    parent_id, _ = sweep_tracking.start_parent(uri, experiment, sweep, _sweep_yaml(sweep))
    say(_header(sweep, path, uri, parent_id, concurrency, resume))
    try:
        with _trial_tracking_uri(uri, concurrency, path) as trial_uri:
            _fit(sweep, path, parent_id, trial_uri, concurrency, resume)
    except BaseException as err:
        tracking.end_run(uri, parent_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return _finish(sweep, path, uri, experiment, parent_id)


def _check_state(sweep, path: str, uri: str, experiment: str, resume: bool) -> None:
    from ray import tune

    from alignprop_ray.sweep.tracking import find_parent

    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise UserError(
            f"nothing to resume: no sweep {sweep.name!r} in {sweep.storage_path} (start it without --resume)"
        )
    if not resume and exists:
        raise UserError(
            f"sweep {sweep.name!r} already exists in {sweep.storage_path}: continue it with "
            f"--resume, or start another with --set name={sweep.name}-2"
        )
    if resume:
        _check_same_search(sweep, uri, experiment)
    if not resume and find_parent(uri, experiment, sweep.name):
        raise UserError(
            f"MLflow experiment {experiment!r} already has a run named {sweep.name!r} ({uri}): "
            f"start the sweep under another name, e.g. --set name={sweep.name}-2"
        )


def _check_same_search(sweep, uri: str, experiment: str) -> None:
    """Tune resumes the search and trial configs it pickled: a changed space, Tune or base setting would
    silently not apply (or apply to some trials only)."""
    from alignprop_ray import tracking
    from alignprop_ray.sweep.tracking import find_parent, parent_params

    run_id = find_parent(uri, experiment, sweep.name)
    if run_id is None:
        return
    changed = tracking.changed_param(uri, run_id, parent_params(sweep))
    if changed:
        key, logged, now = changed
        raise UserError(
            f"{key} was {logged} when sweep {sweep.name!r} started (now {now}); "
            "resume it with the same settings, or start another with --set name=..."
        )


def _capacity(sweep, say: Callable[[str], None]) -> int:
    """How many trials the cluster can run at once: its resources over one trial's workers' needs."""
    import ray

    need = trial_resources(sweep)
    total = ray.cluster_resources()
    fits = [int(total.get(key, 0) // amount) for key, amount in need.items() if amount > 0]
    capacity = min(fits) if fits else 1
    if capacity < 1:
        say(
            f"note: the cluster has {_fmt(total, need)} now, one trial needs {need}: trials wait for "
            "resources (an autoscaler may add them); set tune.max_concurrent_trials to plan for more"
        )
        return 1
    return capacity


def trial_resources(sweep) -> dict[str, float]:
    """Resources of one trial's Train workers (the most workers any searched value asks for)."""
    scaling = sweep.reference.scaling
    workers = max(
        [
            scaling.num_workers,
            *(int(v) for d in sweep.domains if d.field == "scaling.num_workers" for v in d.candidates()),
        ]
    )
    per_worker = dict(scaling.resources_per_worker or {"CPU": 1.0})
    if scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return {key: amount * workers for key, amount in per_worker.items()}


def _fmt(total: dict, need: dict) -> str:
    return ", ".join(f"{key}: {total.get(key, 0):g}" for key in need) or "no resources"


def _sweep_yaml(sweep) -> str:
    import yaml

    data = sweep.config.model_dump(mode="json", exclude_none=True)
    data["base"] = sweep.reference.to_dict()
    return yaml.safe_dump(data, sort_keys=False)


def _header(sweep, path: str, uri: str, parent_id: str, concurrency: int, resume: bool) -> str:
    tune = sweep.config.tune
    count = sweep.trial_count()
    space = "; ".join(f"{d.field} {d.describe()}" for d in sweep.domains)
    return "\n".join(
        [
            f"# sweep {sweep.name}{' (resumed)' if resume else ''}: {count} trials ({tune.algorithm}"
            f"{', ' + tune.scheduler if tune.scheduler != 'none' else ''}), up to {concurrency} at a time; "
            f"each trial: {trial_resources(sweep)}",
            f"#   space: {space}",
            f"#   objective: {', '.join(f'{m} ({o})' for m, o in zip(tune.metrics, tune.modes, strict=True))}",
            f"#   MLflow: parent run {parent_id}, experiment {sweep.reference.tracking.experiment!r}, {uri}",
            f"#   Tune results and checkpoints: {path}",
        ]
    )


def _trial_tracking_uri(uri: str, concurrency: int, path: str):
    """The URI trials log to: the store, or a local server in front of SQLite when trials overlap."""
    if not uri.startswith("sqlite:") or concurrency <= 1:
        return contextlib.nullcontext(uri)
    from alignprop_ray.sweep.mlflow_server import local_server

    log_dir = path if "://" not in path else Path(uri.removeprefix("sqlite:///")).parent
    return local_server(uri, log_dir)


def _fit(sweep, path: str, parent_id: str, trial_uri: str, concurrency: int, resume: bool) -> None:
    from ray import tune

    from alignprop_ray.sweep.trial import TrialContext, run_trial

    context = TrialContext(sweep, parent_id, trial_uri, posixpath.join(path, TRAIN_RUNS))
    resources = dict(sweep.config.tune.resources or DRIVER_RESOURCES)
    if not any(resources.values()):
        resources["memory"] = DRIVER_RESOURCES["memory"]
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={d.field: d.to_tune() for d in sweep.domains},
            tune_config=_tune_config(sweep, concurrency),
            run_config=_run_config(sweep),
        )
    tuner.fit()


def _tune_config(sweep, concurrency: int):
    from ray import tune

    settings = sweep.config.tune
    metric, mode = (None, None) if settings.objectives else (settings.metrics[0], settings.modes[0])
    return tune.TuneConfig(
        metric=metric,
        mode=mode,
        search_alg=_searcher(sweep, concurrency),
        scheduler=_scheduler(sweep),
        num_samples=settings.num_samples,
        # Tune applies this to Searchers (Optuna); the variant generator takes its own max_concurrent.
        max_concurrent_trials=concurrency if settings.algorithm == "optuna" else None,
        reuse_actors=False,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )


def trial_name(trial) -> str:
    return trial.trial_id


def _searcher(sweep, concurrency: int):
    settings = sweep.config.tune
    if settings.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if settings.objectives:
            return OptunaSearch(metric=settings.metrics, mode=settings.modes, seed=settings.seed)
        return OptunaSearch(seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=settings.seed)


def _scheduler(sweep):
    settings = sweep.config.tune
    if settings.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    train = sweep.reference.train
    grace = settings.asha.grace_period or min(2 * train.eval_every, train.steps)
    # ASHA stops any trial that reaches max_t; one past the last step lets a finished trial save its adapter.
    return ASHAScheduler(
        time_attr="step",
        max_t=max_steps(sweep) + 1,
        grace_period=grace,
        reduction_factor=settings.asha.reduction_factor,
    )


def max_steps(sweep) -> int:
    """The most optimizer steps any trial runs (train.steps may be searched)."""
    searched = [int(v) for d in sweep.domains if d.field == "train.steps" for v in d.candidates()]
    return max([sweep.reference.train.steps, *searched])


def _run_config(sweep):
    from ray import tune

    from alignprop_ray.sweep.stoppers import CollapseRule, TrialStopper
    from alignprop_ray.sweep.tracking import ChildRunCloser

    stop = sweep.config.stop
    collapse = CollapseRule(**stop.collapse.model_dump()) if stop.collapse else None
    nan_metrics = [*sweep.config.tune.metrics, "train/loss"] if stop.nan else []
    stopper = TrialStopper(collapse, nan_metrics)
    ref = sweep.reference
    closer = ChildRunCloser(ref.tracking.uri, ref.tracking.experiment, sweep.name, ref.train.steps)
    return tune.RunConfig(
        name=sweep.name,
        storage_path=sweep.storage_path,
        stop=stopper,
        callbacks=[stopper, closer],  # the stopper too: Tune saves its state (stoppers.py)
        failure_config=tune.FailureConfig(max_failures=sweep.config.tune.max_failures),
        verbose=1,
    )


def _finish(sweep, path: str, uri: str, experiment: str, parent_id: str) -> SweepOutcome:
    from ray.tune import ExperimentAnalysis

    from alignprop_ray.sweep import summary
    from alignprop_ray.sweep.tracking import finish_parent

    trials = ExperimentAnalysis(path).trials
    rows = summary.trial_rows(trials, sweep, _child_runs(uri, experiment, parent_id))
    settings = sweep.config.tune
    best = summary.best_row(rows, *settings.best_metric)
    pareto = summary.pareto_front(rows, settings.metrics, settings.modes) if settings.objectives else []
    outcome = SweepOutcome(sweep.name, parent_id, uri, path, rows, best, pareto)
    status = "KILLED" if outcome.interrupted else ("FAILED" if outcome.exit_code else "FINISHED")
    finish_parent(uri, parent_id, rows, best, pareto, status)
    return outcome


def _child_runs(uri: str, experiment: str, parent_id: str) -> dict[str, str]:
    """Trial id -> MLflow run id of the sweep's child runs."""
    from alignprop_ray import tracking
    from alignprop_ray.sweep.tracking import TRIAL_TAG

    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'", max_results=10_000
    )
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}


def print_outcome(outcome: SweepOutcome, sweep, resume_command: str) -> None:
    from alignprop_ray.sweep.summary import format_table

    print("\n" + format_table(outcome.rows, sweep))
    metric, _ = sweep.config.tune.best_metric
    if outcome.pareto:
        names = ", ".join(r["trial"] for r in outcome.pareto)
        print(f"\nPareto front ({', '.join(sweep.config.tune.metrics)}): {names}")
    if outcome.best:
        best = outcome.best
        value = best.get(metric)
        print(f"\nbest trial: {best['trial']} ({metric} {'-' if value is None else f'{value:.4g}'})")
        print(f"best adapter: {best['adapter'] or '(no checkpoint)'}")
        if best.get("run_id"):
            print(f"  also in MLflow: runs:/{best['run_id']}/adapter")
    if outcome.interrupted:
        print(f"\ninterrupted: continue with `{resume_command}`")
    print(
        f"\nMLflow: parent run {outcome.parent_run_id}; compare trials with "
        f"`mlflow ui --backend-store-uri {outcome.tracking_uri}`"
    )
