"""`alignprop-ray train`: validate, open (or find) the MLflow run, run a Ray Train trainer on Ray.

The driver owns the MLflow run's life cycle (create or resume by name, then FINISHED/FAILED); rank 0
of the workers logs metrics and artifacts into it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import posixpath
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from alignprop_ray.console import quiet_console
from alignprop_ray.errors import UserError

# Ray Train 2.60 gives each worker a one-slot result queue that its controller empties only when it polls
# the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2 s). Our loop reports every step,
# so with the default any step shorter than 2 s is held to 2 s (BENCHMARKS.md, section 4). Ray passes the
# variable from the process calling fit() to the controller and workers; a value set by the user wins.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.1"
# Ray Train 2.60 starts a PreemptionWatcher actor (a process of ~100 MiB on the driver's node, so one
# more per running trial on a sweep's head) for every worker group. It acts only on nodes that Ray drains
# with notice (`ray drain-node`, a platform that forwards preemption notices); the clusters in clusters/
# forward none, so a reclaimed spot node is a lost node, restarted from the last checkpoint. Off unless
# the user sets it (docs/clusters.md: "What the head carries").
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@dataclass
class TrainOutcome:
    name: str
    run_id: str
    resumed: bool
    checkpoint: str | None  # the last checkpoint directory (holds adapter/)
    metrics: dict


def cmd_train(args: argparse.Namespace) -> int:
    from alignprop_ray.config import load_experiment
    from alignprop_ray.config.experiment import tracking_uri_source

    cfg = load_experiment(args.config, args.overrides)
    print("# resolved config\n" + cfg.to_yaml(), flush=True)
    t = cfg.train
    print(
        f"{cfg.scaling.num_workers} workers x {t.batch_size} images x {t.grad_accum} accumulation = "
        f"{cfg.images_per_step} images per optimizer step",
        flush=True,
    )
    source = tracking_uri_source(args.config, args.overrides)
    print(f"MLflow tracking URI: {cfg.tracking.uri} (from {source})", flush=True)
    name = args.name or default_name(cfg)
    try:
        with quiet_console(verbose=args.verbose), ray_of_this_command():
            outcome = run_training(cfg, name=name)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train's SIGINT handler ends fit() with sys.exit(0)
        stopped = stopped_after(cfg, name)
        print(f"alignprop-ray train: interrupted {stopped}; {resume_hint(cfg, name, args)}", file=sys.stderr)
        return 130
    except Exception as err:  # Ray has printed any worker's traceback: end with the cause in one line
        line = failure_line(err)
        if line is None:
            raise
        print(f"alignprop-ray train: {line}; {resume_hint(cfg, name, args)}", file=sys.stderr)
        return 1
    print(f"run {outcome.name}: MLflow run {outcome.run_id} in {cfg.tracking.uri}")
    if outcome.checkpoint:
        print(f"adapter: {Path(outcome.checkpoint) / 'adapter'} (also logged to MLflow under adapter/)")
    print(f"compare runs: {compare_runs(cfg.tracking.uri)}")
    return 0


def compare_runs(uri: str) -> str:
    """Where to compare runs: the `mlflow ui` command that serves the store, or the server's own UI."""
    from alignprop_ray.tracking import ui_command

    return ui_command(uri) or f"the MLflow UI at {uri}"


def failure_line(err: BaseException) -> str | None:
    """A runtime failure in one line (None for a bug, whose traceback should show).

    A failed Train run: its first failing worker's error, or the controller's (the last line of the
    traceback Ray keeps, which names the exception). Our own errors say what happened in words and are
    shown without their type; so are the driver's own disk and MLflow errors.
    """
    from mlflow.exceptions import MlflowException
    from ray.train import ControllerError, TrainingFailedError, WorkerGroupError

    own = own_errors()
    if isinstance(err, own):
        return str(err)
    if isinstance(err, OSError | MlflowException):
        return f"{type(err).__name__}: {_last_line(str(err))}"
    if not isinstance(err, TrainingFailedError):
        return None
    cause: BaseException = err
    if isinstance(err, WorkerGroupError) and err.worker_failures:
        cause = err.worker_failures[min(err.worker_failures)]
    elif isinstance(err, ControllerError):
        cause = err.controller_failure
    line = _last_line(str(cause)) or type(cause).__name__
    for kind in own:
        line = line.removeprefix(f"{kind.__module__}.{kind.__qualname__}: ")
    return f"training failed: {line}"


def own_errors() -> tuple[type[Exception], ...]:
    """Runtime failures whose message says what happened and what was kept: shown as they are."""
    from alignprop_ray.serving.client import RewardServiceError
    from alignprop_ray.tracking import TrackingError
    from alignprop_ray.train.checkpoint import StorageError
    from alignprop_ray.train.loop import NonFiniteError
    from alignprop_ray.train.placement import NoRoomError, StartFailedError

    return StorageError, TrackingError, NonFiniteError, NoRoomError, StartFailedError, RewardServiceError


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def resume_hint(cfg, name: str, args: argparse.Namespace) -> str:
    """How to continue the run: the same command with its name, and the step it resumes from."""
    sets = "".join(f" --set {shlex.quote(item)}" for item in args.overrides)
    command = f"alignprop-ray train {shlex.quote(str(args.config))}{sets} --name {name}"
    step = last_checkpoint_step(cfg.storage.path, name)
    if step is None:
        return f"no checkpoint was saved: `{command}` starts it again"
    return f"resume from the checkpoint of step {step} with `{command}`"


def stopped_after(cfg, name: str) -> str:
    """`after step N`: the last step the run logged (`before its first step` if none)."""
    from alignprop_ray import tracking

    try:
        step = tracking.last_logged_step(cfg.tracking.uri, cfg.tracking.experiment, name)
    except Exception:  # the store itself may be what is failing: the line still says how to resume
        return "(its last step is not known: the MLflow store did not answer)"
    return f"after step {step}" if step else "before its first step"


def last_checkpoint_step(storage_path: str, name: str) -> int | None:
    """The step of the newest checkpoint of Train run `name` in `storage_path`, or None."""
    from ray.train import Result

    try:
        metrics = Result.from_path(posixpath.join(storage_path, name)).metrics or {}
    except Exception:  # no run folder, or no checkpoint record in it
        return None
    return metrics.get("step")


def default_name(cfg) -> str:
    return cfg.name or f"{cfg.tracking.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(
    cfg,
    name: str | None = None,
    *,
    tags: dict | None = None,
    callbacks: list | None = None,
    fail_at_step: int | list[int] | None = None,
    fail_marker: str | None = None,
) -> TrainOutcome:
    """Train one experiment to completion on Ray (resuming a run of the same name) and return its outcome.

    `tags` are set on a newly created MLflow run (a sweep passes `mlflow.parentRunId`); `callbacks` are
    Ray Train callbacks (a Tune trial passes `TuneReportCallback()` so its reports reach Tune).
    """
    name = name or default_name(cfg)
    check_storage(cfg.storage.path)
    with served_rewards(cfg) as served:  # before the MLflow run: a reward that cannot start leaves none
        return _run_training(cfg, name, served, tags, callbacks, fail_at_step, fail_marker)


@contextlib.contextmanager
def served_rewards(cfg):
    """The run's served rewards (serving/specs.py) running for the block: those already running (a sweep's)
    are used, those started here are stopped at its end. Yields the served terms."""
    from alignprop_ray.serving.specs import served_terms

    served = served_terms(cfg)
    if not served:
        yield served
        return
    from alignprop_ray.serving.pool import reward_pool

    connect_ray()
    with reward_pool(served):
        yield served


def _run_training(cfg, name, served, tags, callbacks, fail_at_step, fail_marker) -> TrainOutcome:
    from alignprop_ray import tracking
    from alignprop_ray.prompts import load_prompts
    from alignprop_ray.serving.specs import SERVED_TAG, served_tag
    from alignprop_ray.train.inputs import LoopInput

    loop_input = LoopInput(
        experiment=cfg.to_dict(),
        run_id="",  # set once the MLflow run exists
        train_prompts=load_prompts(cfg.prompts.train),
        eval_prompts=load_prompts(cfg.prompts.eval),
        fail_at_step=fail_at_step,
        fail_marker=fail_marker,
    )
    loop_input.run_id, resumed = tracking.start_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        name,
        cfg.flat_params(),
        cfg.to_yaml(),
        tags,
        check_resume=lambda existing: _check_same_config(cfg, existing, name),
    )
    run_id = loop_input.run_id
    if served:  # which rewards ran as services, with which settings (a resumed run may change them)
        tracking.retried(
            cfg.tracking.uri,
            tracking.client(cfg.tracking.uri).set_tag,
            run_id,
            SERVED_TAG,
            served_tag(served),
        )
    connect_ray()
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    trainer = build_trainer(cfg, name, asdict(loop_input), callbacks)
    try:
        result = trainer.fit()
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be what failed: keep the first error
            tracking.end_run_if_running(cfg.tracking.uri, run_id, "KILLED" if _interrupted() else "FAILED")
        raise
    tracking.end_run(cfg.tracking.uri, run_id)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return TrainOutcome(name, run_id, resumed, checkpoint, dict(result.metrics or {}))


def build_trainer(cfg, name: str, loop_config: dict, callbacks: list | None = None):
    """The Ray Train trainer for experiment `cfg`: its workers, process group, storage and failure policy.

    Torch-free on this side (train/backend.py): the driver and the run's controller never import torch."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from alignprop_ray.compat import ray_train_trainer_without_dataset_actor
    from alignprop_ray.train.backend import ProcessGroupConfig
    from alignprop_ray.train.inputs import process_group_backend

    scaling = cfg.scaling
    # a trainer that starts no idle DatasetManager actor per run (we give it no Ray Datasets)
    return ray_train_trainer_without_dataset_actor()(
        worker_main,
        train_loop_config=loop_config,
        # Not Ray's default (NCCL alone on GPUs): our step statistics and evaluation gathers are CPU data.
        backend_config=ProcessGroupConfig(backend=process_group_backend(scaling.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker,
            accelerator_type=scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.storage.path,
            failure_config=FailureConfig(
                max_failures=cfg.failure.max_failures,
                # A worker-group start that finds no room is tried again without limit: RoomWatch ends
                # the wait after failure.wait_for_room_s (first start) or wait_for_workers_s (restart).
                controller_failure_limit=-1,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[*(callbacks or []), room_watch(cfg, name, loop_config.get("run_id"))],
        ),
    )


def worker_main(loop_input: dict) -> None:
    """Ray Train's entry point on each worker (`train_loop_per_worker`): alignprop_ray.train.loop's.

    Imported there, not here: Ray pickles this function by reference, so the driver and the Train
    controller (on the head, one of each per running trial) never load the engine; the workers do.
    """
    from alignprop_ray.train.loop import train_loop

    train_loop(loop_input)


def room_watch(cfg, name: str, run_id: str | None):
    """The callback that bounds and shows the run's waits for room (alignprop_ray/train/placement.py)."""
    from alignprop_ray.train.placement import RoomWatch

    failure = cfg.failure
    return RoomWatch(
        name,
        wait_for_room_s=failure.wait_for_room_s,
        wait_for_workers_s=failure.wait_for_workers_s,
        max_start_failures=failure.max_failures,
        tracking=(cfg.tracking.uri, run_id) if run_id else None,
    )


def check_storage(path: str) -> None:
    """A local storage.path must take files: a read-only, full or missing disk fails here, before the MLflow
    run or anything else is created. (Ray checks a remote one, s3:// or gs://, itself.)"""
    if "://" in path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".alignprop-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        from alignprop_ray.train.checkpoint import StorageError

        raise StorageError(f"storage.path {path} cannot take checkpoints: {err.strerror or err}") from None


def _interrupted() -> bool:
    """Ctrl-C, or Tune stopping the trial: its session ends a stopped trial's thread with sys.exit(0)."""
    return isinstance(sys.exc_info()[1], KeyboardInterrupt | SystemExit)


def _check_same_config(cfg, run_id: str, name: str) -> None:
    """Resuming under a name whose run was trained with other settings would mix two experiments."""
    from alignprop_ray import tracking

    params = {k: v for k, v in cfg.flat_params().items() if not k.startswith(tracking.IGNORED_ON_RESUME)}
    changed = tracking.changed_param(cfg.tracking.uri, run_id, params)
    if changed:
        key, logged, now = changed
        raise UserError(
            f"run {name!r} exists with {key}={logged} (now {now}); use another --name to start a new run"
        )


@contextlib.contextmanager
def ray_of_this_command():
    """Shut down, at the end of the block, the Ray instance that `connect_ray` starts in it (one that was
    running before, a notebook's or a test session's, is left alone). Ray prints its workers' last lines
    while it shuts down; inside the block, the console filter still sees them (alignprop_ray/console.py)."""
    import ray

    started_here = not ray.is_initialized()
    try:
        yield
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()


def connect_ray() -> None:
    """Join a cluster only when the user asked for one, else start a private local Ray instance.

    Asked for: `RAY_ADDRESS` is set, or a cluster started with `ray start` runs on this machine. Never
    `address="auto"`: it joins ANY local instance, including the private one of another `alignprop-ray`
    command, which then dies under us when that command exits. A private instance is started so that its
    own processes never take another command's instance for theirs either (compat.ray_init_private). An
    instance this process (or a notebook) already started is reused.
    """
    import ray

    from alignprop_ray.compat import ray_init_private, ray_started_cluster_address

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # the dashboard stays on: Ray Train's state checks query it
    settings = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS") or ray_started_cluster_address()
    if address:
        ray.init(address=address, **settings)
    else:
        ray_init_private(**settings)
