"""The training methods (engine/methods/) against their references, on the tiny model, without Ray.

References: DDPO's DDIM log-probability, PPO loss and per-prompt statistics are TRL's ports of
kvablack/ddpo-pytorch (`trl==0.23.1`); ReFL's x0 is diffusers' own `DDIMScheduler.step(...)
.pred_original_sample` on the latents diffusers' pipeline reaches; DRaFT-LV's gradient is the average of
its copies' gradients taken one at a time, and an independent float64 implementation of the paper's
Algorithm 2 written here. Then each method's step through the shared learner, its
config rules, and the cost plots.
"""

from __future__ import annotations

import dataclasses
import math
import random
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from alignprop_ray.config import load_experiment
from alignprop_ray.engine.families.registry import SD_SCHEDULE
from alignprop_ray.engine.methods import build_method, get_method, method_rows
from alignprop_ray.engine.methods.configs import DdpoConfig, DraftConfig, ReflConfig
from alignprop_ray.engine.methods.ddpo import (
    PerPromptStats,
    batch_advantages,
    ddim_log_prob,
    ddim_step_mean_std,
    ppo_clip_loss,
)
from alignprop_ray.engine.methods.draft import DraftLV
from alignprop_ray.engine.methods.refl import Refl
from alignprop_ray.engine.step import Batch
from alignprop_ray.engine.truncation import StepRange
from alignprop_ray.errors import ConfigError
from tests import noop_method
from tests.helpers import (
    assert_resumes_exactly,
    brightness_reward,
    perturb,
    sampler_settings,
    tiny_learner,
)
from tests.method_sweep import STEPS as SWEEP_STEPS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS = ["a cat", "a red car"], [3, 11]
DDPO = DdpoConfig(per_prompt_stats=False)  # the reference's defaults, advantages over the batch


def ddim(steps: int = 10, **config):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**{**SD_SCHEDULE, **config})
    scheduler.set_timesteps(steps)
    return scheduler


# --- DDPO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_log_prob_matches_ddpo_reference(eta, prediction_type):
    """The log-probability under one prediction of a step sampled under another (as PPO's ratio needs it),
    with per-image timesteps, the last step (previous timestep < 0) among them."""
    from trl.models.modeling_sd_base import scheduler_step

    scheduler = ddim(10, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    latents, old, new = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    t = scheduler.timesteps[[0, 3, 8, 9]]
    mean, std = ddim_step_mean_std(scheduler, old, t, latents, eta)
    following = mean + std * torch.randn(4, 4, 8, 8, generator=gen)
    ours = ddim_log_prob(scheduler, new, t, latents, following, eta)
    reference = scheduler_step(scheduler, new, t, latents, eta=eta, prev_sample=following).log_probs
    # float32 against float32, the same operations: measured max |diff| 0.0
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5), (ours, reference)
    assert (ours - ddim_log_prob(scheduler, old, t, latents, following, eta)).abs().min() > 1e-3


def test_ddim_step_mean_and_std_are_diffusers_step():
    """x_(t-1) = mean + std * noise is DDIMScheduler.step with that variance noise."""
    scheduler = ddim(10)
    gen = torch.Generator().manual_seed(1)
    latents, prediction, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for t in scheduler.timesteps[[0, 5, 9]]:
        mean, std = ddim_step_mean_std(scheduler, prediction, t, latents, 1.0)
        theirs = scheduler.step(prediction, t, latents, eta=1.0, variance_noise=noise).prev_sample
        assert torch.allclose(mean + std * noise, theirs, rtol=0, atol=1e-6)


def test_ppo_clip_loss_matches_ddpo_reference():
    from trl.trainer.ddpo_trainer import DDPOTrainer

    gen = torch.Generator().manual_seed(2)
    advantages = torch.randn(64, generator=gen)
    ratio = 1 + 3e-4 * torch.randn(64, generator=gen)  # about half of them outside the 1e-4 clip
    reference = DDPOTrainer.loss(None, advantages, 1e-4, ratio)
    assert torch.equal(ppo_clip_loss(advantages, ratio, 1e-4), reference)


def test_per_prompt_stats_match_ddpo_reference_across_updates():
    from trl.trainer.utils import PerPromptStatTracker

    ours, theirs = PerPromptStats(buffer=6, min_count=4), PerPromptStatTracker(buffer_size=6, min_count=4)
    rng = np.random.default_rng(3)
    for _ in range(5):  # the buffers fill, then roll over: batch statistics, then the prompt's own
        prompts = list(rng.choice(["a cat", "a dog", "a car"], size=5))
        rewards = rng.normal(size=5)
        np.testing.assert_allclose(ours.update(prompts, rewards), theirs.update(prompts, rewards), atol=1e-6)
    restored = PerPromptStats(buffer=6, min_count=4)
    restored.load_state_dict(ours.state_dict())
    prompts, rewards = ["a cat", "a dog"], [0.3, -0.1]
    np.testing.assert_array_equal(restored.update(prompts, rewards), ours.update(prompts, rewards))


def test_batch_advantages_are_ddpos():
    rewards = np.array([1.0, 2.0, 4.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # ddpo-pytorch scripts/train.py
    np.testing.assert_allclose(batch_advantages(rewards), expected)


def ddpo_learner(reward=brightness_reward, lr=1e-2, **settings):
    learner = tiny_learner(reward, lr=lr)
    learner.method = build_method(dataclasses.replace(DDPO, **settings))
    learner.plan = one_batch  # step i's batch: one_batch(i)
    return learner


def one_batch(seed: int = 0) -> list[Batch]:
    rng = random.Random(seed)
    return [Batch(PROMPTS, [rng.randrange(2**31) for _ in PROMPTS])]


def test_ddpo_rollout_log_probs_are_the_reference_log_probs_of_its_own_chain():
    """Recompute each recorded step's log-probability with the reference from a fresh denoiser call."""
    from trl.models.modeling_sd_base import scheduler_step

    from alignprop_ray.engine.sampler import guided_prediction

    learner = ddpo_learner()
    perturb(learner.params)
    rollout = learner.method.sample(learner, one_batch()[0])
    parts = learner.parts
    assert len(rollout.latents) == len(rollout.timesteps) + 1 == 7
    for i, t in enumerate(rollout.timesteps):
        with torch.no_grad():
            prediction = guided_prediction(parts, rollout.latents[i], t, rollout.cond, 5.0)
        batch_t = t.repeat(len(PROMPTS))
        reference = scheduler_step(
            parts.scheduler,
            prediction,
            batch_t,
            rollout.latents[i],
            eta=1.0,
            prev_sample=rollout.latents[i + 1],
        )
        assert torch.allclose(rollout.log_probs[i], reference.log_probs, rtol=0, atol=1e-5), i


def test_ddpo_at_its_defaults_clips_from_the_second_update_of_a_round():
    """`method: ddpo` as a run builds it, every setting at its default (updates_per_round 2, ddpo-pytorch's
    and TRL's): a round samples both updates' batches with the adapter of its first step, so the second
    update's ratio has moved and PPO's clip acts."""
    cfg = method_experiment("ddpo", {})
    assert cfg.method.updates_per_round == 2 and cfg.method.inner_epochs == 1
    learner = method_learner(cfg)
    results = [learner.train_step(*plan(cfg, step)) for step in range(3)]
    assert all(r.updated for r in results)
    per_round = 2 * cfg.train.batch_size * cfg.train.grad_accum
    assert [r.images for r in results] == [per_round, 0, per_round]  # the round is sampled at its start
    assert results[0].metrics == {"clip_fraction": 0.0, "approx_kl": 0.0}  # the adapter that sampled it
    assert results[1].metrics["clip_fraction"] > 0 and results[1].metrics["approx_kl"] > 0
    assert results[2].metrics == {"clip_fraction": 0.0, "approx_kl": 0.0}  # a new round
    assert results[0].reward != results[1].reward  # each update trains on its own minibatch


def test_ddpo_with_one_update_per_round_and_one_pass_is_reinforce():
    """updates_per_round 1, inner_epochs 1: every update trains on samples of its own adapter, so the ratio
    is 1 and both PPO diagnostics are exactly 0 (docs/methods.md: this setting is REINFORCE)."""
    learner = ddpo_learner(lr=3e-2, updates_per_round=1, inner_epochs=1)
    results = [learner.train_step(one_batch(step), [0]) for step in range(2)]
    assert all(r.updated for r in results) and [r.images for r in results] == [2, 2]
    assert all(r.metrics == {"clip_fraction": 0.0, "approx_kl": 0.0} for r in results)


def test_ddpo_inner_epochs_pass_over_the_round_again():
    learner = ddpo_learner(lr=3e-2, updates_per_round=1, inner_epochs=2)
    first = learner.train_step(one_batch(0), [0])
    second = learner.train_step(one_batch(1), [0])  # reuses the round: the adapter has moved since
    third = learner.train_step(one_batch(2), [0])  # a new round
    assert first.updated and second.updated and third.updated
    assert first.metrics == {"clip_fraction": 0.0, "approx_kl": 0.0}
    assert second.metrics["approx_kl"] > 0 and second.metrics["clip_fraction"] > 0
    assert third.metrics == {"clip_fraction": 0.0, "approx_kl": 0.0}
    assert [first.images, second.images, third.images] == [2, 0, 2]  # the round is sampled once
    assert first.k == 6 and first.reward == second.reward  # every step trained; the same samples


def test_ddpo_trains_on_a_non_differentiable_reward():
    """From the config, as a run builds it: JPEG size (no gradient) validates as DDPO's objective, and a step
    updates the adapter and keeps its per-prompt statistics for the checkpoint."""
    cfg = method_experiment("ddpo", {"stat_min_count": 2}, "reward={jpeg_compressibility: 1}")
    learner = method_learner(cfg)
    before = lora_state(learner)
    batches, draws = plan(cfg, 0)
    result = learner.train_step(batches, draws)
    assert result.updated and not result.nonfinite and result.grad_norm > 0
    assert result.terms.keys() == {"jpeg_compressibility"}
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.params, strict=True))
    stats = learner.state_dict()["method"]["stats"]  # kept in checkpoints
    assert set(stats) == {p for batch in batches for p in batch.prompts}


def test_ddpo_refuses_a_scheduler_without_log_probabilities():
    from alignprop_ray.errors import UserError

    learner = ddpo_learner()
    learner.parts.scheduler = SimpleNamespace()
    with pytest.raises(UserError, match="needs a DDIM scheduler"):
        learner.train_step(one_batch(), [0])


# --- ReFL ---------------------------------------------------------------------------------------------------


def test_refl_x0_is_the_schedulers_pred_original_sample_on_diffusers_chain(tiny_dir):
    """Latents at the gradient step equal diffusers' pipeline's; x0 equals DDIMScheduler.step's."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from alignprop_ray.engine.models import load_parts

    settings = sampler_settings(steps=8, guidance_scale=5.0)
    engine = SimpleNamespace(
        parts=load_parts(str(tiny_dir)), sampler=settings, resolution=None, autocast=nullcontext
    )
    step = 5
    ours = Refl.predict(engine, Batch(PROMPTS, SEEDS), step)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def capture(pipeline, i, t, tensors):
        if i == step - 1:  # the latents after step i are the input of step i + 1
            captured["latents"] = tensors["latents"].clone()
        return tensors

    pipe(
        PROMPTS,
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="latent",
        callback_on_step_end=capture,
    )
    print(
        "latents",
        (ours.latents - captured["latents"]).abs().max(),
        "x0",
        (ours.x0 - pipe.scheduler.step(ours.prediction, ours.t, ours.latents).pred_original_sample)
        .abs()
        .max(),
    )
    assert (ours.latents - captured["latents"]).abs().max() <= 1e-4  # sampler parity (test_families: 0.0)
    reference = pipe.scheduler.step(ours.prediction, ours.t, ours.latents).pred_original_sample
    assert (ours.x0 - reference).abs().max() <= 1e-6


def test_refl_backpropagates_through_exactly_one_denoiser_call(tiny_parts):
    from alignprop_ray.engine.lora import attach_lora
    from tests.helpers import lora_settings

    params = attach_lora(tiny_parts.denoiser, lora_settings())
    perturb(params)
    calls = []
    tiny_parts.denoiser.register_forward_hook(lambda m, a, out: calls.append(out[0].requires_grad))
    engine = SimpleNamespace(
        parts=tiny_parts, sampler=sampler_settings(steps=6), resolution=32, autocast=nullcontext
    )
    Refl.predict(engine, Batch(PROMPTS, SEEDS), 4).x0.mean().backward()
    assert calls == [False] * 4 + [True]
    assert all(p.grad is not None for p in params)


def test_refl_draws_its_step_from_the_range_the_same_on_every_worker():
    from alignprop_ray.engine.step import plan_step

    plans = [
        plan_step(
            PROMPTS * 3, StepRange(3, 5), 6, step=7, seed=1, batch_size=2, grad_accum=8, rank=r, world_size=2
        )
        for r in range(2)
    ]
    assert plans[0][1] == plans[1][1] and set(plans[0][1]) <= {3, 4, 5} and len(set(plans[0][1])) > 1
    with pytest.raises(ValueError, match="not within"):
        StepRange(3, 6).draw(6, random.Random(0))


def refl_toy_experiment(folder: Path, weight: float):
    """ReFL on the committed toy-shapes model (64 px, 4 steps, no guidance), the hue reward at lr 1e-2."""
    return load_experiment(
        ROOT / "sweeps" / "tiny.yaml",
        [
            "truncation=null",
            f"model.pretrained={ROOT / 'models' / 'toy-shapes'}",
            "model.resolution=64",
            "sampling.steps=4",
            "sampling.guidance_scale=1",
            f"method={{name: refl, pretrain_weight: {weight}, pretrain_data: {folder}}}",
            "reward={hue: {colour: orange}}",
        ],
    )


@pytest.mark.slow
def test_refl_pretraining_loss_trains_on_the_toy_shapes_folder(tmp_path):
    """ImageReward's regularizer, on toy-shapes caption-image pairs: 6 steps with pretrain_weight 100 lower
    the denoiser's loss on those pairs (fixed timesteps and noise); the same 6 steps without it, driven by the
    reward alone, raise it (measured: 0.0234 -> 0.0187 with, -> 0.102 without)."""
    from alignprop_ray.engine.methods.refl import diffusion_loss, read_pairs
    from alignprop_ray.toy.shapes import write_captioned_folder
    from alignprop_ray.train.build import build_learner, plan_training_step

    write_captioned_folder(tmp_path, 2, seed=3)
    pixels, captions = read_pairs(tmp_path, 64)

    def fixed_loss(learner) -> float:
        with torch.no_grad():
            draws = [
                diffusion_loss(learner, pixels, captions, torch.Generator().manual_seed(s)) for s in range(6)
            ]
        return float(sum(draws) / len(draws))

    after = {}
    for weight in (100.0, 0.0):
        cfg = refl_toy_experiment(tmp_path, weight)
        learner = build_learner(cfg, torch.device("cpu"), captions)
        before = fixed_loss(learner)
        for step in range(6):
            result = learner.train_step(*plan_training_step(cfg, captions, step))
            assert result.updated and (result.metrics["pretrain_loss"] > 0) == (weight > 0)
        after[weight] = fixed_loss(learner)
    print("toy pre-training loss", before, after)
    assert after[100.0] < before < after[0.0]


def test_refl_pretraining_settings_are_checked_one_line_each(tmp_path):
    from alignprop_ray.toy.shapes import write_captioned_folder

    assert problems("method={name: refl, pretrain_weight: 1}") == [
        "method.pretrain_weight: needs method.pretrain_data, a folder of caption-image pairs"
    ]
    (missing,) = problems(f"method={{name: refl, pretrain_data: {tmp_path / 'nowhere'}}}")
    assert missing.startswith("method.pretrain_data: ") and "not found" in missing
    (empty,) = problems(f"method={{name: refl, pretrain_data: {tmp_path}}}")
    assert "holds no image with a caption" in empty
    write_captioned_folder(tmp_path, 1, seed=0)
    cfg = experiment(f"method={{name: refl, pretrain_weight: 0.5, pretrain_data: {tmp_path}}}")
    assert cfg.method.pretrain_data == str(tmp_path) and cfg.method.pretrain_weight == 0.5
    shipped = experiment(
        f"method={{name: refl, pretrain_data: {ROOT / 'models' / 'toy-shapes' / 'pretrain'}}}"
    )
    assert shipped.method.pretrain_weight == 0  # off unless asked for


# --- DRaFT-LV -----------------------------------------------------------------------------------------------


def lv_learner(parts, sampler, **extra) -> SimpleNamespace:
    """What DRaFT-LV reads of a learner, on 32 px images and the brightness reward, without a KL term
    unless `extra` gives one."""
    fields = dict(
        resolution=32, autocast=nullcontext, reward=brightness_reward, kl_weight=0.0, kl_term=lambda: None
    )
    return SimpleNamespace(parts=parts, sampler=sampler, **{**fields, **extra})


def test_draft_lv_gradient_is_the_average_of_its_copies_gradients():
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from tests.helpers import lora_settings

    parts = load_parts("tiny").to("cpu", torch.float64)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    for p in params:
        p.data = p.data.double()
    perturb(params)
    engine = lv_learner(parts, sampler_settings(steps=5, guidance_scale=5.0))
    method, batch = DraftLV(DraftConfig(lv_samples=3)), Batch(PROMPTS, SEEDS)

    def grads() -> torch.Tensor:
        out = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return out

    output = method.micro_batch(engine, 0, batch, 0, lambda loss: loss.backward())
    averaged = grads()
    sample = method.sample(engine, batch)  # the same chain and copy noise again: both are seeded
    singles = []
    for noise in method.noises(sample):
        method.copy_loss(engine, sample, noise, batch.prompts)[1].backward()
        singles.append(grads())
    expected = torch.stack(singles).mean(0)
    # the loss is taken in float32 (as fp16 runs need): measured 3e-8, against 5e-3 between copies
    assert ((averaged - expected).norm() / expected.norm()) <= 1e-6
    assert min((s - expected).norm() for s in singles) > 1e-3 * expected.norm()  # the copies do differ
    assert output.grad_steps == 1 and output.images == 2


def test_renoise_is_the_forward_process_at_the_last_step(tiny_parts):
    from alignprop_ray.engine.methods.draft import last_step, renoise

    t = last_step(tiny_parts, 6, tiny_parts.native_resolution)
    alpha = tiny_parts.scheduler.alphas_cumprod[int(t)]
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    expected = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    assert torch.allclose(renoise(tiny_parts.scheduler, x0, noise, t), expected, atol=1e-6)


def test_draft_lv_copies_keep_their_noise_in_bf16():
    """In bf16, alpha-bar at the last step (t=1: 0.99830) rounds to 1: the re-noise must stay in float32, or
    every copy is x0. The denoiser still gets x_t in its own dtype (a float32 input would not run)."""
    from alignprop_ray.engine.methods.draft import last_step, renoise
    from alignprop_ray.engine.models import load_parts

    parts = load_parts("tiny", dtype=torch.bfloat16)
    engine = lv_learner(parts, sampler_settings(steps=6, guidance_scale=5.0))
    method = DraftLV(DraftConfig(lv_samples=2))
    sample = method.sample(engine, Batch(PROMPTS, SEEDS))
    t = last_step(parts, 6, 32)
    assert sample.x0.dtype == torch.bfloat16 and int(t) == 1
    alpha = parts.scheduler.alphas_cumprod[int(t)].double()
    noises = method.noises(sample)
    copies = [renoise(parts.scheduler, sample.x0, noise, t) for noise in noises]
    for copy, noise in zip(copies, noises, strict=True):
        exact = alpha.sqrt() * sample.x0.double() + (1 - alpha).sqrt() * noise.double()
        assert (copy.double() - exact).abs().max() <= 1e-5  # the forward process, to float32 precision
        assert (copy.float() - sample.x0.float()).abs().mean() > 0.02  # sqrt(1 - a) = 0.041, not 0
    assert (copies[0] - copies[1]).abs().mean() > 0.02
    output = method.micro_batch(engine, 0, Batch(PROMPTS, SEEDS), 0, lambda loss: None)
    assert math.isfinite(output.loss)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_refl_x0_in_bf16_is_within_half_a_percent_of_float64(prediction_type):
    """ReFL's x0 (schedulers.predict_x0) at the last step (t=1) from bf16 inputs with SD's statistics (unit
    latents, a perfect prediction), against the same formula in float64 on the same bf16 inputs, alpha-bar
    from the betas in float64. (The tiny model's latents are 20x its predictions, which hides the error.)"""
    from alignprop_ray.engine.schedulers import predict_x0

    scheduler = ddim(steps=6, prediction_type=prediction_type)
    t = scheduler.timesteps[-1]
    alpha = float64_alphas_cumprod()[int(t)]
    gen = torch.Generator().manual_seed(0)
    clean, noise = (torch.randn(2, 4, 16, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    x = (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).bfloat16().double()
    if prediction_type == "epsilon":
        prediction = noise.bfloat16().double()
        exact = (x - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    else:  # v = sqrt(a) eps - sqrt(1 - a) x0
        prediction = (alpha.sqrt() * noise - (1 - alpha).sqrt() * clean).bfloat16().double()
        exact = alpha.sqrt() * x - (1 - alpha).sqrt() * prediction
    ours = predict_x0(scheduler, prediction.bfloat16(), t, x.bfloat16())
    error = (ours.double() - exact).norm() / exact.norm()
    print(f"refl x0 in bf16 ({prediction_type}): {float(error):.2e} relative to float64")
    assert int(t) == 1 and error <= 5e-3  # measured 7.6e-8; 4.1e-2 when alpha-bar was cast to bf16


def float64_alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule (SD_SCHEDULE), computed here in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_draft_lv_gradient_is_the_papers_algorithm_2_in_float64():
    """An independent float64 DRaFT-LV (Clark et al. 2023, Alg. 2) on the tiny model, written here from the
    paper: sample x0 with DDIM (eta 0, CFG) without gradient; n times: x_1 = sqrt(a_1) sg(x0) + sqrt(1 - a_1)
    eps_i, one guided DDIM step x_1 -> x0_i with gradient, g += grad r(decode(x0_i)); g / n. Same seeds,
    same noise draws (each image's generator: its initial noise, then the copies')."""
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from tests.helpers import lora_settings

    steps, guidance, copies = 5, 5.0, 3
    parts = load_parts("tiny").to("cpu", torch.float64)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    for p in params:
        p.data = p.data.double()
    perturb(params)
    engine = lv_learner(parts, sampler_settings(steps=steps, guidance_scale=guidance))
    DraftLV(DraftConfig(lv_samples=copies)).micro_batch(
        engine, 0, Batch(PROMPTS, SEEDS), 0, lambda loss: loss.backward()
    )
    ours = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None

    # --- the paper's algorithm, from the raw modules ---
    alphas = float64_alphas_cumprod()
    tokens = [
        parts.tokenizer(
            text, padding="max_length", max_length=parts.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        for text in ([""] * len(PROMPTS), PROMPTS)
    ]
    with torch.no_grad():
        context = torch.cat([parts.text_encoder(ids)[0] for ids in tokens]).double()

    def eps(x, t):  # classifier-free guidance on [uncond; cond]
        uncond, cond = parts.denoiser(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        return uncond + guidance * (cond - uncond)

    def ddim(x, t):  # eta 0; past t=1, alpha-bar of t=0 (set_alpha_to_one false)
        a, a_prev = alphas[t], alphas[max(t - 1000 // steps, 0)]
        e = eps(x, t)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    side = 32 // parts.vae_scale_factor  # the tiny VAE halves the side
    shape = (1, parts.denoiser.config.in_channels, side, side)
    x = torch.cat([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens])
    timesteps = [t * (1000 // steps) + 1 for t in reversed(range(steps))]  # "leading", steps_offset 1
    with torch.no_grad():
        for t in timesteps:
            x = ddim(x, t)
    total = 0
    for _ in range(copies):
        noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).double()
        x1 = alphas[1].sqrt() * x + (1 - alphas[1]).sqrt() * noise
        image = parts.vae.decode(ddim(x1, 1) / parts.vae.config.scaling_factor).sample
        total = total - brightness_reward((image / 2 + 0.5).clamp(0, 1), PROMPTS).total.mean()
    (total / copies).backward()
    paper = torch.cat([p.grad.flatten() for p in params])
    error = (ours - paper).norm() / paper.norm()
    print("DRaFT-LV against Algorithm 2 in float64: relative gradient difference", float(error))
    # measured 2.6e-5: diffusers keeps alpha-bar in float32, and 1 - a at t=1 (0.0017) carries its rounding
    # (3.5e-5 relative); with those float32 alphas here it is 1.3e-7. The copies differ by 5e-3.
    assert error <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_draft_lv_and_refl_step_other_families(family):
    """Euler (SDXL) and flow matching (SD3, FLUX.1) keep a step index: the LV step starts it at the last step.
    With train.kl_weight, the base model's call at the same step (adapter off) gives a finite, nonzero term."""
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.regularizers import KLAccumulator
    from tests.helpers import lora_settings

    parts = load_parts("tiny", family=family)
    params = attach_lora(parts.denoiser, lora_settings())
    perturb(params)
    sampler = sampler_settings(steps=3)
    engine = lv_learner(
        parts, sampler, kl_weight=0.1, kl_term=lambda: KLAccumulator(parts, sampler.guidance_scale)
    )
    batch = Batch(PROMPTS, SEEDS)
    for method, draw in [(DraftLV(DraftConfig(lv_samples=2)), 0), (Refl(ReflConfig(step_range=(1, 2))), 2)]:
        output = method.micro_batch(engine, 0, batch, draw, lambda loss: loss.backward())
        assert math.isfinite(output.loss) and math.isfinite(output.kl) and output.kl > 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# --- what every method row gets: validation, a step through the shared learner, exact resume ---------------
# Parametrized over the registry (engine/methods/registry.py): a new row is tested by joining it. VARIANTS adds
# settings that take another code path (DRaFT-LV) or exercise more of one (DDPO's second update of a round).

# Every built-in row, and docs/extending.md's no-op method, built in memory from the diff printed there
# (tests/noop_method.py): a row outside the table, named by import path, gets the same tests.
ROWS = [*method_rows(), get_method(noop_method.NAME)]
VARIANTS = {"draft": [{}, {"lv_samples": 2}], "ddpo": [{"inner_epochs": 2, "per_prompt_stats": False}]}
CASES = [(row, settings) for row in ROWS for settings in VARIANTS.get(row.name, [{}])]
CASE_IDS = [row.name + "".join(f"-{k}{v}" for k, v in settings.items()) for row, settings in CASES]


# What a row needs of the tiny experiment beyond its defaults: a row limited to other families trains the first
# of them (Flow-GRPO: sd3), and Flow-GRPO's groups must divide the step's images (tiny.yaml: 2 workers x 2).
ROW_SETTINGS = {"flow_grpo": {"group_size": 2}}


def row_sets(row) -> list[str]:
    """The experiment keys a row's tests set so that it trains on the tiny model."""
    return [] if row.families is None or "sd" in row.families else [f"model.family={row.families[0]}"]


def method_experiment(name: str, settings: dict, *sets: str):
    """tiny.yaml with the method `name` (its other settings at their defaults, but for ROW_SETTINGS), 4
    sampling steps at 32 px, on a family the method trains."""
    settings = {**ROW_SETTINGS.get(name, {}), **settings}
    method = "{" + ", ".join([f"name: '{name}'", *(f"{k}: {v}" for k, v in settings.items())]) + "}"
    extra = row_sets(get_method(name))
    return experiment(f"method={method}", "sampling.steps=4", "model.resolution=32", *extra, *sets)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_every_method_validates_round_trips_and_refuses_what_is_not_its_setting(row):
    from alignprop_ray.config import ExperimentConfig

    assert row.label and row.summary and row.gradient_steps
    assert row.limited_because or (row.schedulers is None and row.families is None)  # a refusal says why
    cfg = method_experiment(row.name, {})
    assert type(cfg.method) is row.config and cfg.method.name == row.name
    assert ExperimentConfig.model_validate(cfg.to_dict()).method == cfg.method  # what a worker re-reads
    assert cfg.flat_params()["method.name"] == row.name
    assert all(row.config.__pydantic_fields__[setting].description for setting in row.settings)
    [line] = problems(f"method={{name: '{row.name}', bogus_setting: 1}}", *row_sets(row))
    assert line == (
        f"method.bogus_setting: not a setting of method {row.name}; {row.name}'s settings: "
        f"{', '.join(row.settings) or 'none'}"
    )


def frozen_state(learner) -> dict[str, torch.Tensor]:
    """Every parameter of the pipeline that is not LoRA."""
    modules = dict(zip(("denoiser", "vae"), (learner.parts.denoiser, learner.parts.vae), strict=True))
    modules.update({f"text{i}": m for i, m in enumerate(learner.parts.text_encoders)})
    return {
        f"{name}.{key}": value.clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
        if "lora_" not in key
    }


def lora_state(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.params]


def method_learner(cfg):
    """The learner a run of `cfg` builds on its worker (train/build.py), on the CPU."""
    from alignprop_ray.train.build import build_learner

    return build_learner(cfg, torch.device("cpu"), PROMPTS)


def plan(cfg, step: int):
    from alignprop_ray.train.build import plan_training_step

    return plan_training_step(cfg, PROMPTS, step)


@pytest.mark.parametrize(("row", "settings"), CASES, ids=CASE_IDS)
def test_every_method_trains_only_lora_and_reports_its_own_metrics(row, settings):
    """One optimizer step of the method as a run builds it: finite, the frozen model untouched, LoRA moved iff
    some denoiser call carried gradient, and exactly the row's metrics logged as train/<method>/<metric>."""
    from alignprop_ray.train.checkpoint import Progress
    from alignprop_ray.train.loop import step_metrics

    cfg = method_experiment(row.name, settings)
    learner = method_learner(cfg)
    frozen, lora = frozen_state(learner), lora_state(learner)
    result = learner.train_step(*plan(cfg, 0))
    assert math.isfinite(result.loss) and math.isfinite(result.reward) and not result.nonfinite
    updates = getattr(cfg.method, "updates_per_round", 1)  # DDPO samples its whole round at its first step
    assert result.images == cfg.train.batch_size * cfg.train.grad_accum * updates  # from noise, this worker
    after = frozen_state(learner)
    assert all(torch.equal(frozen[key], after[key]) for key in frozen)
    moved = any(not torch.equal(a, b) for a, b in zip(lora, learner.params, strict=True))
    assert moved == (result.k > 0) == result.updated, (result.k, result.updated)
    logged = step_metrics(result, learner, 1.0, Progress(step=1, run_id="r"), 1)
    assert {key for key in logged if key.startswith(f"train/{row.name}/")} == set(row.metric_names)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_every_method_resumes_from_a_checkpoint_exactly(row, tmp_path):
    """At the method's defaults: tests/helpers.py `assert_resumes_exactly`; DDPO's per-prompt reward
    statistics ride in the checkpoint, its round's samples do not (a resume in the middle of a round samples
    it again, engine/methods/ddpo.py), so its checkpoint falls between two rounds."""
    cfg = method_experiment(row.name, {})
    round_length = getattr(cfg.method, "updates_per_round", 1) * getattr(cfg.method, "inner_epochs", 1)
    assert_resumes_exactly(cfg, tmp_path, before=round_length)


# --- reference settings (each row's `reference`) ------------------------------------------------------------


@pytest.mark.parametrize("row", method_rows(), ids=[row.name for row in method_rows()])
def test_each_method_takes_its_reference_settings_where_the_experiment_is_silent(row):
    """Unset fields take the row's reference values, each with a source line that docs/methods.md prints;
    a field the experiment sets keeps its value; lr_scale multiplies the reference lr."""
    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.config.schema import TrainConfig
    from alignprop_ray.train.build import engine_settings

    silent = ExperimentConfig.model_validate({"reward": {"saturation": 1.0}, "method": row.name})
    applied = row.reference.applied()
    for key, value in applied.items():
        section, name = key.split(".")
        assert getattr(getattr(silent, section), name) == value, key
    if "train.lr" not in applied:  # no reference: the schema's default (AlignProp's)
        assert silent.train.lr == TrainConfig().lr
    docs = (ROOT / "docs" / "methods.md").read_text()
    for setting, source in row.reference.sources.items():
        assert getattr(row.reference, setting) is not None or setting == "images_per_update"
        assert source in docs, (row.name, setting)
    assert all(
        row.reference.sources.get(name)
        for name in dataclasses.asdict(row.reference)
        if name != "sources" and getattr(row.reference, name) is not None
    )
    data = {"reward": {"saturation": 1.0}, "method": row.name}
    chosen = ExperimentConfig.model_validate({**data, "train": {"weight_decay": 0.5, "lr_scale": 2.0}})
    assert chosen.train.weight_decay == 0.5
    assert engine_settings(chosen).optim.lr == pytest.approx(2.0 * silent.train.lr)
    again = ExperimentConfig.model_validate(chosen.to_dict())  # what a worker and a resume validate
    assert again.train == chosen.train and again.sampling == chosen.sampling


def test_the_shipped_method_sweeps_leave_the_reference_settings_to_each_method(hub_reachable):
    from alignprop_ray.sweep.protocol import load_comparison

    for name in ("methods.yaml", "methods_sd15.yaml"):
        comparison = load_comparison(ROOT / "sweeps" / name, env={})
        for method in ("alignprop", "ddpo", "refl"):
            sweep = comparison.selection_sweep(comparison.labels.index(method))
            cfg = sweep.experiment({d.field: d.first() for d in sweep.domains})
            reference = get_method(method).reference
            assert cfg.train.weight_decay == reference.weight_decay, (name, method)
            assert cfg.sampling.guidance_scale == reference.guidance_scale, (name, method)
            assert cfg.train.lr == reference.lr, (name, method)


def test_ddpo_evaluation_also_scores_its_training_eta_and_names_its_sampler():
    from alignprop_ray.train.evaluate import evaluate, sampler_description

    cfg = method_experiment("ddpo", {}, "prompts.eval_seeds=2")
    learner = method_learner(cfg)
    metrics = evaluate(learner, cfg, PROMPTS, 0, None, None)
    assert math.isfinite(metrics["eval/train_eta/reward"])
    assert metrics["eval/train_eta/reward"] != metrics["eval/reward"]  # eta 1 samples other images
    assert learner.sampler.eta == 0.0  # evaluation put the sampler back
    assert sampler_description(learner, cfg) == (
        "DDIMScheduler, 4 steps, eta 0, guidance 7.5; also at the training eta 1 (eval/train_eta/reward)"
    )
    alignprop = method_experiment("alignprop", {})
    assert sampler_description(learner, alignprop) == "DDIMScheduler, 4 steps, eta 0, guidance 7.5"


def test_a_nonfinite_method_loss_skips_the_update():
    def nan_reward(images, prompts):
        value = images.mean(dim=(1, 2, 3)) * float("nan")
        return SimpleNamespace(total=value, terms={"nan": value})

    learner = tiny_learner(nan_reward)
    learner.method = build_method(ReflConfig(step_range=(3, 5)))
    before = [p.detach().clone() for p in learner.params]
    result = learner.train_step(one_batch(), [4])
    assert result.nonfinite and not result.updated
    assert all(torch.equal(b, p) for b, p in zip(before, learner.params, strict=True))


# --- config ---------------------------------------------------------------------------------------------------


def experiment(*sets):
    return load_experiment(ROOT / "sweeps" / "tiny.yaml", ["truncation=null", *sets])


def problems(*sets) -> list[str]:
    with pytest.raises(ConfigError) as err:
        experiment(*sets)
    return str(err.value).splitlines()


def test_method_settings_reach_the_engine_as_validated():
    from alignprop_ray.engine.truncation import NoDraw, RedrawZero, Truncation
    from alignprop_ray.train.build import build_learner

    alignprop = experiment()
    assert alignprop.method.name == "alignprop" and alignprop.method.truncation.describe() == "uniform:0:10"
    assert alignprop.method.draw_rule == Truncation("uniform", low=0, high=10)
    redraw = experiment("truncation=uniform:0:10", "train.k0=redraw").method.draw_rule
    assert redraw == RedrawZero(Truncation("uniform", low=0, high=10))
    assert experiment("method={name: draft, k: 3}").method.draw_rule == Truncation("fixed", k=3)
    assert experiment("method={name: draft, lv_samples: 2}").method.draw_rule == NoDraw()
    refl = experiment("method=refl")
    assert refl.method.step_range == (7, 9) and refl.method.draw_rule == StepRange(7, 9)  # 3T/4 .. T-1
    ddpo = experiment("method={name: ddpo, clip_range: 2.0e-4}", "model.resolution=32")
    learner = build_learner(ddpo, torch.device("cpu"))
    assert learner.method.config is ddpo.method and learner.method.config.clip_range == 2e-4
    assert dataclasses.replace(ddpo.method, clip_range=1e-4, per_prompt_stats=False) == DDPO
    assert ddpo.flat_params()["method.name"] == "ddpo"


@pytest.mark.parametrize(
    "sets, line",
    [
        (["truncation=fixed:2", "method=refl"], "truncation: only used with method alignprop; refl"),
        (["method=ddpo", "train.k0=redraw"], "train.k0: only used with method alignprop"),
        (
            ["method={name: alignprop, lv_samples: 2}"],
            "method.lv_samples: not a setting of method alignprop (a setting of draft)",
        ),
        (
            ["method={name: draft, lv_samples: 2, k: 3}"],
            "method.k: DRaFT-LV (method.lv_samples) backpropagates",
        ),
        (["method={name: draft, k: 11}"], "method.k: K=11 but sampling has 10 steps"),
        (["method={name: refl, step_range: [8, 10]}"], "method.step_range: [8, 10] must satisfy"),
        (["method={name: ddpo, eta: 0}"], "method.eta: must be > 0"),
        (["method=ddpo", "model.family=sd3"], "method: ddpo needs a DDIMScheduler (its policy is DDIM's"),
        (["method=ddpo", "model.family=flux"], "method: ddpo needs a DDIMScheduler (its policy is DDIM's"),
        (["method=dpo"], "method: unknown method 'dpo'; did you mean ddpo?"),
        (
            ["reward={jpeg_compressibility: 1}"],
            "reward.jpeg_compressibility: not differentiable, cannot be an AlignProp",
        ),
        (
            ["method=refl", "reward={jpeg_compressibility: 1}"],
            "reward.jpeg_compressibility: not differentiable, cannot be a ReFL",
        ),
    ],
)
def test_validate_rejects_what_the_method_does_not_use_one_line_each(sets, line):
    found = problems(*sets)
    assert len(found) == 1 and found[0].startswith(line), found


def test_validate_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from alignprop_ray.config import load_experiment; "
        f"load_experiment({str(ROOT / 'sweeps' / 'tiny.yaml')!r}, ['truncation=null', 'method=ddpo']); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_method_sweeps_validate(hub_reachable):
    from alignprop_ray.sweep.protocol import load_comparison

    comparison = load_comparison(ROOT / "sweeps" / "methods.yaml", env={})
    methods = {
        value["name"] if isinstance(value, dict) else value
        for i in range(len(comparison.labels))
        for d in comparison.selection_sweep(i).domains
        for value in d.values
        if d.field == "method"
    }
    assert methods == {"alignprop", "draft", "refl", "ddpo"}
    gpu = load_comparison(ROOT / "sweeps" / "methods_sd15.yaml", env={}).selection_sweep(0)
    assert gpu.reference.model.dtype == "bfloat16" and gpu.reference.scaling.use_gpu


# --- report: reward against cost ------------------------------------------------------------------------


def cost_tables():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "name": ["m-a", "m-b", "m-c"],
            "params.method.name": ["alignprop", "draft", "ddpo"],
            "params.method.lv_samples": [None, "2", None],
            "params.method.k": [None, "1", None],
        }
    )
    rows = []
    for run, speed in zip("abc", [3.0, 2.0, 1.0], strict=True):
        for step in range(1, 7):
            rows += [
                (run, "perf/wall_seconds", step, 10.0 * step),
                (run, "perf/images_generated", step, 4 * step),
            ]
        rows += [(run, "eval/reward", step, 0.2 + 0.01 * speed * step) for step in (0, 3, 6)]
    history = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    return runs, history


def test_reward_at_cost_joins_evaluations_to_the_cost_so_far():
    from alignprop_ray.report.plots import method_labels, reward_at_cost

    runs, history = cost_tables()
    points = reward_at_cost(history, "a", "perf/wall_seconds")
    assert points["cost"].tolist() == [0.0, 30.0, 60.0] and points["step"].tolist() == [0, 3, 6]
    assert method_labels(runs) == {"a": "alignprop", "b": "draft-LV2", "c": "ddpo"}
    # a run that logged no evaluation (a trial that never started) has no points, not an error
    unevaluated = history[(history["run_id"] != "a") | (history["key"] != "eval/reward")]
    assert reward_at_cost(unevaluated, "a", "perf/wall_seconds").empty


def test_cost_plots_have_a_line_per_run_colored_by_method():
    from alignprop_ray.report.plots import plot_reward_vs_images, plot_reward_vs_time

    runs, history = cost_tables()
    for plot in (plot_reward_vs_time, plot_reward_vs_images):
        ax = plot(runs, history).axes[0]
        assert len(ax.lines) == 3 and len({str(line.get_color()) for line in ax.lines}) == 3
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alignprop", "draft-LV2", "ddpo"]
    assert plot_reward_vs_time(runs, history[history["key"] == "eval/reward"]) is None


# --- two Ray workers per method: one sweep whose grid is every method row ------------------------------------
# AlignProp's 2-worker run is tests/test_train_ray.py's; each other row joins the grid (with its last VARIANT:
# DRaFT-LV, whose code path AlignProp's run does not take; DDPO's second update of a round). The sweep runs
# through the CLI, and tests/test_mlflow_ui.py checks its console and links (tests/method_sweep.py).

# A row that cannot train the tiny sd model (Flow-GRPO) has its own 2-worker run: tests/test_flow_grpo.py.
SWEPT = [
    (row, VARIANTS.get(row.name, [{}])[-1]) for row in ROWS if row.name != "alignprop" and not row_sets(row)
]


@pytest.mark.ray
def test_every_method_trains_on_two_ray_workers_in_sync(method_sweep):
    """Each method through the whole stack (a sweep trial, Ray Train on 2 workers, MLflow, checkpoints): the
    workers end with the same LoRA weights, the adapter moved, and the method's own metrics and the cost
    metrics are logged at every step."""
    from safetensors.torch import load_file

    client, trials, tmp = method_sweep.client, method_sweep.trials, method_sweep.tmp
    out = method_sweep.first.stdout
    table = out[out.index("\ntrial ") :].splitlines()
    assert sum(line.rstrip().endswith("completed") for line in table) == len(SWEPT), table
    assert set(trials) == {row.name for row, _ in SWEPT}
    for row, _ in SWEPT:
        run = trials[row.name]
        assert run.info.status == "FINISHED", row.name
        digests = run.data.tags["alignprop.lora_sha256_by_rank"].split(",")
        assert len(digests) == 2 and digests[0] == digests[1], row.name
        for key in ["train/loss", "perf/wall_seconds", "perf/images_generated", *row.metric_names]:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, SWEEP_STEPS + 1)), (row.name, key)
        images = [m.value for m in client.get_metric_history(run.info.run_id, "perf/images_generated")]
        assert images == sorted(images) and images[-1] > 0  # cumulative
        # the adapter moved iff some step backpropagated through a denoiser call (B starts at zero)
        trained = max(m.value for m in client.get_metric_history(run.info.run_id, "train/k")) > 0
        adapter = client.download_artifacts(run.info.run_id, "adapter", str(tmp / row.name))
        weights = load_file(next(Path(adapter).glob("*.safetensors")))
        moved = any(float(w.abs().sum()) > 0 for name, w in weights.items() if "lora_B" in name)
        assert moved == trained, row.name
