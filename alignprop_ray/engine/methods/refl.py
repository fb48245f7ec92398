"""ReFL (Xu et al. 2023, "ImageReward", Algorithm 1): reward feedback from one step's x0 prediction.

    i    <- drawn per micro-batch from [low, high] (the plan's draw: engine/truncation.py `StepRange`)
    x_t  <- steps 0 .. i-1 without autograd          (t = the i-th timestep of the T-step chain)
    x0'  =  predict_x0(x_t, one guided denoiser call at t, with gradient)
    loss =  -reward_mixture(decode(x0')).mean()   [+ train.kl_weight x the KL to the base model at t]

ImageReward stops at a random step in 30..39 of 40 and scores the scheduler's `pred_original_sample`
(ReFL.py); the default range here is the same fraction of T (config: method.step_range). Its loss is
ReLU(2 - r) for its own reward model; here, as for every gradient method, the reward mixture's objective.

With method.pretrain_weight > 0 each micro-batch adds the paper's pre-training loss (Algorithm 1) on as many
caption-image pairs of method.pretrain_data as it has images, in the same update:

    x0_pre = VAE(image) (latents), t ~ U{0..999}, eps ~ N(0, I), x_t = DDPM forward process(x0_pre, eps, t)
    loss  += pretrain_weight * mean((denoiser(x_t, t, caption) - target)^2)   (target: eps, or v, or x0)

The caption conditions the denoiser without classifier-free guidance, as a diffusion model is trained.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.methods.base import (
    Backward,
    Batch,
    Method,
    MicroBatchOutput,
    generators,
    run_chain,
)
from alignprop_ray.engine.methods.configs import ReflConfig, captioned_images
from alignprop_ray.engine.sampler import (
    decode,
    encode,
    guided_prediction,
    initial_latents,
    predict_x0,
    start,
    upcast_vae,
)
from alignprop_ray.errors import UserError


@dataclass
class Prediction:
    """The gradient step of one micro-batch: x_t, the guided prediction at t, and the x0 it implies."""

    t: torch.Tensor
    cond: Conditioning
    latents: torch.Tensor  # x_t (no graph)
    prediction: torch.Tensor  # with gradient
    x0: torch.Tensor  # with gradient


class Refl(Method):
    config: ReflConfig

    def __init__(self, config: ReflConfig):
        super().__init__(config)
        self.pairs: tuple[torch.Tensor, list[str]] | None = None  # pretrain_data, read at first use

    def micro_batch(self, learner, index, batch, draw: int, backward: Backward) -> MicroBatchOutput:
        kl = learner.kl_term()  # train.kl_weight: the KL-to-base term at the one step (regularizers.py)
        with learner.autocast():
            step = self.predict(learner, batch, draw)
            out = learner.reward(decode(learner.parts, step.x0), batch.prompts)
            if kl is not None:
                kl(step.latents, step.t, step.cond, step.prediction)
        loss = -out.total.float().mean()
        metrics = {"step": draw, "pretrain_loss": 0.0}
        if self.config.pretrain_weight > 0:
            pretrain = self.pretrain_loss(learner, batch)
            metrics["pretrain_loss"] = float(pretrain.detach())
            loss = loss + self.config.pretrain_weight * pretrain
        if kl is not None:
            loss = loss + learner.kl_weight * kl.total
        backward(loss)
        return MicroBatchOutput(
            out,
            float(loss.detach()),
            images=len(batch.prompts),
            grad_steps=1,
            kl=None if kl is None else kl.value(),
            metrics=metrics,
        )

    def pretrain_loss(self, learner, batch: Batch) -> torch.Tensor:
        """The pre-training loss on len(batch) caption-image pairs, drawn from the folder by a stream keyed
        by the step and the batch's seeds (the same on a resumed run), with gradient into the adapter."""
        pixels, captions = self.data(learner)
        rng = random.Random(f"refl:pretrain:{learner.step}:{','.join(map(str, batch.seeds))}")
        picks = [rng.randrange(len(captions)) for _ in batch.prompts]
        return diffusion_loss(
            learner,
            pixels[picks],
            [captions[i] for i in picks],
            torch.Generator().manual_seed(rng.randrange(2**31)),
        )

    def data(self, learner) -> tuple[torch.Tensor, list[str]]:
        if self.pairs is None:
            resolution = learner.resolution or learner.parts.native_resolution
            self.pairs = read_pairs(Path(self.config.pretrain_data), resolution)
        return self.pairs

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


def read_pairs(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Every captioned image of `folder` as (N, 3, resolution, resolution) pixels in [-1, 1] (RGB, centre-
    cropped to a square, resized) and its caption (the .txt's text, stripped)."""
    import numpy as np
    from PIL import Image

    pixels, captions = [], []
    for image_path, caption_path in captioned_images(folder):
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as err:
            raise UserError(f"method.pretrain_data: {image_path} is not a readable image ({err})") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize(
            (resolution, resolution), Image.BICUBIC
        )
        pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        captions.append(caption_path.read_text().strip())
    return torch.stack(pixels).float() / 127.5 - 1, captions


def diffusion_loss(learner, pixels: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """The denoiser's training loss on (image, caption) pairs: MSE between its prediction at a uniform
    training timestep of DDPM's forward process and the model's target (eps, v or x0), float32."""
    from diffusers import DDPMScheduler

    parts = learner.parts
    if not hasattr(parts.scheduler, "alphas_cumprod"):
        raise UserError(
            f"method.pretrain_weight: the pre-training loss needs a DDPM-type model (alphas_cumprod); this "
            f"one samples with {type(parts.scheduler).__name__}"
        )
    schedule = DDPMScheduler.from_config(parts.scheduler.config)
    resolution = learner.resolution or parts.native_resolution
    unguided = dataclasses.replace(learner.sampler, guidance_scale=1.0)
    vae, device = upcast_vae(parts), parts.device
    with torch.no_grad():
        encoded = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample(gen)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((encoded.float() - shift) * vae.config.scaling_factor).to(device)
        cond = encode(parts, captions, unguided, resolution)
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(captions),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = t.to(device)
    noisy = schedule.add_noise(latents, noise, t)  # float32: the schedule is not rounded to bf16
    kind = schedule.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(kind)
    if target is None:
        target = schedule.get_velocity(latents, noise, t)
    with learner.autocast():
        prediction = parts.family.denoise(parts.denoiser, noisy.to(parts.dtype), t, cond)
    return torch.nn.functional.mse_loss(prediction.float(), target)
