"""`alignprop-ray compare FILE [--set ...]`: the comparison protocol (sweep/protocol.py), round by round.

    selection round: per method, a sweep over compare.lr_scales at seed compare.seeds[0]
        -> the sweep's own selection picks the method's scale (best objective among trials not collapsed)
    seeds round:     per method, a sweep at the picked scale over compare.seeds[1:]
        -> the runs at the picked scale (the selection trial included) are tagged as the comparison's

Rerunning the command continues: a round whose sweep finished is read back, not run again; an interrupted
one is resumed (`sweep --resume`'s rules: the same settings). `alignprop-ray report` then draws each
method's eval reward against training seconds and images, the seeds' spread as a band.

MLflow tags, on every trial's run: `alignprop.compare` (the comparison), `alignprop.compare.method` (the
method's label), `alignprop.compare.round` (select or seeds), and `alignprop.compare.final=true` on the
runs at the picked scale; on each selection sweep's parent run, `alignprop.compare.lr_scale` (the pick).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignprop_ray.console import quiet_console
from alignprop_ray.sweep.protocol import SEEDS, SELECT, Comparison
from alignprop_ray.sweep.summary import SweepOutcome
from alignprop_ray.tracking import (
    COMPARE_FINAL_TAG,
    COMPARE_METHOD_TAG,
    COMPARE_PICK_TAG,
    COMPARE_ROUND_TAG,
    COMPARE_TAG,
)

SCALE, SEED = "train.lr_scale", "train.seed"


@dataclass
class Pick:
    """A method's lr scale, as its selection round's sweep chose it (None: no trial has a result)."""

    label: str
    scale: float | None
    why: list[str]  # the selection's explanation (Selection.explain)
    fallback: bool = False  # no trial kept the rule: the one that missed it least


@dataclass
class ComparisonOutcome:
    name: str
    tracking_uri: str
    experiment: str
    picks: dict[str, Pick] = field(default_factory=dict)
    final: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> rows at the pick
    interrupted: bool = False
    failed: bool = False  # a trial failed, or a method has no pick

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)


def cmd_compare(args: argparse.Namespace) -> int:
    from alignprop_ray.sweep.protocol import load_comparison
    from alignprop_ray.train.launch import ray_of_this_command

    comparison = load_comparison(args.config, args.overrides)
    with quiet_console(verbose=args.verbose), ray_of_this_command():
        outcome = run_comparison(comparison)
    print_summary(outcome, comparison, f"alignprop-ray compare {args.config}")
    return outcome.exit_code


def run_comparison(comparison: Comparison, say: Callable[[str], None] = print) -> ComparisonOutcome:
    """Both rounds for every method; stops at an interrupted round (rerunning continues there)."""
    reference = comparison.selection_sweep(0).reference
    outcome = ComparisonOutcome(comparison.name, reference.tracking.uri, reference.tracking.experiment)
    say(header(comparison))
    selection_rows = {}
    for index, label in enumerate(comparison.labels):
        sweep = comparison.selection_sweep(index)
        result = run_round(sweep, say)
        pick = pick_scale(label, result)
        outcome.picks[label] = pick
        selection_rows[label] = [r for r in result.rows if _same(r.get(SCALE), pick.scale)]
        tag_round(result, comparison.name, label, SELECT, pick.scale)
        say(f"# {label}: lr_scale {_scale(pick.scale)} ({'; '.join(pick.why) or 'no trial has a result'})")
        outcome.failed |= result.exit_code != 0 or pick.scale is None
        if result.interrupted:
            outcome.interrupted = True
            return outcome
    for index, label in enumerate(comparison.labels):
        pick = outcome.picks[label]
        if pick.scale is None:
            continue
        result = run_round(comparison.seeds_sweep(index, pick.scale), say)
        tag_round(result, comparison.name, label, SEEDS, pick.scale)
        outcome.final[label] = selection_rows[label] + result.rows
        outcome.failed |= result.exit_code != 0
        if result.interrupted:
            outcome.interrupted = True
            return outcome
    return outcome


def header(comparison: Comparison) -> str:
    reference = comparison.selection_sweep(0)
    budget = reference.reference.train.max_wall_seconds
    methods = len(comparison.labels)
    trials = methods * (len(comparison.scales) + len(comparison.seeds) - 1)
    return "\n".join(
        [
            f"# comparison {comparison.name}: {methods} methods, {trials} trials of {budget:g} s of training "
            "steps each",
            f"#   methods: {', '.join(comparison.labels)}",
            f"#   selection round: train.lr_scale {comparison.scales} x each method's reference lr, seed "
            f"{comparison.seeds[0]}; picked by {reference.selection_rule}",
            f"#   seeds round: the picked scale, seeds {comparison.seeds[1:]} (seed {comparison.seeds[0]}: the "
            "selection trial at that scale)",
        ]
    )


def run_round(sweep, say: Callable[[str], None]) -> SweepOutcome:
    """The round's sweep: read back if it finished before, else run (or resume) it; prints its table."""
    from alignprop_ray.sweep.launch import can_resume, finished_outcome, run_sweep
    from alignprop_ray.sweep.summary import format_table

    outcome = finished_outcome(sweep)
    if outcome is not None:
        say(f"# sweep {sweep.name}: finished earlier, not run again")
    else:
        outcome = run_sweep(sweep, resume=can_resume(sweep), say=say)
    say(format_table(outcome.rows, sweep))
    return outcome


def pick_scale(label: str, outcome: SweepOutcome) -> Pick:
    """The scale of the trial the round's sweep chose (its selection rule: not collapsed, by default)."""
    selection = outcome.selection
    if outcome.best is None or selection is None:
        return Pick(label, None, [])
    why = [line.strip() for line in selection.explain()]
    return Pick(label, float(outcome.best[SCALE]), why, selection.fallback)


def tag_round(outcome: SweepOutcome, name: str, label: str, round_: str, scale: float | None) -> None:
    """Tag the round's runs as the comparison's; those at the picked scale as its final runs."""
    from alignprop_ray import tracking

    client = tracking.client(outcome.tracking_uri)
    if round_ == SELECT and scale is not None:
        client.set_tag(outcome.parent_run_id, COMPARE_PICK_TAG, f"{scale:g}")
    for row in outcome.rows:
        if not row.get("run_id"):
            continue
        tags = {COMPARE_TAG: name, COMPARE_METHOD_TAG: label, COMPARE_ROUND_TAG: round_}
        if _same(row.get(SCALE), scale):
            tags[COMPARE_FINAL_TAG] = "true"
        for key, value in tags.items():
            client.set_tag(row["run_id"], key, value)


def print_summary(outcome: ComparisonOutcome, comparison: Comparison, command: str) -> None:
    """Per method: the scale picked and why, and each seed's final objective at it."""
    metric = comparison.selection_sweep(0).selection_rule.metric
    print(f"\ncomparison {outcome.name} ({metric} at the end of each run):")
    for label in comparison.labels:
        pick = outcome.picks.get(label)
        if pick is None:
            print(f"  {label}: not run yet")
            continue
        rows = sorted(outcome.final.get(label, []), key=lambda r: r.get(SEED, 0))
        seeds = ", ".join(f"seed {r.get(SEED)}: {_value(r.get(metric))} ({r['status']})" for r in rows)
        note = " (no trial kept the rule: the least broken)" if pick.fallback else ""
        print(f"  {label}: lr_scale {_scale(pick.scale)}{note}; {seeds or 'seeds round not run'}")
    if outcome.interrupted:
        print(f"\ninterrupted: continue with `{command}`", file=sys.stderr)
        return
    print(
        f"\nthe plots and the table with each figure's spread: alignprop-ray report --tracking-uri "
        f"{outcome.tracking_uri} --experiment {outcome.experiment} --out {outcome.name}-report/"
    )


def _same(value: Any, scale: float | None) -> bool:
    return scale is not None and value is not None and abs(float(value) - scale) <= 1e-12 * max(1.0, scale)


def _scale(scale: float | None) -> str:
    return "-" if scale is None else f"{scale:g}"


def _value(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"
