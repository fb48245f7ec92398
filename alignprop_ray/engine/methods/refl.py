"""ReFL (Xu et al. 2023, "ImageReward", Algorithm 1): reward feedback from one step's x0 prediction.

    i    <- drawn per micro-batch from [low, high] (the plan's draw: engine/truncation.py `StepRange`)
    x_t  <- steps 0 .. i-1 without autograd          (t = the i-th timestep of the T-step chain)
    x0'  =  predict_x0(x_t, one guided denoiser call at t, with gradient)
    loss =  -reward_mixture(decode(x0')).mean()   [+ train.kl_weight x the KL to the base model at t]

ImageReward stops at a random step in 30..39 of 40 and scores the scheduler's `pred_original_sample`
(ReFL.py); the default range here is the same fraction of T (config: method.step_range). Its loss is
ReLU(2 - r) for its own reward model; here, as for every gradient method, the reward mixture's objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.methods.base import Backward, Method, MicroBatchOutput, generators, run_chain
from alignprop_ray.engine.sampler import decode, encode, guided_prediction, initial_latents, predict_x0, start


@dataclass
class Prediction:
    """The gradient step of one micro-batch: x_t, the guided prediction at t, and the x0 it implies."""

    t: torch.Tensor
    cond: Conditioning
    latents: torch.Tensor  # x_t (no graph)
    prediction: torch.Tensor  # with gradient
    x0: torch.Tensor  # with gradient


class Refl(Method):
    def micro_batch(self, learner, index, batch, draw: int, backward: Backward) -> MicroBatchOutput:
        kl = learner.kl_term()  # train.kl_weight: the KL-to-base term at the one step (regularizers.py)
        with learner.autocast():
            step = self.predict(learner, batch, draw)
            out = learner.reward(decode(learner.parts, step.x0), batch.prompts)
            if kl is not None:
                kl(step.latents, step.t, step.cond, step.prediction)
        loss = -out.total.float().mean()
        if kl is not None:
            loss = loss + learner.kl_weight * kl.total
        backward(loss)
        return MicroBatchOutput(
            out,
            float(loss.detach()),
            images=len(batch.prompts),
            grad_steps=1,
            kl=None if kl is None else kl.value(),
            metrics={"step": draw},
        )

    @staticmethod
    def predict(learner, batch, step: int) -> Prediction:
        """Sample without autograd down to step `step`, then one denoiser call with gradient and its x0."""
        parts, settings = learner.parts, learner.sampler
        resolution = learner.resolution or parts.native_resolution
        gens = generators(batch.seeds)
        with torch.no_grad():
            cond = encode(parts, batch.prompts, settings, resolution)
            timesteps = start(parts, settings.steps, resolution)
            latents = initial_latents(parts, gens, resolution)
            latents = run_chain(
                parts, cond, latents, timesteps[:step], settings.guidance_scale, settings.eta, gens
            )
        t = timesteps[step]
        prediction = guided_prediction(
            parts, latents, t, cond, settings.guidance_scale, checkpointed=settings.checkpoint
        )
        return Prediction(t, cond, latents, prediction, predict_x0(parts, prediction, t, latents))
