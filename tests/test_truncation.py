import random
from collections import Counter

import pytest

from alignprop_ray.engine.truncation import Truncation, parse_truncation


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
