"""tests/run_tiers.py, `make test`'s runner: the two tiers cover the suite once, and their statuses combine."""

from __future__ import annotations

import json

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


def test_the_cpu_profile_charges_a_ray_test_the_machines_cpu_less_the_other_tiers(tmp_path):
    """tests/cpu_profile.py's summary: a Ray test is the machine's busy CPU over it less what the rest tier used
    meanwhile (its samples interpolated); a rest test is its own. The rest tier's samples come from its xdist
    controller, its tests from each worker's file."""
    from tests.cpu_profile import summary

    ray = [{"test": "tests/test_a.py::test_run", "t0": 10.0, "t1": 20.0, "busy": 18.0, "own": 0.5}]
    rest = [{"t": t, "own": t} for t in (0.0, 15.0, 30.0)]  # one core busy: 10 CPU-s within the window
    gw0 = [{"test": "tests/test_b.py::test_unit", "t0": 0.0, "t1": 30.0, "busy": 50.0, "own": 20.0}]
    gw1 = [{"test": "tests/test_c.py::test_unit", "t0": 0.0, "t1": 5.0, "busy": 9.0, "own": 4.0}]
    for name, records in (("ray", ray), ("rest", rest), ("rest.gw0", gw0), ("rest.gw1", gw1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = summary(tmp_path).splitlines()
    assert lines[0] == "ray tier: 1 tests, 8 CPU-s"  # 18 busy - 10 of the rest's
    assert "       8       10  tests/test_a.py::test_run" in lines
    assert "rest tier: 2 tests, 24 CPU-s" in lines
