"""The workers' torch process group, set up by a Ray Train backend that the head never loads torch for.

Ray's own `TorchConfig` lives in `ray.train.torch`, whose import loads torch: ~2 CPU-seconds and a few hundred
MiB in every process that builds or unpickles the trainer, that is each Tune trial's driver and each Train
controller, both on the head node and neither running a tensor. `ProcessGroupConfig` does for our runs what
Ray 2.60's `_TorchBackend` does, and with Ray's own worker-side functions (compat.py): an `env://`
rendezvous at rank 0's address, the LOCAL_RANK/RANK/WORLD_SIZE variables, `init_process_group` with the
given backend, the worker's CUDA device set for the training function, the group destroyed at the end. Only
the functions below that run on the workers import torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

from alignprop_ray import compat

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """A torch.distributed process group over the run's workers (train/inputs.process_group_backend)."""

    backend: str
    timeout_s: int = 1800  # collective operations

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return WorkerDevice

    @property
    def framework(self):
        return compat.ray_train_torch_framework()

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    # as Ray's torch backend: each worker sees every GPU of its node given to the run, and picks its own
    # by local rank (ray.train.torch.get_device)
    share_cuda_visible_devices = True

    def on_start(self, worker_group, config: ProcessGroupConfig) -> None:
        import ray

        address, port = worker_group.execute_single(0, compat.ray_train_address_and_port)
        worker_group.execute(_join, address=address, port=port)
        world_size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _init_process_group,
                    backend=config.backend,
                    world_rank=rank,
                    world_size=world_size,
                    timeout_s=config.timeout_s,
                )
                for rank in range(world_size)
            ]
        )

    def on_shutdown(self, worker_group, config: ProcessGroupConfig) -> None:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(
            compat.ray_train_shutdown_torch, destroy_process_group=len(worker_group) > 1
        )
        # Ray's own setting (and default) for the torch backend
        timeout_s = float(
            os.environ.get(
                TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
            )
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("the workers' torch process group did not shut down within %.0f s", timeout_s)


class WorkerDevice:
    """Around the training function on each worker: its CUDA device made current (Ray's own context)."""

    def __enter__(self):
        self._context = compat.ray_train_torch_device_context()
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


# --- on the workers -----------------------------------------------------------------------------------------


def _join(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    compat.ray_train_set_torch_distributed_env()


def _init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    compat.ray_train_init_torch_process_group(backend, world_rank, world_size, "env://", timeout_s)
