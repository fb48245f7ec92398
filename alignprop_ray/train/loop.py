"""The Ray Train worker loop: build the engine, resume, train, evaluate, log (rank 0), checkpoint.

Every worker runs this function. Prompts are sharded by rank, K is shared, LoRA gradients are
averaged across workers once per optimizer step, so every worker holds the same adapter.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import posixpath
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import psutil
import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.lora import LoraSettings, attach_lora, save_adapter
from alignprop_ray.engine.methods import REWARD_GRADIENT, build_method
from alignprop_ray.engine.methods.alignprop import TruncatedBackpropSettings
from alignprop_ray.engine.methods.ddpo import DdpoSettings
from alignprop_ray.engine.methods.draft import DraftLVSettings
from alignprop_ray.engine.methods.refl import ReflSettings, StepRange
from alignprop_ray.engine.models import DTYPES, load_parts
from alignprop_ray.engine.sampler import SamplerSettings
from alignprop_ray.engine.step import AlignPropLearner, OptimSettings, StepResult, generate_eval, plan_step
from alignprop_ray.engine.truncation import RedrawZero, Truncation
from alignprop_ray.train import base_fidelity
from alignprop_ray.train.checkpoint import (
    UNSENT_LOGS,
    DamagedCheckpoint,
    Progress,
    StorageError,
    read_checkpoint,
    write_checkpoint,
)

if TYPE_CHECKING:
    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.rewards.diversity import Features
    from alignprop_ray.rewards.mixture import RewardMixture

# A report's count of the run's steps, read by the sweep's stoppers (sweep/stoppers.py TOTAL_STEPS): a run
# its time budget ends early reports it at its last step, so Tune sees that step as the last, not a cut.
TOTAL_STEPS = "total_steps"
EVAL_SEED_BASE = 10_000  # eval image j of prompt i: seed EVAL_SEED_BASE + i x eval_seeds + j (eval_pairs)
FLUSH_ON_FAILURE_S = 10.0  # a failing worker waits this long at most for its queued MLflow calls


@dataclass
class LoopInput:
    """What the driver hands every worker (plain data: it is pickled to remote nodes)."""

    experiment: dict  # the resolved ExperimentConfig as a dict
    run_id: str  # MLflow run created by the driver
    train_prompts: list[str]
    eval_prompts: list[str]
    fail_at_step: int | list[int] | None = None  # test hook: rank 1 (or 0 alone) dies once at each step
    fail_marker: str | None = None  # file that records the failures that already happened


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
    rank, world_size = world()
    threads = gather_objects(use_assigned_cpus())  # every rank: a collective
    learner = build_learner(cfg, ray.train.torch.get_device())
    logger = _rank0_logger(cfg, data.run_id) if rank == 0 else None
    try:
        _train(learner, cfg, data, logger, threads)
    except BaseException:
        if logger:  # the steps up to the failure are what its diagnosis needs: give them a moment to go out
            with contextlib.suppress(Exception):
                logger.flush(timeout=FLUSH_ON_FAILURE_S)
        raise


def _train(learner: AlignPropLearner, cfg, data: LoopInput, logger, threads: list[int]) -> None:
    import ray.train

    rank, world_size = world()
    progress = restore(ray.train.get_checkpoint(), learner, logger, data.run_id)
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
        _report(learner, progress, metrics, cfg, rank, logger, last)
        if last:
            break
    digests = check_workers_in_sync(learner)
    if logger:
        logger.set_tags({"alignprop.lora_sha256_by_rank": ",".join(digests)})
        _finish(learner, logger)


def restore(checkpoint, learner: AlignPropLearner, logger, run_id: str) -> Progress:
    """Resume from the newest intact checkpoint: the one Ray hands, or if that one is damaged (a node died
    while writing or uploading it), the newest intact one the run keeps; each damaged one is named in one
    line. None intact (or none at all): step 0. Rank 0 queues the MLflow calls the checkpoint carried."""
    from alignprop_ray.tracking import read_unsent

    rank = world()[0]
    progress = Progress(step=0, run_id=run_id)
    base_fidelity.forget()
    for candidate in _newest_first(checkpoint):
        try:
            with candidate.as_directory() as directory:
                contents = read_checkpoint(directory)
                unsent = Path(directory) / UNSENT_LOGS
                try:
                    read_unsent(unsent)
                except ValueError as err:
                    raise DamagedCheckpoint(f"{UNSENT_LOGS}/{err}") from err
                reference = base_fidelity.read_reference(Path(directory))
                progress = contents.restore(learner)
                base_fidelity.keep(reference)
                if logger:
                    logger.resend(unsent)
            break
        except DamagedCheckpoint as err:
            if rank == 0:
                _say(f"damaged checkpoint skipped: {candidate.path} ({err})")
    else:
        if checkpoint is not None and rank == 0:
            _say("no intact checkpoint left: training starts over from step 0")
    steps = gather_objects(progress.step)
    if len(set(steps)) != 1:  # a download that failed on one node only: the ranks would train apart
        raise RuntimeError(f"workers restored different checkpoints (steps by rank: {steps})")
    return progress


def _newest_first(checkpoint):
    """`checkpoint` (the newest, as Ray hands it), then the run's other kept checkpoints, newest first."""
    if checkpoint is None:
        return
    yield checkpoint
    from ray.train import Result

    run_dir = posixpath.dirname(checkpoint.path.rstrip("/"))  # <storage.path>/<run name>/checkpoint_*
    try:
        kept = Result.from_path(run_dir, storage_filesystem=checkpoint.filesystem).best_checkpoints
    except Exception as err:  # Ray's own record of the run is unreadable: nothing older to offer
        _say(f"cannot list the older checkpoints of {run_dir}: {err}")
        return
    for older, _ in sorted(kept, key=lambda pair: pair[1].get("step", -1), reverse=True):
        if older.path != checkpoint.path:
            yield older


def out_of_time(cfg, progress: Progress) -> bool:
    """Whether train.max_wall_seconds has been spent (perf/wall_seconds: training steps only)."""
    budget = cfg.train.max_wall_seconds
    return budget is not None and progress.wall_seconds >= budget


def plan_training_step(cfg, prompts: list[str], step: int, rank: int = 0, world_size: int = 1):
    """`plan_step` for optimizer step `step` of experiment `cfg` on worker `rank` of `world_size`: the
    micro-batches, and the method's draw for each (AlignProp's K, with train.k0: redraw K | K >= 1;
    DRaFT-K's fixed K; ReFL's gradient step; nothing for DRaFT-LV and DDPO)."""
    return plan_step(
        prompts,
        method_settings(cfg).draws,
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
    from alignprop_ray.rewards.mixture import build_reward

    if device.type == "cuda":  # TF32 matmuls on Ampere+: ~2x faster, plenty for LoRA fine-tuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parts = load_parts(cfg.model.pretrained, DTYPES[cfg.model.dtype], device, family=cfg.model.family)
    lora, sampler, optim, method = engine_settings(cfg)
    params = attach_lora(parts.denoiser, lora, seed=cfg.train.seed)
    # DDPO needs reward values only: a non-differentiable term is a valid objective (validated with the method)
    gradient = REWARD_GRADIENT[cfg.method.name]
    reward = build_reward(cfg.reward, device=device, dtype=torch.float32, for_training=gradient)
    return AlignPropLearner(
        parts, params, reward, sampler, optim, resolution=cfg.model.resolution, method=build_method(method)
    )


class EngineSettings(NamedTuple):
    lora: LoraSettings
    sampler: SamplerSettings
    optim: OptimSettings
    method: TruncatedBackpropSettings | DraftLVSettings | ReflSettings | DdpoSettings


def engine_settings(cfg) -> EngineSettings:
    """The engine's settings from the experiment config: the one place where config meets engine."""
    lora, sampling, train = cfg.model.lora, cfg.sampling, cfg.train
    return EngineSettings(
        LoraSettings(
            lora.rank, lora.alpha, tuple(lora.target_modules) if lora.target_modules else None, lora.init
        ),
        SamplerSettings(
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            eta=sampling.eta,
            negative_prompt=sampling.negative_prompt,
            checkpoint=cfg.model.gradient_checkpointing,
            compile=cfg.model.compile,
            activation_budget_mb=cfg.model.activation_budget_mb,
        ),
        OptimSettings(
            lr=train.lr,
            weight_decay=train.weight_decay,
            loss_scale=train.loss_scale,
            max_grad_norm=train.max_grad_norm,
            betas=tuple(train.adam_betas),
            eps=train.adam_eps,
            schedule=train.lr_schedule,
            warmup_steps=train.warmup_steps,
            total_steps=train.steps,
        ),
        method_settings(cfg),
    )


def method_settings(cfg) -> TruncatedBackpropSettings | DraftLVSettings | ReflSettings | DdpoSettings:
    """The training method's engine settings (`engine_settings`); their `draws` is what the plan draws."""
    method = cfg.method
    if method.name == "alignprop":
        truncation = RedrawZero(cfg.truncation) if cfg.train.k0 == "redraw" else cfg.truncation
        return TruncatedBackpropSettings("alignprop", truncation)
    if method.name == "draft" and method.lv_samples is None:
        return TruncatedBackpropSettings("draft", Truncation("fixed", k=method.k))
    if method.name == "draft":
        return DraftLVSettings(samples=method.lv_samples)
    if method.name == "refl":
        return ReflSettings(StepRange(*method.step_range))
    return DdpoSettings(
        eta=method.eta,
        clip_range=method.clip_range,
        adv_clip_max=method.adv_clip_max,
        timestep_fraction=method.timestep_fraction,
        inner_epochs=method.inner_epochs,
        per_prompt_stats=method.per_prompt_stats,
        stat_buffer=method.stat_buffer,
        stat_min_count=method.stat_min_count,
    )


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
        "train/k0_skipped": sum(k == 0 for k in result.ks),  # batches without gradient (train.k0: skip)
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
    metrics.update({f"train/reward/{name}": value for name, value in result.terms.items()})
    metrics.update({f"train/{learner.method.name}/{name}": v for name, v in result.metrics.items()})
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_pairs(prompts: list[str], per_prompt: int) -> list[tuple[str, int]]:
    """(prompt, seed) of every eval image, prompt by prompt: image j of prompt i has seed
    EVAL_SEED_BASE + i * per_prompt + j at every evaluation. No two images share their initial noise, so
    across-prompt diversity does not measure shared noise; `alignprop-ray sample --seed 10000 --n per_prompt`
    with the eval prompts in order draws the same noise."""
    return [
        (p, EVAL_SEED_BASE + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)
    ]


def evaluate(
    learner: AlignPropLearner, cfg, prompts: list[str], step: int, result: StepResult | None, logger
) -> dict:
    """Eval prompts x their seeds, sharded over workers: the trained reward's terms, the held-out rewards
    (eval.rewards) and the diversity features (eval.diversity) of each image; rank 0 gets every image and
    logs grid and table."""
    from alignprop_ray.rewards.diversity import diversity

    pairs = eval_pairs(prompts, cfg.prompts.eval_seeds)
    rank, world_size = world()
    mine = pairs[rank::world_size]
    mine_prompts, batch = [p for p, _ in mine], cfg.train.batch_size
    images, terms, totals = generate_eval(learner, mine_prompts, [s for _, s in mine], batch)
    heldout, features = eval_models(cfg, learner.device).measure(images, mine_prompts, batch)
    fidelity = base_fidelity.shard_features(cfg.eval.base_fidelity, learner.device, images, batch)
    columns = _in_image_order(
        list(range(rank, len(pairs), world_size)),
        {
            "images": (images * 255).round().to(torch.uint8),
            "features": features,
            "fidelity": fidelity,
            "reward": totals,
            **{f"reward/{name}": value for name, value in terms.items()},
            **{f"heldout/{name}": value for name, value in heldout.items()},  # metrics eval/heldout/<name>
        },
    )
    images, features = columns.pop("images").float() / 255, columns.pop("features")
    fidelity = base_fidelity.measure(cfg.eval.base_fidelity, columns.pop("fidelity"), step)
    if fidelity is not None:  # metric eval/base_fidelity, a column of the eval table
        columns["base_fidelity"] = fidelity
    metrics = {f"eval/{name}": float(value.mean()) for name, value in columns.items()}
    groups = [i for i in range(len(prompts)) for _ in range(cfg.prompts.eval_seeds)]
    metrics.update(diversity(images, groups, features, prefix="eval/"))
    if logger:
        _log_eval_artifacts(logger, pairs, images, columns, step, result, cfg.prompts.eval_seeds)
    return metrics


def _in_image_order(
    index: list[int], columns: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor | None]:
    """Every worker's `columns` of its images (`index`: their positions), concatenated in image order; a
    column that is None on the workers stays None. A collective: every worker calls it."""
    shards = gather_objects((index, columns))
    order = torch.argsort(torch.tensor([i for shard_index, _ in shards for i in shard_index]))
    return {
        name: None if value is None else torch.cat([shard[name] for _, shard in shards])[order]
        for name, value in columns.items()
    }


@dataclass
class EvalModels:
    """What an evaluation measures besides the trained reward, built once per worker (`eval_models`)."""

    device: torch.device
    heldout: RewardMixture | None  # eval.rewards; None when there are none
    features: Features | None  # the eval.diversity space; None: pixels

    @torch.no_grad()
    def measure(
        self, images: torch.Tensor, prompts: list[str], batch_size: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """({held-out reward: raw value per image}, diversity features per image or None), on the CPU."""
        heldout, features = {}, []
        for start in range(0, len(prompts), batch_size):
            chunk = images[start : start + batch_size].to(self.device)
            if self.heldout is not None:
                for name, value in self.heldout(chunk, prompts[start : start + batch_size]).terms.items():
                    heldout.setdefault(name, []).append(value.float().cpu())
            if self.features is not None:
                features.append(self.features(chunk).float().cpu())
        return {n: torch.cat(v) for n, v in heldout.items()}, (torch.cat(features) if features else None)


_EVAL_MODELS: dict[tuple[str, str], EvalModels] = {}


def eval_models(cfg, device: torch.device) -> EvalModels:
    """The held-out rewards and the diversity feature model of `cfg.eval` on `device`, built at the first
    evaluation and kept for the next ones (a worker trains one experiment; a new one replaces it)."""
    from alignprop_ray.errors import UserError
    from alignprop_ray.rewards.diversity import clip_features
    from alignprop_ray.rewards.mixture import build_reward
    from alignprop_ray.rewards.weights import WeightsError

    key = (json.dumps(cfg.eval.model_dump(mode="json"), sort_keys=True), str(device))
    if key not in _EVAL_MODELS:
        _EVAL_MODELS.clear()
        rewards, space = cfg.eval.rewards, cfg.eval.diversity
        heldout = None
        if rewards:
            heldout = build_reward(rewards, device=device, dtype=torch.float32, for_training=False)
        features = None
        if space.space == "clip":
            try:
                features = clip_features(space.arch, space.path, seed=space.seed, device=device)
            except WeightsError as err:
                raise UserError(f"eval.diversity.{err.option}: {err.message}") from err
        _EVAL_MODELS[key] = EvalModels(device, heldout, features)
    return _EVAL_MODELS[key]


def _log_eval_artifacts(logger, pairs, images, columns, step, result, nrow) -> None:
    """The eval grid (a row per prompt, a column per seed) and a table with a row per image: its prompt,
    seed, the K of the step just taken, and `columns` (reward, reward/<term>, heldout/<name>)."""
    import pyarrow as pa
    from torchvision.utils import make_grid

    from alignprop_ray.engine.images import to_pil

    logger.log_image(to_pil(make_grid(images, nrow=nrow, padding=2)), key="eval/images", step=step)
    k = result.k if result else 0.0  # the K of the training step just taken (0 before training)
    table = {
        "prompt": [p for p, _ in pairs],
        "seed": [s for _, s in pairs],
        "step": [step] * len(pairs),
        "k": [k] * len(pairs),
    }
    table.update({name: values.tolist() for name, values in columns.items()})
    logger.log_table(pa.table(table), step)


def _report(
    learner: AlignPropLearner, progress: Progress, metrics: dict, cfg, rank: int, logger, last: bool
) -> None:
    """Report every step (all ranks: it is a barrier); attach a checkpoint every checkpoint_every steps.

    The checkpoint carries rank 0's MLflow calls not yet sent (written, not waited for: training does not
    wait on MLflow), so a restart from it loses none of the logs of the steps it covers. A checkpoint that
    cannot be written ends the run with a StorageError, its partial copy in storage removed.
    """
    import ray.train

    metrics = {**metrics, "step": progress.step}
    if last and progress.step < cfg.train.steps:  # ended by train.max_wall_seconds: this is the last step
        metrics[TOTAL_STEPS] = progress.step
    due = progress.step % cfg.train.checkpoint_every == 0 or last
    if not due:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as parent:
        checkpoint, name = None, None
        if rank == 0:  # every worker holds the same adapter: one copy is enough
            extras = functools.partial(_checkpoint_extras, logger=logger)
            try:
                directory = write_checkpoint(learner, progress, parent, extras)
            except OSError as err:
                raise _storage_error(err, progress, "a local temporary folder") from err
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            # Ray's own names are timestamps; the step first tells a reader which is which.
            name = f"checkpoint_{progress.step:07d}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        except OSError as err:
            if name:
                _remove_from_storage(cfg.storage.path, name)
            raise _storage_error(err, progress, cfg.storage.path) from err


def _checkpoint_extras(directory: Path, logger) -> None:
    """What a checkpoint carries besides the training state: rank 0's unsent MLflow calls, the step-0
    reference of eval.base_fidelity."""
    if logger:
        logger.save_unsent(directory / UNSENT_LOGS)
    base_fidelity.save_reference(directory)


def _storage_error(err: OSError, progress: Progress, where: str) -> StorageError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    return StorageError(
        f"could not save the checkpoint of step {progress.step} to {where}: {reason}; "
        "the checkpoints saved before it are intact"
    )


def _remove_from_storage(storage_path: str, checkpoint_name: str) -> None:
    """Delete what a failed upload left of a checkpoint (it was never registered; on a full disk the room
    helps the rerun): `<storage.path>/<run name>/<checkpoint_name>`, Ray's documented layout."""
    import pyarrow.fs
    import ray.train

    with contextlib.suppress(Exception):  # nothing was written, or the storage is gone: nothing to clean
        if "://" in storage_path:
            filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        else:
            filesystem, root = pyarrow.fs.LocalFileSystem(), os.path.abspath(storage_path)
        run = ray.train.get_context().get_experiment_name()
        filesystem.delete_dir(posixpath.join(root, run, checkpoint_name))


def _rank0_logger(cfg, run_id: str):
    from alignprop_ray.tracking import BufferedLogger, use_own_retries

    use_own_retries()
    return BufferedLogger(cfg.tracking.uri, run_id, cfg.tracking.outage_limit_s, say=_say)


def _finish(learner: AlignPropLearner, logger) -> None:
    """Log the adapter, then wait until MLflow holds everything (at most tracking.outage_limit_s)."""
    with tempfile.TemporaryDirectory() as tmp:
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
