"""The training methods by name, and what the config layer needs to know of each, without importing torch.

A method owns how a generated batch becomes a loss (engine/methods/); the optimizer step, gradient sync,
NaN guard, checkpoints and tracking are shared (engine/step.py, train/).
"""

from __future__ import annotations

METHODS = ("alignprop", "draft", "refl", "ddpo")
LABELS = {
    "alignprop": "AlignProp",
    "draft": "DRaFT",
    "refl": "ReFL",
    "ddpo": "DDPO",
}  # as the papers write them

# Methods that backpropagate the reward into the sampler: their reward terms must be differentiable. DDPO
# only needs reward values (a policy gradient), so any reward can train it.
REWARD_GRADIENT = {"alignprop": True, "draft": True, "refl": True, "ddpo": False}

# DDPO's policy is the DDIM step with eta > 0, a Gaussian whose log-density it needs: DDIM schedulers only.
NEEDS_DDIM = ("ddpo",)
DDIM = "DDIMScheduler"
