import math
import random
from collections import Counter

import pytest

from alignprop_ray.engine.truncation import (
    RedrawZero,
    Truncation,
    grad_steps,
    parse_truncation,
    positive_k_problem,
)


def chi_square(counts: Counter, expected: dict[int, float], n: int) -> float:
    """Pearson's statistic of `counts` (n draws) against the probabilities `expected` (all its support)."""
    assert set(counts) <= set(expected), set(counts) - set(expected)
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fixed:10", Truncation("fixed", k=10)),
        (10, Truncation("fixed", k=10)),
        ("uniform:0:50", Truncation("uniform", low=0, high=50)),
        ({"kind": "uniform", "low": 0, "high": 50}, Truncation("uniform", low=0, high=50)),
        ("normal:25:10", Truncation("normal", mean=25, std=10)),
        ({"kind": "normal", "mean": 25, "std": 10}, Truncation("normal", mean=25, std=10)),
        ("full", Truncation("full")),
        ({"kind": "full"}, Truncation("full")),
        ("gaussian_index:42:5", Truncation("gaussian_index", mean=42, std=5)),
        ({"kind": "gaussian_index", "mean": 42, "std": 5}, Truncation("gaussian_index", mean=42, std=5)),
        ("per_step:0:50", Truncation("per_step", low=0, high=50)),
        ({"kind": "per_step", "low": 0, "high": 50}, Truncation("per_step", low=0, high=50)),
    ],
)
def test_parse_short_and_mapping_forms(spec, expected):
    parsed = parse_truncation(spec)
    assert parsed == expected
    assert parse_truncation(parsed.describe()) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("beta:1:2", "unknown truncation"),
        ("uniform:5", "takes 2 value"),
        ("uniform:9:3", "low <= high"),
        ("fixed:-1", ">= 0"),
        ("fixed:x", "must be numbers"),
        ("fixed:2.5", "must be numbers"),
        ({"kind": "uniform", "low": 0}, "missing"),
        ({"kind": "fixed", "k": 1, "extra": 2}, "unknown field"),
        ({"kind": "nope"}, "truncation.kind"),
        (True, "expected a truncation spec"),
        ("normal:5:-1", "std >= 0"),
        ("gaussian_index:42", "takes 2 value"),
        ("gaussian_index:nan:5", "finite mean"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_truncation(spec)


def test_k_larger_than_steps_is_an_error():
    parse_truncation("uniform:0:20").validate(20)
    parse_truncation("full").validate(20)
    with pytest.raises(ValueError, match="K > T"):
        parse_truncation("fixed:21").validate(20)
    with pytest.raises(ValueError, match="K > T"):
        parse_truncation("uniform:0:50").validate(20)


def test_uniform_is_uniform_over_its_inclusive_range():
    rng, dist, n = random.Random(0), parse_truncation("uniform:2:6"), 20_000
    counts = Counter(dist.draw(50, rng) for _ in range(n))
    assert set(counts) == {2, 3, 4, 5, 6}
    # chi-square, 4 degrees of freedom: 18.5 is the 0.999 quantile
    chi2 = sum((c - n / 5) ** 2 / (n / 5) for c in counts.values())
    assert chi2 < 18.5


def test_normal_is_rounded_clipped_and_centred():
    rng, steps = random.Random(0), 20
    draws = [parse_truncation("normal:10:3").draw(steps, rng) for _ in range(20_000)]
    assert all(isinstance(k, int) and 0 <= k <= steps for k in draws)
    mean = sum(draws) / len(draws)
    std = (sum((k - mean) ** 2 for k in draws) / len(draws)) ** 0.5
    assert abs(mean - 10) < 0.1 and abs(std - 3) < 0.1  # standard error of the mean ~0.02
    clipped = [parse_truncation("normal:19:5").draw(steps, rng) for _ in range(5_000)]
    assert max(clipped) == steps and sum(k == steps for k in clipped) > 1000  # P(x >= 19.5) ~ 0.46


def test_fixed_and_full_are_constant():
    rng = random.Random(0)
    assert {parse_truncation("fixed:3").draw(20, rng) for _ in range(100)} == {3}
    assert {parse_truncation("full").draw(20, rng) for _ in range(100)} == {20}


# --- the official v2 code's draw (mihirp1998/AlignProp sd_pipeline.py:131-139) --------------------------


def official_v2_detach_index(mean: float, std: float, num_inference_steps: int) -> int:
    """The official code's loop, with its torch sampler: the index below which noise predictions are
    detached (`if i < backprop_timestep: noise_pred = noise_pred.detach()`)."""
    import torch

    backprop_timestep = -1
    while backprop_timestep >= num_inference_steps or backprop_timestep < 1:
        backprop_timestep = int(torch.distributions.Normal(mean, std).sample().item())
    return backprop_timestep


def test_gaussian_index_is_the_official_v2_draw():
    """K = T - index: the official draw (torch) and ours (Python's random) against the distribution both
    should have: int() of N(42, 5), kept once it lands in 1..49; the last T - index steps carry gradient."""
    import torch

    torch.manual_seed(0)
    steps, n = 50, 20_000
    official = Counter(steps - official_v2_detach_index(42, 5, steps) for _ in range(n))
    ours = Counter(
        Truncation("gaussian_index", mean=42, std=5).draw(steps, random.Random(s)) for s in range(n)
    )
    # P(index = i) = P(i <= x < i + 1) for x ~ N(42, 5), renormalized over i = 1..49 (written out here, not
    # taken from the code under test); K = 50 - i.
    cdf = lambda x: 0.5 * (1 + math.erf((x - 42) / (5 * math.sqrt(2))))  # noqa: E731
    mass = {steps - i: cdf(i + 1) - cdf(i) for i in range(1, steps)}
    expected = {k: p / sum(mass.values()) for k, p in mass.items()}
    assert Truncation("gaussian_index", mean=42, std=5).probabilities(steps) == pytest.approx(expected)
    # K = 1..18 one bin each (>= 250 expected draws), K >= 19 pooled (P ~ 0.02): 18 degrees of freedom,
    # whose 0.999 quantile is 42.3.
    bins = {**{k: expected[k] for k in range(1, 19)}, 19: sum(p for k, p in expected.items() if k >= 19)}
    for counts in (official, ours):
        assert set(counts) <= set(range(1, steps))
        assert chi_square(pool(counts), bins, n) < 42.3
    assert abs(sum(k * c for k, c in ours.items()) / n - sum(k * p for k, p in expected.items())) < 0.1


def pool(counts: Counter, top: int = 19) -> Counter:
    """`counts` with every K >= top counted as `top`."""
    pooled = Counter()
    for k, c in counts.items():
        pooled[min(k, top)] += c
    return pooled


def test_gaussian_index_needs_a_chain_its_index_can_land_in():
    Truncation("gaussian_index", mean=42, std=5).validate(50)
    Truncation("gaussian_index", mean=5, std=2).validate(10)
    with pytest.raises(ValueError, match="lands in 1..9 with probability"):
        Truncation("gaussian_index", mean=42, std=5).validate(10)  # the official mean with T=10
    with pytest.raises(ValueError, match="lands in 1..0"):
        Truncation("gaussian_index", mean=0.5, std=1).validate(1)


def test_exact_probabilities_match_draws():
    """`probabilities` (used to validate train.k0: redraw) against the draws of each kind."""
    for spec, steps in (
        ("uniform:0:6", 6),
        ("normal:2:3", 6),
        ("fixed:3", 6),
        ("full", 6),
        ("per_step:0:6", 6),
    ):
        dist, rng, n = parse_truncation(spec), random.Random(1), 20_000
        expected = dist.probabilities(steps)
        assert sum(expected.values()) == pytest.approx(1.0)
        counts = Counter(grad_steps(dist.draw(steps, rng)) for _ in range(n))
        assert chi_square(counts, expected, n) < 24.3  # at most 6 degrees of freedom: the 0.9995 quantile
    # normal:2:3 with T=6: K=0 collects everything below 0.5 (Phi(-0.5) = 0.3085)
    assert parse_truncation("normal:2:3").probabilities(6)[0] == pytest.approx(0.3085, abs=1e-4)


def test_redraw_zero_is_the_distribution_conditioned_on_k_at_least_one():
    rng, n = random.Random(2), 20_000
    counts = Counter(RedrawZero(parse_truncation("uniform:0:4")).draw(4, rng) for _ in range(n))
    assert set(counts) == {1, 2, 3, 4}
    assert chi_square(counts, dict.fromkeys(range(1, 5), 0.25), n) < 16.3  # 3 d.o.f., the 0.999 quantile
    assert positive_k_problem(parse_truncation("uniform:0:4"), 4) is None
    assert "probability 0" in positive_k_problem(parse_truncation("fixed:0"), 4)
    assert "would not end" in positive_k_problem(parse_truncation("normal:-20:3"), 10)


def test_per_step_draws_each_steps_index_as_the_v1_code_does():
    """main.py:480-489 (and TRL): per step i, d = random.randint(low, high); step i keeps its gradient iff
    i >= d. The same stream of draws gives the same mask."""
    steps, reference = 50, random.Random(7)
    expected = tuple(not i < reference.randint(0, 50) for i in range(steps))
    assert parse_truncation("per_step:0:50").draw(steps, random.Random(7)) == expected
    # step i carries gradient with probability (i + 1) / 51: the last step almost always, the first rarely
    masks = [parse_truncation("per_step:0:50").draw(steps, random.Random(s)) for s in range(4000)]
    for i in (0, 25, 49):
        assert abs(sum(m[i] for m in masks) / 4000 - (i + 1) / 51) < 0.03
    redrawn = RedrawZero(parse_truncation("per_step:0:2")).draw(2, random.Random(0))
    assert grad_steps(redrawn) >= 1
