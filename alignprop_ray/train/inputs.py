"""What a run's driver hands Ray Train: the workers' input and their process group backend.

Light on purpose: a run's driver (in a sweep, each trial's driver process, on the head node for as long
as the trial runs) imports this module, never the training loop, which pulls in the engine (diffusers,
transformers, peft, open_clip) that only the workers need (train/launch.py: `worker_main`).
"""

from __future__ import annotations

from dataclasses import dataclass

# GPU workers get one process group with two backends: NCCL carries the CUDA tensors (LoRA gradients),
# gloo the collectives on CPU data (step statistics, evaluation shards, LoRA digests), routed by device.
# Why: alignprop_ray/engine/distributed.py.
GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


@dataclass
class LoopInput:
    """What the driver hands every worker (plain data: it is pickled to remote nodes)."""

    experiment: dict  # the resolved ExperimentConfig as a dict
    run_id: str  # MLflow run created by the driver
    train_prompts: list[str]
    eval_prompts: list[str]
    fail_at_step: int | list[int] | None = None  # test hook: rank 1 (or 0 alone) dies once at each step
    fail_marker: str | None = None  # file that records the failures that already happened


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend string for workers on GPUs or on CPUs (see GPU_BACKEND)."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND
