"""Differentiable sampling with classifier-free guidance and truncated, checkpointed backprop, for every family.

`generate(..., k=K)` runs T solver steps. Steps 0 .. T-K-1 run under `torch.no_grad()` (no graph, no
activations kept). The last K steps run with autograd; each of their denoiser calls is wrapped in a
non-reentrant `torch.utils.checkpoint` (by default; `checkpointed` picks which), so only its inputs are
kept and its activations are recomputed during backward: memory grows with K by one latent per step, not
by one denoiser's activations per step. With an activation budget (model.activation_budget_mb) only what
memory requires is checkpointed: the last calls whose activations fit keep them (`checkpoint_plan`, sized
by a one-time `probe`). `compile` runs the denoiser through torch.compile (`models.compile_denoiser`).

The loop is built from step-level primitives that training methods compose: `encode`, `initial_latents`,
`start`, `guided_prediction` (one denoiser call with guidance), `solver_step` (one scheduler step),
`predict_x0`, `decode`. What differs between model families (engine/families/) is asked of the family;
the math is diffusers' own (each pipeline's prompt encoding, `scheduler.step`, latents from
`randn_tensor` with one CPU generator per image), so with eta=0 the output equals the family's diffusers
pipeline for the same seeds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignprop_ray.compat import peft_adapters_disabled
from alignprop_ray.engine import schedulers
from alignprop_ray.engine.families.base import Conditioning, DiffusionParts
from alignprop_ray.engine.models import compile_denoiser
from alignprop_ray.errors import UserError


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling; every value comes from the experiment config (sampling: and model: sections)."""

    steps: int
    guidance_scale: float
    eta: float  # DDIM only; 0 for the other schedulers
    negative_prompt: str  # "" = none: the pipeline's own unconditional branch
    # checkpoint the denoiser calls that carry gradient: all of them, or with a budget those that don't fit
    checkpoint: bool
    compile: bool  # run the denoiser through torch.compile (models.compile_denoiser)
    activation_budget_mb: float | str | None  # MiB, "auto" or None: see checkpoint_plan

    @classmethod
    def for_sampling(
        cls, steps: int, guidance_scale: float, eta: float = 0.0, negative_prompt: str = ""
    ) -> SamplerSettings:
        """Settings to draw images without gradient (CLI sampling, the registry's model, the toy model):
        nothing to checkpoint, eager denoiser."""
        return cls(steps, guidance_scale, eta, negative_prompt, False, False, None)


def check_settings(parts: DiffusionParts, settings: SamplerSettings) -> None:
    """Refuse, in one line, settings this model would silently ignore: eta without DDIM, a negative
    prompt without classifier-free guidance (guidance-distilled FLUX.1)."""
    schedulers.check_eta(parts.scheduler, settings.eta)
    family = parts.family
    if settings.negative_prompt and not family.classifier_free_guidance:
        raise UserError(
            f"negative prompt {settings.negative_prompt!r}: {family.name} models sample without "
            "classifier-free guidance (guidance-distilled), so it would have no effect; leave it empty"
        )


def encode(
    parts: DiffusionParts, prompts: Sequence[str], settings: SamplerSettings, resolution: int
) -> Conditioning:
    """The denoiser's conditioning for `prompts`, [uncond; cond] when classifier-free guidance is on (no
    grad); a guidance-distilled family gets the guidance scale as a denoiser input instead. Every sampling
    path starts here, so the settings are checked here (`check_settings`)."""
    check_settings(parts, settings)
    family = parts.family
    guided = settings.guidance_scale > 1.0 and family.classifier_free_guidance
    negative = settings.negative_prompt or None
    cond = family.encode(parts, list(prompts), negative, guided, resolution)
    return family.guidance_input(parts, cond, settings.guidance_scale)


def initial_latents(
    parts: DiffusionParts, generators: list[torch.Generator], resolution: int
) -> torch.Tensor:
    """x_T for each image from its own CPU generator (diffusers' `randn_tensor` convention)."""
    from diffusers.utils.torch_utils import randn_tensor

    family = parts.family
    multiple = family.resolution_multiple(parts)
    if resolution % multiple:
        raise UserError(
            f"resolution {resolution} must be a multiple of {multiple} for this {family.name} model"
        )
    shape = (len(generators), *family.noise_shape(parts, resolution))
    noise = randn_tensor(shape, generator=generators, device=parts.device, dtype=parts.dtype)
    return family.initial_latents(noise, parts.scheduler)


def start(parts: DiffusionParts, steps: int, resolution: int) -> torch.Tensor:
    """Set the scheduler up for a new chain of `steps` steps at `resolution` (a dynamically shifted
    schedule depends on the image size); its timesteps, first to last."""
    options = parts.family.timestep_options(parts, steps, resolution)
    return schedulers.set_timesteps(parts.scheduler, steps, parts.device, **options)


def guided_prediction(
    parts: DiffusionParts,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    checkpointed: bool = False,
    base: bool = False,
) -> torch.Tensor:
    """One denoiser call at t on the doubled batch [uncond; cond], combined with classifier-free guidance;
    `base`: with the LoRA adapter switched off (the base model's prediction, for a KL-to-base term).

    The scheduler's input scaling runs outside the checkpoint: it reads the scheduler's step index, which
    has moved on by the time backward recomputes the call.
    """
    scaled = parts.family.model_input(parts.scheduler, latents, t)
    if checkpointed:
        return checkpoint(_guided_call, parts, scaled, t, cond, guidance_scale, base, use_reentrant=False)
    return _guided_call(parts, scaled, t, cond, guidance_scale, base)


def _guided_call(
    parts: DiffusionParts,
    scaled: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    base: bool = False,
) -> torch.Tensor:
    """The denoiser on [uncond; cond] (or cond alone) and the guidance combination: what a checkpoint wraps
    (the adapter is switched off inside it, so backward's recompute sees the same model)."""
    model_input = torch.cat([scaled] * 2) if cond.guided else scaled
    with peft_adapters_disabled(parts.denoiser) if base else nullcontext():
        prediction = parts.family.denoise(parts.denoiser, model_input, t, cond)
    if not cond.guided:
        return prediction
    uncond, text = prediction.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def solver_step(
    parts: DiffusionParts,
    prediction: torch.Tensor,
    t: torch.Tensor,
    latents: torch.Tensor,
    eta: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """x_t -> x_(t-1) with the pipeline's scheduler (differentiable)."""
    return schedulers.step(parts.scheduler, prediction, t, latents, eta, generators)


def predict_x0(
    parts: DiffusionParts, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """The clean latents predicted at t from x_t and the (guided) prediction (differentiable)."""
    return schedulers.predict_x0(parts.scheduler, prediction, t, latents)


def decode(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to [0, 1] images (the pipelines' postprocess: x / 2 + 0.5, clamped)."""
    vae = upcast_vae(parts)
    image = vae.decode(parts.family.vae_input(vae, latents).to(vae.dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def upcast_vae(parts: DiffusionParts) -> torch.nn.Module:
    """The VAE to decode (or encode) with: moved to float32 for good where it is float16, its config says
    `force_upcast` and its family's pipeline upcasts it (SDXL's VAE overflows in float16: FamilyRow
    `upcasts_vae`), as StableDiffusionXLPipeline does before decoding; else as it is. Whatever `family:` said
    at validation (`auto` cannot refuse float16 before the weights are read)."""
    vae = parts.vae
    if parts.family.row.upcasts_vae and vae.dtype == torch.float16 and vae.config.get("force_upcast"):
        vae.to(torch.float32)
    return vae


def checkpoint_plan(
    k: int, settings: SamplerSettings, checkpointed: Sequence[bool] | None, keep: int = 0
) -> list[bool]:
    """For each of the K gradient-carrying steps (first to last): whether its denoiser call is checkpointed.

    None: with `settings.checkpoint` off, none of them; with it on, all but the last `keep` (the calls an
    activation budget has room for, `kept_calls`), which keep their activations and skip the recompute in
    backward. K is drawn per batch, so the split is too. Which calls are checkpointed changes memory and
    time only, never the gradient.
    """
    if checkpointed is None:
        if not settings.checkpoint:
            return [False] * k
        keep = min(max(keep, 0), k)
        return [True] * (k - keep) + [False] * keep
    plan = [bool(c) for c in checkpointed]
    if len(plan) != k:
        raise ValueError(f"checkpointed has {len(plan)} entries; K={k} steps carry gradient")
    return plan


# "auto" leaves this fraction of the device's total memory free for what else a step allocates (the
# recompute of a checkpointed call, the VAE decode's graph, the reward model, allocator fragmentation).
AUTO_MARGIN = 0.10


@dataclass(frozen=True)
class Probe:
    """What one probe measured (once per run, per denoiser and input shape)."""

    call_bytes: int  # what autograd keeps for backward from one uncheckpointed denoiser call
    free_bytes: int  # free device memory less AUTO_MARGIN of the total, when the probe ran (the auto budget)


def kept_calls(k: int, settings: SamplerSettings, probe: Probe | None) -> int:
    """How many of the last `k` gradient-carrying calls fit in `settings.activation_budget_mb` (0: no budget)."""
    budget = settings.activation_budget_mb
    if budget is None or probe is None or not settings.checkpoint:
        return 0
    budget_bytes = probe.free_bytes if budget == "auto" else int(float(budget) * 2**20)
    return min(k, max(budget_bytes, 0) // max(probe.call_bytes, 1))


def free_memory_bytes(device: torch.device, meminfo: str = "/proc/meminfo") -> int:
    """Free device memory less AUTO_MARGIN of the total (CUDA: the driver's free memory plus what torch's
    caching allocator holds unused; CPU: the kernel's MemAvailable, read from `meminfo`)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        with open(meminfo, encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        free, total = info["MemAvailable"], info["MemTotal"]
    return int(free - AUTO_MARGIN * total)


_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Probe]] = weakref.WeakKeyDictionary()


def probe(
    parts: DiffusionParts, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float
) -> Probe:
    """Measure, not estimate, the activations of one uncheckpointed denoiser call on inputs shaped like
    `latents`, and the free device memory: once per denoiser and input (shape, dtype, autocast), cached.

    The probe is one call with gradient under a saved-tensors hook that adds up the storages autograd saves
    for backward (each once; the frozen weights, which exist anyway, are left out); its output is discarded.
    It runs under the step's autocast and compile settings, so it sees what the step's calls will save.
    """
    key = (tuple(latents.shape), latents.dtype, cond.guided, torch.is_autocast_enabled(latents.device.type))
    cache = _PROBES.setdefault(parts.denoiser, {})
    if key not in cache:
        weights = {
            w.untyped_storage().data_ptr() for w in (*parts.denoiser.parameters(), *parts.denoiser.buffers())
        }
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _guided_call(
                parts, latents.detach().requires_grad_(latents.requires_grad), t, cond, guidance_scale
            )
        cache[key] = Probe(sum(saved.values()), free_memory_bytes(latents.device))
    return cache[key]


def gradient_input(latents: torch.Tensor, compiled: bool) -> torch.Tensor:
    """The input of a denoiser call that carries gradient. Compiled, it requires grad: the calls after the
    first gradient step's see latents that carry the graph, and the first one's would otherwise get a compiled
    graph of its own (Dynamo guards on an input's requires_grad): one compilation fewer per worker, about a
    third of the compile time (bench/gpu_check.py --smoke). The extra gradient, the input's, is dropped."""
    if compiled and not latents.requires_grad:
        return latents.detach().requires_grad_()
    return latents


# (latents x_t, t, conditioning, the guided prediction with its graph, whether that call was checkpointed)
GradientStepHook = Callable[[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor, bool], None]


def generate(
    parts: DiffusionParts,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    k: int | Sequence[bool] = 0,
    resolution: int | None = None,
    on_step: Callable[[int], None] | None = None,
    checkpointed: Sequence[bool] | None = None,
    on_gradient_step: GradientStepHook | None = None,
) -> torch.Tensor:
    """Images in [0, 1], shape (B, 3, H, W); gradient flows through the last `k` solver steps only.

    `k` may instead be a mask with one bool per step (the `per_step` truncation): step i's denoiser call
    carries gradient where it is True, and from the first True step on the solver steps keep the latents'
    graph, as detaching the noise prediction (the AlignProp v1 code's way) does. With no gradient step the
    whole call runs without autograd and the result carries no graph. `checkpointed[j]` says whether the
    j-th gradient-carrying step's denoiser call is checkpointed (default: see `checkpoint_plan`).
    `on_step(i)` is called after each step (progress bars). `on_gradient_step(latents, t, cond, prediction,
    checkpointed)` sees each step whose denoiser call carries gradient (the KL-to-base term's steps).
    """
    steps = settings.steps
    mask = _grad_mask(k, steps)
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    if settings.compile:
        compile_denoiser(parts.denoiser)
    resolution = resolution or parts.native_resolution
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    cond = encode(parts, prompts, settings, resolution)
    timesteps = start(parts, steps, resolution)
    latents = initial_latents(parts, generators, resolution)
    measured = None
    if (
        checkpointed is None
        and settings.checkpoint
        and settings.activation_budget_mb is not None
        and any(mask)
    ):
        measured = probe(
            parts, gradient_input(latents, settings.compile), timesteps[0], cond, settings.guidance_scale
        )
    plan = iter(checkpoint_plan(sum(mask), settings, checkpointed, kept_calls(sum(mask), settings, measured)))
    tracked = False  # whether the latents carry a graph yet (from the first gradient step on)
    for i, t in enumerate(timesteps):
        tracked |= mask[i]
        with nullcontext() if mask[i] else torch.no_grad():
            checkpointed_call = mask[i] and next(plan)
            inputs = gradient_input(latents, settings.compile) if mask[i] else latents
            prediction = guided_prediction(
                parts, inputs, t, cond, settings.guidance_scale, checkpointed=checkpointed_call
            )
            if mask[i] and on_gradient_step is not None:
                on_gradient_step(latents, t, cond, prediction, checkpointed_call)
        with nullcontext() if tracked else torch.no_grad():
            latents = solver_step(parts, prediction, t, latents, settings.eta, generators)
        if on_step is not None:
            on_step(i)
    with nullcontext() if tracked else torch.no_grad():
        return decode(parts, latents)


def _grad_mask(k: int | Sequence[bool], steps: int) -> list[bool]:
    """Per step, whether its denoiser call carries gradient: the last `k`, or the mask as given."""
    if isinstance(k, int):
        if not 0 <= k <= steps:
            raise ValueError(f"K={k} must be in [0, {steps}]")
        return [i >= steps - k for i in range(steps)]
    mask = [bool(m) for m in k]
    if len(mask) != steps:
        raise ValueError(f"the gradient mask has {len(mask)} entries; sampling has {steps} steps")
    return mask
