"""Reward library: named differentiable rewards, weighted mixtures, and diversity metrics.

Pure torch (no Ray, no MLflow). Images are float in [0, 1], (B, 3, H, W); rewards return (B,).
Importing this package imports no torch: validating a config (`validate_reward_spec`) stays cheap, and
the torch side is imported from its modules where it is used:

    problems = validate_reward_spec({"aesthetic": {"weight": 1.0, "target": 10.0, "arch": "tiny"}})

    from alignprop_ray.rewards.mixture import build_reward
    mixture = build_reward({"compressibility": 1.0, "saturation": 0.5}, device="cpu", dtype=torch.float32)
    out = mixture(images, prompts)          # RewardOutput(total (B,), terms {name: (B,)})
    loss = -out.total.mean()

    from alignprop_ray.rewards.diversity import diversity
    metrics = diversity(images, prompt_ids, mixture.image_features(images))

See docs/rewards.md for each reward and where its weights come from.
"""

from alignprop_ray.rewards.options import RewardTerm
from alignprop_ray.rewards.registry import available_rewards, get_entry
from alignprop_ray.rewards.spec import parse_reward_spec, validate_reward_spec

__all__ = ["RewardTerm", "available_rewards", "get_entry", "parse_reward_spec", "validate_reward_spec"]
