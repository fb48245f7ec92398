"""Truncated backprop: how many of the last denoising steps carry gradient.

With T sampling steps, a draw K means: steps 0 .. T-K-1 run without autograd, and the last K steps
(a contiguous tail) run with gradient, each UNet call checkpointed. K=0 means no gradient reaches the
adapter for that batch; K=T is full backprop. K is drawn once per generated batch, except by ``per_step``.

Specs are written in YAML either as a short string or as a mapping:

    fixed:10              {kind: fixed, k: 10}
    uniform:0:50          {kind: uniform, low: 0, high: 50}        # inclusive, integer
    normal:25:10          {kind: normal, mean: 25, std: 10}        # rounded, clipped to [0, T]
    full                  {kind: full}                             # K = T
    gaussian_index:42:5   {kind: gaussian_index, mean: 42, std: 5} # the official v2 code's draw, below
    per_step:0:50         {kind: per_step, low: 0, high: 50}       # the v1 code's and TRL's draw, below

``gaussian_index`` is the draw of the AlignProp authors' second implementation (mihirp1998/AlignProp
sd_pipeline.py:131-139, `backprop_strategy = 'gaussian'` with mean 42, std 5 in
config/alignprop_config.py:112-113): a step index ``i* = int(x)``, x ~ N(mean, std), drawn again until
1 <= i* <= T-1; the noise predictions of steps i < i* are detached, so the last K = T - i* steps carry
gradient (K in 1 .. T-1; with T = 50, mean 42 and std 5: E[K] = 9.1, sd 4.5).

``per_step`` is the draw of the authors' first implementation (mihirp1998/AlignProp main.py:480-489,
`truncated_backprop_rand` with minmax (0, 50)) and of TRL's AlignPropTrainer: every denoising step i draws
its own index d ~ U{low..high} (inclusive) and its noise prediction is detached when i < d. The steps that
carry gradient are then not a contiguous tail: step i does with probability P(d <= i), independently of the
others, and the latents carry the gradient of every later step back through the solver steps between them.
A draw is then a mask (one bool per step, `GradMask`) rather than K; "K" (train/k) counts its True steps.

A distribution that can draw K=0 leaves some batches without gradient; AlignProp's ``method.k0`` (alias
``train.k0``) says what happens then: ``skip`` (the batch's images are scored but add no gradient) or
``redraw`` (`RedrawZero`: K is drawn again until K >= 1, i.e. the distribution conditioned on K >= 1).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

KINDS = ("fixed", "uniform", "normal", "full", "gaussian_index", "per_step")
_FIELDS = {
    "fixed": ("k",),
    "uniform": ("low", "high"),
    "normal": ("mean", "std"),
    "full": (),
    "gaussian_index": ("mean", "std"),
    "per_step": ("low", "high"),
}
_SHORT_FORMS = "fixed:K, uniform:LOW:HIGH, normal:MEAN:STD, full, gaussian_index:MEAN:STD, per_step:LOW:HIGH"
# A draw that is repeated until it lands in range must land there often enough: below this probability
# the spec is rejected when validated (at 1e-3 a batch needs 1000 draws on average, microseconds).
MIN_ACCEPTANCE = 1e-3
MAX_DRAWS = 100_000  # past MIN_ACCEPTANCE, P(no acceptance in MAX_DRAWS draws) < e^-100


# Which of the T denoising steps carry gradient, one bool per step (the `per_step` kind's draw).
GradMask = tuple[bool, ...]
# What a distribution draws for one batch: K, the length of the tail that carries gradient, or a mask.
Draw = int | GradMask


def grad_steps(draw: Draw) -> int:
    """The number of denoising steps a draw gives gradient (K for a tail)."""
    return draw if isinstance(draw, int) else sum(draw)


class DrawRule(Protocol):
    """What planning a step needs of a method (its config's `draw_rule`): one draw per micro-batch, the same
    on every worker. AlignProp and DRaFT-K draw K in [0, steps] or a `GradMask` (`Truncation`, `RedrawZero`),
    ReFL the step that carries gradient (`StepRange`), the others nothing (`NoDraw`)."""

    def draw(self, steps: int, rng: random.Random) -> Draw: ...


@dataclass(frozen=True)
class Truncation:
    """A distribution over K, the number of trailing denoising steps that carry gradient."""

    kind: str
    k: int = 0
    low: int = 0
    high: int = 0
    mean: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown truncation kind {self.kind!r} (valid: {', '.join(KINDS)})")
        if self.kind == "fixed" and self.k < 0:
            raise ValueError(f"fixed K must be >= 0, got {self.k}")
        if self.kind in ("uniform", "per_step") and not 0 <= self.low <= self.high:
            raise ValueError(f"{self.kind} needs 0 <= low <= high, got {self.low}..{self.high}")
        if self.kind in ("normal", "gaussian_index") and not (
            self.std >= 0 and math.isfinite(self.mean) and math.isfinite(self.std)
        ):
            raise ValueError(f"{self.kind} needs a finite mean and std >= 0, got {self.mean}/{self.std}")

    def validate(self, steps: int) -> None:
        """Raise ValueError if this distribution cannot be drawn with T = `steps` sampling steps: it can draw
        K > T, or (gaussian_index) its index lands in 1 .. T-1 too rarely to be redrawn until it does."""
        largest = {"fixed": self.k, "uniform": self.high, "per_step": self.high}.get(self.kind, 0)
        if largest > steps:
            raise ValueError(f"K > T: {self.describe()} can draw K={largest} but sampling has {steps} steps")
        if self.kind == "gaussian_index":
            accepted = _normal_mass(1, steps, self.mean, self.std) if steps >= 2 else 0.0
            if accepted < MIN_ACCEPTANCE:
                raise ValueError(
                    f"{self.describe()} with T={steps} steps: the detach index lands in 1..{steps - 1} with "
                    f"probability {accepted:.2g}, below {MIN_ACCEPTANCE:g} (the official mean 42 is for T=50)"
                )

    def draw(self, steps: int, rng: random.Random) -> Draw:
        """Draw K in [0, steps] for one generated batch (per_step: a mask, step i's index drawn in turn)."""
        if self.kind == "per_step":
            return tuple(i >= rng.randint(self.low, self.high) for i in range(steps))
        if self.kind == "fixed":
            return self.k
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        if self.kind == "normal":
            return int(min(max(round(rng.gauss(self.mean, self.std)), 0), steps))
        if self.kind == "gaussian_index":
            return steps - self._detach_index(steps, rng)
        return steps

    def _detach_index(self, steps: int, rng: random.Random) -> int:
        """The official v2 draw (sd_pipeline.py:131-139): int() of a normal draw (truncation toward zero),
        drawn again while it is not in 1 .. T-1."""
        for _ in range(MAX_DRAWS):
            index = int(rng.gauss(self.mean, self.std))
            if 1 <= index < steps:
                return index
        raise RuntimeError(f"{self.describe()}: no detach index in 1..{steps - 1} after {MAX_DRAWS} draws")

    def probabilities(self, steps: int) -> dict[int, float]:
        """The exact distribution of K with T = `steps`: {K: P(K)} over the K it can draw (validate first);
        per_step: of the number of steps with gradient."""
        if self.kind == "per_step":  # a sum of independent Bernoullis, P(step i) = P(d <= i)
            counts = {0: 1.0}
            for i in range(steps):
                p = min(max((i - self.low + 1) / (self.high - self.low + 1), 0.0), 1.0)
                following = dict.fromkeys(range(len(counts) + 1), 0.0)
                for k, q in counts.items():
                    following[k] += q * (1 - p)
                    following[k + 1] += q * p
                counts = following
            return {k: q for k, q in counts.items() if q > 0}
        if self.kind == "fixed":
            return {self.k: 1.0}
        if self.kind == "uniform":
            return {k: 1.0 / (self.high - self.low + 1) for k in range(self.low, self.high + 1)}
        if self.kind == "full":
            return {steps: 1.0}
        if self.kind == "normal":  # round to the nearest K; the tails pile up on 0 and T
            edges = [-math.inf, *(k + 0.5 for k in range(steps)), math.inf]
            masses = [_normal_mass(lo, hi, self.mean, self.std) for lo, hi in itertools.pairwise(edges)]
            return {k: p for k, p in enumerate(masses) if p > 0}
        # gaussian_index: index i has mass P(i <= x < i + 1); K = T - i; renormalized over i in 1 .. T-1
        masses = {steps - i: _normal_mass(i, i + 1, self.mean, self.std) for i in range(1, steps)}
        total = sum(masses.values())
        return {k: p / total for k, p in masses.items() if p > 0}

    def describe(self) -> str:
        """The short string form, e.g. ``uniform:0:50``; parse(describe()) == self."""
        if self.kind == "fixed":
            return f"fixed:{self.k}"
        if self.kind in ("uniform", "per_step"):
            return f"{self.kind}:{self.low}:{self.high}"
        if self.kind in ("normal", "gaussian_index"):
            return f"{self.kind}:{self.mean:g}:{self.std:g}"
        return "full"


@dataclass(frozen=True)
class RedrawZero:
    """`base` conditioned on K >= 1 (``method.k0: redraw``): a K=0 draw is replaced by another draw."""

    base: Truncation

    def draw(self, steps: int, rng: random.Random) -> Draw:
        for _ in range(MAX_DRAWS):
            drawn = self.base.draw(steps, rng)
            if grad_steps(drawn) > 0:
                return drawn
        raise RuntimeError(f"{self.base.describe()} drew K=0 {MAX_DRAWS} times in a row")


@dataclass(frozen=True)
class StepRange:
    """ReFL's draw: the 0-based index of the step that carries gradient, uniform on [low, high] (inclusive;
    within the T-step chain)."""

    low: int
    high: int

    def draw(self, steps: int, rng: random.Random) -> int:
        if not 0 <= self.low <= self.high < steps:
            raise ValueError(f"ReFL step range {self.low}..{self.high} is not within 0..{steps - 1}")
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class NoDraw:
    """The draw of methods that draw nothing per micro-batch (DRaFT-LV, DDPO): 0."""

    def draw(self, steps: int, rng: random.Random) -> int:
        return 0


def positive_k_problem(truncation: Truncation, steps: int) -> str | None:
    """Why K=0 cannot be redrawn with this distribution (it draws K >= 1 too rarely), or None."""
    positive = 1.0 - truncation.probabilities(steps).get(0, 0.0)
    if positive >= MIN_ACCEPTANCE:
        return None
    return (
        f"{truncation.describe()} draws K >= 1 with probability {positive:.2g}: redrawing K=0 would not end; "
        "use method.k0: skip or a distribution with K >= 1"
    )


def _normal_mass(low: float, high: float, mean: float, std: float) -> float:
    """P(low <= x < high) for x ~ N(mean, std); std 0 is a point mass at the mean."""
    if std == 0:
        return float(low <= mean < high)
    cdf = lambda x: 0.5 * math.erfc(-(x - mean) / (std * math.sqrt(2)))  # noqa: E731
    return cdf(high) - cdf(low)


def parse_truncation(spec: Any) -> Truncation:
    """Parse a YAML truncation spec (short string, int, or mapping). Raises ValueError naming the problem."""
    if isinstance(spec, Truncation):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"expected a truncation spec like 'uniform:0:50', got {spec!r}")
    if isinstance(spec, int):
        return Truncation("fixed", k=spec)
    if isinstance(spec, str):
        kind, *args = spec.strip().split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown truncation {spec!r} (valid: {_SHORT_FORMS})")
        names = _FIELDS[kind]
        if len(args) != len(names):
            raise ValueError(
                f"truncation {spec!r}: {kind} takes {len(names)} value(s) ({', '.join(names) or 'none'})"
            )
        return _build(kind, dict(zip(names, args, strict=True)), spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in KINDS:
            raise ValueError(f"truncation.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        unknown = set(spec) - set(_FIELDS[kind])
        missing = set(_FIELDS[kind]) - set(spec)
        if unknown or missing:
            what = [f"unknown field(s) {sorted(unknown)}"] * bool(unknown) + [
                f"missing {sorted(missing)}"
            ] * bool(missing)
            raise ValueError(f"truncation ({kind}): {'; '.join(what)}")
        return _build(kind, spec, spec)
    raise ValueError(f"expected a truncation spec like 'uniform:0:50' or a mapping, got {spec!r}")


def _build(kind: str, values: dict[str, Any], original: Any) -> Truncation:
    try:
        real = kind in ("normal", "gaussian_index")
        typed = {name: (float(v) if real else _as_int(v)) for name, v in values.items()}
    except (TypeError, ValueError):
        raise ValueError(f"truncation {original!r}: values must be numbers") from None
    return Truncation(kind, **typed)


def _as_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)
