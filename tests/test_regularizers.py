"""train.kl_weight (DPOK's KL-to-base penalty) and train.ema_decay (an EMA of the LoRA weights): the term is
0 at initialization, its gradient is the derivative of what it computes (float64 finite differences), and
the EMA follows its recurrence, is what evaluation and saving see, and
resumes exactly (engine/regularizers.py)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignprop_ray.engine.methods import build_method
from alignprop_ray.engine.methods.base import Batch
from alignprop_ray.engine.methods.configs import AlignPropConfig
from alignprop_ray.engine.regularizers import KLAccumulator, LoraEMA
from alignprop_ray.rewards.base import RewardOutput
from tests.helpers import (
    assert_resumes_exactly,
    lora_settings,
    perturb,
    sampler_settings,
)

PROMPTS, SEEDS = ["a cat", "a dog"], [3, 4]
ROOT = Path(__file__).resolve().parents[1]


def zero_reward(images, prompts):
    """A reward of 0 that keeps the images' graph: the loss is the KL term alone."""
    value = images.mean(dim=(1, 2, 3)) * 0.0
    return RewardOutput(value, {"zero": value})


@pytest.mark.slow
def test_kl_term_is_zero_at_init_and_its_gradient_matches_float64_finite_differences():
    """LoRA B = 0: the adapted denoiser is the base one and the term is exactly 0. With B != 0, the gradient
    AlignProp backpropagates for train.kl_weight x the term, with K = T = 2 (so no truncated part of the chain
    depends on the weights), equals central finite differences of the loss it reports, along a random
    direction, in float64: at the first step x_t carries no graph (as at ReFL's and DRaFT-LV's one step), at
    the second it does (the pathwise derivative through the base call too), and both calls are checkpointed,
    whose recompute switches the adapter off again. The term's other methods and families:
    tests/test_methods.py::test_draft_lv_and_refl_step_other_families."""
    config, draw = AlignPropConfig(), 2
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts

    parts = load_parts("tiny").to("cpu", torch.float64)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    for p in params:
        p.data = p.data.double()
    sampler = sampler_settings(steps=2, guidance_scale=5.0, checkpoint=True)
    weight = 0.7
    engine = SimpleNamespace(
        parts=parts,
        sampler=sampler,
        resolution=32,
        autocast=nullcontext,
        reward=zero_reward,
        kl_weight=weight,
        kl_term=lambda: KLAccumulator(parts, sampler.guidance_scale),
    )
    method, batch = build_method(config), Batch(PROMPTS, SEEDS)

    def loss() -> float:
        with torch.no_grad():
            return method.micro_batch(engine, 0, batch, draw, lambda _: None).loss

    assert loss() == 0.0  # B = 0
    perturb(params, scale=0.05)
    out = method.micro_batch(engine, 0, batch, draw, lambda total: total.backward())
    assert out.kl > 0 and out.loss == pytest.approx(weight * out.kl)
    gradient = [p.grad.clone() for p in params]
    gen, eps = torch.Generator().manual_seed(1), 1e-6
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(gradient, direction, strict=True))
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        values.append(loss())
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6), (analytic, numeric)


def test_ema_follows_its_recurrence_and_is_what_the_block_sees():
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    ema = LoraEMA(params, decay=0.9)
    with torch.no_grad():
        for p in params:
            p.add_(10.0)
    ema.update()
    expected = [0.9 * torch.tensor([1.0, 2.0]) + 0.1 * torch.tensor([11.0, 12.0]), torch.tensor([[4.0]])]
    assert all(torch.allclose(w, e) for w, e in zip(ema.weights, expected, strict=True))
    trained = [p.detach().clone() for p in params]
    with ema.applied():
        assert all(torch.equal(p, w) for p, w in zip(params, ema.weights, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(params, trained, strict=True))  # back, bit for bit
    state = ema.state_dict()
    other = LoraEMA([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.weights, ema.weights, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(other.params, trained, strict=True))


@pytest.mark.slow
def test_kl_and_ema_resume_exactly_and_the_checkpoint_adapter_is_the_average(tmp_path):
    """A run with both: tests/helpers.py `assert_resumes_exactly` (the adapter, the method state and the EMA
    bit for bit); train/kl is 0 at the first step and in train/loss after; the checkpoint's adapter holds the
    EMA, the training state the trained weights."""
    from peft.utils import get_peft_model_state_dict

    from alignprop_ray.config import load_experiment
    from alignprop_ray.engine.lora import read_adapter
    from alignprop_ray.train.build import build_learner, plan_training_step
    from alignprop_ray.train.checkpoint import ADAPTER, Progress, write_checkpoint
    from alignprop_ray.train.loop import step_metrics

    cfg = load_experiment(
        ROOT / "sweeps" / "tiny.yaml",
        [
            "truncation=full",
            "sampling.steps=2",
            "model.resolution=32",
            "train.batch_size=1",
            "train.kl_weight=0.5",
            "train.ema_decay=0.8",
        ],
    )
    assert_resumes_exactly(cfg, tmp_path)
    learner = build_learner(cfg, torch.device("cpu"))
    first, second = (learner.train_step(*plan_training_step(cfg, PROMPTS, step)) for step in (0, 1))
    assert first.updated and first.kl == 0.0  # B = 0 at the first step: train/kl, logged
    assert second.kl > 0 and second.loss == pytest.approx(-second.reward + 0.5 * second.kl, rel=1e-5)
    assert step_metrics(second, learner, 1.0, Progress(step=2, run_id="r"), 1)["train/kl"] == second.kl
    (tmp_path / "own").mkdir()
    directory = write_checkpoint(learner, Progress(step=1, run_id="r"), tmp_path / "own")
    saved = read_adapter(directory / ADAPTER).state
    with learner.evaluation_weights():
        average = {k: v.clone() for k, v in get_peft_model_state_dict(learner.parts.denoiser).items()}
    trained = get_peft_model_state_dict(learner.parts.denoiser)
    assert saved.keys() == average.keys()
    assert all(torch.equal(saved[k], average[k].float()) for k in saved)
    assert any(not torch.equal(saved[k], trained[k]) for k in saved if ".lora_B." in k)
