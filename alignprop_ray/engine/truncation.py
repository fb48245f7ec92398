"""Truncated backprop: how many of the last denoising steps carry gradient.

With T sampling steps, a draw K means: steps 0 .. T-K-1 run without autograd, and the last K steps
(a contiguous tail) run with gradient, each UNet call checkpointed. K=0 means no gradient reaches the
adapter for that batch; K=T is full backprop. K is drawn once per generated batch, never per step.

Specs are written in YAML either as a short string or as a mapping:

    fixed:10            {kind: fixed, k: 10}
    uniform:0:50        {kind: uniform, low: 0, high: 50}        # inclusive, integer
    normal:25:10        {kind: normal, mean: 25, std: 10}        # rounded, clipped to [0, T]
    full                {kind: full}                             # K = T
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

KINDS = ("fixed", "uniform", "normal", "full")
_FIELDS = {"fixed": ("k",), "uniform": ("low", "high"), "normal": ("mean", "std"), "full": ()}


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
        if self.kind == "uniform" and not 0 <= self.low <= self.high:
            raise ValueError(f"uniform needs 0 <= low <= high, got {self.low}..{self.high}")
        if self.kind == "normal" and (self.std < 0 or not math.isfinite(self.mean)):
            raise ValueError(f"normal needs a finite mean and std >= 0, got {self.mean}/{self.std}")

    def validate(self, steps: int) -> None:
        """Raise ValueError if this distribution can draw a K larger than the number of steps T."""
        largest = {"fixed": self.k, "uniform": self.high}.get(self.kind, 0)
        if largest > steps:
            raise ValueError(f"K > T: {self.describe()} can draw K={largest} but sampling has {steps} steps")

    def draw(self, steps: int, rng: random.Random) -> int:
        """Draw K in [0, steps] for one generated batch."""
        if self.kind == "fixed":
            return self.k
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        if self.kind == "normal":
            return int(min(max(round(rng.gauss(self.mean, self.std)), 0), steps))
        return steps

    def describe(self) -> str:
        """The short string form, e.g. ``uniform:0:50``; parse(describe()) == self."""
        if self.kind == "fixed":
            return f"fixed:{self.k}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        if self.kind == "normal":
            return f"normal:{self.mean:g}:{self.std:g}"
        return "full"


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
            raise ValueError(
                f"unknown truncation {spec!r} (valid: fixed:K, uniform:LOW:HIGH, normal:MEAN:STD, full)"
            )
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
        typed = {name: (float(v) if kind == "normal" else _as_int(v)) for name, v in values.items()}
    except (TypeError, ValueError):
        raise ValueError(f"truncation {original!r}: values must be numbers") from None
    return Truncation(kind, **typed)


def _as_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)
