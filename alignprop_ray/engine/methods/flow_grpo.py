"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470),
and Flow-GRPO-Fast, for flow-matching models sampled with `FlowMatchEulerDiscreteScheduler` (SD3, FLUX).

The ODE sampler of a flow model has no policy log-probability; the reverse SDE with the same marginals
(engine/flow_sde.py: its Euler-Maruyama step is Gaussian) has one, so any reward gives a policy gradient:

    round (every `updates_per_round` optimizer steps), without autograd:
        the step's images are put in groups of G = group_size over every worker (a group shares one prompt,
        each image has its own seed); each micro-batch samples T = method.steps (else sampling.steps) steps:
        the SDE steps (every step but the last; Flow-GRPO-Fast: a window of `window` consecutive steps at a
        random place, the ODE elsewhere) keep (x_t, x_next, log p_old(x_next | x_t))
        r = reward_mixture(decode(x_0));  A = (r - mean of r's group) / (std of r's group + 1e-4),
            over every worker's rewards (global_std: the std of all of them), clipped to +-adv_clip_max
    step: for each micro-batch, for each of its SDE steps (one backward each):
        ratio = exp(log p_theta(x_next | x_t) - log p_old)
        loss  = [mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)))
                 + train.kl_weight x KL(p_theta(. | x_t) || p_base(. | x_t))] / SDE steps

The KL is to the base model, the same denoiser with the LoRA adapter disabled: both steps are Gaussians of the
same variance, so it is (mean - mean_base)^2 / (2 std^2) per element, averaged (flow_sde.gaussian_kl, with the
step's own std: the exact KL; the authors divide by 2 sigma_t^2, which is it times (t - t_next)).
Log-probabilities are averaged over the latent's elements, as the authors' code does (flow_sde.py). With
`cfg` the training prediction is guided as the rollout's was (gradient through both branches, as the authors'
newer code); CFG-free, both run the conditional branch alone at guidance 1.

Deviations from the authors' code (yifan123/flow_grpo, scripts/train_sd3.py and train_sd3_fast.py): a group's
images are consecutive in (worker, micro-batch) order rather than shuffled over GPUs, and groups are told apart
by their index, not by prompt text (two groups that drew the same prompt stay two groups); a round is the
images of one optimizer step, reused for `updates_per_round` steps (DDPO's inner epochs), where the authors
split a sampled epoch into two optimizer steps of half of it each.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignprop_ray.compat import peft_adapters_disabled
from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.families.registry import FLOW_EULER
from alignprop_ray.engine.flow_sde import gaussian_kl, group_advantages, sde_step
from alignprop_ray.engine.methods.base import Backward, Batch, Method, MicroBatchOutput, generators
from alignprop_ray.engine.methods.configs import FlowGrpoConfig
from alignprop_ray.engine.methods.ddpo import ppo_clip_loss
from alignprop_ray.engine.sampler import (
    SamplerSettings,
    decode,
    encode,
    guided_prediction,
    initial_latents,
    start,
)
from alignprop_ray.errors import UserError
from alignprop_ray.rewards.base import RewardOutput

ADVANTAGE_EPS = 1e-4  # the authors' PerPromptStatTracker: (r - mean) / (std + 1e-4)


@dataclass
class Rollout:
    """One micro-batch's sampled chains: the data every optimizer step of its round trains on."""

    prompts: list[str]  # its groups' prompts
    groups: list[int]  # each image's group, numbered over every worker's images of the round
    cond: Conditioning
    guidance_scale: float  # of the rollout, and of its training predictions
    sigmas: torch.Tensor  # (T + 1,): the schedule t_0 = 1 > ... > t_T = 0 it was sampled on
    timesteps: torch.Tensor  # (T,)
    steps: list[int]  # the SDE steps (indices into the chain): the ones trained on
    latents: list[torch.Tensor]  # x_t before each SDE step, float32
    next_latents: list[torch.Tensor]  # x_next it drew
    log_probs: torch.Tensor  # (SDE steps, B): log p_old
    reward: RewardOutput
    advantages: torch.Tensor | None = None  # (B,), unclipped


class FlowGrpo(Method):
    config: FlowGrpoConfig

    def __init__(self, config: FlowGrpoConfig):
        super().__init__(config)
        self.rollouts: list[Rollout] | None = None
        self.group_seeds: dict[int, int] = {}  # group -> the seed of its first image (same_latent)
        self.fresh = False  # whether this step's round was sampled at this step

    # --- the round --------------------------------------------------------------------------------------

    def begin_step(self, learner, batches, draws) -> None:
        """Sample a new round at the first step of each (and after a resume mid-round: its samples are not
        in the checkpoint), then the group advantages over every worker's rewards (collectives)."""
        check_scheduler(learner.parts.scheduler)
        self.fresh = self.rollouts is None or learner.step % self.config.updates_per_round == 0
        if not self.fresh:
            return
        grouped = self.grouped(batches)
        self.rollouts = [self.sample(learner, batch, groups, learner.step) for batch, groups in grouped]
        rewards = torch.cat([r.reward.total.detach().float().cpu() for r in self.rollouts]).tolist()
        groups = [g for r in self.rollouts for g in r.groups]
        advantages = self.advantages(rewards, groups)
        for rollout in self.rollouts:
            size = len(rollout.prompts)
            rollout.advantages, advantages = advantages[:size], advantages[size:]

    def grouped(self, batches: Sequence[Batch]) -> list[tuple[Batch, list[int]]]:
        """The step's micro-batches with their prompts replaced by their groups' (a collective).

        Every image of the step over all workers, in (worker, micro-batch, position) order, falls in group
        index // G, whose prompt is the one its first image drew; seeds stay each image's own. A config
        whose images per step G does not divide is refused; a run that has fewer (one process in a test)
        ends with a smaller group."""
        mine = [(p, s) for batch in batches for p, s in zip(batch.prompts, batch.seeds, strict=True)]
        shards = gather_objects(mine)
        everyone = [image for shard in shards for image in shard]
        offset = sum(len(shard) for shard in shards[: world()[0]])
        size = self.config.group_size
        out, position = [], offset
        for batch in batches:
            groups = [(position + i) // size for i in range(len(batch.prompts))]
            prompts = [everyone[g * size][0] for g in groups]
            out.append((Batch(prompts, list(batch.seeds)), groups))
            position += len(batch.prompts)
        self.group_seeds = {g: everyone[g * size][1] for _, groups in out for g in groups}
        return out

    def advantages(self, rewards: list[float], groups: list[int]) -> torch.Tensor:
        """This worker's advantages, each group's statistics taken over every worker's rewards."""
        shards = gather_objects((groups, rewards))
        every_group = torch.tensor([g for shard, _ in shards for g in shard])
        every_reward = torch.tensor([r for _, shard in shards for r in shard], dtype=torch.float64)
        normalized = group_advantages(
            every_reward, every_group, eps=ADVANTAGE_EPS, global_std=self.config.global_std
        )
        offset = sum(len(shard) for shard, _ in shards[: world()[0]])
        return normalized[offset : offset + len(rewards)].float()

    def rollout_settings(self, learner) -> SamplerSettings:
        """The training rollouts' sampler: method.steps steps; guidance 1 when CFG-free (a guidance-distilled
        family, which has no unconditional branch, keeps its guidance input)."""
        settings = learner.sampler
        guidance = settings.guidance_scale
        if not self.config.cfg and learner.parts.family.classifier_free_guidance:
            guidance = 1.0
        return dataclasses.replace(
            settings, steps=self.config.steps or settings.steps, guidance_scale=guidance
        )

    def sde_steps(self, steps: int, seeds: Sequence[int], step: int) -> list[int]:
        """The chain's SDE steps: every step but the last (Flow-GRPO), or Flow-GRPO-Fast's window of
        `window` consecutive steps, placed per micro-batch and round (the same on a rerun)."""
        window = self.config.window
        if window is None:
            return list(range(steps - 1))
        low, high = self.config.window_range or (0, steps)
        first = random.Random(f"flow_grpo:{step}:{','.join(map(str, seeds))}").randint(low, high - window)
        return list(range(first, first + window))

    @torch.no_grad()
    def sample(self, learner, batch: Batch, groups: list[int], step: int) -> Rollout:
        """The micro-batch's chains: SDE steps (recorded, with their log-probabilities) and ODE steps."""
        parts, settings = learner.parts, self.rollout_settings(learner)
        resolution = learner.resolution or parts.native_resolution
        gens = generators(batch.seeds)
        with learner.autocast():
            cond = encode(parts, batch.prompts, settings, resolution)
            timesteps = start(parts, settings.steps, resolution)
            sigmas = parts.scheduler.sigmas.detach().float().cpu()
            trained = self.sde_steps(len(timesteps), batch.seeds, step)
            if self.config.same_latent:  # x_T from the group's first seed; the SDE noise from each image's
                x = initial_latents(parts, generators([self.group_seeds[g] for g in groups]), resolution)
            else:
                x = initial_latents(parts, gens, resolution)
            x = x.float()
            latents, following, log_probs = [], [], []
            for i, t in enumerate(timesteps):
                velocity = guided_prediction(parts, x.to(parts.dtype), t, cond, settings.guidance_scale)
                noise = self.config.noise_level if i in trained else 0.0
                result = sde_step(sigmas, i, velocity, x, noise, generator=gens)
                if i in trained:
                    latents.append(x)
                    following.append(result.prev_sample)
                    log_probs.append(result.log_prob)
                x = result.prev_sample
            out = learner.reward(decode(parts, x.to(parts.dtype)), batch.prompts)
        return Rollout(
            batch.prompts,
            groups,
            cond,
            settings.guidance_scale,
            sigmas,
            timesteps,
            trained,
            latents,
            following,
            torch.stack(log_probs),
            out,
        )

    # --- the update -------------------------------------------------------------------------------------

    def micro_batch(self, learner, index, batch, draw, backward: Backward) -> MicroBatchOutput:
        rollout = self.rollouts[index]
        advantages = rollout.advantages.clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        advantages = advantages.to(learner.device)
        losses, approx_kl, clipped, kls = [], [], [], []
        for j in range(len(rollout.steps)):
            step = self.policy_step(learner, rollout, j)
            old = rollout.log_probs[j].float()
            ratio = torch.exp(step.log_prob - old)
            loss = ppo_clip_loss(advantages, ratio, self.config.clip_range)
            if learner.kl_weight > 0:
                kl = self.kl_to_base(learner, rollout, j, step).mean()
                loss = loss + learner.kl_weight * kl
                kls.append(float(kl.detach()))
            backward(loss / len(rollout.steps))
            losses.append(float(loss.detach()))
            # the authors' diagnostics (ddpo-pytorch's): 0.5 E[(log ratio)^2], the share of ratios clipped
            approx_kl.append(float(0.5 * torch.mean((step.log_prob.detach() - old) ** 2)))
            clipped.append(float(torch.mean(((ratio.detach() - 1.0).abs() > self.config.clip_range).float())))
        return MicroBatchOutput(
            rollout.reward,
            _mean(losses),
            images=len(rollout.prompts) if self.fresh else 0,
            grad_steps=len(rollout.steps),
            kl=_mean(kls) if kls else None,  # train/kl, as the reward-gradient methods' KL term
            metrics={"clip_fraction": _mean(clipped), "approx_kl": _mean(approx_kl)},
        )

    def policy_step(self, learner, rollout: Rollout, j: int):
        """SDE step j of the rollout under the denoiser as it is (with gradient unless the caller disables
        it), scoring the stored x_next."""
        parts, i = learner.parts, rollout.steps[j]
        x = rollout.latents[j]
        with learner.autocast():
            velocity = guided_prediction(
                parts, x.to(parts.dtype), rollout.timesteps[i], rollout.cond, rollout.guidance_scale
            )
        return sde_step(
            rollout.sigmas, i, velocity, x, self.config.noise_level, prev_sample=rollout.next_latents[j]
        )

    def kl_to_base(self, learner, rollout: Rollout, j: int, step) -> torch.Tensor:
        """KL(this step || the base model's step), per image: the adapter disabled for the base's call."""
        with torch.no_grad(), peft_adapters_disabled(learner.parts.denoiser):
            base = self.policy_step(learner, rollout, j)
        return gaussian_kl(step.mean, base.mean, step.std)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check_scheduler(scheduler) -> None:
    """Flow-GRPO's policy is the SDE of flow-matching Euler sampling."""
    name = type(scheduler).__name__
    if name != FLOW_EULER:
        raise UserError(
            f"method flow_grpo needs a {FLOW_EULER} (its policy is the SDE of flow-matching sampling); "
            f"this model samples with {name}"
        )
