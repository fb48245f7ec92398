"""The Ray Train worker loop: set up, (resume,) train, evaluate, log on rank 0, checkpoint, finish.

Every worker runs `train_loop`. Prompts are sharded by rank, the method's draws are shared, LoRA gradients
are averaged across workers once per optimizer step, so every worker holds the same adapter. Beside it:
train/build.py (config -> engine), train/evaluate.py (evaluation), train/checkpoint.py (checkpoints:
written, reported to Ray, restored).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.lora import save_adapter
from alignprop_ray.engine.step import Learner, StepResult
from alignprop_ray.metrics import KL_TO_BASE
from alignprop_ray.train.build import build_learner, plan_training_step
from alignprop_ray.train.checkpoint import Progress, report_step, restore
from alignprop_ray.train.evaluate import evaluate
from alignprop_ray.train.inputs import LoopInput

if TYPE_CHECKING:
    from alignprop_ray.config import ExperimentConfig

FLUSH_ON_FAILURE_S = 10.0  # a failing worker waits this long at most for its queued MLflow calls


class NonFiniteError(RuntimeError):
    """Too many NaN/inf steps in a row: the run cannot make progress."""


def train_loop(loop_input: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    import ray.train

    from alignprop_ray.compat import quiet_ray_train_report_logs
    from alignprop_ray.config import ExperimentConfig

    quiet_ray_train_report_logs()
    data = LoopInput(**loop_input)
    cfg = ExperimentConfig.model_validate(data.experiment)
    threads = gather_objects(use_assigned_cpus())  # every rank: a collective
    rank, world_size = world()
    learner = build_learner(cfg, ray.train.torch.get_device(), data.train_prompts, rank, world_size)
    logger = _rank0_logger(cfg, data.run_id) if rank == 0 else None
    try:
        _train(learner, cfg, data, logger, threads)
    except BaseException:
        if logger:  # the steps up to the failure are what its diagnosis needs: give them a moment to go out
            with contextlib.suppress(Exception):
                logger.flush(timeout=FLUSH_ON_FAILURE_S)
        raise


def _train(learner: Learner, cfg, data: LoopInput, logger, threads: list[int]) -> None:
    import ray.train

    rank, world_size = world()
    progress = restore(ray.train.get_checkpoint(), learner, logger, data.run_id, say=_say)
    if rank == 0:
        _print_header(cfg, world_size, progress.step, threads)
    started, first_step, first_wall = time.perf_counter(), progress.step, progress.wall_seconds
    if progress.step == 0:  # the base model's eval scores: the reference every curve starts from
        baseline = evaluate(learner, cfg, data.eval_prompts, 0, None, logger)
        if logger:
            logger.log_metrics(baseline, 0)
            logger.settle(timeout=time.perf_counter() - started)
        ray.train.report({**baseline, "step": 0})  # a stopper's "relative to the first evaluation" baseline
    for step in range(progress.step, cfg.train.steps):
        if out_of_time(cfg, progress):  # a run resumed after its time budget ended it: nothing left to do
            break
        step_started = time.perf_counter()
        _maybe_fail(data, step, rank, world_size)
        batches, draws = plan_training_step(cfg, data.train_prompts, step, rank, world_size)
        t0 = time.perf_counter()
        result = learner.train_step(batches, draws)
        # the step lasts as long as its slowest worker; one value on all of them, so they stop together
        seconds = max(gather_objects(time.perf_counter() - t0))
        _count_nonfinite(progress, result, cfg.train.max_nonfinite_in_row)
        progress.step = step + 1
        progress.wall_seconds += seconds
        progress.images_generated += result.images * world_size  # every worker samples as many
        last = progress.step == cfg.train.steps or out_of_time(cfg, progress)
        metrics = step_metrics(result, learner, seconds, progress, world_size)
        if progress.step % cfg.train.eval_every == 0 or last:
            metrics.update(evaluate(learner, cfg, data.eval_prompts, progress.step, result, logger))
        if logger:
            logger.log_metrics(metrics, progress.step)
            logger.settle(timeout=time.perf_counter() - step_started)  # at most one step's time
            _print_progress(
                progress.step,
                cfg.train.steps,
                result,
                seconds,
                eta(cfg, progress, started, first_step, first_wall),
            )
        report_step(learner, progress, metrics, cfg, rank, logger, last)
        if last:
            break
    digests = check_workers_in_sync(learner)
    if logger:
        logger.set_tags({"alignprop.lora_sha256_by_rank": ",".join(digests)})
        _finish(learner, logger)


def out_of_time(cfg, progress: Progress) -> bool:
    """Whether train.max_wall_seconds has been spent (perf/wall_seconds: training steps only)."""
    budget = cfg.train.max_wall_seconds
    return budget is not None and progress.wall_seconds >= budget


def check_workers_in_sync(learner: Learner) -> list[str]:
    """Every worker's LoRA digest; raise if any differs (gradients were not averaged the same way)."""
    import hashlib

    digest = hashlib.sha256()
    for p in learner.params:
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = gather_objects(digest.hexdigest()[:16])
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across workers: {digests}")
    return digests


def _count_nonfinite(progress: Progress, result: StepResult, limit: int) -> None:
    if not result.nonfinite:
        progress.nonfinite_in_row = 0
        return
    progress.skipped_steps += 1
    progress.nonfinite_in_row += 1
    if progress.nonfinite_in_row >= limit:
        raise NonFiniteError(
            f"loss or gradient was NaN/inf for {limit} steps in a row (train.max_nonfinite_in_row); "
            "lower train.lr or check the reward"
        )


def step_metrics(
    result: StepResult, learner: Learner, seconds: float, progress: Progress, world_size: int
) -> dict[str, float]:
    metrics = {
        "train/reward": result.reward,
        "train/loss": result.loss,
        "train/k": result.k,
        "train/k0_skipped": sum(k == 0 for k in result.ks),  # batches without gradient (method.k0: skip)
        "train/lr": result.lr,
        "train/skipped_steps": progress.skipped_steps,
        "perf/step_seconds": seconds,
        "perf/wall_seconds": progress.wall_seconds,
        "perf/images_generated": progress.images_generated,
        "perf/images_per_second": result.images * world_size / seconds,
        "perf/peak_memory_mb": peak_memory_mb(learner.device),
        "perf/rss_mb": psutil.Process().memory_info().rss / 2**20,  # now, not the peak: shows a leak
    }
    if not math.isnan(result.grad_norm):
        metrics["train/grad_norm"] = result.grad_norm
    if not math.isnan(result.kl):  # train.kl_weight > 0
        metrics[KL_TO_BASE] = result.kl
    metrics.update({f"train/reward/{name}": value for name, value in result.terms.items()})
    metrics.update({f"train/{learner.method.name}/{name}": v for name, v in result.metrics.items()})
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rank0_logger(cfg, run_id: str):
    from alignprop_ray.tracking import BufferedLogger, use_own_retries

    use_own_retries()
    return BufferedLogger(cfg.tracking.uri, run_id, cfg.tracking.outage_limit_s, say=_say)


def _finish(learner: Learner, logger) -> None:
    """Log the adapter (the EMA of its weights when train.ema_decay is set), then wait until MLflow holds
    everything (at most tracking.outage_limit_s)."""
    with tempfile.TemporaryDirectory() as tmp, learner.evaluation_weights():
        logger.log_dir(save_adapter(learner.parts.denoiser, Path(tmp) / "adapter"), "adapter")
    logger.close()


def _maybe_fail(data: LoopInput, step: int, rank: int, world_size: int) -> None:
    """Test hook: kill this worker process once at each configured step, to exercise recovery."""
    steps = data.fail_at_step if isinstance(data.fail_at_step, list) else [data.fail_at_step]
    if step not in steps or rank != min(1, world_size - 1) or data.fail_marker is None:
        return
    marker, line = Path(data.fail_marker), f"worker rank {rank} killed at step {step}"
    if marker.exists() and line in marker.read_text().splitlines():
        return
    with marker.open("a") as record:
        record.write(line + "\n")
    os._exit(1)


def _say(line: str) -> None:
    """A console line from rank 0, written past Ray Train's print() patch (which echoes it twice)."""
    sys.stdout.write(f"[alignprop] {line}\n")
    sys.stdout.flush()


def use_assigned_cpus() -> int:
    """Run torch on as many threads as this worker was given CPUs by Ray (its `resources_per_worker`);
    the number of threads torch now uses."""
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    if cpus >= 1:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def _print_header(cfg, world_size: int, start: int, threads: list[int]) -> None:
    t = cfg.train
    per_worker = f"{threads[0]}" if len(set(threads)) == 1 else "/".join(map(str, threads))
    _say(
        f"{world_size} workers x {t.batch_size} images x {t.grad_accum} accumulation = "
        f"{world_size * t.batch_size * t.grad_accum} images per optimizer step; "
        f"torch threads per worker: {per_worker}; "
        f"{'resuming after step ' + str(start) if start else 'starting'} ({t.steps} steps)"
    )


def eta(
    cfg: ExperimentConfig, progress: Progress, started: float, first_step: int, first_wall: float
) -> float:
    """Seconds left at this session's pace: to train.steps, or to train.max_wall_seconds if that comes first."""
    elapsed = time.perf_counter() - started
    left = elapsed / (progress.step - first_step) * (cfg.train.steps - progress.step)
    budget, trained = cfg.train.max_wall_seconds, progress.wall_seconds - first_wall
    if (
        budget is not None and trained > 0
    ):  # wall-clock seconds per second of training steps, times those left
        left = min(left, elapsed / trained * max(budget - progress.wall_seconds, 0.0))
    return left


def _print_progress(step: int, total: int, result: StepResult, seconds: float, eta: float) -> None:
    _say(
        f"step {step}/{total}  reward {result.reward:.4f}  K {result.k:g}  {seconds:.2f} s/step  ETA {eta:.0f}s"
    )
