"""The solver side of sampling: which scheduler a pipeline samples with, one differentiable step, and x0.

The step is diffusers' own `scheduler.step` (DDIM, EulerDiscrete, FlowMatchEulerDiscrete), called with
the keyword arguments the pipelines pass (`prepare_extra_step_kwargs`: `eta` and `generator` where the
step takes them). Each is plain tensor arithmetic on the model output, so gradient flows through it.
"""

from __future__ import annotations

import inspect

import torch

from alignprop_ray.errors import UserError


def load_scheduler(source: str, supported: tuple[str, ...]):
    """The directory's scheduler if its class is in `supported`, else `supported[0]` from its config."""
    import diffusers

    config = getattr(diffusers, supported[0]).load_config(source, subfolder="scheduler")
    name = config.get("_class_name")
    return getattr(diffusers, name if name in supported else supported[0]).from_config(config)


def set_timesteps(scheduler, steps: int, device: torch.device, **options) -> torch.Tensor:
    """Start a new chain of `steps` steps (resets the scheduler's step index); the timesteps, first to last.

    `options` are the family's further `set_timesteps` arguments (`Family.timestep_options`: FLUX's sigmas,
    a dynamic shift's `mu`).
    """
    scheduler.set_timesteps(steps, device=device, **options)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline does; DDIM keeps no index
    return scheduler.timesteps


def dynamic_shift(config, image_seq_len: int, default_max_shift: float) -> float:
    """`mu` of a flow-matching schedule with dynamic shifting, from the image's token count.

    Linear in the token count: base_shift at base_image_seq_len tokens, max_shift at max_image_seq_len
    (extrapolated beyond both), read from the scheduler config with the pipelines' defaults (256, 4096, 0.5;
    the default max_shift is 1.15 in FluxPipeline, 1.16 in StableDiffusion3Pipeline). The scheduler then
    shifts each sigma to e^mu / (e^mu + 1/sigma - 1) (its default, exponential shift): larger images spend
    more of their steps at high noise.
    """
    low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    slope = (top - base) / (high - low)
    return image_seq_len * slope + (base - slope * low)


def check_eta(scheduler, eta: float) -> None:
    """eta is DDIM's noise level; other schedulers' steps take none, and would ignore it silently."""
    if eta != 0 and "eta" not in _step_parameters(scheduler):
        raise UserError(
            f"eta {eta:g} needs a DDIM scheduler; this model samples with {type(scheduler).__name__}, "
            "which takes no eta (use 0)"
        )


def step(
    scheduler,
    prediction: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    eta: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """x_t -> x_(t-1): one step of the scheduler, differentiable in `prediction` and `latents`."""
    accepted = _step_parameters(scheduler)
    extra = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        extra["generator"] = generators
    return scheduler.step(prediction, t, latents, **extra, return_dict=False)[0]


def predict_x0(scheduler, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The clean latents x0 the model predicts at t from x_t (no clipping), differentiable.

    DDIM-style (alphas_cumprod): x0 = (x - sqrt(1-a) eps) / sqrt(a), or sqrt(a) x - sqrt(1-a) v.
    Euler (sigmas, x = x0 + sigma eps): x0 = x - sigma eps. Flow matching (x = (1-sigma) x0 + sigma noise,
    v = noise - x0): x0 = x - sigma v.
    """
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)]
        return (latents.float() - sigma * prediction.float()).to(prediction.dtype)
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return prediction
    if name == "EulerDiscreteScheduler":
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)]
        x = latents.float()
        if kind == "epsilon":
            return (x - sigma * prediction).to(prediction.dtype)
        return (prediction * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)).to(prediction.dtype)
    if hasattr(scheduler, "alphas_cumprod"):
        alpha = scheduler.alphas_cumprod.to(latents.device)[int(t)].to(prediction.dtype)
        if kind == "epsilon":
            return (latents - (1 - alpha) ** 0.5 * prediction) / alpha**0.5
        return alpha**0.5 * latents - (1 - alpha) ** 0.5 * prediction
    raise ValueError(f"x0 prediction is not implemented for {name}")


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
