"""The training methods (engine/methods/) against their references, on the tiny model, without Ray.

References: DDPO's DDIM log-probability, PPO loss and per-prompt statistics are TRL's ports of
kvablack/ddpo-pytorch (`trl==0.23.1`); ReFL's x0 is diffusers' own `DDIMScheduler.step(...)
.pred_original_sample` on the latents diffusers' pipeline reaches; DRaFT-LV's gradient is the average of
its copies' gradients taken one at a time. Then each method's step through the shared learner, its
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
from alignprop_ray.engine.methods import build_method
from alignprop_ray.engine.methods.ddpo import (
    DdpoSettings,
    PerPromptStats,
    batch_advantages,
    ddim_log_prob,
    ddim_step_mean_std,
    ppo_clip_loss,
)
from alignprop_ray.engine.methods.draft import DraftLV, DraftLVSettings
from alignprop_ray.engine.methods.refl import Refl, ReflSettings, StepRange
from alignprop_ray.engine.step import Batch
from alignprop_ray.errors import ConfigError
from tests.helpers import brightness_reward, sampler_settings, tiny_learner

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS = ["a cat", "a red car"], [3, 11]
DDPO = DdpoSettings(
    eta=1.0,
    clip_range=1e-4,
    adv_clip_max=10.0,
    timestep_fraction=1.0,
    inner_epochs=1,
    per_prompt_stats=False,
    stat_buffer=16,
    stat_min_count=16,
)


def ddim(steps: int = 10, **config):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**{**SD_SCHEDULE, **config})
    scheduler.set_timesteps(steps)
    return scheduler


def perturb(params, scale=0.05, seed=0):
    """Give a fresh adapter (B = 0) a non-zero update, so gradients reach both LoRA factors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


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


def test_ddpo_ratio_is_one_on_a_rounds_first_step_and_moves_on_the_next():
    learner = ddpo_learner(lr=3e-2, inner_epochs=2)
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
    from alignprop_ray.rewards.mixture import build_reward

    reward = build_reward(
        {"jpeg_compressibility": 1.0}, device="cpu", dtype=torch.float32, for_training=False
    )
    learner = ddpo_learner(reward, per_prompt_stats=True, stat_min_count=2)
    before = [p.detach().clone() for p in learner.params]
    result = learner.train_step(one_batch(), [0])
    assert result.updated and not result.nonfinite and result.grad_norm > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.params, strict=True))
    assert set(learner.state_dict()["method"]["stats"]) == set(PROMPTS)  # kept in checkpoints


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
    assert (ours.latents - captured["latents"]).abs().max() <= 1e-4  # sampler parity (test_sampler: 0.0)
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


# --- DRaFT-LV -----------------------------------------------------------------------------------------------


def test_draft_lv_gradient_is_the_average_of_its_copies_gradients():
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from tests.helpers import lora_settings

    parts = load_parts("tiny").to("cpu", torch.float64)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    for p in params:
        p.data = p.data.double()
    perturb(params)
    engine = SimpleNamespace(
        parts=parts,
        sampler=sampler_settings(steps=5, guidance_scale=5.0),
        resolution=32,
        autocast=nullcontext,
        reward=brightness_reward,
    )
    method, batch = DraftLV(DraftLVSettings(samples=3)), Batch(PROMPTS, SEEDS)

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

    t = last_step(tiny_parts, 6)
    alpha = tiny_parts.scheduler.alphas_cumprod[int(t)]
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    expected = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    assert torch.allclose(renoise(tiny_parts.scheduler, x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_draft_lv_and_refl_step_other_families(family):
    """Euler (SDXL) and flow matching (SD3) keep a step index: the LV step starts it at the last step."""
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from tests.helpers import lora_settings

    parts = load_parts("tiny", family=family)
    params = attach_lora(parts.denoiser, lora_settings())
    perturb(params)
    engine = SimpleNamespace(
        parts=parts,
        sampler=sampler_settings(steps=3),
        resolution=32,
        autocast=nullcontext,
        reward=brightness_reward,
    )
    batch = Batch(PROMPTS, SEEDS)
    for method, draw in [(DraftLV(DraftLVSettings(samples=2)), 0), (Refl(ReflSettings(StepRange(1, 2))), 2)]:
        output = method.micro_batch(engine, 0, batch, draw, lambda loss: loss.backward())
        assert math.isfinite(output.loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# --- every method through the learner -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, draw, grad_steps",
    [
        (DraftLVSettings(samples=2), 0, 1),
        (ReflSettings(StepRange(3, 5)), 4, 1),
        (DDPO, 0, 6),
    ],
    ids=["draft-lv", "refl", "ddpo"],
)
def test_each_method_updates_only_lora_through_the_shared_step(settings, draw, grad_steps):
    learner = tiny_learner(brightness_reward)
    learner.method = build_method(settings)
    before = [p.detach().clone() for p in learner.params]
    result = learner.train_step(one_batch(), [draw])
    assert result.updated and not result.nonfinite and math.isfinite(result.grad_norm)
    assert result.k == grad_steps and result.ks == [grad_steps] and result.images == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.params, strict=True))


def test_a_nonfinite_method_loss_skips_the_update():
    def nan_reward(images, prompts):
        value = images.mean(dim=(1, 2, 3)) * float("nan")
        return SimpleNamespace(total=value, terms={"nan": value})

    learner = tiny_learner(nan_reward)
    learner.method = build_method(ReflSettings(StepRange(3, 5)))
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


def test_method_settings_reach_the_engine():
    from alignprop_ray.engine.truncation import Truncation
    from alignprop_ray.train.loop import engine_settings, method_settings

    assert experiment().method.name == "alignprop" and experiment().truncation.describe() == "uniform:0:10"
    draft_k = method_settings(experiment("method={name: draft, k: 3}"))
    assert draft_k.name == "draft" and draft_k.draws == Truncation("fixed", k=3)
    assert method_settings(experiment("method={name: draft, lv_samples: 2}")) == DraftLVSettings(2)
    refl = experiment("method=refl")
    assert refl.method.step_range == (7, 9) and refl.truncation is None  # 3T/4 .. T-1 of T = 10
    assert method_settings(refl) == ReflSettings(StepRange(7, 9))
    ddpo = engine_settings(experiment("method={name: ddpo, clip_range: 2.0e-4}")).method
    assert dataclasses.replace(ddpo, clip_range=1e-4, per_prompt_stats=False) == DDPO
    assert experiment("method=ddpo").flat_params()["method.name"] == "ddpo"


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
        (["method=ddpo", "model.family=sd3"], "method: ddpo needs a DDIM scheduler"),
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


def test_ddpo_trains_on_a_non_differentiable_reward_config():
    cfg = experiment("method=ddpo", "reward={jpeg_compressibility: 1}")
    assert cfg.method.name == "ddpo"


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
    from alignprop_ray.sweep.config import load_sweep

    sweep = load_sweep(ROOT / "sweeps" / "methods.yaml")
    methods = {
        value["name"] if isinstance(value, dict) else value
        for d in sweep.domains
        for value in d.values
        if d.field == "method"
    }
    assert methods == {"alignprop", "draft", "refl", "ddpo"}
    gpu = load_sweep(ROOT / "sweeps" / "methods_sd15.yaml")
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


def test_cost_plots_have_a_line_per_run_colored_by_method():
    from alignprop_ray.report.plots import plot_reward_vs_images, plot_reward_vs_time

    runs, history = cost_tables()
    for plot in (plot_reward_vs_time, plot_reward_vs_images):
        ax = plot(runs, history).axes[0]
        assert len(ax.lines) == 3 and len({str(line.get_color()) for line in ax.lines}) == 3
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alignprop", "draft-LV2", "ddpo"]
    assert plot_reward_vs_time(runs, history[history["key"] == "eval/reward"]) is None


# --- a 2-worker Ray run per method -----------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    ("method", "reward", "own_metrics"),
    [
        ("{name: draft, k: 2}", "saturation", []),
        ("{name: draft, lv_samples: 2}", "saturation", []),
        ("refl", "saturation", ["train/refl/step"]),
        # DDPO needs only reward values: JPEG compressibility, refused by the gradient methods, trains here
        (
            "{name: ddpo, inner_epochs: 2}",
            "compressibility",
            ["train/ddpo/clip_fraction", "train/ddpo/approx_kl"],
        ),
    ],
    ids=["draft-k", "draft-lv", "refl", "ddpo"],
)
def test_two_worker_ray_run_of_each_method(ray_session, tmp_path, method, reward, own_metrics):
    """Each method through the whole stack (Ray Train on 2 workers, MLflow, checkpoints): the workers end with
    the same LoRA weights, the adapter moved, and the method's own metrics and the cost metrics are logged."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from alignprop_ray.config import load_experiment
    from alignprop_ray.train.launch import run_training

    steps = 4
    cfg = load_experiment(
        ROOT / "sweeps" / "tiny.yaml",
        [
            f"method={method}",
            "truncation=null",
            "reward={" + reward + ": 1.0}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"storage.path={tmp_path}/runs",
            "sampling.steps=4",
            "model.resolution=32",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "prompts.train=tiny",
            "prompts.eval=tiny",
        ],
    )
    outcome = run_training(cfg, name="method-run")
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    digests = run.data.tags["alignprop.lora_sha256_by_rank"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]
    for key in ["train/loss", "perf/wall_seconds", "perf/images_generated", *own_metrics]:
        assert [m.step for m in client.get_metric_history(outcome.run_id, key)] == list(
            range(1, steps + 1)
        ), key
    images = [m.value for m in client.get_metric_history(outcome.run_id, "perf/images_generated")]
    assert images == sorted(images) and images[-1] > 0  # cumulative
    adapter = client.download_artifacts(outcome.run_id, "adapter", str(tmp_path / "download"))
    weights = load_file(next(Path(adapter).glob("*.safetensors")))
    assert any(
        float(w.abs().sum()) > 0 for name, w in weights.items() if "lora_B" in name or "lora.up" in name
    )
