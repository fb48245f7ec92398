"""Issue 18's speed levers: an activation budget (checkpoint only what memory requires) and a compiled denoiser.

Neither may change the math: the budget only moves which gradient-carrying calls are recomputed in
backward (the gradient must equal the fully checkpointed one), compilation only the kernels (the images
must equal eager's within fp tolerance).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from alignprop_ray.config import parse_experiment
from alignprop_ray.engine import sampler
from alignprop_ray.engine.lora import attach_lora
from alignprop_ray.engine.models import compile_denoiser, load_parts
from alignprop_ray.engine.sampler import Probe, checkpoint_plan, generate, kept_calls
from alignprop_ray.errors import ConfigError
from tests.helpers import gpu_check_script, lora_settings, sampler_settings

PROMPTS, SEEDS, RESOLUTION, STEPS = ["a cat", "a dog"], [3, 4], 32, 5
MIB = 2**20


def tiny(dtype=torch.float64):
    """The tiny SD pipeline with a perturbed LoRA (B != 0), so the adapter's gradient reaches both factors."""
    parts = load_parts("tiny").to("cpu", dtype)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)
            p.add_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.05)
    return parts, params


def count_calls(parts) -> list[int]:
    calls = []
    parts.denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def lora_grads(parts, params, settings, k):
    for p in params:
        p.grad = None
    generate(parts, PROMPTS, SEEDS, settings, k=k, resolution=RESOLUTION).mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


# --- the budget policy ----------------------------------------------------------------------------------


def test_the_budget_keeps_the_last_calls_that_fit_and_checkpoints_the_rest():
    budget = sampler_settings(activation_budget_mb=25.0)
    probe = Probe(call_bytes=10 * MIB, free_bytes=35 * MIB)
    assert kept_calls(5, budget, probe) == 2  # 25 MiB holds two 10 MiB calls
    assert checkpoint_plan(5, budget, None, keep=2) == [True, True, True, False, False]
    # K is drawn per batch: the split follows it
    assert kept_calls(1, budget, probe) == 1 and checkpoint_plan(1, budget, None, keep=1) == [False]
    assert kept_calls(0, budget, probe) == 0 and checkpoint_plan(0, budget, None, keep=0) == []
    assert kept_calls(5, sampler_settings(activation_budget_mb=0.0), probe) == 0
    assert (
        kept_calls(5, sampler_settings(activation_budget_mb="auto"), probe) == 3
    )  # free less margin: 35 MiB
    assert (
        kept_calls(5, sampler_settings(activation_budget_mb=None), probe) == 0
    )  # no budget: all checkpointed
    assert checkpoint_plan(4, sampler_settings(checkpoint=False), None, keep=0) == [False] * 4
    assert checkpoint_plan(3, budget, [True, False, True], keep=2) == [
        True,
        False,
        True,
    ]  # explicit plan wins


def test_auto_is_free_memory_less_a_margin_of_the_total(tmp_path):
    """On a CPU, `auto` is the kernel's MemAvailable less 10% of MemTotal: 8 GiB of 16 leaves 6.4 GiB."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\n"
    )
    assert sampler.free_memory_bytes(torch.device("cpu"), str(meminfo)) == int(6.4 * 2**30)
    import psutil  # this machine's own, through another reader: below what is available, by the margin

    memory, free = psutil.virtual_memory(), sampler.free_memory_bytes(torch.device("cpu"))
    assert free < memory.available - 0.09 * memory.total and free > memory.available - 0.2 * memory.total


@pytest.mark.slow
def test_the_probe_measures_a_calls_activations_once_per_run():
    parts, _ = tiny(torch.float32)
    calls = count_calls(parts)
    budget = sampler_settings(steps=STEPS, activation_budget_mb=1e6)
    generate(parts, PROMPTS, SEEDS, budget, k=2, resolution=RESOLUTION).mean().backward()
    probes = sampler._PROBES[parts.denoiser]
    assert len(probes) == 1 and len(calls) == STEPS + 1  # one probe call, nothing recomputed
    (measured,) = probes.values()
    calls.clear()
    generate(parts, PROMPTS, SEEDS, budget, k=4, resolution=RESOLUTION).mean().backward()
    assert len(calls) == STEPS and list(probes.values()) == [measured]  # not measured again
    # it is a measurement: twice the images keep about twice the activations
    four = probe_on(parts, 4)
    assert 1.8 < four.call_bytes / measured.call_bytes < 2.2
    assert measured.call_bytes > 100_000  # the tiny UNet keeps ~MBs per call, not a token amount


def probe_on(parts, images: int):
    """The probe on a batch of `images` latents at RESOLUTION (cached like any probe)."""
    generators = [torch.Generator().manual_seed(i) for i in range(images)]
    latents = sampler.initial_latents(parts, generators, RESOLUTION)
    cond = sampler.encode(parts, ["a cat"] * images, sampler_settings(), RESOLUTION)
    return sampler.probe(parts, latents, parts.scheduler.timesteps[0], cond, 7.5)


@pytest.mark.slow
def test_the_budget_policy_gives_the_fully_checkpointed_gradient_and_skips_the_kept_recomputes():
    parts, params = tiny()
    calls = count_calls(parts)
    k = 4
    full = lora_grads(parts, params, sampler_settings(steps=STEPS), k)
    assert len(calls) == STEPS + k  # every gradient call recomputed in backward
    measured = next(iter(sampler._PROBES.get(parts.denoiser, {}).values()), None)
    assert measured is None  # no budget: no probe
    measured = probe_on(parts, 2)
    for room, kept in ((2.5, 2), (0.0, 0), (100.0, k)):  # budget in calls' worth of activations
        calls.clear()
        budget = sampler_settings(steps=STEPS, activation_budget_mb=room * measured.call_bytes / MIB)
        grads = lora_grads(parts, params, budget, k)
        assert len(calls) == STEPS + k - kept, f"budget of {room} calls"
        assert full.abs().sum() > 0
        assert ((grads - full).norm() / full.norm()) <= 1e-12  # float64; measured: 0


def test_the_budget_settings_come_from_the_config():
    from alignprop_ray.train.build import engine_settings

    base = {"reward": {"saturation": 1.0}}
    settings = engine_settings(parse_experiment(base, None, (), env={}))[1]
    assert (settings.compile, settings.activation_budget_mb, settings.checkpoint) == (False, None, True)
    data = copy.deepcopy(base) | {"model": {"compile": True, "activation_budget_mb": "auto"}}
    settings = engine_settings(parse_experiment(data, None, (), env={}))[1]
    assert (settings.compile, settings.activation_budget_mb) == (True, "auto")
    data["model"]["activation_budget_mb"] = 512
    assert engine_settings(parse_experiment(data, None, (), env={}))[1].activation_budget_mb == 512


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"activation_budget_mb": -1}, "model.activation_budget_mb"),
        ({"activation_budget_mb": "lots"}, "model.activation_budget_mb"),
        (
            {"activation_budget_mb": 100, "gradient_checkpointing": False},
            "model.activation_budget_mb: only used with model.gradient_checkpointing: true",
        ),
        ({"compile": "maybe"}, "model.compile"),
    ],
)
def test_bad_speed_settings_get_one_line_naming_the_field(model, expected):
    with pytest.raises(ConfigError) as err:
        parse_experiment({"reward": {"saturation": 1.0}, "model": model}, None, (), env={})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(expected), err.value.problems


# --- the compiled denoiser ------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_wraps_the_denoisers_forward_once(monkeypatch):
    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    parts, _ = tiny(torch.float32)
    generate(parts, PROMPTS, SEEDS, sampler_settings(steps=2), k=0, resolution=RESOLUTION)
    assert compiled == []  # off by default
    settings = dataclasses.replace(sampler_settings(steps=2), compile=True)
    generate(parts, PROMPTS, SEEDS, settings, k=1, resolution=RESOLUTION)
    generate(parts, PROMPTS, SEEDS, settings, k=1, resolution=RESOLUTION)
    assert len(compiled) == 1 and compiled[0].__func__ is type(parts.denoiser).forward
    assert compile_denoiser(parts.denoiser) is parts.denoiser and len(compiled) == 1


@pytest.mark.slow
def test_the_compiled_denoiser_gives_eager_images_and_gradients():
    """Inductor on CPU (a C++ compiler is needed): same images and LoRA gradient as eager, within fp32
    tolerance, with the checkpointed recompute going through the compiled forward too.

    At the shapes `bench/gpu_check.py --smoke` trains the compiled tiny denoiser at (its TRAIN_SMOKE, with
    classifier-free guidance on as there): test_gpu_check.py runs it earlier in the same tier, and Inductor's
    on-disk cache of those graphs then serves this test (21 CPU-seconds instead of 166 from a cold cache,
    2026-12-07). Any shapes test the same thing; these cost least."""
    smoke = gpu_check_script().TRAIN_SMOKE
    prompts, seeds = ["a cat"] * smoke["batch"], list(range(3, 3 + smoke["batch"]))
    torch._dynamo.reset()
    parts, params = tiny(torch.float32)
    settings = sampler_settings(steps=smoke["steps"], guidance_scale=7.5)  # bench/common.py's default
    k = 2

    def run(settings):
        for p in params:
            p.grad = None
        images = generate(parts, prompts, seeds, settings, k=k, resolution=smoke["resolution"])
        images.mean().backward()
        return images.detach(), torch.cat([p.grad.flatten() for p in params])

    eager_images, eager_grads = run(settings)
    counters.clear()
    compiled_images, compiled_grads = run(dataclasses.replace(settings, compile=True))
    assert getattr(parts.denoiser, "_alignprop_compiled", False)
    # one graph without gradient and one with, though the first gradient call's latents carry no graph yet
    # (sampler.gradient_input): both gradient calls and the checkpointed recompute share it
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch.testing.assert_close(compiled_images, eager_images, atol=1e-4, rtol=1e-4)
    assert ((compiled_grads - eager_grads).norm() / eager_grads.norm()) < 1e-3
