"""What the learner asks of a training method, and the no-grad sampling chain the methods share.

The learner (engine/step.py) owns everything common to the methods: the optimizer, the loss scale, the
gradient average across workers, clipping, the NaN guard and the learning-rate schedule. Per optimizer
step it calls the method's `begin_step` once with the step's micro-batches (where DDPO samples its whole
round and normalizes rewards across workers), then `micro_batch` for each of them. A micro-batch hands
what it wants minimized to `backward` (as often as it likes: DDPO once per trained timestep, DRaFT-LV once
per re-noised copy, so memory stays that of one backward) and returns what it scored and how much it
sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from alignprop_ray.engine.families.base import Conditioning, DiffusionParts
from alignprop_ray.engine.methods.configs import MethodConfig
from alignprop_ray.engine.regularizers import KLAccumulator
from alignprop_ray.engine.sampler import SamplerSettings, guided_prediction, solver_step
from alignprop_ray.engine.truncation import Draw
from alignprop_ray.rewards.base import RewardModel, RewardOutput


@dataclass(frozen=True)
class Batch:
    prompts: list[str]
    seeds: list[int]


class LearnerView(Protocol):
    """What a method may use of the learner (engine/step.py `Learner`)."""

    parts: DiffusionParts
    reward: RewardModel
    sampler: SamplerSettings
    resolution: int | None  # None: the model's own
    device: torch.device
    # The micro-batches the run plans for any optimizer step (engine/step.py `plan_step`, this worker's);
    # None outside a run. DDPO samples its round's later steps' batches at the round's first.
    plan: Callable[[int], Sequence[Batch]] | None
    kl_weight: float  # train.kl_weight: the weight of the KL-to-base term (engine/regularizers.py); 0: off

    @property
    def step(self) -> int: ...  # optimizer steps taken so far

    def autocast(self) -> AbstractContextManager: ...

    def kl_term(self) -> KLAccumulator | None: ...  # a fresh sum of the KL-to-base term; None when off


# Backpropagate `loss` (a scalar to minimize, unscaled): the learner multiplies it by train.loss_scale /
# grad_accum, skips it (and the step's update) when it is not finite, and accumulates LoRA gradients.
Backward = Callable[[torch.Tensor], None]


@dataclass
class MicroBatchOutput:
    reward: RewardOutput  # the objective and raw terms of the images the reward scored, (B,) each
    loss: float  # the unscaled objective this micro-batch minimized (train/loss)
    images: int  # denoising chains newly sampled from noise on this worker (perf/images_generated)
    grad_steps: int  # denoiser calls per image whose gradient reached LoRA (train/k); 0: no gradient
    kl: float | None = None  # the KL-to-base term it added, unweighted (train/kl); None: train.kl_weight 0
    metrics: dict[str, float] = field(default_factory=dict)  # logged as train/<method>/<name>


class Method:
    """A training method: how a micro-batch of prompts and seeds becomes a loss. Built from its validated
    config (engine/methods/configs.py) by its row (registry.py); subclasses implement `micro_batch`, and
    methods that keep state across steps (DDPO) also its checkpoint hooks."""

    def __init__(self, config: MethodConfig):
        self.config = config
        self.name = config.name  # its metrics are logged as train/<name>/<metric>

    def begin_step(self, learner: LearnerView, batches: Sequence[Batch], draws: Sequence[Draw]) -> None:
        """Called once per optimizer step before its micro-batches, on every worker (may be a collective)."""

    def micro_batch(
        self, learner: LearnerView, index: int, batch: Batch, draw: Draw, backward: Backward
    ) -> MicroBatchOutput:
        """Micro-batch `index` of the step: `draw` is what the plan drew for it with the config's
        `draw_rule` (K for alignprop and draft, the gradient step for refl, 0 for the others)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint must keep to resume the method exactly (plain data)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, as `sampler.generate` seeds them (diffusers' convention)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


ChainRecord = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def run_chain(
    parts: DiffusionParts,
    cond: Conditioning,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    guidance_scale: float,
    eta: float,
    gens: list[torch.Generator],
    record: ChainRecord | None = None,
) -> torch.Tensor:
    """Solver steps over `timesteps` from `latents`, without autograd: the latents after the last one.

    The same step as `sampler.generate`'s (guided prediction, then the scheduler's step), so a full chain
    ends where `generate` does. `record(i, t, latents, prediction, next_latents)` sees every step.
    """
    for i, t in enumerate(timesteps):
        prediction = guided_prediction(parts, latents, t, cond, guidance_scale)
        following = solver_step(parts, prediction, t, latents, eta, gens)
        if record is not None:
            record(i, t, latents, prediction, following)
        latents = following
    return latents


def mean_output(outputs: Sequence[RewardOutput]) -> RewardOutput:
    """Per image, the mean of several scorings of it (DRaFT-LV's copies)."""
    total = torch.stack([o.total.detach().float() for o in outputs]).mean(0)
    terms = {
        name: torch.stack([o.terms[name].detach().float() for o in outputs]).mean(0)
        for name in outputs[0].terms
    }
    return RewardOutput(total, terms)
