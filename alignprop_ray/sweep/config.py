"""The sweep file: a base experiment, a search space, Tune settings and stoppers; validated before any work.

    name: smoke                      # default: the file name; the MLflow parent run and the storage folder
    base: tiny.yaml                  # an experiment YAML (relative to this file), or the experiment inline
    space: {train.lr: {loguniform: [1.0e-3, 1.0e-1]}}
    tune: {algorithm: random, num_samples: 4, metric: eval/reward, mode: max}
    stop: {collapse: {min_relative_to_first: 0.5}}

The best trial (summary, parent run, `--register`, report) is the objective's best among the trials that
keep `tune.select`'s constraints (alignprop_ray/selection.py); without it, the trials that did not collapse.

``--set KEY=VALUE`` edits the sweep: keys under `name`, `space`, `tune`, `stop` set the sweep; any other
key (or `base.KEY`) sets the base experiment, e.g. ``--set train.steps=4 --set tune.num_samples=2``.
A searched field takes its value from the space, whatever the base or ``--set`` says.

Every problem is collected and raised as one ConfigError, one line each, starting with the dotted field.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignprop_ray.config import ExperimentConfig, parse_experiment, read_yaml
from alignprop_ray.config.overrides import collect_overrides, parse_value
from alignprop_ray.engine.methods.registry import method_rows
from alignprop_ray.errors import ConfigError, UserError
from alignprop_ray.metrics import (
    BASE_FIDELITY,
    EVAL_METRICS,
    HELDOUT_PREFIX,
    KL_TO_BASE,
    TERM_PREFIXES,
    TRAIN_METRICS,
)
from alignprop_ray.problems import format_validation_error
from alignprop_ray.rewards.spec import split_key
from alignprop_ray.selection import (
    SelectionRule,
    default_constraints,
    parse_constraint,
)
from alignprop_ray.sweep.space import LISTS, Domain, apply_point, parse_space

SWEEP_KEYS = ("name", "base", "space", "tune", "stop")
# top-level keys that mark a sweep file rather than an experiment (`compare`: a comparison, sweep/protocol.py)
MARKERS = ("tune", "space", "compare")
MAX_COMBINATIONS = 64  # grid/choice combinations checked one by one; beyond, each field is checked alone
Mode = Literal["max", "min"]


def is_sweep(data: dict) -> bool:
    """True for a sweep or comparison file (top-level `tune:`, `space:` or `compare:`), False for an
    experiment file."""
    return any(key in data for key in MARKERS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Section):
    metric: str = Field(description="a logged metric, e.g. eval/reward/aesthetic")
    mode: Mode = Field("max", description="max or min")


class AshaSettings(_Section):
    grace_period: Annotated[int, Field(ge=1)] | None = Field(
        None, description="optimizer steps before ASHA may stop a trial; default: 2 x train.eval_every"
    )
    reduction_factor: float = Field(3.0, gt=1, description="ASHA keeps 1/reduction_factor of trials per rung")


class SelectSettings(_Section):
    """Which trial is the sweep's best: the objective's best among the trials that keep every constraint.

    select:                                   # or the list of constraints alone
      constraints:
        - eval/diversity >= 0.5 x first       # first: the trial's own first evaluation (the base model)
        - eval/heldout/clip_score >= first - 0.01
        - eval/vendi >= 2                     # an absolute bound
    """

    metric: str | None = Field(
        None, description="the objective; default: tune.metric (multi-objective: tune.metric or the first)"
    )
    mode: Mode | None = Field(None, description="max or min; default: tune.mode (or the objective's)")
    constraints: list[str] = Field(
        default_factory=list,
        description="METRIC OP BOUND, OP one of >= <= > <, BOUND a number, `first`, `A x first`, "
        "`first + B` or `A x first - B`; [] picks the plain best",
    )

    @model_validator(mode="before")
    @classmethod
    def _list_form(cls, data: Any) -> Any:
        return {"constraints": data} if isinstance(data, list) else data


class TuneSettings(_Section):
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "random", description="grid: every combination of `grid` fields; random: Tune's sampler; optuna: TPE"
    )
    num_samples: int = Field(1, ge=1, description="trials to sample (grid: repeats of the whole grid)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop weak trials early")
    asha: AshaSettings = Field(default_factory=AshaSettings, description="ASHA settings (scheduler: asha)")
    metric: str | None = Field(
        None, description="metric to optimize; default eval/reward (or the first objective)"
    )
    mode: Mode = Field("max", description="max or min")
    objectives: list[Objective] | None = Field(
        None,
        min_length=2,
        description="Optuna multi-objective: several {metric, mode}; reports the Pareto front",
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="trials at once; default: every trial, as many as the largest cluster the autoscaler "
        "may build holds (docs/clusters.md)",
    )
    # The trial only drives a Ray Train run (its workers hold the CPUs/GPUs): by default it asks for no CPU
    # (plus a token of memory, since Tune needs a non-empty request), so 2 CPUs serve 2 one-CPU workers.
    resources: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Ray resources of each trial's driver process (default {CPU: 0}); workers: scaling:"
    )
    storage_path: str | None = Field(
        None,
        description="Tune results and trial checkpoints (local or s3://); default: the base storage.path",
    )
    max_failures: int = Field(
        0, ge=-1, description="restarts of a trial whose driver died (worker failures: the base failure:)"
    )
    seed: int | None = Field(None, description="seed of the random/Optuna sampler")
    select: SelectSettings | None = Field(
        None,
        description="how the best trial is chosen: the objective under constraints (default: not collapsed, "
        "stop.collapse's thresholds or eval/diversity >= 0.5 x first)",
    )

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives] if self.objectives else [self.metric or "eval/reward"]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives] if self.objectives else [self.mode]

    @property
    def best_metric(self) -> tuple[str, str]:
        """(metric, mode) that picks the single best trial (multi-objective: `metric`, else the first)."""
        if self.objectives and not self.metric:
            return self.objectives[0].metric, self.objectives[0].mode
        return self.metric or "eval/reward", self.mode


class CollapseStop(_Section):
    metric: str = Field("eval/diversity", description="a diversity metric; collapse drives it toward 0")
    min_absolute: float | None = Field(None, ge=0, description="stop when the metric falls below this")
    min_relative_to_first: float | None = Field(
        None, gt=0, le=1, description="stop when the metric falls below this fraction of its first evaluation"
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> CollapseStop:
        if self.min_absolute is None and self.min_relative_to_first is None:
            raise ValueError("give min_absolute or min_relative_to_first (or both)")
        return self


class OveroptimizationStop(_Section):
    """Stop a trial whose trained reward rises while a held-out reward falls: reward over-optimization."""

    heldout: str = Field(
        description="the held-out reward to watch: eval/heldout/<name> (or <name>) of the base eval.rewards"
    )
    reward: str = Field("eval/reward", description="the trained reward, as measured at each evaluation")
    margin: float = Field(
        ge=0, description="stop when the held-out reward falls by more than this (its units) over the window"
    )
    window: int = Field(
        3, ge=2, description="evaluations (step 0 included) over which both trends are fitted by a line"
    )

    @property
    def heldout_metric(self) -> str:
        return self.heldout if self.heldout.startswith("eval/") else HELDOUT_PREFIX + self.heldout


class StopSettings(_Section):
    collapse: CollapseStop | None = Field(None, description="end a trial whose diversity collapses")
    overoptimization: OveroptimizationStop | None = Field(
        None, description="end a trial whose held-out reward falls while its trained reward rises"
    )
    nan: bool = Field(True, description="end a trial whose loss or objective becomes NaN/inf")


class SweepConfig(_Section):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="sweep name; default: the file name"
    )
    base: str | dict[str, Any] = Field(
        description="an experiment YAML path (relative to this file) or mapping"
    )
    space: dict[str, Any] = Field(
        description="dotted experiment field -> domain (alignprop_ray/sweep/space.py)"
    )
    tune: TuneSettings = Field(default_factory=TuneSettings, description="search and scheduling")
    stop: StopSettings = Field(default_factory=StopSettings, description="stoppers")


@dataclass
class Sweep:
    """A validated sweep, ready to run."""

    name: str
    config: SweepConfig
    domains: list[Domain]
    base: dict[str, Any]  # the base experiment as data (overrides applied, input paths pinned absolute)
    base_dir: str  # where the base experiment's relative paths resolve
    reference: ExperimentConfig  # base + the first value of every domain: shared settings (tracking, ...)
    source: str | None = None  # the sweep file
    overrides: list[str] = field(default_factory=list)

    @property
    def storage_path(self) -> str:
        return self.config.tune.storage_path or self.reference.storage.path

    @property
    def selection_rule(self) -> SelectionRule:
        return selection_rule(self.config)

    @property
    def heldout_metrics(self) -> list[str]:
        """eval/heldout/<name> of the base experiment's held-out rewards (eval.rewards)."""
        return heldout_metrics(self.reference)

    def experiment(self, point: Mapping[str, Any], overrides: Iterable[str] = ()) -> ExperimentConfig:
        """The trial's experiment: base + the sampled point (+ e.g. tracking overrides); raises ConfigError."""
        data, problems = apply_point(self.base, dict(point))
        if problems:
            raise ConfigError(problems)
        return parse_experiment(data, self.base_dir, overrides, env={})

    def served_terms(self) -> list:
        """The served rewards of every trial (serving/specs.py), one per Ray Serve application: the base's,
        crossed with every listed value of the searched fields that change a served reward (validation
        holds those to listed values: `_served_domain_problems`)."""
        from alignprop_ray.serving.specs import served_terms, unique

        varying = [d for d in self.domains if _reward_term_of(d.field) is not None]
        first = {d.field: d.first() for d in self.domains}
        found = []
        for values in itertools.product(*(d.candidates() for d in varying)):
            point = {**first, **{d.field: v for d, v in zip(varying, values, strict=True)}}
            found += served_terms(self.experiment(point))
        return unique(found)

    def trial_count(self) -> int | None:
        """Trials a grid or random sweep will run (grid fields crossed x num_samples); None for Optuna."""
        if self.config.tune.algorithm == "optuna":
            return self.config.tune.num_samples
        grid = [len(d.values) for d in self.domains if d.kind == "grid"]
        return self.config.tune.num_samples * (_product(grid) if grid else 1)


def _product(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def load_sweep(
    path: str | os.PathLike, overrides: Iterable[str] = (), env: Mapping[str, str] = os.environ
) -> Sweep:
    """Read and validate a sweep file; every problem is raised together as one ConfigError."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return parse_sweep(read_yaml(path), path.parent, overrides, env, default_name=path.stem, source=str(path))


def parse_sweep(
    data: dict[str, Any],
    base_dir: str | os.PathLike,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] = os.environ,
    *,
    default_name: str = "sweep",
    source: str | None = None,
) -> Sweep:
    if "compare" in data:
        raise ConfigError(["compare: this is a comparison file: run it with `alignprop-ray compare FILE`"])
    overrides = list(overrides)
    data, problems = _apply_sweep_overrides(data, overrides)
    config, config_problems = _validate_config(data)
    problems += config_problems
    base, base_root, base_problems = _load_base(data.get("base"), Path(base_dir), _base_overrides(overrides))
    problems += base_problems
    domains, space_problems = parse_space(data.get("space"))
    problems += space_problems
    reference = None
    if base is not None:
        reference, point_problems = _check_points(base, base_root, domains, env)
        problems += point_problems
    if config is not None:
        problems += _check_tune(config, domains, reference, base)
    if reference is not None and not problems:
        problems += _served_domain_problems(reference, domains)
    if problems or config is None or reference is None or base is None:
        raise ConfigError(problems or ["base: could not be validated"])
    name = config.name or _safe_name(default_name)
    return Sweep(
        name, config, domains, _pin_paths(base, reference), str(base_root), reference, source, overrides
    )


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")
    return cleaned or "sweep"


def _base_overrides(overrides: list[str]) -> list[str]:
    """`--set` items for the base experiment: `base.KEY=V`, or any key that is not a sweep section."""
    out = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        head = key.split(".")[0]
        if head == "base":
            out.append(item.strip()[len("base.") :])
        elif head not in SWEEP_KEYS:
            out.append(item)
    return out


def _apply_sweep_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `--set` items that edit the sweep itself; `space.a.b=V` sets the space entry `a.b`."""
    sweep_items, space_items = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        head = key.split(".")[0]
        if head == "space" and "." in key:
            space_items.append(item)
        elif head in SWEEP_KEYS and head != "base":
            sweep_items.append(item)
    data, problems = collect_overrides(data, sweep_items, SweepConfig)
    for item in space_items:
        key, _, text = item.partition("=")
        space = data.get("space") if isinstance(data.get("space"), dict) else {}
        data["space"] = {**space, key.strip()[len("space.") :]: parse_value(text)}
    return data, problems


def _validate_config(data: dict[str, Any]) -> tuple[SweepConfig | None, list[str]]:
    try:
        return SweepConfig.model_validate(data), []
    except ValidationError as err:
        problems = format_validation_error(err, (), SweepConfig)
        # base/space shapes are reported (in more detail) by their own checks
        return None, [p for p in problems if not p.startswith(("base.", "base:", "space.", "space:"))]


def _load_base(base: Any, sweep_dir: Path, overrides: list[str]) -> tuple[dict | None, Path, list[str]]:
    """(experiment data with overrides, the directory its relative paths resolve against, problems)."""
    if base is None:
        return None, sweep_dir, ["base: required (an experiment YAML path, or the experiment inline)"]
    root = sweep_dir
    if isinstance(base, str):
        path = sweep_dir / Path(base).expanduser()
        try:
            base = read_yaml(path)
        except UserError as err:
            return None, sweep_dir, [f"base: {err}"]
        root = path.parent
    if not isinstance(base, dict):
        return None, root, [f"base: must be an experiment YAML path or mapping (got {repr(base)[:60]})"]
    data, problems = collect_overrides(base, overrides, ExperimentConfig)
    return data, root, problems


def _validate_experiment(
    data: dict, root: Path, env: Mapping[str, str]
) -> tuple[ExperimentConfig | None, list[str]]:
    try:
        return parse_experiment(data, root, (), env), []
    except ConfigError as err:
        return None, err.problems


def _check_points(
    base: dict, root: Path, domains: list[Domain], env: Mapping[str, str]
) -> tuple[ExperimentConfig | None, list[str]]:
    """Validate base + first values, then each other candidate value, then small grids combination-wise."""
    first = {d.field: d.first() for d in domains}
    data, problems = apply_point(base, first)
    if problems:
        return None, problems
    reference, problems = _validate_experiment(data, root, env)
    if reference is None:
        return None, [_attribute(p, domains) for p in problems]
    problems = []
    for domain in domains:
        for value in domain.candidates()[1:]:
            problems += _point_problems(base, root, env, {**first, domain.field: value}, domain.field, value)
    if not problems:
        problems = _combination_problems(base, root, env, domains, first)
    return reference, problems


def _point_problems(base, root, env, point, field_name, value) -> list[str]:
    data, problems = apply_point(base, point)
    if not problems:
        problems = _validate_experiment(data, root, env)[1]
    return [f"space.{field_name}: value {value!r}: {p}" for p in problems]


def _combination_problems(base, root, env, domains: list[Domain], first: dict) -> list[str]:
    listed = [d for d in domains if d.kind in ("grid", "choice") and len(d.values) > 1]
    if _product([len(d.values) for d in listed]) > MAX_COMBINATIONS:
        return []
    for combo in itertools.product(*(d.values for d in listed)):
        point = {**first, **{d.field: v for d, v in zip(listed, combo, strict=True)}}
        data, problems = apply_point(base, point)
        problems = problems or _validate_experiment(data, root, env)[1]
        if problems:
            shown = ", ".join(f"{d.field}={v!r}" for d, v in zip(listed, combo, strict=True))
            return [f"space: the combination {shown} is invalid: {problems[0]}"]
    return []


def _attribute(problem: str, domains: list[Domain]) -> str:
    """Prefix a problem of the reference experiment with `space.` (a searched field) or `base.`."""
    for d in domains:
        if problem.startswith((d.field + ":", d.field + ".")):
            return f"space.{problem}"
    return f"base.{problem}"


def _pin_paths(base: dict, reference: ExperimentConfig) -> dict:
    """Input paths as the driver resolved them: trials run with another cwd (Tune's trial directory)."""
    out = dict(base)
    out["model"] = {**(base.get("model") or {}), "pretrained": reference.model.pretrained}
    out["prompts"] = {
        **(base.get("prompts") or {}),
        "train": reference.prompts.train,
        "eval": reference.prompts.eval,
    }
    return out


def selection_rule(config: SweepConfig) -> SelectionRule:
    """tune.select as a rule; without it, "not collapsed" (selection.default_constraints)."""
    metric, mode = config.tune.best_metric
    select = config.tune.select
    if select is None:
        collapse = config.stop.collapse
        if collapse is None:
            return SelectionRule(metric, mode, default_constraints())
        thresholds = (collapse.metric, collapse.min_absolute, collapse.min_relative_to_first)
        return SelectionRule(metric, mode, default_constraints(*thresholds))
    constraints = tuple(parse_constraint(text) for text in select.constraints)
    return SelectionRule(select.metric or metric, select.mode or mode, constraints)


def heldout_metrics(reference: ExperimentConfig) -> list[str]:
    return sorted({HELDOUT_PREFIX + split_key(str(key))[0] for key in reference.eval.rewards})


def known_metrics(reference: ExperimentConfig | None, base: dict | None, domains: list[Domain]) -> set[str]:
    terms = set(reference.reward) if reference is not None else set((base or {}).get("reward") or {})
    terms |= {d.field.removeprefix("reward.") for d in domains if d.field.startswith("reward.")}
    terms = {split_key(t)[0] for t in terms}
    methods = [m for row in method_rows() for m in row.metric_names]  # train/ddpo/approx_kl, ...
    known = {*TRAIN_METRICS, *EVAL_METRICS, *methods, *(p + t for p in TERM_PREFIXES for t in terms)}
    if reference is not None:
        known |= set(heldout_metrics(reference))
        if reference.eval.base_fidelity is not None:
            known.add(BASE_FIDELITY)
        if reference.train.kl_weight > 0:
            known.add(KL_TO_BASE)
    if any(d.field == "train.kl_weight" for d in domains):
        known.add(KL_TO_BASE)
    return known


def _check_metric(name: str, metric: str, known: set[str]) -> list[str]:
    if metric in known:
        return []
    terms = sorted(m for m in known if m.startswith(("eval/reward/", HELDOUT_PREFIX, BASE_FIDELITY)))
    return [
        f"{name}: unknown metric {metric!r} (valid: {', '.join([*EVAL_METRICS, *terms])}, train/..., perf/...)"
    ]


def _check_select(config: SweepConfig, known: set[str]) -> list[str]:
    """tune.select: each constraint parses and names a logged metric; the objective is one too."""
    select, problems = config.tune.select, []
    if select is None:
        return []
    if select.metric:
        problems += _check_metric("tune.select.metric", select.metric, known)
    for i, text in enumerate(select.constraints):
        where = f"tune.select.constraints.{i}"
        try:
            constraint = parse_constraint(text)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        problems += _check_metric(where, constraint.metric, known)
    return problems


def _check_overoptimization(config: SweepConfig, known: set[str]) -> list[str]:
    stop = config.stop.overoptimization
    if stop is None:
        return []
    problems = _check_metric("stop.overoptimization.reward", stop.reward, known)
    if not stop.heldout_metric.startswith(HELDOUT_PREFIX):
        return [*problems, f"stop.overoptimization.heldout: {stop.heldout!r} is not eval/heldout/<name>"]
    if stop.heldout_metric not in known:
        names = sorted(m.removeprefix(HELDOUT_PREFIX) for m in known if m.startswith(HELDOUT_PREFIX))
        problems.append(
            f"stop.overoptimization.heldout: no held-out reward {stop.heldout!r} in base eval.rewards "
            f"(has: {', '.join(names) or 'none'})"
        )
    return problems


# Term settings the worker applies: the same served reward serves every value of them.
_MIXTURE_FIELDS = ("weight", "objective", "target")


def _reward_term_of(field_name: str) -> str | None:
    """The reward term whose model or serve settings a searched field changes (`reward.aesthetic.seed` ->
    `aesthetic`; `*` for a whole `reward:` or `eval.rewards:` mapping), or None."""
    from alignprop_ray.rewards.spec import split_key

    for prefix in ("reward", "eval.rewards"):
        if field_name == prefix:
            return "*"
        if field_name.startswith(prefix + "."):
            name, option = split_key(field_name[len(prefix) + 1 :])
            return None if option in _MIXTURE_FIELDS else name
    return None


def _served_domain_problems(reference: ExperimentConfig, domains: list[Domain]) -> list[str]:
    """A searched field that changes a served reward takes listed values (grid, choice): the sweep starts a
    deployment for each before its first trial, so it must know them all."""
    from alignprop_ray.serving.specs import served_terms

    served = {term.name for term in served_terms(reference)}
    problems = []
    for d in domains:
        term = _reward_term_of(d.field)
        touches = term is not None and (term == "*" or term in served or ".serve" in d.field)
        if touches and d.kind not in LISTS:
            problems.append(
                f"space.{d.field}: changes a served reward, so it takes listed values (grid or choice), "
                f"not {d.kind}: the sweep starts each deployment before its first trial"
            )
    return problems


def _check_tune(config: SweepConfig, domains: list[Domain], reference, base) -> list[str]:
    tune, problems = config.tune, []
    known = known_metrics(reference, base, domains)
    if tune.metric:
        problems += _check_metric("tune.metric", tune.metric, known)
    for i, objective in enumerate(tune.objectives or []):
        problems += _check_metric(f"tune.objectives.{i}.metric", objective.metric, known)
    if config.stop.collapse:
        problems += _check_metric("stop.collapse.metric", config.stop.collapse.metric, known)
    problems += _check_select(config, known)
    problems += _check_overoptimization(config, known)
    for d in domains:
        if tune.algorithm == "optuna" and d.kind == "grid":
            problems.append(f"space.{d.field}: grid is not supported by algorithm optuna; use choice")
        if tune.algorithm == "grid" and d.kind != "grid":
            problems.append(
                f"space.{d.field}: algorithm grid needs grid: [...] (got {d.kind}); "
                "use algorithm random to sample it"
            )
    if tune.objectives and tune.algorithm != "optuna":
        problems.append(
            f"tune.objectives: multi-objective search needs algorithm optuna (got {tune.algorithm})"
        )
    if tune.objectives and tune.scheduler == "asha":
        problems.append("tune.scheduler: asha needs a single metric; drop it or tune.objectives")
    return problems
