"""Differentiable DDIM sampling with classifier-free guidance and truncated, checkpointed backprop.

`generate(..., k=K)` runs T DDIM steps. Steps 0 .. T-K-1 run under `torch.no_grad()` (no graph, no
activations kept). The last K steps run with autograd; each UNet call there is wrapped in a
non-reentrant `torch.utils.checkpoint`, so only its inputs are kept and its activations are recomputed
during backward: memory grows with K by one latent per step, not by one UNet's activations per step.

The math is diffusers' own (DDIMScheduler.step, the pipeline's prompt encoding, latents from
`randn_tensor` with one CPU generator per image), so with eta=0 the output equals
`StableDiffusionPipeline` with a DDIM scheduler for the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignprop_ray.engine.models import DiffusionParts


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    negative_prompt: str = ""
    checkpoint: bool = True  # checkpoint every UNet call that carries gradient


def encode_prompts(parts: DiffusionParts, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings as StableDiffusionPipeline.encode_prompt computes them (no grad: frozen)."""
    tokens = parts.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return parts.text_encoder(tokens.input_ids.to(device))[0]


def initial_latents(
    parts: DiffusionParts,
    generators: list[torch.Generator],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """x_T for each image from its own CPU generator (diffusers' `randn_tensor` convention)."""
    from diffusers.utils.torch_utils import randn_tensor

    size = resolution // parts.vae_scale_factor
    shape = (len(generators), parts.unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    return latents * parts.scheduler.init_noise_sigma


def generate(
    parts: DiffusionParts,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    k: int = 0,
    resolution: int | None = None,
    on_step=None,
) -> torch.Tensor:
    """Images in [0, 1], shape (B, 3, H, W); gradient flows through the last `k` denoising steps only.

    With k = 0 the whole call runs without autograd and the result carries no graph.
    `on_step(i)` is called after each step (progress bars).
    """
    steps = settings.steps
    if not 0 <= k <= steps:
        raise ValueError(f"K={k} must be in [0, {steps}]")
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    unet_param = next(parts.unet.parameters())
    device, dtype = unet_param.device, parts.unet.dtype
    resolution = resolution or parts.native_resolution
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    cond = encode_prompts(parts, prompts, device)
    guided = settings.guidance_scale > 1.0
    if guided:
        uncond = encode_prompts(parts, [settings.negative_prompt] * len(prompts), device)
        cond = torch.cat([uncond, cond])
    cond = cond.to(dtype)

    scheduler = parts.scheduler
    scheduler.set_timesteps(steps, device=device)
    latents = initial_latents(parts, generators, resolution, device, dtype)
    first_grad_step = steps - k
    for i, t in enumerate(scheduler.timesteps):
        with_grad = i >= first_grad_step
        with nullcontext() if with_grad else torch.no_grad():
            noise = _guided_noise(
                parts.unet,
                latents,
                t,
                cond,
                settings.guidance_scale,
                guided,
                checkpointed=with_grad and settings.checkpoint,
            )
            latents = scheduler.step(
                noise, t, latents, eta=settings.eta, generator=generators, return_dict=False
            )[0]
        if on_step is not None:
            on_step(i)
    with nullcontext() if k > 0 else torch.no_grad():
        return decode(parts, latents)


def _guided_noise(unet, latents, t, cond, guidance_scale: float, guided: bool, checkpointed: bool):
    """One UNet call on the doubled batch [uncond; cond], combined with classifier-free guidance."""

    def call(latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if guided else latents
        noise = unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
        if not guided:
            return noise
        noise_uncond, noise_text = noise.chunk(2)
        return noise_uncond + guidance_scale * (noise_text - noise_uncond)

    if checkpointed:
        return checkpoint(call, latents, cond, use_reentrant=False)
    return call(latents, cond)


def decode(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to [0, 1] images (the pipeline's postprocess: x / 2 + 0.5, clamped)."""
    image = parts.vae.decode(latents / parts.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)
