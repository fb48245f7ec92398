"""Training methods: how a generated batch becomes a loss (engine/methods/base.py has the interface).

One module per method (alignprop.py: AlignProp and DRaFT-K; draft.py: DRaFT-LV; refl.py; ddpo.py) and one
row per method in registry.py, with its config class in configs.py; both are torch-free, so the config
layer reads them. `build_method` imports the method's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignprop_ray.engine.methods.configs import MethodConfig
from alignprop_ray.engine.methods.registry import METHODS, get_method, method_rows

if TYPE_CHECKING:
    from alignprop_ray.engine.methods.base import Method

__all__ = ["METHODS", "build_method", "get_method", "method_rows"]


def build_method(config: MethodConfig) -> Method:
    """The method a validated method config describes (the experiment's `method:`), built by its row."""
    row = get_method(config.name)
    if row is None:
        raise ValueError(f"unknown method {config.name!r} (known: {', '.join(METHODS)})")
    return row.build(config)
