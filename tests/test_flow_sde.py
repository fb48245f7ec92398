"""Flow-GRPO's SDE sampler (engine/flow_sde.py) against the paper's equations, written out again here in
float64 in a different form (through the score), against diffusers' Euler step, and against distributions
with known marginals; the KL and the group advantages against hand-computed values."""

import math

import pytest
import torch

from alignprop_ray.engine.flow_sde import (
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    sde_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(steps: int = 10):
    """SD3's scheduler (shift 3) set for `steps` steps: its sigmas run 1 = t_0 > ... > t_T = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def paper_step(x, v, x_next, sigmas: list[float], i: int, a: float):
    """Flow-GRPO, Section 4, in float64: the reverse SDE dx = (v - sigma_t^2 / 2 * score) dt + sigma_t dw with
    the rectified flow's score -(x + (1 - t) v) / t, discretized by Euler-Maruyama; sigma_t = a sqrt(t / (1 - t)),
    with the next sigma in the denominator at t = 1 (the authors' code). Returns (mean, std, log_prob)."""
    t, t_next = sigmas[i], sigmas[i + 1]
    sigma_t = a * math.sqrt(t / (1 - (sigmas[1] if t == 1.0 else t)))
    dt = t_next - t
    score = -(x + (1 - t) * v) / t
    mean = x + (v - 0.5 * sigma_t**2 * score) * dt
    std = sigma_t * math.sqrt(-dt)
    log_density = -0.5 * ((x_next - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))
    return mean, std, log_density.flatten(1).mean(dim=1)


@pytest.mark.parametrize("noise_level", [0.7, 0.3, 1.0])
def test_every_step_matches_the_papers_equations_in_float64(noise_level):
    """Mean, std and log-probability at each of 10 SD3 steps, the first (t = 1) included, to 1e-6; both when
    the step draws x_next and when it scores a given one. Float32 inputs (as training runs) to 1e-5."""
    scheduler = schedule(10)
    sigmas = scheduler.sigmas.double()
    assert sigmas[0] == 1.0  # the first step is the one the formula cannot take as written
    gen = torch.Generator().manual_seed(0)
    for i in range(len(scheduler.timesteps)):
        x, v = (torch.randn(3, 16, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        drawn = sde_step(sigmas, i, v, x, noise_level, generator=torch.Generator().manual_seed(i))
        mean, std, log_prob = paper_step(x, v, drawn.prev_sample, sigmas.tolist(), i, noise_level)
        torch.testing.assert_close(drawn.mean, mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(drawn.std.expand_as(x), torch.full_like(x, std), rtol=0, atol=1e-6)
        torch.testing.assert_close(drawn.log_prob, log_prob, rtol=0, atol=1e-6)
        # the noise actually has the step's std: x_next - mean is std x a standard normal draw
        noise = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        torch.testing.assert_close(drawn.prev_sample, mean + std * noise, rtol=0, atol=1e-6)

        given = torch.randn(3, 16, 4, 4, generator=gen, dtype=torch.float64)
        scored = sde_step(sigmas, i, v, x, noise_level, prev_sample=given)
        torch.testing.assert_close(
            scored.log_prob, paper_step(x, v, given, sigmas.tolist(), i, noise_level)[2], rtol=0, atol=1e-6
        )
        single = sde_step(scheduler.sigmas, i, v.float(), x.float(), noise_level, prev_sample=given.float())
        torch.testing.assert_close(single.log_prob.double(), scored.log_prob, rtol=1e-5, atol=1e-5)


def test_the_first_step_uses_the_next_sigma_in_its_denominator():
    scheduler = schedule(10)
    x = v = torch.zeros(1, 4, 2, 2)
    first = sde_step(scheduler.sigmas, 0, v, x, noise_level=0.7)
    t1 = float(scheduler.sigmas[1])
    assert float(first.sigma_t) == pytest.approx(0.7 * math.sqrt(1 / (1 - t1)), rel=1e-6)
    assert float(first.std) == pytest.approx(0.7 * math.sqrt(1 / (1 - t1)) * math.sqrt(1 - t1), rel=1e-6)
    assert torch.isfinite(first.log_prob).all()


def test_at_noise_level_0_the_step_is_the_schedulers_euler_step():
    """Bit for bit, at every step of diffusers' FlowMatchEulerDiscreteScheduler.step."""
    scheduler = schedule(10)
    gen = torch.Generator().manual_seed(1)
    for i, t in enumerate(scheduler.timesteps):
        x, v = (torch.randn(2, 16, 8, 8, generator=gen) for _ in range(2))
        ode = sde_step(scheduler.sigmas, i, v, x, noise_level=0.0)
        assert torch.equal(ode.prev_sample, scheduler.step(v, t, x, return_dict=False)[0])
        assert ode.log_prob is None  # a deterministic step has no density


def test_the_sde_keeps_the_odes_marginals():
    """Gaussian data x0 ~ N(0, 0.5^2), whose exact velocity is known: from pure noise, 200 SDE steps at
    noise level 0.7 pass through the interpolation's variances (1 - t)^2 0.25 + t^2 and end at 0.25, as the
    ODE does. A wrong drift correction (a sign, a factor) would not: measured, 1-2% off at 200 steps
    (Euler-Maruyama's error, which shrinks with more steps), 3% allowed."""
    scheduler = schedule(200)
    sigmas = scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(2)
    data_var = 0.25
    x = torch.randn(50_000, 1, generator=gen, dtype=torch.float64)
    for i in range(200):
        t = float(sigmas[i])
        velocity = x * (t - (1 - t) * data_var) / ((1 - t) ** 2 * data_var + t**2)  # E[x1 - x0 | x_t]
        x = sde_step(sigmas, i, velocity, x, noise_level=0.7, generator=gen).prev_sample
        t_next = float(sigmas[i + 1])
        if i in (50, 100, 150, 199):
            assert float(x.var()) == pytest.approx((1 - t_next) ** 2 * data_var + t_next**2, rel=0.03), i


def test_log_prob_is_the_gaussian_density_averaged_over_elements():
    gen = torch.Generator().manual_seed(3)
    x, mean = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    std = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)
    expected = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    mean.requires_grad_(True)
    x.requires_grad_(True)
    gaussian_log_prob(x, mean, std).sum().backward()
    assert x.grad is None and mean.grad.abs().sum() > 0  # the sample is data; the mean carries the gradient


def test_kl_of_equal_variance_gaussians_by_hand():
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mean_ref = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    std = torch.tensor([[0.5], [2.0]])
    # sample 0: differences (0, 2), variance 0.25 -> (0 + 4 / 0.5) / 2 = 4; sample 1: (0, -1), variance 4
    # -> (0 + 1 / 8) / 2 = 0.0625
    assert gaussian_kl(mean, mean_ref, std).tolist() == [4.0, 0.0625]
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std)
    )
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std), exact.mean(dim=1))
    assert gaussian_kl(mean, mean, std).tolist() == [0.0, 0.0]


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 4.0, 8.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 5, 5])  # any ids; groups need not be sorted or equal in size
    root = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    expected = [-1 / (root + 1e-4), 0.0, 1 / (root + 1e-4), 0.0, 0.0, 0.0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)]
    torch.testing.assert_close(group_advantages(rewards, groups), torch.tensor(expected))
    shuffled = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    torch.testing.assert_close(
        group_advantages(rewards[shuffled], groups[shuffled]), torch.tensor(expected)[shuffled]
    )
    # global std: the population std of all eight rewards (mean 6, squared deviations sum to 106)
    spread = math.sqrt(106 / 8)
    expected_global = [
        (r - m) / (spread + 1e-4) for r, m in zip(rewards.tolist(), [2, 2, 2, 10, 10, 10, 6, 6], strict=True)
    ]
    torch.testing.assert_close(
        group_advantages(rewards, groups, global_std=True), torch.tensor(expected_global)
    )
