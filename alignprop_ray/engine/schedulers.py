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
    """The clean latents x0 the model predicts at t from x_t (no clipping), differentiable; in float32 (or
    the inputs' wider dtype) whatever the latents' dtype.

    DDIM-style (alphas_cumprod): x0 = (x - sqrt(1-a) eps) / sqrt(a), or sqrt(a) x - sqrt(1-a) v.
    Euler (sigmas, x = x0 + sigma eps): x0 = x - sigma eps. Flow matching (x = (1-sigma) x0 + sigma noise,
    v = noise - x0): x0 = x - sigma v.

    Why float32: in bf16, alpha-bar at SD's last timestep (t=1: 0.99830) rounds to 1.0, so sqrt(1-a) is 0 and
    x0 is x_t: 4.1% off the float64 value with SD-like inputs, 7.6e-8 in float32 (tests/test_methods.py
    test_refl_x0_in_bf16_is_within_half_a_percent_of_float64).
    """
    dtype = wide_dtype(prediction, latents)
    x, out = latents.to(dtype), prediction.to(dtype)
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)].to(x.device, dtype)
        return x - sigma * out
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return out
    if name == "EulerDiscreteScheduler":
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)].to(x.device, dtype)
        if kind == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if hasattr(scheduler, "alphas_cumprod"):
        alpha = scheduler.alphas_cumprod[int(t)].to(x.device, dtype)
        if kind == "epsilon":
            return (x - (1 - alpha) ** 0.5 * out) / alpha**0.5
        return alpha**0.5 * x - (1 - alpha) ** 0.5 * out
    raise ValueError(f"x0 prediction is not implemented for {name}")


def wide_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or the widest of the tensors' dtypes if wider (float64 stays float64): the dtype of the
    schedule's arithmetic, where bf16 and fp16 lose the small noise levels of the last steps."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
