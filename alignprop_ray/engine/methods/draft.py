"""DRaFT-LV (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", Alg. 2).

DRaFT-K is AlignProp with a fixed K (engine/methods/alignprop.py). DRaFT-LV lowers the variance of
DRaFT-1's gradient by reusing one sample n times:

    x0    <- sample all T steps without autograd
    for i in 1..n:
        x_t^i  = q(x_t | sg(x0)), fresh noise eps_i      (the forward process, to the level of the last step t)
        x0^i   = last solver step from x_t^i              (one denoiser call, with gradient)
        loss_i = -reward_mixture(decode(x0^i)).mean()
    gradient = (1/n) sum_i grad loss_i

Each copy is backpropagated on its own (memory of one copy); the learner accumulates them. The noise of
copy i comes from the image's own generator after its chain, so the copies are deterministic in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.methods.alignprop import TruncatedBackprop
from alignprop_ray.engine.methods.base import (
    Backward,
    Method,
    MicroBatchOutput,
    generators,
    mean_output,
    run_chain,
)
from alignprop_ray.engine.methods.configs import DraftConfig
from alignprop_ray.engine.regularizers import KLAccumulator
from alignprop_ray.engine.sampler import (
    decode,
    encode,
    guided_prediction,
    initial_latents,
    solver_step,
    start,
)
from alignprop_ray.engine.schedulers import wide_dtype
from alignprop_ray.rewards.base import RewardOutput


def build(config: DraftConfig) -> Method:
    """DRaFT-LV with lv_samples, else DRaFT-K: AlignProp's truncated backprop with K fixed (its draw rule)."""
    return DraftLV(config) if config.lv_samples is not None else TruncatedBackprop(config)


@dataclass
class Sample:
    """A micro-batch's finished chain: what every copy starts from."""

    cond: Conditioning
    x0: torch.Tensor  # final latents, no graph
    gens: list[torch.Generator]  # each image's generator, past its chain


class DraftLV(Method):
    def __init__(self, config: DraftConfig):
        super().__init__(config)
        self.samples = config.lv_samples  # n re-noised copies of each final latent

    def micro_batch(self, learner, index, batch, draw, backward: Backward) -> MicroBatchOutput:
        sample = self.sample(learner, batch)
        outputs, losses, kls = [], [], []
        for noise in self.noises(sample):
            kl = learner.kl_term()  # train.kl_weight: the KL-to-base term at the copy's step
            out, loss = self.copy_loss(learner, sample, noise, batch.prompts, kl)
            if kl is not None:
                loss = loss + learner.kl_weight * kl.total
                kls.append(kl.value())
            backward(loss / self.samples)
            outputs.append(out)
            losses.append(float(loss.detach()))
        return MicroBatchOutput(
            mean_output(outputs),
            sum(losses) / len(losses),
            images=len(batch.prompts),
            grad_steps=1,
            kl=sum(kls) / len(kls) if kls else None,
        )

    @staticmethod
    def sample(learner, batch) -> Sample:
        """The full chain for the batch's prompts and seeds, without autograd (`generate`'s latents)."""
        parts, settings = learner.parts, learner.sampler
        resolution = learner.resolution or parts.native_resolution
        gens = generators(batch.seeds)
        with learner.autocast(), torch.no_grad():
            cond = encode(parts, batch.prompts, settings, resolution)
            timesteps = start(parts, settings.steps, resolution)
            latents = initial_latents(parts, gens, resolution)
            x0 = run_chain(parts, cond, latents, timesteps, settings.guidance_scale, settings.eta, gens)
        return Sample(cond, x0, gens)

    def noises(self, sample: Sample) -> list[torch.Tensor]:
        """One standard normal draw per copy, each image's from its own generator, in float32 (a bf16 draw
        would round the noise before it is scaled)."""
        from diffusers.utils.torch_utils import randn_tensor

        x0 = sample.x0
        return [
            randn_tensor(x0.shape, generator=sample.gens, device=x0.device, dtype=torch.float32)
            for _ in range(self.samples)
        ]

    @staticmethod
    def copy_loss(
        learner, sample: Sample, noise: torch.Tensor, prompts, kl: KLAccumulator | None = None
    ) -> tuple[RewardOutput, torch.Tensor]:
        """One copy: re-noise x0 to the last step's level, take that step with gradient, score the result;
        `kl` (when given) adds that step's KL-to-base term."""
        parts, settings = learner.parts, learner.sampler
        with learner.autocast():
            t = last_step(parts, settings.steps, learner.resolution or parts.native_resolution)
            noisy = renoise(parts.scheduler, sample.x0, noise, t)  # float32: the step below is taken in it
            prediction = guided_prediction(  # the denoiser sees x_t in its own dtype
                parts,
                noisy.to(parts.dtype),
                t,
                sample.cond,
                settings.guidance_scale,
                checkpointed=settings.checkpoint,
            )
            if kl is not None:
                kl(noisy, t, sample.cond, prediction)
            x0 = solver_step(parts, prediction, t, noisy, settings.eta, sample.gens)
            out = learner.reward(decode(parts, x0), prompts)
        return out, -out.total.float().mean()


def last_step(parts, steps: int, resolution: int) -> torch.Tensor:
    """Set the scheduler at the last of `steps` steps (step-indexed schedulers count from there); its t."""
    timesteps = start(parts, steps, resolution)
    if hasattr(parts.scheduler, "set_begin_index"):  # Euler, flow matching: the step index starts here
        parts.scheduler.set_begin_index(len(timesteps) - 1)
    return timesteps[-1]


def renoise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) with the given standard normal `noise`: the scheduler's own forward process
    (`add_noise`: sqrt(a_t) x0 + sqrt(1 - a_t) noise for DDIM, x0 + sigma noise for Euler; flow matching's
    `scale_noise`: (1 - sigma) x0 + sigma noise), in float32 (or wider) whatever x0's dtype.

    Both take the schedule in their input's dtype: in bf16, alpha-bar at t=1 (0.99830) rounds to 1.0, so
    sqrt(1 - a_t) would be 0 and every copy would be x0 (no variance reduction at all).
    """
    dtype = wide_dtype(x0, noise)
    x0, noise = x0.to(dtype), noise.to(dtype)
    timestep = t.reshape(1).to(x0.device)
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, timestep, noise)
    return scheduler.add_noise(x0, noise, timestep)
