"""The sampler against diffusers, and the exact meaning of truncated, checkpointed backprop."""

import pytest
import torch

from alignprop_ray.engine.lora import attach_lora, save_adapter
from alignprop_ray.engine.models import load_parts
from alignprop_ray.engine.sampler import generate
from tests.helpers import lora_settings, sampler_settings

PROMPTS, SEEDS = ["a photo of a cat", "a red car"], [3, 11]


def diffusers_images(tiny_dir, settings, adapter=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(adapter)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(
        PROMPTS,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        eta=settings.eta,
        negative_prompt=[settings.negative_prompt] * 2 if settings.negative_prompt else None,
        generator=generators,
        output_type="pt",
    ).images


def perturb(params, scale=0.05, seed=0):
    """Give a freshly attached adapter (B = 0) a non-zero update so it changes the images."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# float32 end to end with identical op order: we measured a max abs difference of exactly 0.0; 1e-4
# (0.03 of one 8-bit level) leaves room for BLAS kernel choice on other CPUs without hiding a real bug
# (a wrong timestep or guidance term moves pixels by > 1e-2).
PIXEL_TOL = 1e-4


@pytest.mark.parametrize(
    "settings",
    [
        sampler_settings(steps=8, guidance_scale=7.5),
        sampler_settings(steps=6, guidance_scale=3.0, eta=1.0),
        sampler_settings(steps=5, guidance_scale=1.0),
        sampler_settings(steps=5, negative_prompt="blurry"),
    ],
    ids=["cfg", "eta1", "no-cfg", "negative"],
)
def test_matches_diffusers_pipeline(tiny_dir, settings):
    ours = generate(load_parts(str(tiny_dir)), PROMPTS, SEEDS, settings)
    theirs = diffusers_images(tiny_dir, settings)
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max() <= PIXEL_TOL


def test_matches_diffusers_with_adapter(tiny_dir, tmp_path):
    parts = load_parts(str(tiny_dir))
    perturb(attach_lora(parts.denoiser, lora_settings(rank=4, alpha=8)))
    save_adapter(parts.denoiser, tmp_path / "adapter")
    settings = sampler_settings(steps=8)
    ours = generate(parts, PROMPTS, SEEDS, settings)
    theirs = diffusers_images(tiny_dir, settings, adapter=tmp_path / "adapter")
    base = diffusers_images(tiny_dir, settings)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the images
    assert (ours - theirs).abs().max() <= PIXEL_TOL


def lora_grads(parts, params, k, checkpointed, steps=6):
    for p in params:
        p.grad = None
    images = generate(parts, PROMPTS, SEEDS, sampler_settings(steps=steps, checkpoint=checkpointed), k=k)
    images.mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_checkpointing_does_not_change_gradients():
    parts = load_parts("tiny").to("cpu", torch.float64)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    for p in params:
        p.data = p.data.double()
    perturb(params)
    with_ckpt = lora_grads(parts, params, k=3, checkpointed=True)
    without = lora_grads(parts, params, k=3, checkpointed=False)
    assert with_ckpt.abs().sum() > 0
    assert ((with_ckpt - without).norm() / without.norm()) <= 1e-10  # float64; we measured 0


def unet_calls_receiving_gradient(parts):
    """Timesteps of the UNet calls whose output gradient is computed during backward."""
    received = []

    def hook(module, args, output):
        t = int(args[1])
        if output[0].requires_grad and torch.is_grad_enabled():
            output[0].register_hook(lambda grad: received.append(t))

    parts.denoiser.register_forward_hook(hook)
    return received


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_exactly_the_last_k_steps_receive_gradient(tiny_parts, k):
    params = attach_lora(tiny_parts.denoiser, lora_settings())
    perturb(params)
    received = unet_calls_receiving_gradient(tiny_parts)
    settings = sampler_settings(steps=6)
    images = generate(tiny_parts, PROMPTS, SEEDS, settings, k=k)
    timesteps = [int(t) for t in tiny_parts.scheduler.timesteps]
    if k == 0:
        assert not images.requires_grad  # no graph at all: nothing to backpropagate
        assert received == []
        return
    images.mean().backward()
    assert sorted(received) == sorted(timesteps[len(timesteps) - k :])  # a contiguous tail, each once
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in params if "lora_B" in _name(tiny_parts, p)
    )


def _name(parts, param):
    return next(n for n, p in parts.denoiser.named_parameters() if p is param)


def test_no_grad_prefix_keeps_no_graph(tiny_parts):
    """Steps before the tail must not build autograd state: their UNet outputs do not require grad."""
    attach_lora(tiny_parts.denoiser, lora_settings())
    flags = []
    tiny_parts.denoiser.register_forward_hook(lambda m, a, out: flags.append(out[0].requires_grad))
    generate(tiny_parts, PROMPTS, SEEDS, sampler_settings(steps=6), k=2)
    assert flags == [False] * 4 + [True] * 2


def test_per_step_truncation_is_trls_per_step_detach(tiny_dir):
    """`per_step:0:T` against TRL's AlignProp sampler (`pipeline_step_with_grad`, randomized truncation: one
    `random.randint(0, T)` per step, the noise prediction of step i detached when i < it): on the same
    seeds and the same index draws, the same images and the same LoRA gradient."""
    import random

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from trl.models.modeling_sd_base import pipeline_step_with_grad

    from alignprop_ray.engine.truncation import parse_truncation

    steps, seed = 6, 4
    mask = parse_truncation(f"per_step:0:{steps}").draw(steps, random.Random(seed))
    assert 0 < sum(mask) < steps and mask != tuple(sorted(mask))  # gradient steps that are not a tail

    parts = load_parts(str(tiny_dir))
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=8))
    perturb(params)
    settings = sampler_settings(steps=steps, guidance_scale=7.5, checkpoint=False)
    ours = generate(parts, PROMPTS, SEEDS, settings, k=mask)
    ours.mean().backward()
    our_grads = [p.grad.clone() for p in params]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = parts.denoiser  # the same LoRA parameters
    for p in params:
        p.grad = None
    random.seed(seed)  # TRL draws from the global stream, one randint per step as our draw does
    theirs = pipeline_step_with_grad(
        pipe,
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=7.5,
        truncated_rand_backprop_minmax=(0, steps),
        gradient_checkpoint=False,
        negative_prompt=[""] * 2,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="pt",
    ).images
    theirs.mean().backward()
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    for mine, reference in zip(our_grads, (p.grad for p in params), strict=True):
        assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-9)
    assert sum(float(g.abs().sum()) for g in our_grads) > 0


def test_per_step_mask_gives_gradient_to_exactly_its_steps(tiny_parts):
    params = attach_lora(tiny_parts.denoiser, lora_settings())
    perturb(params)
    received = unet_calls_receiving_gradient(tiny_parts)
    mask = (False, True, False, False, True, False)
    generate(tiny_parts, PROMPTS, SEEDS, sampler_settings(steps=6), k=mask).mean().backward()
    timesteps = [int(t) for t in tiny_parts.scheduler.timesteps]
    assert sorted(received) == sorted(t for t, m in zip(timesteps, mask, strict=True) if m)
