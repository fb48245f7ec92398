"""The few collective operations training needs (pure torch.distributed; no-ops in a single process).

Which backend carries which collective: GPU workers get one process group with two backends,
`cpu:gloo,cuda:nccl` (alignprop_ray/train/inputs.py, which hands it to Ray Train). NCCL only takes CUDA tensors, and three of our
collectives are on CPU data by nature: the step statistics (Python floats), evaluation shards
(`all_gather_object` pickles to a byte tensor) and the LoRA digests. With both backends, torch routes
each collective by its tensor's device: LoRA gradients (CUDA) go through NCCL, the small CPU
collectives through gloo, and object collectives pick gloo because "cpu" is among the pairs. Moving
every collective onto the GPU instead would also work, but each call site would then have to remember
to, and object collectives would need `torch.cuda.set_device` exactly right on every worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_across_workers(flat: torch.Tensor) -> torch.Tensor:
    """Average a 1-D tensor over all workers in one collective (in place where distributed)."""
    _, size = world()
    if size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size
    return flat


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient with its mean over workers, as DDP would.

    One coalesced all-reduce per optimizer step (after gradient accumulation), instead of DDP's
    per-backward buckets: the sampler calls the UNet many times per backward (no-grad prefix, then
    checkpointed tail), which DDP's one-forward-one-backward bookkeeping does not model.
    """
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = mean_across_workers(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather_objects(obj) -> list:
    """Every worker's `obj`, in rank order (a single-element list in one process)."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out
