"""Training methods: how a generated batch becomes a loss (engine/methods/base.py has the interface).

    alignprop  AlignProp: truncated backprop through the last K steps, K drawn per batch (alignprop.py)
    draft      DRaFT-K (AlignProp with K fixed), or DRaFT-LV with lv_samples (draft.py)
    refl       ReFL: one step's x0 prediction, from a random step (refl.py)
    ddpo       DDPO: PPO-clip on the DDIM chain's log-probabilities, any reward (ddpo.py)

Importing this package does not import torch (the config layer reads the names); `build_method`
imports the method's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignprop_ray.engine.methods.names import METHODS, REWARD_GRADIENT

if TYPE_CHECKING:
    from alignprop_ray.engine.methods.base import Method

__all__ = ["METHODS", "REWARD_GRADIENT", "build_method"]


def build_method(settings: Any) -> Method:
    """The method its settings dataclass describes (train/loop.py `engine_settings` builds them)."""
    from alignprop_ray.engine.methods.alignprop import TruncatedBackprop, TruncatedBackpropSettings
    from alignprop_ray.engine.methods.ddpo import Ddpo, DdpoSettings
    from alignprop_ray.engine.methods.draft import DraftLV, DraftLVSettings
    from alignprop_ray.engine.methods.refl import Refl, ReflSettings

    if isinstance(settings, TruncatedBackpropSettings):
        return TruncatedBackprop(settings.name)
    kinds = {DraftLVSettings: DraftLV, ReflSettings: Refl, DdpoSettings: Ddpo}
    return kinds[type(settings)](settings)
