"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"), the PPO-clip variant,
as kvablack/ddpo-pytorch implements it (scripts/train.py, diffusers_patch/ddim_with_logprob.py).

The policy is the DDIM sampler with eta > 0: each step x_t -> x_(t-1) is a Gaussian N(mu_theta(x_t), s_t^2),
so a chain has a log-likelihood and any reward, differentiable or not, gives a policy gradient.

    round (every updates_per_round x inner_epochs optimizer steps), without autograd:
        for each of its updates_per_round updates, for every micro-batch the plan gives that update's step:
            sample T steps with eta, keeping (x_t, x_(t-1), log p_old(x_(t-1) | x_t)) of every step
            r = reward_mixture(decode(x_0))
        A = (r - mean) / (std + 1e-6), per prompt over a buffer of its last rewards once it holds
            `stat_min_count` of them, else over the whole round (gathered from every worker);
            clipped to [-adv_clip_max, adv_clip_max]
    each of inner_epochs passes: shuffle the round's micro-batches, split them into updates_per_round
    disjoint minibatches, one optimizer step each:
        for each micro-batch, for int(T x timestep_fraction) of its steps t (one backward each):
            ratio = exp(log p_theta(x_(t-1) | x_t) - log p_old)
            loss  = mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))) / steps trained

The log-probability is averaged over the latent's elements, as the reference does. The first update of
a round trains with the adapter that sampled it, so its ratio is 1 and nothing is clipped; every later
update's adapter has moved, and the ratio and clip act (ddpo-pytorch scripts/train.py: sample a round, then
`num_batches_per_epoch x sample.batch_size / (train.batch_size x gradient_accumulation_steps)` updates per
inner epoch). With updates_per_round 1 and inner_epochs 1 every update is a round's first: that is
REINFORCE with normalized advantages, not PPO. Deviations from the reference: a pass shuffles whole micro-batches rather
than single images, the trained timesteps are drawn per micro-batch rather than per image (the same with timestep_fraction 1,
its default), and the step's mean follows diffusers' DDIMScheduler.step exactly (the reference uses
alphas_cumprod[0] where diffusers uses final_alpha_cumprod: the same for every SD checkpoint, whose
scheduler has set_alpha_to_one false).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.families.registry import DDIM
from alignprop_ray.engine.methods.base import (
    Backward,
    Batch,
    Method,
    MicroBatchOutput,
    generators,
    run_chain,
)
from alignprop_ray.engine.methods.configs import DdpoConfig
from alignprop_ray.engine.sampler import decode, encode, guided_prediction, initial_latents, start
from alignprop_ray.errors import UserError
from alignprop_ray.rewards.base import RewardOutput

STD_EPS = 1e-6  # the reference's per-prompt normalization: (r - mean) / (std + 1e-6)
BATCH_STD_EPS = 1e-8  # without per-prompt statistics: (r - mean) / (std + 1e-8)


# --- the DDIM step as a Gaussian policy ------------------------------------------------------------------


def ddim_step_mean_std(
    scheduler, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of x_(t-1) given x_t under DDIM with noise `eta` (DDIMScheduler.step:
    x_(t-1) = mean + std * noise). `t` is one timestep or one per image; the result is differentiable."""
    if scheduler.config.thresholding:
        raise ValueError("DDIM with dynamic thresholding has no Gaussian step to take log-probabilities of")
    t = torch.as_tensor(t).reshape(-1).long().cpu()
    previous = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.cpu()
    alpha = alphas[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype).cpu()
    alpha_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], final)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    alpha, alpha_prev = (a.view(shape).to(latents.device, latents.dtype) for a in (alpha, alpha_prev))
    beta = 1 - alpha
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (latents - beta.sqrt() * prediction) / alpha.sqrt(), prediction
    elif kind == "sample":
        x0, eps = prediction, (latents - alpha.sqrt() * prediction) / beta.sqrt()
    elif kind == "v_prediction":
        x0 = alpha.sqrt() * latents - beta.sqrt() * prediction
        eps = alpha.sqrt() * prediction + beta.sqrt() * latents
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        bound = scheduler.config.clip_sample_range
        x0 = x0.clamp(-bound, bound)
    std = eta * ((1 - alpha_prev) / beta * (1 - alpha / alpha_prev)).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std


def ddim_log_prob(
    scheduler,
    prediction: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """log N(next_latents; mean, std^2) of one DDIM step, averaged over all but the batch dimension
    (ddpo-pytorch's `ddim_step_with_logprob` with `prev_sample`), in float32; differentiable in
    `prediction`. Shape (B,)."""
    mean, std = ddim_step_mean_std(scheduler, prediction.float(), t, latents.float(), eta)
    x = next_latents.detach().float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ppo_clip_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate, to minimize: mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


# --- advantages -------------------------------------------------------------------------------------------


class PerPromptStats:
    """DDPO's per-prompt reward normalization (ddpo-pytorch stat_tracking.PerPromptStatTracker): each
    prompt keeps its last `buffer` rewards; a reward is normalized by its prompt's buffer once that holds
    `min_count` rewards, before that by the whole batch."""

    def __init__(self, buffer: int, min_count: int):
        self.buffer, self.min_count = buffer, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[float]) -> np.ndarray:
        prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            seen = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer))
            seen.extend(mine.tolist())
            pool = np.asarray(seen) if len(seen) >= self.min_count else rewards
            advantages[prompts == prompt] = (mine - pool.mean()) / (pool.std() + STD_EPS)
        return advantages

    def state_dict(self) -> dict:
        return {prompt: list(values) for prompt, values in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {prompt: deque(values, maxlen=self.buffer) for prompt, values in state.items()}


def batch_advantages(rewards: Sequence[float]) -> np.ndarray:
    """Without per-prompt statistics: normalized over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + BATCH_STD_EPS)


# --- the method -------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One micro-batch's sampled chains: the data the updates of its round train on."""

    batch: Batch
    cond: Conditioning
    timesteps: torch.Tensor  # (T,)
    latents: list[torch.Tensor]  # T + 1 entries: x_T, ..., x_0, each (B, C, h, w)
    log_probs: torch.Tensor  # (T, B): log p_old of step i's x_(t-1)
    reward: RewardOutput
    advantages: torch.Tensor | None = None  # (B,), unclipped


class Ddpo(Method):
    config: DdpoConfig

    def __init__(self, config: DdpoConfig):
        super().__init__(config)
        self.stats = (
            PerPromptStats(config.stat_buffer, config.stat_min_count) if config.per_prompt_stats else None
        )
        self.rollouts: list[Rollout] | None = None  # the round: updates_per_round x grad_accum micro-batches
        self.current: list[Rollout] = []  # this update's minibatch (one rollout per micro-batch)
        self.sampled = 0  # images this worker sampled at this step (a round's first step: all of them)

    @property
    def round_length(self) -> int:
        """Optimizer steps per round: updates_per_round updates in each of inner_epochs passes."""
        return self.config.updates_per_round * self.config.inner_epochs

    def begin_step(self, learner, batches, draws) -> None:
        """At a round's first step (and after a resume mid-round: its samples are not in the checkpoint)
        sample the whole round and normalize its rewards over every worker's images; then pick this update's
        minibatch of it."""
        check_scheduler(learner.parts.scheduler)
        updates = self.config.updates_per_round
        position = learner.step % self.round_length
        first = learner.step - position  # the round's first step
        self.sampled = 0
        if self.rollouts is None or position == 0:
            # the round's first update trains on its own step's batches (those of this step, unless a resume
            # lands mid-round and the run's plan can say which they were)
            own = first == learner.step or learner.plan is None
            planned = [batches if own else self.plan(learner, first, updates)]
            planned += [self.plan(learner, first + j, updates) for j in range(1, updates)]
            self.rollouts = [self.sample(learner, batch) for update in planned for batch in update]
            self.sampled = sum(len(r.batch.prompts) for r in self.rollouts)
            prompts = [p for r in self.rollouts for p in r.batch.prompts]
            rewards = torch.cat([r.reward.total.detach().float().cpu() for r in self.rollouts]).tolist()
            advantages = self.advantages(prompts, rewards)
            for rollout in self.rollouts:
                size = len(rollout.batch.prompts)
                rollout.advantages, advantages = advantages[:size], advantages[size:]
        epoch, update = divmod(position, updates)
        if len(self.rollouts) != updates * len(batches):
            raise ValueError(
                f"DDPO's round holds {len(self.rollouts)} micro-batches, not {updates} x {len(batches)}"
            )
        # every worker shuffles its own micro-batches with the same permutation (the same count on each)
        order = list(range(len(self.rollouts)))
        random.Random(f"ddpo:round:{first}:{epoch}").shuffle(order)
        mine = order[update * len(batches) : (update + 1) * len(batches)]
        self.current = [self.rollouts[i] for i in mine]

    @staticmethod
    def plan(learner, step: int, updates: int) -> Sequence[Batch]:
        """The micro-batches the plan gives optimizer step `step` (`learner.plan`, set by the run)."""
        if learner.plan is None:
            raise ValueError(
                f"method ddpo with updates_per_round {updates} samples the batches of its round's later "
                "steps at its first: the learner needs the run's plan (Learner.plan)"
            )
        return learner.plan(step)

    def advantages(self, prompts: list[str], rewards: list[float]) -> torch.Tensor:
        """Normalized advantages of this worker's images, the statistics taken over every worker's (a
        collective): every worker updates the same per-prompt buffers with the same data, in rank order."""
        shards = gather_objects((prompts, rewards))
        every_prompt = [p for shard, _ in shards for p in shard]
        every_reward = [r for _, shard in shards for r in shard]
        if self.stats is not None:
            normalized = self.stats.update(every_prompt, every_reward)
        else:
            normalized = batch_advantages(every_reward)
        offset = sum(len(shard) for shard, _ in shards[: world()[0]])
        return torch.tensor(normalized[offset : offset + len(prompts)], dtype=torch.float32)

    def sample(self, learner, batch: Batch) -> Rollout:
        """The micro-batch's chains with eta, recording each step and its log-probability (no autograd)."""
        parts, settings = learner.parts, learner.sampler
        resolution = learner.resolution or parts.native_resolution
        gens = generators(batch.seeds)
        latents, log_probs = [], []

        def record(i, t, x, prediction, following):
            latents.append(x)
            log_probs.append(ddim_log_prob(parts.scheduler, prediction, t, x, following, self.config.eta))

        with learner.autocast(), torch.no_grad():
            cond = encode(parts, batch.prompts, settings, resolution)
            timesteps = start(parts, settings.steps, resolution)
            noise = initial_latents(parts, gens, resolution)
            final = run_chain(
                parts, cond, noise, timesteps, settings.guidance_scale, self.config.eta, gens, record
            )
            out = learner.reward(decode(parts, final), batch.prompts)
        return Rollout(batch, cond, timesteps, [*latents, final], torch.stack(log_probs), out)

    def micro_batch(self, learner, index, batch, draw, backward: Backward) -> MicroBatchOutput:
        """Train on micro-batch `index` of this update's minibatch (its own prompts and seeds: sampled at the
        round's first step, which may not be this step's `batch`)."""
        rollout, parts = self.current[index], learner.parts
        resolution = learner.resolution or parts.native_resolution
        start(parts, learner.sampler.steps, resolution)  # the step count sets each step's previous timestep
        chosen = self.trained_steps(rollout, rollout.batch.seeds, learner.step)
        advantages = rollout.advantages.clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        advantages = advantages.to(learner.device)
        losses, kl, clipped = [], [], []
        for i in chosen:
            t, x = rollout.timesteps[i], rollout.latents[i]
            with learner.autocast():
                prediction = guided_prediction(parts, x, t, rollout.cond, learner.sampler.guidance_scale)
            log_prob = ddim_log_prob(
                parts.scheduler, prediction, t, x, rollout.latents[i + 1], self.config.eta
            )
            old = rollout.log_probs[i].float()
            ratio = torch.exp(log_prob - old)
            loss = ppo_clip_loss(advantages, ratio, self.config.clip_range)
            backward(loss / len(chosen))
            losses.append(float(loss.detach()))
            # ddpo-pytorch's diagnostics: 0.5 E[(log ratio)^2], and the share of ratios outside the clip
            kl.append(float(0.5 * torch.mean((log_prob.detach() - old) ** 2)))
            clipped.append(float(torch.mean(((ratio.detach() - 1.0).abs() > self.config.clip_range).float())))
        return MicroBatchOutput(
            rollout.reward,
            sum(losses) / len(losses),
            images=self.sampled if index == 0 else 0,  # the whole round counts at its first step
            grad_steps=len(chosen),
            metrics={"clip_fraction": sum(clipped) / len(clipped), "approx_kl": sum(kl) / len(kl)},
        )

    def trained_steps(self, rollout: Rollout, seeds: Sequence[int], step: int) -> list[int]:
        """The int(T x timestep_fraction) steps (indices into the chain) trained on, drawn per micro-batch
        and optimizer step (all of them with fraction 1)."""
        steps = len(rollout.timesteps)
        count = int(steps * self.config.timestep_fraction)
        if count < 1:
            raise ValueError(
                f"timestep_fraction {self.config.timestep_fraction} of {steps} steps trains none"
            )
        rng = random.Random(f"ddpo:{step}:{','.join(map(str, seeds))}")
        return sorted(rng.sample(range(steps), count))

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict()} if self.stats is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stats is not None and "stats" in state:
            self.stats.load_state_dict(state["stats"])


def check_scheduler(scheduler) -> None:
    """DDPO's log-probabilities are those of DDIM's Gaussian step."""
    name = type(scheduler).__name__
    if name != DDIM:
        raise UserError(
            f"method ddpo needs a DDIM scheduler (its policy is DDIM's Gaussian step); this model samples "
            f"with {name}"
        )
