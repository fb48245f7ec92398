"""Choosing the best trial under constraints (alignprop_ray/selection.py), on synthetic trial results, and
how a sweep applies it: its rule, the table's marks."""

from __future__ import annotations

import math

import pytest

from alignprop_ray.selection import (
    Constraint,
    SelectionRule,
    TrialResult,
    default_constraints,
    parse_constraint,
    parse_rule,
    select,
)

NOT_COLLAPSED = SelectionRule("eval/reward", "max", default_constraints())


def trial(name, reward, diversity, first_diversity=0.284, completed=True, **more) -> TrialResult:
    final = {"eval/reward": reward, "eval/diversity": diversity, **more}
    return TrialResult(name, final, {"eval/diversity": first_diversity}, completed)


# The demo's four trials as measured (README): full backprop at lr 1e-2 has the highest reward and collapsed.
DEMO = [
    trial("gentle-random", 0.004, 0.270),
    trial("gentle-full", 0.010, 0.265),
    trial("random-1e-2", 0.30, 0.031),
    trial("full-1e-2", 0.40, 0.020),
]


def test_the_collapsed_maximum_is_skipped_and_the_reason_names_the_bound():
    chosen = select(DEMO, NOT_COLLAPSED)
    assert chosen.best.id == "gentle-full" and not chosen.fallback
    assert chosen.plain_best.id == "full-1e-2"  # what a plain maximum would have registered
    assert chosen.broken == {
        "random-1e-2": "collapsed: eval/diversity 0.031 < 0.142",
        "full-1e-2": "collapsed: eval/diversity 0.020 < 0.142",  # 0.5 x the trial's first, 0.284
    }
    best, why_not = chosen.explain()
    assert best.startswith(
        "best trial: gentle-full (eval/reward 0.01): the highest eval/reward of the trials that keep"
    )
    assert why_not == (
        "  not full-1e-2 (eval/reward 0.4, the plain maximum): collapsed: eval/diversity 0.020 < 0.142"
    )


def test_each_trial_is_compared_with_its_own_first_evaluation():
    low_start = trial("low", 0.5, 0.05, first_diversity=0.06)  # never diverse, never collapsed
    fell = trial("fell", 0.9, 0.10, first_diversity=0.30)
    assert select([low_start, fell], NOT_COLLAPSED).best.id == "low"


def test_ties_go_to_the_trial_furthest_inside_its_constraints_then_to_the_earlier_one():
    a, b = trial("a", 0.2, 0.15), trial("b", 0.2, 0.25)
    assert select([a, b], NOT_COLLAPSED).best.id == "b"  # same reward, more of its diversity kept
    twins = [trial("x", 0.2, 0.25), trial("y", 0.2, 0.25)]
    assert select(twins, NOT_COLLAPSED).best.id == "x"
    assert select(twins[::-1], NOT_COLLAPSED).best.id == "y"
    lowest = SelectionRule("eval/loss", "min")
    rows = [TrialResult("p", {"eval/loss": 1.0}), TrialResult("q", {"eval/loss": 0.5})]
    assert select(rows, lowest).best.id == "q"


def test_no_qualifying_trial_falls_back_to_the_one_that_misses_the_constraints_least():
    collapsed = [trial("deep", 0.4, 0.02), trial("shallow", 0.1, 0.12), trial("middle", 0.3, 0.08)]
    chosen = select(collapsed, NOT_COLLAPSED)
    assert chosen.fallback and chosen.best.id == "shallow"  # 0.12 is closest to the bound 0.142
    head = chosen.explain()[0]
    assert head.startswith("no trial keeps eval/diversity >= 0.5 x first: falling back to the one that")
    assert "shallow: collapsed: eval/diversity 0.120 < 0.142" in head


def test_completed_trials_come_first_and_unusable_values_break_constraints():
    cut = trial("cut", 0.9, 0.25, completed=False)  # a scheduler stopped it: ranked after completed ones
    done = trial("done", 0.1, 0.25)
    assert select([cut, done], NOT_COLLAPSED).best.id == "done"
    assert select([cut], NOT_COLLAPSED).best.id == "cut"
    nan = trial("nan", math.nan, 0.25)
    assert select([nan], NOT_COLLAPSED).best is None  # nothing to rank
    unlogged = TrialResult("u", {"eval/reward": 1.0, "eval/diversity": 0.2})  # no first evaluation
    chosen = select([unlogged, trial("ok", 0.0, 0.2)], NOT_COLLAPSED)
    assert chosen.best.id == "ok"
    assert chosen.broken["u"] == "unchecked: eval/diversity: no first evaluation to compare with"


def test_constraints_relative_to_first_absolute_and_on_held_out_rewards():
    rule = SelectionRule(
        "eval/reward",
        "max",
        (parse_constraint("eval/heldout/clip_score >= first - 0.01"), parse_constraint("eval/vendi >= 1.5")),
    )
    first = {"eval/heldout/clip_score": 0.30}
    fell = TrialResult(
        "fell", {"eval/reward": 0.9, "eval/heldout/clip_score": 0.28, "eval/vendi": 1.9}, first
    )
    kept = TrialResult(
        "kept", {"eval/reward": 0.5, "eval/heldout/clip_score": 0.295, "eval/vendi": 1.6}, first
    )
    alike = TrialResult(
        "alike", {"eval/reward": 0.7, "eval/heldout/clip_score": 0.31, "eval/vendi": 1.2}, first
    )
    chosen = select([fell, kept, alike], rule)
    assert chosen.best.id == "kept"
    assert chosen.broken == {
        "fell": "breaks: eval/heldout/clip_score 0.280 < 0.290",
        "alike": "collapsed: eval/vendi 1.200 < 1.500",
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("eval/diversity >= 0.5 x first", Constraint("eval/diversity", ">=", 0.0, 0.5)),
        ("eval/diversity>=0.5*first", Constraint("eval/diversity", ">=", 0.0, 0.5)),
        ("eval/heldout/clip_score >= first - 0.01", Constraint("eval/heldout/clip_score", ">=", -0.01, 1.0)),
        ("train/loss < 2e-1", Constraint("train/loss", "<", 0.2)),
        ("eval/vendi > 1.5 x first + 0.1", Constraint("eval/vendi", ">", 0.1, 1.5)),
    ],
)
def test_constraint_forms(text, expected):
    assert parse_constraint(text) == expected
    assert parse_constraint(str(expected)) == expected  # its canonical text reads back


def test_rule_text_reads_back_and_the_default_follows_the_collapse_stopper():
    assert str(NOT_COLLAPSED) == "eval/reward max; eval/diversity >= 0.5 x first"
    assert parse_rule(str(NOT_COLLAPSED)) == NOT_COLLAPSED
    assert default_constraints("eval/vendi", 1.2, 0.25) == (
        Constraint("eval/vendi", ">=", 1.2),
        Constraint("eval/vendi", ">=", 0.0, 0.25),
    )
    with pytest.raises(ValueError):
        parse_rule("eval/reward upward")
