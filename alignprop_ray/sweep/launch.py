"""`alignprop-ray sweep FILE [--set ...] [--resume]` and `alignprop-ray demo`: run a sweep on Ray Tune.

    sweep file -> load_sweep (every problem, before any work) -> parent MLflow run -> Tuner.fit
      (or Tuner.restore with --resume) -> one trial = one Ray Train run = one child MLflow run
      -> table of trials, best adapter, Pareto front; summary logged to the parent run

Tune's results live in `<storage>/<sweep name>/` (storage: tune.storage_path, default the base
experiment's storage.path); each trial's Train run keeps its checkpoints in `train_runs/` below it.
"""

from __future__ import annotations

import argparse
import contextlib
import posixpath
import sys
from collections.abc import Callable
from pathlib import Path

from alignprop_ray.console import quiet_console
from alignprop_ray.errors import UserError
from alignprop_ray.sweep import capacity
from alignprop_ray.sweep.console import print_outcome
from alignprop_ray.sweep.summary import TRAIN_RUNS, SweepOutcome

DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}  # Tune needs a non-empty request; the workers hold the CPUs


def cmd_sweep(args: argparse.Namespace) -> int:
    from alignprop_ray.sweep.config import load_sweep
    from alignprop_ray.train.launch import ray_of_this_command

    ui_url = _ui_url(args)
    if args.register:
        from alignprop_ray.registry import check_model_name

        check_model_name(args.register)
    sweep = load_sweep(args.config, args.overrides)
    with quiet_console(verbose=args.verbose), ray_of_this_command():
        outcome = run_sweep(sweep, resume=args.resume)
    resume = f"alignprop-ray sweep {args.config} --resume"
    print_outcome(outcome, sweep, resume_command=resume, ui_url=ui_url)
    return _register_best(outcome, args.register) if args.register else outcome.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    """sweeps/demo.yaml (AlignProp on the toy-shapes model), then its report, everything written under
    --workdir; rerunning resumes the sweep."""
    from alignprop_ray.report import write_report
    from alignprop_ray.sweep.config import load_sweep
    from alignprop_ray.train.launch import ray_of_this_command

    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    ui_url = _ui_url(args)
    overrides = [f"base.tracking.uri={uri}", f"base.storage.path={workdir / 'runs'}"]
    sweep = load_sweep(shipped_sweep("demo.yaml"), overrides)
    with quiet_console(verbose=args.verbose), ray_of_this_command():
        outcome = run_sweep(sweep, resume=can_resume(sweep))
    resume = f"alignprop-ray demo --workdir {args.workdir}"
    print_outcome(outcome, sweep, resume_command=resume, ui_url=ui_url)
    print(f"MLflow store: {workdir / 'mlflow.db'} (artifacts: {workdir / 'mlartifacts'})")
    if not outcome.interrupted:
        write_report(uri, sweep.reference.tracking.experiment, workdir / "report")
        print(
            f"report (first and last eval images of each trial, curves): {workdir / 'report' / 'index.html'}"
        )
    return outcome.exit_code


def _ui_url(args: argparse.Namespace) -> str | None:
    from alignprop_ray.sweep.tracking import check_ui_url

    return check_ui_url(args.ui_url) if args.ui_url else None


def _register_best(outcome: SweepOutcome, name: str) -> int:
    """`sweep --register NAME`: the best trial's adapter as a new version of model NAME."""
    from alignprop_ray.registry import register

    best = outcome.best
    if outcome.interrupted or not best or not best.get("run_id"):
        why = "the sweep was interrupted" if outcome.interrupted else "no trial has a result to rank"
        print(f"\nnot registered as {name!r}: {why}", file=sys.stderr)
        return outcome.exit_code or 1
    print()
    register(outcome.tracking_uri, best["run_id"], name)
    return outcome.exit_code


def shipped_sweep(name: str) -> Path:
    """sweeps/NAME of the clone this package runs from (or of the cwd)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "sweeps" / name).is_file():
            return root / "sweeps" / name
    raise UserError(f"sweeps/{name} not found: run the demo from a clone of the repository")


def experiment_path(sweep) -> str:
    return posixpath.join(sweep.storage_path.rstrip("/"), sweep.name)


def can_resume(sweep) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment_path(sweep))


def finished_outcome(sweep) -> SweepOutcome | None:
    """The outcome of a sweep that finished before (its parent run FINISHED, Tune's state on disk), read
    again without running a trial; None if it has not finished. Raises UserError if its settings changed."""
    from alignprop_ray import tracking
    from alignprop_ray.sweep.tracking import find_parent

    uri, experiment = sweep.reference.tracking.uri, sweep.reference.tracking.experiment
    parent_id = find_parent(uri, experiment, sweep.name)
    if parent_id is None or not can_resume(sweep):
        return None
    if tracking.client(uri).get_run(parent_id).info.status != "FINISHED":
        return None
    _check_same_search(sweep, uri, experiment)
    return _finish(sweep, experiment_path(sweep), uri, experiment, parent_id)


def run_sweep(sweep, *, resume: bool = False, say: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or with `resume`, continue) the sweep on Ray and return its trials; raises UserError early."""
    from alignprop_ray import tracking
    from alignprop_ray.serving.pool import reward_pool
    from alignprop_ray.serving.specs import SERVED_TAG, served_tag
    from alignprop_ray.sweep import tracking as sweep_tracking
    from alignprop_ray.train.launch import connect_ray

    uri, experiment = sweep.reference.tracking.uri, sweep.reference.tracking.experiment
    path = experiment_path(sweep)
    _check_state(sweep, path, uri, experiment, resume)
    connect_ray()
    _say_ray_version(say)
    served = sweep.served_terms()  # every trial's served rewards: one pool for the whole sweep
    held = [replica for term in served for replica in term.holds()]
    concurrency, why = capacity.concurrency(sweep, say, held)
    with reward_pool(served, say):  # before anything in MLflow: a reward that cannot start leaves nothing
        tracking.ensure_experiment(uri, experiment)  # before any server: pins the artifact folder
        parent_id, _ = sweep_tracking.start_parent(uri, experiment, sweep, _sweep_yaml(sweep))
        if served:
            tracking.client(uri).set_tag(parent_id, SERVED_TAG, served_tag(served))
        say(_header(sweep, path, uri, parent_id, concurrency, why, resume))
        try:
            with _trial_tracking_uri(uri, concurrency, path) as trial_uri:
                _fit(sweep, path, parent_id, trial_uri, concurrency, resume)
        except BaseException as err:
            tracking.end_run(uri, parent_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
    return _finish(sweep, path, uri, experiment, parent_id)


def ray_version_note(running: str, requirements: list[str]) -> str | None:
    """A warning if `running` (the Ray here) is not the Ray that this package's `requirements` pin, which
    is the cluster image's (clusters/Dockerfile): a laptop's `ray up` and `ray job submit` need the
    cluster's Ray, and a sweep tried here first should run what the cluster runs."""
    from packaging.requirements import Requirement

    pins = [Requirement(r) for r in requirements]
    pinned = [str(r.specifier)[2:] for r in pins if r.name == "ray" and str(r.specifier).startswith("==")]
    if not pinned or pinned[0] == running:
        return None
    return (
        f"warning: Ray {running} runs here, the cluster image runs Ray {pinned[0]} (clusters/Dockerfile): "
        f"a laptop's `ray up` and `ray job submit` need the cluster's Ray; "
        f"pip install 'ray[default,serve,train,tune]=={pinned[0]}'"
    )


def _say_ray_version(say: Callable[[str], None]) -> None:
    from importlib.metadata import PackageNotFoundError, requires

    import ray

    try:
        note = ray_version_note(ray.__version__, requires("alignprop-ray") or [])
    except PackageNotFoundError:  # a source tree that was never installed: nothing pinned
        return
    if note:
        say(note)


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


def _sweep_yaml(sweep) -> str:
    import yaml

    data = sweep.config.model_dump(mode="json", exclude_none=True)
    data["base"] = sweep.reference.to_dict()
    return yaml.safe_dump(data, sort_keys=False)


def _header(sweep, path: str, uri: str, parent_id: str, concurrency: int, why: str, resume: bool) -> str:
    tune = sweep.config.tune
    count = sweep.trial_count()
    space = "; ".join(f"{d.field} {d.describe()}" for d in sweep.domains)
    return "\n".join(
        [
            f"# sweep {sweep.name}{' (resumed)' if resume else ''}: {count} trials ({tune.algorithm}"
            f"{', ' + tune.scheduler if tune.scheduler != 'none' else ''}), up to {concurrency} at a time "
            f"({why}); "
            f"each trial: {capacity.trial_resources(sweep)}",
            f"#   space: {space}",
            f"#   objective: {', '.join(f'{m} ({o})' for m, o in zip(tune.metrics, tune.modes, strict=True))}",
            f"#   best trial: {_rule_line(sweep)}",
            f"#   MLflow: parent run {parent_id}, experiment {sweep.reference.tracking.experiment!r}, {uri}",
            f"#   Tune results and checkpoints: {path}",
            f"#   a trial without room for its workers waits for it (failure.wait_for_room_s: {_bound(sweep)})",
        ]
    )


def _bound(sweep) -> str:
    wait = sweep.reference.failure.wait_for_room_s
    return "no limit" if wait is None else f"{wait:g} s"


def _rule_line(sweep) -> str:
    rule = sweep.selection_rule
    kept = "; ".join(map(str, rule.constraints))
    where = "tune.select" if sweep.config.tune.select is not None else "the default: not collapsed"
    best = f"the {rule.mode} of {rule.metric}"
    return f"{best} among the trials that keep {kept} ({where})" if kept else f"{best} ({where}: [])"


def _trial_tracking_uri(uri: str, concurrency: int, path: str):
    """The URI trials log to: the store, or a local server in front of SQLite when trials overlap."""
    if not uri.startswith("sqlite:") or concurrency <= 1:
        return contextlib.nullcontext(uri)
    from alignprop_ray.sweep.mlflow_server import local_server

    log_dir = path if "://" not in path else Path(uri.removeprefix("sqlite:///")).parent
    return local_server(uri, log_dir)


def _fit(sweep, path: str, parent_id: str, trial_uri: str, concurrency: int, resume: bool) -> None:
    from ray import tune

    from alignprop_ray.sweep.slots import start_slots
    from alignprop_ray.sweep.trial import TrialContext, run_trial

    # Tune alone lets a resumed sweep run more trials at once than `concurrency` (sweep/slots.py)
    slots = start_slots(concurrency)
    train_runs = posixpath.join(path, TRAIN_RUNS)
    context = TrialContext(sweep, parent_id, trial_uri, train_runs, slots, concurrency)
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

    from alignprop_ray.sweep.stoppers import CollapseRule, OveroptimizationRule, TrialStopper
    from alignprop_ray.sweep.tracking import ChildRunCloser

    stop = sweep.config.stop
    collapse = CollapseRule(**stop.collapse.model_dump()) if stop.collapse else None
    nan_metrics = [*sweep.config.tune.metrics, "train/loss"] if stop.nan else []
    over = stop.overoptimization
    overoptimization = (
        OveroptimizationRule(over.heldout_metric, over.margin, over.window, over.reward) if over else None
    )
    stopper = TrialStopper(collapse, nan_metrics, overoptimization)
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

    from alignprop_ray import tracking
    from alignprop_ray.sweep import summary
    from alignprop_ray.sweep.tracking import finish_parent, first_values

    trials = ExperimentAnalysis(path).trials
    rows = summary.trial_rows(trials, sweep, _child_runs(uri, experiment, parent_id))
    rule = sweep.selection_rule
    relative = sorted({c.metric for c in rule.constraints if c.relative})
    best, selection = summary.choose(rows, rule, first_values(uri, rows, relative))
    fronts = summary.fronts(rows, sweep)
    experiment_id = tracking.client(uri).get_experiment_by_name(experiment).experiment_id
    outcome = SweepOutcome(sweep.name, parent_id, uri, path, rows, best, fronts, experiment_id, selection)
    status = "KILLED" if outcome.interrupted else ("FAILED" if outcome.exit_code else "FINISHED")
    finish_parent(uri, parent_id, outcome, status, [d.field for d in sweep.domains])
    return outcome


def _child_runs(uri: str, experiment: str, parent_id: str) -> dict[str, str]:
    """Trial id -> MLflow run id of the sweep's child runs."""
    from alignprop_ray import tracking
    from alignprop_ray.tracking import TRIAL_TAG

    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'", max_results=10_000
    )
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}
