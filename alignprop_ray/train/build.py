"""From a validated experiment config to the engine: the learner (denoiser, LoRA, reward, method,
optimizer) and the plan of each optimizer step. The one place where config meets engine: a method's config
reaches its engine code unchanged (its row builds it, engine/methods/registry.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignprop_ray.engine.lora import LoraSettings, attach_lora
from alignprop_ray.engine.methods import build_method, get_method
from alignprop_ray.engine.methods.base import Batch
from alignprop_ray.engine.models import DTYPES, load_parts
from alignprop_ray.engine.regularizers import Regularizers
from alignprop_ray.engine.sampler import SamplerSettings
from alignprop_ray.engine.step import Learner, OptimSettings, plan_step
from alignprop_ray.engine.truncation import Draw
from alignprop_ray.errors import UserError


def build_learner(
    cfg, device: torch.device, prompts: list[str] | None = None, rank: int = 0, world_size: int = 1
) -> Learner:
    """The model of `cfg` on `device` with a fresh LoRA adapter, its reward, method and optimizer; with the
    run's training `prompts`, also its plan of every step on worker `rank` (`Learner.plan`: DDPO samples its
    round's later steps' batches at the round's first)."""
    from alignprop_ray.rewards.mixture import build_reward
    from alignprop_ray.serving.client import served_reward

    if device.type == "cuda":  # TF32 matmuls on Ampere+: ~2x faster, plenty for LoRA fine-tuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parts = load_parts(cfg.model.pretrained, DTYPES[cfg.model.dtype], device, family=cfg.model.family)
    lora, sampler, optim = engine_settings(cfg)
    params = attach_lora(parts.denoiser, lora, seed=cfg.train.seed)
    # a method that needs reward values only (DDPO) trains on non-differentiable terms too (validated)
    gradient = get_method(cfg.method.name).reward_gradient
    # a term with `serve` settings is scored by its Ray Serve application (started by the driver)
    reward = build_reward(
        cfg.reward, device=device, dtype=torch.float32, for_training=gradient, served=served_reward
    )
    if gradient and not reward.differentiable:  # a served plugin proves it only where it runs
        flat = [
            name for name, r in reward.rewards.items() if not r.differentiable and reward.terms[name].weight
        ]
        raise UserError(
            f"reward.{flat[0]}: not differentiable (its replicas found no gradient reaching the images), "
            f"cannot be a {get_method(cfg.method.name).label} training objective"
        )
    method = build_method(cfg.method)
    regularizers = Regularizers(kl_weight=cfg.train.kl_weight, ema_decay=cfg.train.ema_decay)
    learner = Learner(
        parts,
        params,
        reward,
        sampler,
        optim,
        resolution=cfg.model.resolution,
        method=method,
        regularizers=regularizers,
    )
    if prompts is not None:
        learner.plan = lambda step: plan_training_step(cfg, prompts, step, rank, world_size)[0]
    return learner


class EngineSettings(NamedTuple):
    lora: LoraSettings
    sampler: SamplerSettings
    optim: OptimSettings


def engine_settings(cfg) -> EngineSettings:
    """The engine's adapter, sampler and optimizer settings from the experiment config (the method needs
    no translation: it reads its validated config)."""
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
            lr=train.lr * train.lr_scale,  # lr: the method's reference unless the experiment sets it
            weight_decay=train.weight_decay,
            loss_scale=train.loss_scale,
            max_grad_norm=train.max_grad_norm,
            betas=tuple(train.adam_betas),
            eps=train.adam_eps,
            schedule=train.lr_schedule,
            warmup_steps=train.warmup_steps,
            total_steps=train.steps,
        ),
    )


def plan_training_step(
    cfg, prompts: list[str], step: int, rank: int = 0, world_size: int = 1
) -> tuple[list[Batch], list[Draw]]:
    """`plan_step` for optimizer step `step` of experiment `cfg` on worker `rank` of `world_size`: the
    micro-batches, and the method's draw for each (its config's `draw_rule`)."""
    return plan_step(
        prompts,
        cfg.method.draw_rule,
        cfg.sampling.steps,
        step=step,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        rank=rank,
        world_size=world_size,
    )
