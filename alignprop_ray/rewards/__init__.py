"""Reward library: named differentiable rewards, weighted mixtures, and diversity metrics.

Pure torch (no Ray, no MLflow). Images are float in [0, 1], (B, 3, H, W); rewards return (B,).

    problems = validate_reward_spec({"aesthetic": {"weight": 1.0, "target": 10.0, "arch": "tiny"}})
    mixture = build_reward({"compressibility": 1.0, "saturation": 0.5}, device="cpu", dtype=torch.float32)
    out = mixture(images, prompts)          # RewardOutput(total (B,), terms {name: (B,)})
    loss = -out.total.mean()
    metrics = diversity(images, prompt_ids, mixture.image_features(images))

See docs/rewards.md for each reward and where its weights come from.
"""

# Importing the reward modules registers them (open_clip/transformers load lazily, at build time).
from alignprop_ray.rewards import aesthetic, clip_rewards, simple  # noqa: F401
from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.diversity import diversity, pairwise_distances
from alignprop_ray.rewards.mixture import RewardMixture, RewardOutput, build_reward
from alignprop_ray.rewards.registry import RewardOptions, available_rewards, register_reward
from alignprop_ray.rewards.spec import TermSpec, parse_reward_spec, validate_reward_spec

__all__ = [
    "Reward",
    "RewardMixture",
    "RewardOptions",
    "RewardOutput",
    "TermSpec",
    "available_rewards",
    "build_reward",
    "diversity",
    "pairwise_distances",
    "parse_reward_spec",
    "register_reward",
    "validate_reward_spec",
]
