"""The stochastic sampler of Flow-GRPO (arXiv 2505.05470, Section 4 "ODE-to-SDE") for flow-matching models
sampled with `FlowMatchEulerDiscreteScheduler`, its per-step Gaussian log-probability, the KL between two
such steps, and GRPO's group-relative advantages. Pure torch: no scheduler object, no Ray, no MLflow.

Notation (the scheduler's): x_t = (1 - t) x_0 + t x_1 with x_1 ~ N(0, I) pure noise at t = 1, so sampling
runs t from 1 down to 0 through `scheduler.sigmas` (t_0 = 1 > t_1 > ... > t_T = 0); the denoiser predicts the
velocity v = x_1 - x_0, and the ODE step is x_next = x + (t_next - t) v (what `scheduler.step` does).

**The SDE.** For this interpolation the score is grad log p_t(x) = -(x + (1 - t) v(x, t)) / t, and the
reverse-time SDE

    dx = [v + sigma_t^2 / (2t) * (x + (1 - t) v)] dt + sigma_t dw        (dt < 0: t runs from 1 to 0)

has the same marginals p_t as the ODE dx = v dt for every noise schedule sigma_t (sigma_t = 0 is the ODE).
Flow-GRPO takes sigma_t = a * sqrt(t / (1 - t)) with `noise_level` a (paper default 0.7).

**The Euler-Maruyama step** from t to t_next (dt = t_next - t < 0) is Gaussian:

    mean = x + [v + sigma_t^2 / (2t) * (x + (1 - t) v)] dt,      std = sigma_t * sqrt(-dt)

**The first step.** At t = 1 the noise schedule is infinite (1 - t = 0). The authors' code
(flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) puts the schedule's next sigma, t_1, in the denominator
there: sigma_t = a * sqrt(1 / (1 - t_1)). `noise_std` does the same, wherever t == 1.

**Log-probabilities** are Gaussian densities of x_next under (mean, std), averaged (not summed) over the
latent elements of each sample, as the authors' code reduces them: log_prob has shape (B,) and is the
per-element mean log density. A PPO ratio exp(log_prob - old_log_prob) built from them is therefore the
geometric mean of the per-element ratios (the authors' convention), not the joint density ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE_LEVEL = 0.7  # the paper's a (Flow-GRPO, Section 4; config/grpo.py's sample.noise_level)


@dataclass(frozen=True)
class SDEStep:
    """One Euler-Maruyama step of the flow SDE, for a batch.

    `mean` and `prev_sample` have the latents' shape; `std` and `sigma_t` broadcast to it: (1, 1, ..., 1)
    for one step index, (B, 1, ..., 1) for one per sample. `log_prob` is (B,): the per-element mean log density of `prev_sample` (None at noise level 0,
    where the step is deterministic and has no density).
    """

    prev_sample: torch.Tensor  # x_next: drawn here, or the one given (a stored trajectory)
    mean: torch.Tensor  # the step's mean (differentiable in the velocity)
    std: torch.Tensor  # sigma_t * sqrt(t - t_next): the step's standard deviation
    sigma_t: torch.Tensor  # the SDE's noise schedule at t
    log_prob: torch.Tensor | None


def noise_std(
    sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float = NOISE_LEVEL
) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)); at t == 1 the denominator takes the next sigma (the authors' code)."""
    denominator = 1 - torch.where(sigma == 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def sde_mean(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    """The Euler-Maruyama mean x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt, with dt = t_next - t."""
    dt = sigma_next - sigma
    drift = velocity + sigma_t**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)
    return sample + drift * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the batch dimension: shape (B,).

    `x` is treated as data (detached): the gradient flows into `mean` (and `std`), as a policy gradient needs.
    """
    x = x.detach()
    density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return density.mean(dim=tuple(range(1, density.ndim)))


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over all but the batch dimension: (B,).

    For two Gaussians of equal variance the KL is the squared difference of the means over twice the
    variance, (mean - mean_ref)^2 / (2 std^2). One helper for every KL-to-base term (Flow-GRPO's, and
    `train.kl_weight`'s). With `std` = the step's std (`SDEStep.std`) this is the exact per-element KL of
    the two steps. The authors' train_sd3.py divides by 2 sigma_t^2 instead (`SDEStep.sigma_t`, without
    the sqrt(-dt)): that is the exact KL times (t - t_next), the scale their `beta` = 0.04 was tuned on.
    """
    difference = (mean - mean_ref) ** 2 / (2 * std**2)
    return difference.mean(dim=tuple(range(1, difference.ndim)))


def sde_step(
    sigmas: torch.Tensor,
    index: int | torch.Tensor,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = NOISE_LEVEL,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> SDEStep:
    """One SDE step from t = sigmas[index] to sigmas[index + 1], with its log-probability.

    `sigmas` is the scheduler's `sigmas` after `set_timesteps` (t_0 = 1 ... t_T = 0); `index` the step (an int,
    or one per sample). Without `prev_sample`, x_next = mean + std * noise, the noise drawn as diffusers'
    `randn_tensor` draws it (one CPU generator per image, as the sampler draws latents); with it, the step
    scores that transition (recomputing a stored trajectory's log-probabilities under new weights).
    Computed in float32 at least (bf16 overflows here), in float64 for float64 inputs.
    """
    dtype = torch.promote_types(sample.dtype, torch.float32)
    sample, velocity = sample.to(dtype), velocity.to(dtype)
    index = torch.as_tensor(index, device=sigmas.device).reshape(-1)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    sigma = sigmas[index].to(sample.device, dtype).reshape(shape)
    sigma_next = sigmas[index + 1].to(sample.device, dtype).reshape(shape)
    sigma_t = noise_std(sigma, sigma_next, noise_level)
    mean = sde_mean(sample, velocity, sigma, sigma_next, sigma_t)
    std = sigma_t * torch.sqrt(sigma - sigma_next)
    if noise_level == 0:  # the ODE's Euler step: deterministic, no density
        return SDEStep(mean if prev_sample is None else prev_sample.to(dtype), mean, std, sigma_t, None)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.to(dtype)
    return SDEStep(prev_sample, mean, std, sigma_t, gaussian_log_prob(prev_sample, mean, std))


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4, global_std: bool = False
) -> torch.Tensor:
    """GRPO's advantages (r - mean of r's group) / (std + eps), one per reward.

    `groups` holds each reward's group id (its prompt), so rewards gathered from every worker are grouped
    wherever their images were drawn. std is the population std (ddof 0) of the group's rewards, or of all
    rewards with `global_std` (the authors' SD3 configs set sample.global_std = True); eps = 1e-4 as their
    PerPromptStatTracker adds it. A group whose rewards are all equal gets advantage 0.
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1)
    _, ids = torch.unique(groups.reshape(-1), return_inverse=True)
    count = torch.zeros(int(ids.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, ids, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, ids, rewards) / count
    centred = rewards - mean[ids]
    if global_std:
        std = rewards.std(correction=0)
    else:
        std = torch.sqrt(torch.zeros_like(count).index_add_(0, ids, centred**2) / count)[ids]
    return centred / (std + eps)
