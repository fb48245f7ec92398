"""Pydantic field types shared by every typed section: experiment config, sweep file, reward options."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML `yes`/`true` must not become 1
        raise ValueError(f"must be a number, not a boolean (got {value!r})")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
FiniteFloat = Annotated[float, BeforeValidator(_no_bool), AfterValidator(_finite)]
