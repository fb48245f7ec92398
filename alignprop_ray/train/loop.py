"""The Ray Train worker loop: build the engine, resume, train, evaluate, log (rank 0), checkpoint.

Every worker runs this function. Prompts are sharded by rank, K is shared, LoRA gradients are
averaged across workers once per optimizer step, so every worker holds the same adapter.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.lora import LoraSettings, attach_lora, save_adapter
from alignprop_ray.engine.models import DTYPES, load_parts
from alignprop_ray.engine.sampler import SamplerSettings
from alignprop_ray.engine.step import AlignPropLearner, OptimSettings, StepResult, generate_eval, plan_step
from alignprop_ray.train.checkpoint import Progress, read_checkpoint, write_checkpoint

EVAL_SEED_BASE = 10_000  # eval image j of every prompt uses seed EVAL_SEED_BASE + j, at every evaluation


@dataclass
class LoopInput:
    """What the driver hands every worker (plain data: it is pickled to remote nodes)."""

    experiment: dict  # the resolved ExperimentConfig as a dict
    run_id: str  # MLflow run created by the driver
    train_prompts: list[str]
    eval_prompts: list[str]
    fail_at_step: int | None = None  # test hook: rank 1 (or 0 alone) dies once at this step
    fail_marker: str | None = None  # file that records that the failure already happened


class NonFiniteError(RuntimeError):
    """Too many NaN/inf steps in a row: the run cannot make progress."""


def train_loop(loop_input: dict) -> None:
    """Ray Train entry point (`train_loop_per_worker`)."""
    import ray.train

    from alignprop_ray.config import ExperimentConfig

    _quiet_ray_train_logs()
    data = LoopInput(**loop_input)
    cfg = ExperimentConfig.model_validate(data.experiment)
    rank, world_size = world()
    learner = build_learner(cfg, ray.train.torch.get_device())
    progress = Progress(step=0, run_id=data.run_id)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            progress = read_checkpoint(directory, learner)
    logger = _rank0_logger(cfg, data.run_id) if rank == 0 else None
    if rank == 0:
        _print_header(cfg, world_size, progress.step)
    started, first_step = time.perf_counter(), progress.step
    if progress.step == 0:  # the base model's eval scores: the reference every curve starts from
        baseline = evaluate(learner, cfg, data.eval_prompts, 0, None, logger)
        if logger:
            logger.log_metrics(baseline, 0)
        ray.train.report({**baseline, "step": 0})  # a stopper's "relative to the first evaluation" baseline
    for step in range(progress.step, cfg.train.steps):
        _maybe_fail(data, step, rank, world_size)
        batches, ks = plan_training_step(cfg, data.train_prompts, step, rank, world_size)
        t0 = time.perf_counter()
        result = learner.train_step(batches, ks)
        seconds = time.perf_counter() - t0
        _count_nonfinite(progress, result, cfg.train.max_nonfinite_in_row)
        progress.step = step + 1
        metrics = step_metrics(result, learner, seconds, progress, world_size)
        if progress.step % cfg.train.eval_every == 0 or progress.step == cfg.train.steps:
            metrics.update(evaluate(learner, cfg, data.eval_prompts, progress.step, result, logger))
        if logger:
            logger.log_metrics(metrics, progress.step)
            _print_progress(
                progress.step,
                cfg.train.steps,
                result,
                seconds,
                (time.perf_counter() - started) / (progress.step - first_step),
            )
        _report(learner, progress, metrics, cfg, rank)
    digests = check_workers_in_sync(learner)
    if logger:
        logger.set_tags({"alignprop.lora_sha256_by_rank": ",".join(digests)})
        _finish(learner, logger)


def plan_training_step(cfg, prompts: list[str], step: int, rank: int = 0, world_size: int = 1):
    """`plan_step` for optimizer step `step` of experiment `cfg` on worker `rank` of `world_size`."""
    return plan_step(
        prompts,
        cfg.truncation_spec(),
        cfg.sampling.steps,
        step=step,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        rank=rank,
        world_size=world_size,
    )


def check_workers_in_sync(learner: AlignPropLearner) -> list[str]:
    """Every worker's LoRA digest; raise if any differs (gradients were not averaged the same way)."""
    import hashlib

    digest = hashlib.sha256()
    for p in learner.params:
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = gather_objects(digest.hexdigest()[:16])
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across workers: {digests}")
    return digests


def build_learner(cfg, device: torch.device) -> AlignPropLearner:
    from alignprop_ray.rewards import build_reward

    if device.type == "cuda":  # TF32 matmuls on Ampere+: ~2x faster, plenty for LoRA fine-tuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parts = load_parts(cfg.model.pretrained, DTYPES[cfg.model.dtype], device)
    lora = cfg.model.lora
    settings = LoraSettings(
        rank=lora.rank, alpha=lora.alpha, target_modules=tuple(lora.target_modules), init=lora.init
    )
    params = attach_lora(parts.unet, settings, seed=cfg.train.seed)
    reward = build_reward(cfg.reward, device=device, dtype=torch.float32)
    sampling = cfg.sampling
    sampler = SamplerSettings(
        steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        negative_prompt=sampling.negative_prompt,
        checkpoint=cfg.model.gradient_checkpointing,
    )
    optim = OptimSettings(
        lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm
    )
    return AlignPropLearner(parts, params, reward, sampler, optim, resolution=cfg.model.resolution)


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
    result: StepResult, learner: AlignPropLearner, seconds: float, progress: Progress, world_size: int
) -> dict[str, float]:
    metrics = {
        "train/reward": result.reward,
        "train/loss": result.loss,
        "train/k": result.k,
        "train/lr": learner.optimizer.param_groups[0]["lr"],
        "train/skipped_steps": progress.skipped_steps,
        "perf/step_seconds": seconds,
        "perf/images_per_second": result.images * world_size / seconds,
        "perf/peak_memory_mb": peak_memory_mb(learner.device),
    }
    if not math.isnan(result.grad_norm):
        metrics["train/grad_norm"] = result.grad_norm
    metrics.update({f"train/reward/{name}": value for name, value in result.terms.items()})
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate(
    learner: AlignPropLearner, cfg, prompts: list[str], step: int, result: StepResult | None, logger
) -> dict:
    """Eval prompts x fixed seeds, sharded over workers; rank 0 gets every image and logs grid and table."""
    from alignprop_ray.rewards import diversity

    pairs = [(p, EVAL_SEED_BASE + j) for p in prompts for j in range(cfg.prompts.eval_seeds)]
    rank, world_size = world()
    mine = pairs[rank::world_size]
    images, terms, totals = generate_eval(
        learner, [p for p, _ in mine], [s for _, s in mine], cfg.train.batch_size
    )
    features = learner.reward.image_features(images.to(learner.device))
    shard = {
        "index": list(range(rank, len(pairs), world_size)),
        "images": (images * 255).round().to(torch.uint8),
        "terms": terms,
        "total": totals,
        "features": None if features is None else features.cpu(),
    }
    shards = gather_objects(shard)
    order = [i for s in shards for i in s["index"]]
    inverse = torch.argsort(torch.tensor(order))
    cat = lambda key: torch.cat([s[key] for s in shards])[inverse]  # noqa: E731
    all_images = cat("images").float() / 255
    all_terms = {name: torch.cat([s["terms"][name] for s in shards])[inverse] for name in terms}
    all_features = cat("features") if features is not None else None
    metrics = {"eval/reward": float(cat("total").mean())}
    metrics.update({f"eval/reward/{name}": float(v.mean()) for name, v in all_terms.items()})
    metrics.update(diversity(all_images, [p for p, _ in pairs], all_features, prefix="eval/"))
    if logger:
        _log_eval_artifacts(
            logger, pairs, all_images, all_terms, cat("total"), step, result, cfg.prompts.eval_seeds
        )
    return metrics


def _log_eval_artifacts(logger, pairs, images, terms, totals, step, result, nrow) -> None:
    import pyarrow as pa
    from torchvision.utils import make_grid

    from alignprop_ray.engine.commands import to_pil

    logger.log_image(to_pil(make_grid(images, nrow=nrow, padding=2)), key="eval/images", step=step)
    k = result.k if result else 0.0  # the K of the training step just taken (0 before training)
    columns = {
        "prompt": [p for p, _ in pairs],
        "seed": [s for _, s in pairs],
        "step": [step] * len(pairs),
        "k": [k] * len(pairs),
        "reward": totals.tolist(),
    }
    columns.update({f"reward/{name}": values.tolist() for name, values in terms.items()})
    logger.log_table(pa.table(columns), step)


def _report(learner: AlignPropLearner, progress: Progress, metrics: dict, cfg, rank: int) -> None:
    """Report every step (all ranks: it is a barrier); attach a checkpoint every checkpoint_every steps."""
    import ray.train

    metrics = {**metrics, "step": progress.step}
    due = progress.step % cfg.train.checkpoint_every == 0 or progress.step == cfg.train.steps
    if not due:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as parent:
        checkpoint = None
        if rank == 0:  # every worker holds the same adapter: one copy is enough
            checkpoint = ray.train.Checkpoint.from_directory(write_checkpoint(learner, progress, parent))
        ray.train.report(metrics, checkpoint=checkpoint)


def _rank0_logger(cfg, run_id: str):
    from alignprop_ray.tracking import RunLogger

    return RunLogger(cfg.tracking.uri, run_id)


def _finish(learner: AlignPropLearner, logger) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        logger.log_dir(save_adapter(learner.parts.unet, Path(tmp) / "adapter"), "adapter")


def _maybe_fail(data: LoopInput, step: int, rank: int, world_size: int) -> None:
    """Test hook: kill this worker process once, at the configured step, to exercise recovery."""
    if data.fail_at_step != step or rank != min(1, world_size - 1) or data.fail_marker is None:
        return
    marker = Path(data.fail_marker)
    if marker.exists():
        return
    marker.write_text(f"worker rank {rank} killed at step {step}\n")
    os._exit(1)


def _quiet_ray_train_logs() -> None:
    """Ray 2.60 logs every report at INFO under a logger named by file path (so LoggingConfig misses it)."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _say(line: str) -> None:
    """A console line from rank 0, written past Ray Train's print() patch (which echoes it twice)."""
    sys.stdout.write(f"[alignprop] {line}\n")
    sys.stdout.flush()


def _print_header(cfg, world_size: int, start: int) -> None:
    t = cfg.train
    _say(
        f"{world_size} workers x {t.batch_size} images x {t.grad_accum} accumulation = "
        f"{world_size * t.batch_size * t.grad_accum} images per optimizer step; "
        f"{'resuming after step ' + str(start) if start else 'starting'} ({t.steps} steps)"
    )


def _print_progress(step: int, total: int, result: StepResult, seconds: float, per_step: float) -> None:
    eta = per_step * (total - step)
    _say(
        f"step {step}/{total}  reward {result.reward:.4f}  K {result.k:g}  {seconds:.2f} s/step  ETA {eta:.0f}s"
    )
