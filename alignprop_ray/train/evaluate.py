"""Evaluation in the Ray Train workers: the eval prompts x their fixed seeds, sharded over workers, scored
by the trained reward, the held-out rewards (eval.rewards) and the diversity space (eval.diversity); rank 0
logs the grid and a table with a row per image."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.step import Learner, StepResult, generate_eval
from alignprop_ray.train import base_fidelity

if TYPE_CHECKING:
    from alignprop_ray.rewards.diversity import Features
    from alignprop_ray.rewards.mixture import RewardMixture

EVAL_SAMPLER_TAG = "alignprop.eval_sampler"  # what evaluation sampled with, in words (set at each evaluation)
TRAIN_ETA_PREFIX = "eval/train_eta/"  # the trained reward at the training eta, where it is not sampling.eta
EVAL_SEED_BASE = 10_000  # eval image j of prompt i: seed EVAL_SEED_BASE + i x eval_seeds + j (eval_pairs)


def eval_pairs(prompts: list[str], per_prompt: int) -> list[tuple[str, int]]:
    """(prompt, seed) of every eval image, prompt by prompt: image j of prompt i has seed
    EVAL_SEED_BASE + i * per_prompt + j at every evaluation. No two images share their initial noise, so
    across-prompt diversity does not measure shared noise; `alignprop-ray sample --seed 10000 --n per_prompt`
    with the eval prompts in order draws the same noise."""
    return [
        (p, EVAL_SEED_BASE + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)
    ]


def evaluate(learner: Learner, cfg, prompts: list[str], step: int, result: StepResult | None, logger) -> dict:
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
    metrics.update(_at_training_eta(learner, cfg, mine_prompts, [s for _, s in mine]))
    if logger:
        logger.set_tags({EVAL_SAMPLER_TAG: sampler_description(learner, cfg)})
        _log_eval_artifacts(logger, pairs, images, columns, step, result, cfg.prompts.eval_seeds)
    return metrics


def sampler_description(learner: Learner, cfg) -> str:
    """What evaluation samples with: `DDIMScheduler, 50 steps, eta 0, guidance 7.5` (and the training eta
    where the method samples its training images at another one, DDPO's)."""
    settings = learner.sampler
    text = (
        f"{type(learner.parts.scheduler).__name__}, {settings.steps} steps, eta {settings.eta:g}, "
        f"guidance {settings.guidance_scale:g}"
    )
    eta = _training_eta(cfg)
    return text if eta is None else f"{text}; also at the training eta {eta:g} ({TRAIN_ETA_PREFIX}reward)"


def _training_eta(cfg) -> float | None:
    """The method's own sampling eta for its training images (DDPO's method.eta) where it differs from
    sampling.eta, which evaluation uses; None otherwise."""
    eta = getattr(cfg.method, "eta", None)
    return eta if eta is not None and eta != cfg.sampling.eta else None


def _at_training_eta(learner: Learner, cfg, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """DDPO trains on samples drawn at its own eta (1 by default) but evaluation samples at sampling.eta
    (0): the trained reward of the same eval prompts and seeds at the training eta as well (eval/train_eta/
    reward, and per term). A collective: every worker calls it."""
    eta = _training_eta(cfg)
    if eta is None:
        return {}
    sampler = learner.sampler
    learner.sampler = dataclasses.replace(sampler, eta=eta)
    try:
        _, terms, totals = generate_eval(learner, prompts, seeds, cfg.train.batch_size)
    finally:
        learner.sampler = sampler
    shards = gather_objects((totals, terms))
    metrics = {f"{TRAIN_ETA_PREFIX}reward": float(torch.cat([t for t, _ in shards]).mean())}
    for name in terms:
        values = torch.cat([shard[name] for _, shard in shards])
        metrics[f"{TRAIN_ETA_PREFIX}reward/{name}"] = float(values.mean())
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
            from alignprop_ray.serving.client import served_reward

            heldout = build_reward(
                rewards, device=device, dtype=torch.float32, for_training=False, served=served_reward
            )
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
