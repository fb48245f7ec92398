"""Every use of another library's private names, in one place.

Ray, MLflow, open_clip and peft move their internals between releases. Each function here wraps one such
access and says which version it was written against; tests/test_compat.py calls each of them on the
installed versions, so an upgrade that moves one breaks here, in one place, loudly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from pathlib import Path


def ray_local_instances() -> set[str]:
    """GCS addresses of every Ray instance running on this machine, read afresh from the process table.

    Ray 2.60: `ray._private.services.find_gcs_addresses` (it caches a non-empty answer: cleared first).
    """
    from ray._private import services

    services.find_gcs_addresses.cache_clear()
    return set(services.find_gcs_addresses())


def ray_started_cluster_address() -> str | None:
    """The address of a cluster started with `ray start` on this machine, if it is still running.

    `ray start` records the address in /tmp/ray/ray_current_cluster (a private instance started by
    `ray.init()` does not); the file outlives a crashed cluster, so the address only counts while a GCS
    serves it. Ray 2.60: `ray._private.utils.read_ray_address`.
    """
    from ray._private import utils

    address = utils.read_ray_address()
    return address if address and address in ray_local_instances() else None


def ray_init_private(**init_kwargs) -> str:
    """Start a private Ray instance (`ray.init(address="local", **init_kwargs)`) whose every process
    resolves it, and no other, as its cluster; its GCS address.

    Ray's own code inside an instance looks its cluster up with address None or "auto" in places: Ray
    2.60's state API (`ray.util.state.get_actor`, used by Ray Train V2's PlacementGroupCleaner and its
    state actor to ask whether a Train controller is alive) resolves the address with
    `ray.dashboard.utils.get_address_for_submission_client`, which takes RAY_ADDRESS from the environment
    and otherwise scans the process table for GCS servers (`services.canonicalize_bootstrap_address_or_die`):
    with two instances on the machine it fails with "Found multiple active Ray instances", the cleaner's
    monitor thread dies, and a dead controller's placement group is never removed.

    The fix is RAY_ADDRESS in the environment of every process of the instance. The GCS address is known
    only once the instance runs, so it is fixed before: the GCS port is chosen here and handed to Ray in
    RAY_GCS_SERVER_PORT (which Ray 2.60 reads when it starts a head node: `ray/_private/node.py`,
    `GCS_PORT_ENVIRONMENT_VARIABLE`), and the node IP in `_node_ip_address`, and RAY_ADDRESS is set to that
    address while `ray.init` runs. Why every process gets it: `ray.init` starts the GCS, raylet, dashboard
    and their agents from this process's environment, and the raylet starts every worker (tasks, actors:
    the Train controller, its cleaner and state actor, Tune trials, Train workers) from its own. address
    "local" makes `ray.init` itself start a new instance whatever RAY_ADDRESS says. Both variables are
    restored afterwards, so that after `ray.shutdown` this process does not take the dead instance for a
    cluster the user named. (The port is free when chosen; as with the ports Ray picks for its other
    processes, `Node._get_unused_port`, another process could take it before the GCS binds it.)
    """
    import os
    import socket

    import ray

    ip = init_kwargs.pop("_node_ip_address", None) or ray.util.get_node_ip_address()
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{ip}:{port}"
    chosen = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address}
    saved = {key: os.environ.get(key) for key in chosen}
    os.environ.update(chosen)
    try:
        ray.init(address="local", _node_ip_address=ip, **init_kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return address


def quiet_ray_train_report_logs() -> None:
    """Silence the INFO line Ray Train logs for every `ray.train.report` in a worker.

    Ray 2.60 logs it under a logger named by the file path of `ray.train.v2._internal.execution.context`,
    which `LoggingConfig` does not reach.
    """
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def open_clip_arch_exists(arch: str) -> bool:
    """Whether open_clip ships a config for `arch`, read from its `model_configs/` folder without
    importing open_clip (which imports torch). open_clip 3.x keeps one `<arch>.json` per model there."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return False
    return (Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{arch}.json").is_file()


def open_clip_register_config(name: str, config: dict) -> None:
    """Add a model config given as a dict to open_clip's registry (idempotent).

    `open_clip.add_model_config` only takes JSON files on disk, so the dict goes into the registry it
    fills: open_clip 3.x `open_clip.factory._MODEL_CONFIGS`.
    """
    import open_clip.factory

    open_clip.factory._MODEL_CONFIGS.setdefault(name, config)


# `MlflowClient.log_image(key=K, step=N)` writes images/<K>+step+N+timestamp+T+UUID.png with `/` in K as
# `~` (MLflow 3.x; 2.x wrote `#` for `/` and `%` for `+`). MLflow offers no API that lists them by step.
_LOGGED_IMAGE = re.compile(
    r"^(?P<key>[\w~#.-]+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+[+%][\w-]+\.png$"
)


def mlflow_logged_image_step(file_name: str, key: str) -> int | None:
    """The step of an image file that `log_image(key=key, step=...)` wrote, or None for any other file."""
    match = _LOGGED_IMAGE.match(file_name)
    if match is None or match["key"].replace("#", "~") != key.replace("/", "~"):
        return None
    return int(match["step"])


def mlflow_latest_metric_steps(client, run_id: str) -> dict[str, int]:
    """The last step a run holds for each of its metric keys, in one call.

    MLflow's `get_run` returns the latest value of each key, which its SQL stores choose by (step,
    timestamp, value), but `RunData.metrics` keeps only the values: the Metric objects with their steps
    are MLflow 3.x's `RunData._metric_objs`.
    """
    return {metric.key: metric.step for metric in client.get_run(run_id).data._metric_objs}


def ray_train_startup_timed_out(err: BaseException) -> bool:
    """Whether a Ray Train controller failure is its worker group finding no room in the cluster in time.

    Ray 2.60 Train V2: `ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError`.
    """
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(err, WorkerGroupStartupTimeoutError)


@functools.cache
def ray_train_trainer_without_dataset_actor() -> type:
    """Ray Train's DataParallelTrainer whose runs, given no Ray Datasets, start no DatasetManager actor.

    Not its TorchTrainer subclass: `ray.train.torch` imports torch in every process that builds or unpickles
    the trainer (a trial's driver, its Train controller); the process group is train/backend.py's.

    Ray 2.60 Train V2: `ray.train.v2.api.data_parallel_trainer.DataParallelTrainer` (TorchTrainer's base;
    DeveloperAPI). Its `_create_default_callbacks` always adds a `DatasetsCallback`
    (ray.train.v2._internal.callbacks.datasets), whose `before_init_train_context` starts a
    DatasetManager actor (a Ray worker process, ~100 MiB, on the driver's node) for every worker group,
    datasets or not. Each worker's TrainContext requires a `dataset_shard_provider`, so the callback is
    replaced by one that hands the workers a provider without datasets, not dropped.
    """
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class NoDatasets:
        def get_dataset_shard(self, dataset_info):
            raise KeyError(f"no dataset {dataset_info.dataset_name!r}: this run was given none")

    class NoDatasetsCallback(WorkerGroupCallback):
        def before_init_train_context(self, workers) -> dict:
            return {"dataset_shard_provider": [NoDatasets()] * len(workers)}

    class Trainer(DataParallelTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [NoDatasetsCallback() if isinstance(c, DatasetsCallback) else c for c in callbacks]

    return Trainer


def ray_train_torch_framework():
    """The framework a torch backend reports to Ray Train's state export.

    Ray 2.60 Train V2: `ray.train.v2._internal.util.TrainingFramework.TORCH` (what TorchConfig.framework is).
    """
    from ray.train.v2._internal.util import TrainingFramework

    return TrainingFramework.TORCH


# What Ray 2.60's torch backend (`ray.train.torch.config._TorchBackend`) runs on each worker, called there by
# train/backend.py: importing `ray.train.torch.config` imports torch, so only the workers do.


def ray_train_address_and_port() -> tuple[str, int]:
    """This node's IP address and a free port on it. Ray 2.60: `ray.train._internal.utils`."""
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def ray_train_set_torch_distributed_env() -> None:
    """LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, RANK, WORLD_SIZE and ACCELERATE_TORCH_DEVICE of this worker, from
    its Train context. Ray 2.60: `ray.train.torch.config._set_torch_distributed_env_vars`."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def ray_train_init_torch_process_group(
    backend: str, rank: int, world_size: int, init_method: str, timeout_s: int
):
    """`torch.distributed.init_process_group`, with NCCL's async error handling on unless the user set it.
    Ray 2.60: `ray.train.torch.config._setup_torch_process_group`."""
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend, rank, world_size, init_method, timeout_s)


def ray_train_shutdown_torch(destroy_process_group: bool) -> None:
    """The process group destroyed (if asked) and the CUDA caches of the worker's devices emptied.
    Ray 2.60: `ray.train.torch.config._shutdown_torch`."""
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


def ray_train_torch_device_context():
    """A context manager that makes the worker's CUDA device current, if it has one.
    Ray 2.60: `ray.train.torch.config.TorchConfigContextManager` (TorchConfig.train_func_context)."""
    from ray.train.torch.config import TorchConfigContextManager

    return TorchConfigContextManager()


def ray_train_controller_callback_bases() -> tuple[type, type]:
    """(ControllerCallback, WorkerGroupCallback): bases of a callback that runs in a run's Train controller
    and sees its state changes and each worker-group start (RunConfig.callbacks passes any of them on).

    Ray 2.60 Train V2: `ray.train.v2._internal.execution.callback` (DeveloperAPI classes, private path).
    """
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    return ControllerCallback, WorkerGroupCallback


def ray_train_state_name(state) -> str:
    """The name of a Train controller state: INITIALIZING, SCHEDULING, RESCHEDULING (a worker-group start
    failed and is tried again), RUNNING, RESTARTING (after a failure), ..., ERRORED, FINISHED, ABORTED.

    Ray 2.60 Train V2: `TrainControllerState._state_type.state_name`.
    """
    return state._state_type.state_name


def ray_train_start_failure(state) -> BaseException | None:
    """Why a Train controller state is RESCHEDULING: the error of the worker-group start that failed.

    Ray 2.60 Train V2: `ReschedulingState.training_failed_error`, a ControllerError around the cause.
    """
    error = getattr(state, "training_failed_error", None)
    return getattr(error, "controller_failure", error)


def ray_reported_node_groups() -> list[tuple[dict[str, float], float]]:
    """(resources, most nodes) of each node group in the cluster config an autoscaler reports to the GCS;
    empty where none is reported (Ray 2.60's own autoscalers leave it empty).

    Ray 2.60: `ray._private.state.state.get_cluster_config()`; a max_count of -1 means no limit.
    """
    import math

    from ray._private.state import state

    config = state.get_cluster_config()
    if not config or not config.node_group_configs:
        return []
    return [
        (dict(group.resources), math.inf if group.max_count == -1 else group.max_count)
        for group in config.node_group_configs
    ]


def ray_monitor_command(gcs_address: str) -> list[str] | None:
    """Command line of this cluster's autoscaler monitor, if it runs on this node.

    Ray 2.60 starts it on the head as `python .../autoscaler/_private/monitor.py --gcs-address=ADDRESS
    [--autoscaling-config=FILE] ...` (autoscaler v2: autoscaler/v2/monitor.py): a private script's name.
    """
    import psutil

    flag = f"--gcs-address={gcs_address}"
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if flag in command and any(arg.endswith("monitor.py") for arg in command):
            return command
    return None


@contextlib.contextmanager
def peft_adapters_disabled(module):
    """Run the block with every peft adapter layer inside `module` switched off (the base model), without
    touching any parameter's `requires_grad`.

    peft's public switch (`BaseTunerLayer.enable_adapters`, behind diffusers' `disable_adapters()`) also
    sets `requires_grad=False` on the adapter weights and back on enable: inside a forward whose graph
    holds those weights, or inside a checkpointed call that backward recomputes, that is unsafe. The
    layers' forward reads only the flag `_disable_adapters` (peft 0.21: `BaseTunerLayer.disable_adapters`
    returns it), so only the flag is flipped, and restored on the way out.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer._disable_adapters = flag


def ray_logs_dir() -> Path:
    """The logs folder of the Ray instance this process is connected to (worker-*.out hold the console of
    every worker process, Train workers included). Ray 2.60: `ray._private.worker._global_node`."""
    from ray._private import worker

    return Path(worker._global_node.get_logs_dir_path())
