"""Choosing among trials: the objective's best among those that keep every constraint, and the Pareto front.

Plain functions of plain data (no Ray, no MLflow, no torch): the sweep summary, the report and any other
code that compares runs (e.g. picking each method's learning rate) call the same rule.

    rule = SelectionRule("eval/reward", "max", parse_constraints(["eval/diversity >= 0.5 x first"]))
    chosen = select([TrialResult("a", final={...}, first={...}), ...], rule)
    chosen.best, chosen.broken, chosen.explain()

A constraint compares a trial's final value of a metric with a number, or with its own first evaluation
(the base model's, step 0): `eval/diversity >= 0.5 x first`, `eval/heldout/clip_score >= first - 0.01`,
`eval/vendi >= 2`. The default rule of a sweep ("not collapsed") is `default_constraints`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

OPS = (">=", "<=", ">", "<")
NEGATED = {">=": "<", "<=": ">", ">": "<=", "<": ">="}
DIVERSITY_METRIC = "eval/diversity"
DEFAULT_RELATIVE = 0.5  # the default rule keeps trials whose diversity kept half its first value
COLLAPSE_METRICS = ("eval/diversity", "eval/vendi")  # a trial breaking a constraint on these "collapsed"
CONSTRAINT_FORMS = (
    "'eval/diversity >= 0.5 x first', 'eval/heldout/clip_score >= first - 0.01', 'eval/vendi >= 2'"
)

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CONSTRAINT = re.compile(r"^\s*(?P<metric>[^\s<>=]+)\s*(?P<op>>=|<=|>|<)\s*(?P<rhs>.+?)\s*$")
_ABSOLUTE = re.compile(rf"^(?P<offset>{_NUMBER})$")
_RELATIVE = re.compile(
    rf"^(?:(?P<scale>{_NUMBER})\s*[x*]\s*)?first(?:\s*(?P<sign>[-+])\s*(?P<offset>{_NUMBER}))?$"
)


@dataclass(frozen=True)
class Constraint:
    """`metric op limit`, with limit = `scale` x (the trial's first value) + `offset`, or `offset` alone
    when `scale` is None."""

    metric: str
    op: str
    offset: float = 0.0
    scale: float | None = None

    @property
    def relative(self) -> bool:
        return self.scale is not None

    def __str__(self) -> str:
        if self.scale is None:
            return f"{self.metric} {self.op} {self.offset:g}"
        rhs = "first" if self.scale == 1 else f"{self.scale:g} x first"
        if self.offset:
            rhs += f" {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"
        return f"{self.metric} {self.op} {rhs}"

    def limit(self, first: float | None) -> float | None:
        """The bound for a trial whose first evaluation of `metric` is `first` (None: cannot be known)."""
        if self.scale is None:
            return self.offset
        if first is None or not math.isfinite(first):
            return None
        return self.scale * first + self.offset

    def broken(self, final: float | None, first: float | None) -> str | None:
        """Why a trial with these values breaks the constraint (`eval/diversity 0.020 < 0.142`), else None.

        A value that was not logged, or is NaN/inf, breaks it: nothing shows that the trial kept it."""
        if final is None or not math.isfinite(final):
            return f"{self.metric} {'not logged' if final is None else final}"
        limit = self.limit(first)
        if limit is None:
            return f"{self.metric}: no first evaluation to compare with"
        if _holds(final, self.op, limit):
            return None
        return f"{self.metric} {_num(final)} {NEGATED[self.op]} {_num(limit)}"

    def shortfall(self, final: float | None, first: float | None) -> float:
        """How far the trial misses the bound, relative to the bound's size (0 when kept; inf: unknown)."""
        limit = self.limit(first)
        if final is None or limit is None or not math.isfinite(final):
            return math.inf
        gap = limit - final if self.op in (">=", ">") else final - limit
        return max(gap, 0.0) / max(abs(limit), 1e-12)

    def margin(self, final: float | None, first: float | None) -> float:
        """How far inside the bound the trial is, relative to the bound's size (negative when broken)."""
        limit = self.limit(first)
        if final is None or limit is None or not math.isfinite(final):
            return -math.inf
        gap = final - limit if self.op in (">=", ">") else limit - final
        return gap / max(abs(limit), 1e-12)


def _holds(value: float, op: str, limit: float) -> bool:
    return {">=": value >= limit, "<=": value <= limit, ">": value > limit, "<": value < limit}[op]


def _num(value: float) -> str:
    return f"{value:.3f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"


def parse_constraint(text: str) -> Constraint:
    """`eval/diversity >= 0.5 x first` -> Constraint; ValueError with a one-line reason otherwise."""
    found = _CONSTRAINT.match(str(text))
    if not found:
        raise ValueError(f"{text!r} is not METRIC OP BOUND (OP: >=, <=, >, <); e.g. {CONSTRAINT_FORMS}")
    metric, op, rhs = found["metric"], found["op"], found["rhs"]
    if absolute := _ABSOLUTE.match(rhs):
        return Constraint(metric, op, float(absolute["offset"]))
    if relative := _RELATIVE.match(rhs):
        scale = float(relative["scale"]) if relative["scale"] else 1.0
        offset = float(relative["offset"] or 0.0) * (-1 if relative["sign"] == "-" else 1)
        return Constraint(metric, op, offset, scale)
    raise ValueError(
        f"{text!r}: the bound {rhs!r} is not a number, `first`, `A x first`, `first + B` or `A x first - B`"
    )


def parse_constraints(texts: Sequence[str]) -> tuple[Constraint, ...]:
    return tuple(parse_constraint(text) for text in texts)


def default_constraints(
    collapse_metric: str | None = None,
    min_absolute: float | None = None,
    min_relative_to_first: float | None = None,
) -> tuple[Constraint, ...]:
    """The default rule, "not collapsed": the collapse stopper's thresholds where a sweep sets them, else
    `eval/diversity >= 0.5 x first`."""
    metric = collapse_metric or DIVERSITY_METRIC
    found = []
    if min_absolute is not None:
        found.append(Constraint(metric, ">=", min_absolute))
    if min_relative_to_first is not None:
        found.append(Constraint(metric, ">=", 0.0, min_relative_to_first))
    return tuple(found) or (Constraint(DIVERSITY_METRIC, ">=", 0.0, DEFAULT_RELATIVE),)


@dataclass(frozen=True)
class SelectionRule:
    """The best trial: the best `metric` (`mode` max or min) among trials that keep every constraint."""

    metric: str
    mode: str = "max"
    constraints: tuple[Constraint, ...] = ()

    @property
    def metrics(self) -> list[str]:
        """Every metric the rule reads, the objective first."""
        return list(dict.fromkeys([self.metric, *(c.metric for c in self.constraints)]))

    def __str__(self) -> str:
        """`eval/reward max; eval/diversity >= 0.5 x first` (parse_rule reads it back)."""
        return "; ".join([f"{self.metric} {self.mode}", *map(str, self.constraints)])


def parse_rule(text: str) -> SelectionRule:
    """The inverse of str(SelectionRule); ValueError on anything else."""
    head, *constraints = [part.strip() for part in text.split(";")]
    metric, _, mode = head.rpartition(" ")
    if not metric or mode not in ("max", "min"):
        raise ValueError(f"{text!r}: expected 'METRIC max|min; CONSTRAINT; ...'")
    return SelectionRule(metric, mode, parse_constraints(constraints))


@dataclass
class TrialResult:
    """What selection needs of a trial: its final metric values, its first evaluation's values, and whether
    it ran to completion (a trial cut short by a stopper or scheduler is ranked only after those that did)."""

    id: str
    final: Mapping[str, float | None]
    first: Mapping[str, float | None] = field(default_factory=dict)
    completed: bool = True

    def value(self, metric: str) -> float | None:
        value = self.final.get(metric)
        return float(value) if value is not None else None


@dataclass
class Selection:
    """The outcome of `select`: the trial chosen and why, and each trial that breaks the rule."""

    rule: SelectionRule
    best: TrialResult | None
    # trial id -> "collapsed: eval/diversity 0.020 < 0.142", every constraint it breaks (trials with an
    # objective value only: one without is no candidate anyway)
    broken: dict[str, str]
    plain_best: TrialResult | None  # the objective's best with no constraint (what a plain sweep picks)
    fallback: bool = False  # no trial keeps every constraint: `best` is the one that misses them least

    def explain(self) -> list[str]:
        """Console lines: which trial is best under the rule, and why the plain maximum is not (if it is not)."""
        if self.best is None:
            return []
        metric = self.rule.metric
        kept = "; ".join(map(str, self.rule.constraints)) or "no constraint"
        head = f"best trial: {self.best.id} ({metric} {_shown(self.best.value(metric))})"
        if self.fallback:
            lines = [
                f"no trial keeps {kept}: falling back to the one that misses it by the least "
                f"(smallest relative shortfall), {self.best.id}: {self.broken[self.best.id]}",
                head,
            ]
        else:
            extreme = "highest" if self.rule.mode == "max" else "lowest"
            lines = [f"{head}: the {extreme} {metric} of the trials that keep {kept}"]
        plain = self.plain_best
        if plain is not None and plain.id != self.best.id and plain.id in self.broken:
            lines.append(
                f"  not {plain.id} ({metric} {_shown(plain.value(metric))}, the plain {self.rule.mode}imum): "
                f"{self.broken[plain.id]}"
            )
        return lines


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def violations(trial: TrialResult, constraints: Sequence[Constraint]) -> str | None:
    """Every constraint `trial` breaks, as one line (`collapsed: eval/diversity 0.020 < 0.142`), or None."""
    found = []
    for constraint in constraints:
        value, first = trial.value(constraint.metric), _first(trial, constraint.metric)
        why = constraint.broken(value, first)
        if why is None:
            continue
        if constraint.limit(first) is None or value is None or not math.isfinite(value):
            label = "unchecked"  # nothing shows that the trial kept it
        else:
            label = "collapsed" if constraint.metric.startswith(COLLAPSE_METRICS) else "breaks"
        found.append(f"{label}: {why}")
    return "; ".join(found) or None


def _first(trial: TrialResult, metric: str) -> float | None:
    value = trial.first.get(metric)
    return float(value) if value is not None else None


def select(trials: Sequence[TrialResult], rule: SelectionRule) -> Selection:
    """The best trial under `rule`.

    Among trials with a finite objective: those that keep every constraint, completed ones first; the best
    objective wins; a tie goes to the trial furthest inside its constraints (by its smallest relative
    margin), then to the earlier trial in `trials`. If no trial keeps every constraint, the
    fallback is the trial whose worst constraint it misses by the smallest relative amount (ties: the
    better objective), and `fallback` says so. No trial with a finite objective: `best` is None.
    """
    scored = [t for t in trials if _finite(t.value(rule.metric))]
    broken = {t.id: why for t in scored if (why := violations(t, rule.constraints))}
    sign = 1.0 if rule.mode == "max" else -1.0

    def margin(trial: TrialResult) -> float:
        margins = [c.margin(trial.value(c.metric), _first(trial, c.metric)) for c in rule.constraints]
        return min(margins, default=0.0)

    def best(pool: list[TrialResult]) -> TrialResult | None:
        pool = [t for t in pool if t.completed] or pool
        # max() keeps the first of equal keys: the earlier trial wins a full tie
        return max(pool, key=lambda t: (sign * t.value(rule.metric), margin(t)), default=None)

    kept = [t for t in scored if t.id not in broken]
    plain = best(scored)
    if kept or not scored:
        return Selection(rule, best(kept), broken, plain)

    def shortfall(trial: TrialResult) -> float:
        return max(c.shortfall(trial.value(c.metric), _first(trial, c.metric)) for c in rule.constraints)

    pool = [t for t in scored if t.completed] or scored
    fallback = min(pool, key=lambda t: (shortfall(t), -sign * t.value(rule.metric)))
    return Selection(rule, fallback, broken, plain, fallback=True)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# --- the Pareto front ---------------------------------------------------------------------------------


def pareto_front(rows: Sequence[dict], metrics: Sequence[str], modes: Sequence[str]) -> list[dict]:
    """Completed rows (`row["completed"]`) that no other completed row beats on every metric (and strictly
    on one); `modes` says max or min per metric. Rows missing a metric, or with NaN/inf, are left out."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    pool = [r for r in rows if r["completed"] and all(_finite(r.get(m)) for m in metrics)]

    def score(row: dict) -> list[float]:
        return [s * row[m] for s, m in zip(signs, metrics, strict=True)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(
            x > y for x, y in zip(a, b, strict=True)
        )

    return [r for r in pool if not any(dominates(score(o), score(r)) for o in pool if o is not r)]


def front_pairs(objective: tuple[str, str], heldout: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(y metric, y mode, x metric, x mode) of the fronts a sweep reports: its objective against
    eval/diversity and against each held-out reward (`eval/heldout/<name>`, higher is better)."""
    metric, mode = objective
    return [(metric, mode, x, "max") for x in [DIVERSITY_METRIC, *heldout] if x != metric]
