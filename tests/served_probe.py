"""A reward plugin for tests/test_reward_service.py: it reads an environment variable while it scores, so a
test sees where it ran (a served reward's replica, whose runtime_env sets it, or the trainer's process)."""

import os

SCALE_ENV = "ALIGNPROP_TEST_REWARD_SCALE"


def env_scaled_brightness(images, prompts):
    """Mean pixel value times $ALIGNPROP_TEST_REWARD_SCALE (1 where it is unset)."""
    return float(os.environ.get(SCALE_ENV, "1")) * images.mean(dim=(1, 2, 3))
