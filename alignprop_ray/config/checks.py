"""Rules that involve more than one field, run on the sections that validated on their own.

Each check takes the dict of validated sections (a section that failed is absent) and returns one-line
problems; a check whose inputs are missing returns nothing, so every independent error is still reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignprop_ray.engine.families.names import AUTO, check_family, local_model_index
from alignprop_ray.engine.methods.names import DDIM, LABELS, NEEDS_DDIM, REWARD_GRADIENT
from alignprop_ray.engine.truncation import positive_k_problem
from alignprop_ray.presets import TINY

Sections = dict[str, Any]


def check_truncation(v: Sections) -> list[str]:
    """The distribution can be drawn with T = sampling.steps (no K > T; gaussian_index lands in 1..T-1), and
    train.k0: redraw has a K >= 1 to redraw toward; its own shape was checked when it parsed (AlignProp only:
    `check_method` reports a truncation given to another method)."""
    if v.get("truncation") is None or "sampling" not in v or _method(v) != "alignprop":
        return []
    steps = v["sampling"].steps
    try:
        v["truncation"].validate(steps)
    except ValueError as err:
        return [f"truncation: {err}"]
    train = v.get("train")
    problem = positive_k_problem(v["truncation"], steps) if train and train.k0 == "redraw" else None
    return [f"train.k0: {problem}"] if problem else []


def check_schedule(v: Sections) -> list[str]:
    """Warm-up belongs to the schedules that have one, and ends before the run does."""
    train = v.get("train")
    if train is None or train.warmup_steps == 0:
        return []
    if train.lr_schedule == "constant":
        return ["train.warmup_steps: only used with lr_schedule linear_warmup or cosine (it is constant)"]
    if train.warmup_steps >= train.steps:
        return [
            f"train.warmup_steps: {train.warmup_steps} is not below train.steps ({train.steps}): "
            "the run would end before its learning rate reaches train.lr"
        ]
    return []


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
    if scaling is not None and scaling.accelerator_type and not scaling.use_gpu:
        problems.append(
            f"scaling.accelerator_type: {scaling.accelerator_type} is a GPU type but scaling.use_gpu is false"
        )
    return problems


def check_reward(v: Sections) -> list[str]:
    """Reward names and settings, checked by the reward library (without loading any weights)."""
    from alignprop_ray.rewards import validate_reward_spec  # lazily: keeps torch out of `import config`

    if "reward" not in v:
        return []
    spec = v["reward"]
    if not spec:
        return ["reward: must name at least one reward term, e.g. {saturation: 1.0}"]
    # Differentiability depends on the method; when the method itself is invalid, it is not checked.
    method = _method(v)
    gradient = LABELS[method] if method and REWARD_GRADIENT[method] else None
    return [_reward_line(p) for p in validate_reward_spec(spec, gradient_method=gradient)]


def _reward_line(problem: Any) -> str:
    text = " ".join(str(problem).split())
    return text if text.startswith("reward") else f"reward: {text}"


# Settings of a reward term that make it an objective; a held-out term only has its raw value logged.
OBJECTIVE_FIELDS = frozenset({"weight", "objective", "target"})


def check_eval_rewards(v: Sections) -> list[str]:
    """Held-out rewards are reward terms (checked by the reward library, non-differentiable ones allowed) that
    are not objectives: no weight/objective/target, and no term the training reward already has."""
    from alignprop_ray.rewards import validate_reward_spec
    from alignprop_ray.rewards.spec import split_key

    spec = v["eval"].rewards if "eval" in v else {}
    trained = {split_key(str(key))[0] for key in v.get("reward") or {}}
    problems, terms = [], {}
    for key, value in spec.items():
        name, field = split_key(str(key))
        objective = sorted(OBJECTIVE_FIELDS & (value.keys() if isinstance(value, dict) else {field}))
        if name in trained:
            problems.append(
                f"eval.rewards.{name}: is a training term (logged as eval/reward/{name}); held-out rewards "
                "are the ones not trained on"
            )
        elif objective or not field and isinstance(value, int | float) and not isinstance(value, bool):
            where = ".".join([name, *objective[:1]])
            problems.append(f"eval.rewards.{where}: {_not_an_objective(name)}")
        else:
            terms[key] = value
    found = validate_reward_spec(terms, for_training=False) if terms else []
    return problems + ["eval.rewards" + _reward_line(p).removeprefix("reward") for p in found]


def _not_an_objective(name: str) -> str:
    return (
        "a held-out reward logs its raw value: weight, objective and target do not apply "
        f"(write `{name}: {{}}` or its model settings)"
    )


def check_eval_diversity(v: Sections) -> list[str]:
    """The CLIP models of the diversity and base-fidelity spaces exist (checked like a clip_score term,
    without loading them)."""
    from alignprop_ray.rewards.options import OpenClipTerm

    if "eval" not in v:
        return []
    problems = []
    for name in ("diversity", "base_fidelity"):
        space = getattr(v["eval"], name)
        if space is None:
            continue
        if space.space == "pixels":
            problems += [f"eval.{name}.path: only used with space: clip"] if space.path is not None else []
            continue
        term = OpenClipTerm(arch=space.arch, path=space.path, seed=space.seed)
        problems += [f"eval.{name}.{problem}" for problem in term.check()]
    return problems


def _method(v: Sections) -> str | None:
    """The method's name, or None when `method` did not validate."""
    return v["method"].name if "method" in v else None


# How each other method chooses the steps that carry gradient, for the line that rejects `truncation` there.
_STEPS_WITH_GRADIENT = {
    "draft": "draft backpropagates through the last method.k steps (DRaFT-LV: the last one)",
    "refl": "refl backpropagates through one step drawn from method.step_range",
    "ddpo": "ddpo trains on the log-probabilities of int(T x method.timestep_fraction) steps",
}


def check_method(v: Sections) -> list[str]:
    """Settings only AlignProp reads; each method's settings against T; what DDPO needs of the model."""
    method = _method(v)
    if method is None:
        return []
    settings, problems = v["method"], []
    if method != "alignprop" and v.get("truncation") is not None:
        problems.append(f"truncation: only used with method alignprop; {_STEPS_WITH_GRADIENT[method]}")
    if method != "alignprop" and "train" in v and v["train"].k0 == "redraw":
        problems.append(f"train.k0: only used with method alignprop (method {method} never draws K=0)")
    steps = v["sampling"].steps if "sampling" in v else None
    if method == "draft":
        if settings.lv_samples is not None and settings.k != 1:
            problems.append(
                "method.k: DRaFT-LV (method.lv_samples) backpropagates through the last step only; "
                "k does not apply (drop it, or lv_samples for DRaFT-K)"
            )
        elif steps is not None and settings.k > steps:
            problems.append(f"method.k: K={settings.k} but sampling has {steps} steps")
    if method == "refl" and steps is not None and settings.step_range is not None:
        low, high = settings.step_range
        if not 0 <= low <= high <= steps - 1:
            problems.append(
                f"method.step_range: [{low}, {high}] must satisfy 0 <= low <= high <= T-1 = {steps - 1} "
                "(0-based step indices of the T = sampling.steps chain)"
            )
    if method == "ddpo" and steps is not None and int(steps * settings.timestep_fraction) < 1:
        problems.append(
            f"method.timestep_fraction: {settings.timestep_fraction:g} of {steps} steps trains on none "
            "(int(T x fraction) must be >= 1)"
        )
    if method in NEEDS_DDIM and "model" in v:
        scheduler = _scheduler_of(v["model"])
        if scheduler is not None and scheduler != DDIM:
            problems.append(
                f"method: {method} needs a DDIM scheduler (its policy is DDIM's Gaussian step, eta > 0); "
                f"this model samples with {scheduler}"
            )
    return problems


def _scheduler_of(model: Any) -> str | None:
    """The scheduler class a model samples with, when this machine can tell without loading it.

    sd: DDIM always; sd3: flow-matching Euler; sdxl: its pipeline's scheduler (DDIM or Euler; the tiny
    preset's is Euler). None when not known here (a hub model not downloaded yet).
    """
    index = local_model_index(model.pretrained) if model.pretrained != TINY else None
    family = model.family
    if family == AUTO:
        family = "sd" if model.pretrained == TINY else check_family(AUTO, model.pretrained, index)
    if family == "sd":
        return DDIM
    if family == "sd3":
        return "FlowMatchEulerDiscreteScheduler"
    if family != "sdxl":
        return None
    if model.pretrained == TINY:
        return "EulerDiscreteScheduler"
    config = Path(model.pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None
    return name if name == DDIM else "EulerDiscreteScheduler"  # the family samples with Euler otherwise


def check_activation_budget(v: Sections) -> list[str]:
    """A budget picks which gradient-carrying calls are checkpointed: it needs checkpointing on."""
    model = v.get("model")
    if model is None or model.activation_budget_mb is None or model.gradient_checkpointing:
        return []
    return [
        "model.activation_budget_mb: only used with model.gradient_checkpointing: true (without it every "
        "call keeps its activations, whatever the budget)"
    ]


CHECKS: list[Callable[[Sections], list[str]]] = [
    check_method,
    check_truncation,
    check_schedule,
    check_devices,
    check_activation_budget,
    check_reward,
    check_eval_rewards,
    check_eval_diversity,
]


def run_checks(v: Sections) -> list[str]:
    return [problem for check in CHECKS for problem in check(v)]
