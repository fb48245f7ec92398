"""CUDA-only behaviour of the engine (skipped where no GPU exists): fp16 loss scaling, flat memory in K.

The CPU suite covers the same code paths in fp32/bf16; these check what only a GPU shows: the
GradScaler path that fp16 needs, and peak device memory (the CUDA caching allocator counts exactly the
tensors alive, unlike CPU RSS, see BENCHMARKS.md section 3).
"""

import math

import pytest
import torch

from alignprop_ray.engine.lora import attach_lora
from alignprop_ray.engine.models import load_parts
from alignprop_ray.engine.step import Batch, Learner
from tests.helpers import brightness_reward, lora_settings, optim_settings, run_ranks, sampler_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["a cat", "a dog"]


def cuda_learner(dtype: torch.dtype, steps: int, checkpoint: bool = True) -> Learner:
    parts = load_parts("tiny", dtype=dtype, device="cuda")
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    sampler = sampler_settings(steps=steps, guidance_scale=5.0, checkpoint=checkpoint)
    return Learner(parts, params, brightness_reward, sampler, optim_settings(lr=1e-2), resolution=128)


def test_fp16_on_cuda_uses_loss_scaling_and_updates_fp32_lora():
    learner = cuda_learner(torch.float16, steps=6)
    assert learner.scaler is not None
    before = [p.detach().clone() for p in learner.params]
    updated = 0
    for k in (2, 6, 3, 4, 5, 1):
        result = learner.train_step([Batch(PROMPTS, [0, 1])], [k])
        # an fp16 overflow lowers the loss scale and skips the step; it is never reported as non-finite
        assert not result.nonfinite and math.isfinite(result.reward)
        updated += result.updated
    assert updated >= 3
    assert {(p.dtype, p.device.type) for p in learner.params} == {(torch.float32, "cuda")}
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.params, strict=True))


@pytest.mark.parametrize("checkpoint", [True, False])
def test_peak_cuda_memory_is_flat_in_k_only_with_checkpointing(checkpoint):
    steps = 10
    learner = cuda_learner(torch.float32, steps, checkpoint)
    learner.train_step([Batch(PROMPTS, [0, 1])], [1])  # warm-up: optimizer state, cuDNN workspaces

    def peak(k: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        learner.train_step([Batch(PROMPTS, [0, 1])], [k])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - resting

    growth = peak(steps) / peak(1)
    if checkpoint:
        assert growth <= 1.15, growth
    else:
        assert growth >= 1.5, growth


def train_two_steps_on_gpu(rank: int, port: int) -> tuple[list[str], bool]:
    """One rank of a 2-GPU run under the trainer's own GPU process group (NCCL for CUDA tensors)."""
    import torch.distributed as dist

    from alignprop_ray.engine.step import plan_step
    from alignprop_ray.engine.truncation import parse_truncation
    from alignprop_ray.train.inputs import process_group_backend
    from alignprop_ray.train.loop import check_workers_in_sync

    torch.cuda.set_device(rank)
    backend = process_group_backend(use_gpu=True)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parts = load_parts("tiny", device=f"cuda:{rank}")
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    before = [p.detach().clone() for p in params]
    sampler = sampler_settings(steps=6, guidance_scale=5.0)
    learner = Learner(parts, params, brightness_reward, sampler, optim_settings(lr=1e-2), resolution=64)
    for step in range(2):
        batches, ks = plan_step(
            PROMPTS,
            parse_truncation("uniform:1:6"),
            6,
            step=step,
            seed=0,
            batch_size=2,
            grad_accum=1,
            rank=rank,
            world_size=2,
        )
        assert learner.train_step(batches, ks).updated
    digests = check_workers_in_sync(learner)  # raises if the ranks' LoRA weights differ
    moved = any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    dist.destroy_process_group()
    return digests, moved


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl_end_with_identical_lora():
    (digests0, moved0), (digests1, moved1) = run_ranks(train_two_steps_on_gpu, 2, timeout=300)
    assert moved0 and moved1
    assert digests0 == digests1 and len(set(digests0)) == 1
