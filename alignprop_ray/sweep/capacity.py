"""How many trials of a sweep run at once: from the largest cluster Ray may build, not the one up now.

A cluster that scales from zero (`ray up clusters/aws.yaml`) has no GPU node when a sweep starts, and
Tune shows the autoscaler only the trials it lets run: concurrency sized from what is up would keep the
sweep on one node for good. docs/clusters.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignprop_ray.compat import ray_monitor_command, ray_reported_node_groups
from alignprop_ray.errors import UserError

# The node types an autoscaler may add, for a driver that cannot read its config (KubeRay's autoscaler
# runs in a container of its own): `cluster_ceiling`, source 2.
NODE_TYPES_ENV = "ALIGNPROP_NODE_TYPES"


@dataclass(frozen=True)
class Ceiling:
    """The largest cluster Ray may build: the nodes that are always there, each kind of node an autoscaler
    may add with the most nodes of that kind (math.inf: no limit), and the cap on added nodes."""

    always: list[dict[str, float]]
    growable: list[tuple[dict[str, float], float]]
    source: str  # where this was read, for the sweep header
    max_nodes: float = math.inf


def concurrency(sweep, say: Callable[[str], None], held: Sequence[dict[str, float]] = ()) -> tuple[int, str]:
    """How many trials run at once, and why (the sweep header prints both).

    `tune.max_concurrent_trials` if set; else every trial, as far as the largest cluster Ray may build holds
    them (`cluster_ceiling`) once the sweep's served rewards have their replicas (`held`: each replica's
    resources, max_replicas of each; `reserve`). Not the resources present at the start: a cluster that
    scales from zero has no GPU node then, and Tune shows the autoscaler only the trials it lets run, so
    sizing by what is up would keep the sweep on one node for good. UserError if an autoscaler can never
    fit one trial.
    """
    settings = sweep.config.tune
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials, "tune.max_concurrent_trials"
    trials = sweep.trial_count()
    ceiling = cluster_ceiling()
    if ceiling is None:
        return (
            trials,
            "all trials: this node cannot see how far the cluster grows (cap: tune.max_concurrent_trials)",
        )
    if held:
        ceiling = reserve(ceiling, held)
    workers, per_worker = trial_workers(sweep)
    fit = trials_that_fit(ceiling, per_worker, workers)
    if fit >= 1:
        room = "no limit" if math.isinf(fit) else f"room for {fit}"
        return min(trials, fit), f"{ceiling.source}: {room}"
    need = f"{workers} workers x {per_worker}"
    if ceiling.growable:
        raise UserError(f"one trial needs {need}, more than the cluster can ever hold ({ceiling.source})")
    say(f"note: one trial needs {need}, more than {ceiling.source}: trials wait for a node to join")
    return 1, f"{ceiling.source}: no room for a trial yet"


def trials_that_fit(ceiling: Ceiling, per_worker: dict[str, float], workers: int) -> float:
    """How many trials of `workers` workers, each needing `per_worker`, the largest cluster holds at once.

    Counted node by node, since a worker never spans two: the nodes that are always there, then the kinds
    of node that take the most workers, up to the cap on added nodes. math.inf: no limit.
    """
    slots = sum(_per_node(node, per_worker) for node in ceiling.always)
    for fits, added, _ in _added_nodes(ceiling, per_worker):
        slots += fits * added
    return math.inf if math.isinf(slots) else slots // workers


def reserve(ceiling: Ceiling, held: Sequence[dict[str, float]]) -> Ceiling:
    """The ceiling less what the reward replicas `held` take (each a replica's resources).

    Each replica goes where Ray's scheduler would find room first: a node that is always there, else one
    node of the first kind an autoscaler may add that holds it (that node then counts as always there, with
    what the replica leaves). A replica no node can hold takes nothing here (its deployment never starts).
    """
    always = [dict(node) for node in ceiling.always]
    growable, max_nodes = list(ceiling.growable), ceiling.max_nodes
    for need in held:
        node = next((n for n in always if _holds(n, need)), None)
        if node is None:
            kind = next(
                (i for i, (res, most) in enumerate(growable) if most >= 1 and _holds(res, need)), None
            )
            if kind is None or max_nodes < 1:
                continue
            resources, most = growable[kind]
            growable[kind], max_nodes = (resources, most - 1), max_nodes - 1
            node = dict(resources)
            always.append(node)
        for key, amount in need.items():
            node[key] = node.get(key, 0) - amount
    total = _sum(held)
    return Ceiling(always, growable, f"{ceiling.source}, less the reward replicas' {total}", max_nodes)


def _holds(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(node.get(key, 0) >= amount - 1e-9 for key, amount in need.items())


def _sum(held: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for need in held:
        for key, amount in need.items():
            total[key] = total.get(key, 0) + amount
    return {key: round(float(amount), 6) for key, amount in total.items()}


def nodes_to_hold(ceiling: Ceiling, per_worker: dict[str, float], workers: int, trials: int) -> list:
    """The added nodes that hold `trials` trials at once, as (node resources, count), in the order
    `trials_that_fit` counts them (the roomiest kinds first, after the nodes that are always there):
    what the autoscaler adds for them, and what the cloud quota must allow."""
    slots = sum(_per_node(node, per_worker) for node in ceiling.always)
    needed, used = trials * workers, []
    for fits, added, resources in _added_nodes(ceiling, per_worker):
        if slots >= needed:
            break
        count = min(added, math.ceil((needed - slots) / fits))
        used.append((resources, count))
        slots += fits * count
    return used


def _per_node(resources: dict[str, float], per_worker: dict[str, float]) -> float:
    """Workers one node of `resources` holds (math.inf if a worker needs nothing)."""
    # + 1e-9: 1 // 0.001 is 999 in floating point (accelerator_type asks 0.001 per worker)
    fits = [math.floor(resources.get(k, 0) / need + 1e-9) for k, need in per_worker.items() if need > 0]
    return min(fits, default=math.inf)


def _added_nodes(ceiling: Ceiling, per_worker: dict[str, float]):
    """(workers each, nodes, resources) of each kind an autoscaler may add, roomiest first, within the cap
    on added nodes; stops at a kind that holds no worker (or after one that holds any number)."""
    room = ceiling.max_nodes
    kinds = sorted(
        ((_per_node(node, per_worker), most, node) for node, most in ceiling.growable),
        key=lambda kind: kind[0],
        reverse=True,
    )
    for fits, most, node in kinds:
        if fits == 0 or room == 0:
            return
        added = min(most, room)
        if added == 0:  # a kind switched off (max_workers: 0)
            continue
        yield fits, added, node
        room -= added
        if math.isinf(fits):
            return


def cluster_ceiling() -> Ceiling | None:
    """The largest cluster Ray may build, as far as this node can tell; None where it cannot.

    1. The cluster config an autoscaler reports to the GCS: what Ray Train checks worker groups against
       (Ray 2.60's own autoscalers leave it empty; platforms that report it fill it).
    2. The node types in NODE_TYPES_ENV, declared where the autoscaler's config is out of the driver's
       sight: the KubeRay manifests set it from their worker groups (tests/test_clusters.py checks them).
    3. The node types and max_workers in the config file of this cluster's autoscaler, the monitor process
       on the head (`ray up` starts it with --autoscaling-config=~/ray_bootstrap_config.yaml); the driver
       must run on the head to see it, as it does under `ray job submit`.
    4. A monitor without a config file: a fixed cluster (`ray.init()`, `ray start` by hand); its nodes now.
    Otherwise (a driver off the head, KubeRay's autoscaler without NODE_TYPES_ENV): None.
    """
    import ray
    import yaml

    for found in (reported_ceiling(), declared_ceiling(os.environ.get(NODE_TYPES_ENV))):
        if found is not None:
            return found
    monitor = ray_monitor_command(ray.get_runtime_context().gcs_address)
    if monitor is None:
        return None
    config = next((arg.split("=", 1)[1] for arg in monitor if arg.startswith("--autoscaling-config=")), None)
    if config:
        try:
            return autoscaler_ceiling(yaml.safe_load(Path(config).expanduser().read_text()), config)
        except (OSError, yaml.YAMLError):  # gone or unreadable since the head started
            return None
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return Ceiling(nodes, [], "the nodes of this cluster, which has no autoscaler")


def autoscaler_ceiling(config: dict[str, Any], path: str) -> Ceiling | None:
    """Ceiling of an autoscaler config (`ray up`'s format, as the launcher writes it for the head).

    None where a node type that may run leaves its `resources` for Ray to detect at run time: the `local`
    provider's single node type, or a cloud node type written without them.
    """
    types, head = config.get("available_node_types") or {}, config.get("head_node_type")
    cap = config.get("max_workers", math.inf)
    most = {name: 1 if name == head else spec.get("max_workers", cap) for name, spec in types.items()}
    if head not in types or any(most[name] and not spec.get("resources") for name, spec in types.items()):
        return None
    growable = [(spec.get("resources", {}), most[name]) for name, spec in types.items() if name != head]
    return Ceiling([types[head]["resources"]], growable, f"node types and max_workers in {path}", cap)


def declared_ceiling(text: str | None) -> Ceiling | None:
    """Ceiling from NODE_TYPES_ENV: {type name: {resources: {...}, max_workers: N}} as JSON (or YAML), the
    shape of an autoscaler config's available_node_types; None if unset. UserError if malformed."""
    import yaml

    if not text:
        return None
    try:
        types = yaml.safe_load(text)
        growable = [
            ({k: float(v) for k, v in spec["resources"].items()}, int(spec["max_workers"]))
            for spec in types.values()
        ]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{NODE_TYPES_ENV} must map each node type to {{resources: {{...}}, max_workers: N}} "
            f"(got {text[:80]!r}: {err})"
        ) from None
    return Ceiling([], growable, f"node types in {NODE_TYPES_ENV}")


def reported_ceiling() -> Ceiling | None:
    """Ceiling from the cluster config an autoscaler reports to the GCS, if any."""
    groups = ray_reported_node_groups()
    if not groups:
        return None
    return Ceiling([], groups, "the cluster config the autoscaler reports to Ray")


def trial_resources(sweep) -> dict[str, float]:
    """Resources of one trial's Train workers (the most workers any searched value asks for)."""
    workers, per_worker = trial_workers(sweep)
    return {key: amount * workers for key, amount in per_worker.items()}


def trial_workers(sweep) -> tuple[int, dict[str, float]]:
    """The most Train workers one trial runs (scaling.num_workers may be searched), and what each needs."""
    scaling = sweep.reference.scaling
    workers = max(
        [
            scaling.num_workers,
            *(int(v) for d in sweep.domains if d.field == "scaling.num_workers" for v in d.candidates()),
        ]
    )
    per_worker = dict(scaling.resources_per_worker or {"CPU": 1.0})
    if scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    if scaling.accelerator_type:  # what Ray's ScalingConfig adds per worker for accelerator_type
        per_worker.setdefault(f"accelerator_type:{scaling.accelerator_type}", 0.001)
    return workers, per_worker
