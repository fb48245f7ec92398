"""Rules that involve more than one field, run on the sections that validated on their own.

Each check takes the dict of validated sections (a section that failed is absent) and returns one-line
problems; a check whose inputs are missing returns nothing, so every independent error is still reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Sections = dict[str, Any]


def check_truncation(v: Sections) -> list[str]:
    """The spec parses, and cannot draw K > T (sampling.steps)."""
    if v.get("truncation") is None:
        return []
    from alignprop_ray.engine.truncation import parse_truncation  # pure Python, no torch

    try:
        truncation = parse_truncation(v["truncation"])
        if "sampling" in v:
            truncation.validate(v["sampling"].steps)
    except ValueError as err:
        return [f"truncation: {err}"]
    return []


def check_intervals(v: Sections) -> list[str]:
    """Evaluation and checkpoints must happen at least once within train.steps."""
    if "train" not in v:
        return []
    train, problems = v["train"], []
    for name, what in (("eval_every", "no evaluation"), ("checkpoint_every", "no checkpoint")):
        every = getattr(train, name)
        if every > train.steps:
            problems.append(
                f"train.{name}: {every} is more than train.steps ({train.steps}); {what} would run"
            )
    return problems


def check_devices(v: Sections) -> list[str]:
    """fp16 needs a GPU; GPU resources need use_gpu (Ray's ScalingConfig refuses the mix)."""
    problems = []
    scaling = v.get("scaling")
    if "model" in v and scaling is not None and v["model"].dtype == "float16" and not scaling.use_gpu:
        problems.append(
            "model.dtype: float16 needs scaling.use_gpu: true (CPU kernels lack or emulate fp16); "
            "use float32 or bfloat16 on CPU"
        )
    gpus = (scaling.resources_per_worker or {}).get("GPU", 0) if scaling is not None else 0
    if gpus and not scaling.use_gpu:
        problems.append(f"scaling.resources_per_worker: asks for GPU: {gpus:g} but scaling.use_gpu is false")
    return problems


def check_reward(v: Sections) -> list[str]:
    """Reward names and settings, checked by the reward library (without loading any weights)."""
    from alignprop_ray.rewards import validate_reward_spec  # lazily: keeps torch out of `import config`

    if "reward" not in v:
        return []
    spec = v["reward"]
    if not spec:
        return ["reward: must name at least one reward term, e.g. {saturation: 1.0}"]
    return [_reward_line(p) for p in validate_reward_spec(spec)]


def _reward_line(problem: Any) -> str:
    text = " ".join(str(problem).split())
    return text if text.startswith("reward") else f"reward: {text}"


CHECKS: list[Callable[[Sections], list[str]]] = [
    check_truncation,
    check_intervals,
    check_devices,
    check_reward,
]


def run_checks(v: Sections) -> list[str]:
    return [problem for check in CHECKS for problem in check(v)]
