"""tests/run_tiers.py, `make test`'s runner: the two tiers cover the suite once, and their statuses combine."""

from __future__ import annotations

import pytest

from tests.run_tiers import NO_TESTS, RAY, REST, exit_status


@pytest.mark.parametrize(
    ("ray", "rest", "status"),
    [
        (0, 0, 0),
        (1, 0, 1),  # a failure in either tier fails the suite
        (0, 1, 1),
        (2, 1, 2),  # the Ray tier's status first
        (NO_TESTS, 0, 0),  # a selection without Ray tests (or without the others) is no failure
        (0, NO_TESTS, 0),
        (NO_TESTS, 1, 1),
        (NO_TESTS, NO_TESTS, NO_TESTS),  # nothing selected at all
    ],
)
def test_a_failing_tier_fails_the_suite_and_an_empty_one_does_not(ray, rest, status):
    assert exit_status(ray, rest) == status


@pytest.mark.parametrize(
    "markers", [set(), {"ray"}, {"own_ray"}, {"slow"}, {"ray", "slow"}, {"soak"}, {"ray", "soak"}]
)
def test_every_test_but_the_soak_tier_is_in_exactly_one_tier(markers):
    def selected(expression: str) -> bool:
        # pytest's -m grammar on these names is Python's `and`/`or`/`not` over "has the marker"
        return eval(expression, {}, {name: name in markers for name in ("ray", "own_ray", "slow", "soak")})

    tiers = [selected(RAY), selected(REST)]
    assert sum(tiers) == (0 if "soak" in markers else 1)
