"""Rules that involve more than one field, run on the sections that validated on their own.

Each check takes the dict of validated sections (a section that failed is absent) and returns one-line
problems; a check whose inputs are missing returns nothing, so every independent error is still reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alignprop_ray.engine.families.registry import (
    AUTO,
    TINY_FAMILY,
    check_family,
    family_row,
    local_model_index,
    local_scheduler_class,
)
from alignprop_ray.engine.methods.registry import MethodRow, get_method
from alignprop_ray.presets import TINY

Sections = dict[str, Any]


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
    row = _method(v)
    gradient = row.label if row is not None and row.reward_gradient else None
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


def _method(v: Sections) -> MethodRow | None:
    """The method's row, or None when `method` did not validate."""
    return get_method(v["method"].name) if "method" in v else None


def check_method(v: Sections) -> list[str]:
    """The method's own checks (its settings against the other sections: its row), then what its flags ask
    of the model: the schedulers and families it can train."""
    row = _method(v)
    if row is None:
        return []
    problems = row.check(v)
    model = v.get("model")
    if model is None:
        return problems
    family = _family_of(model)
    if row.families is not None and family is not None and family not in row.families:
        problems.append(
            f"method: {row.name} trains {' or '.join(row.families)} models ({row.limited_because}); "
            f"this model is {family}"
        )
        return problems  # one line per refusal: the family's scheduler would say it again
    scheduler = _scheduler_of(model)
    if row.schedulers is not None and scheduler is not None and scheduler not in row.schedulers:
        problems.append(
            f"method: {row.name} needs a {' or '.join(row.schedulers)} ({row.limited_because}); "
            f"this model samples with {scheduler}"
        )
    return problems


def _scheduler_of(model: Any) -> str | None:
    """The scheduler class a model samples with, when this machine can tell without loading it: the tiny
    preset's, the family's only one, or the one its pipeline directory ships if the family samples with it
    (else the family's first). None when not known here (a hub model not downloaded yet)."""
    family = _family_of(model)
    if family is None:
        return None
    row = family_row(family)
    if model.pretrained == TINY:
        return row.tiny_scheduler[0]
    if len(row.schedulers) == 1:
        return row.schedulers[0]
    shipped = local_scheduler_class(model.pretrained)
    if shipped is None:
        return None
    return shipped if shipped in row.schedulers else row.schedulers[0]


def _family_of(model: Any) -> str | None:
    """The family a model is used as, when this machine can tell (`check_family`)."""
    if model.pretrained == TINY:
        return TINY_FAMILY if model.family == AUTO else model.family
    try:
        family = check_family(model.family, model.pretrained, local_model_index(model.pretrained))
    except ValueError:  # a family the pipeline contradicts: model.family reports it
        return None
    return None if family == AUTO else family


def check_kl_weight(v: Sections) -> list[str]:
    """train.kl_weight belongs to the methods that add a KL-to-base term (their row's `kl_to_base`)."""
    row, train = _method(v), v.get("train")
    if row is None or train is None or not train.kl_weight or row.kl_to_base:
        return []
    return [
        f"train.kl_weight: {row.name} has no KL-to-base term, so {train.kl_weight:g} would have no effect; "
        "set it to 0"
    ]


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
    check_kl_weight,
    check_schedule,
    check_devices,
    check_activation_budget,
    check_reward,
    check_eval_rewards,
    check_eval_diversity,
]


def run_checks(v: Sections) -> list[str]:
    return [problem for check in CHECKS for problem in check(v)]
