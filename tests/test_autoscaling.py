"""How many trials a sweep runs at once: from what the cluster can grow to, not from what is up at the start.

The arithmetic is checked without Ray. The Ray test grows a real cluster from zero: Ray's fake multi-node
autoscaler (the `fake_multinode` provider, which starts each added node as a set of Ray processes on this
machine) with a CPU-only head and one node type that carries a custom resource standing in for a GPU.
A 4-trial sweep on the tiny model whose trials ask for that resource must make the autoscaler add nodes
and run trials side by side; sizing concurrency by the resources present at the start (none) ran them one
after another on one added node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from alignprop_ray.errors import UserError
from alignprop_ray.sweep import capacity
from alignprop_ray.sweep.capacity import Ceiling, autoscaler_ceiling, trials_that_fit
from alignprop_ray.sweep.config import load_sweep, parse_sweep
from tests.helpers import free_port, most_at_once, tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
INF = math.inf

A10G = {"CPU": 4, "GPU": 1, "accelerator_type:A10G": 1}
L40S = {"CPU": 4, "GPU": 1, "accelerator_type:L40S": 1}
L40S_X4 = {"CPU": 48, "GPU": 4, "accelerator_type:L40S": 1}
L40S_WORKER = {"CPU": 1, "GPU": 1, "accelerator_type:L40S": 0.001}  # what trial_workers asks per worker


# --- the arithmetic ------------------------------------------------------------------------------------


def test_workers_are_counted_node_by_node():
    """4 workers per trial on L40S: 2 four-GPU nodes (8 workers) + 4 one-GPU nodes (4) = 12 workers, 3
    trials. The A10G nodes add GPUs but no L40S, and the head has none: adding up resources across the
    cluster would say 5 trials (20 GPUs / 4)."""
    ceiling = Ceiling([{"CPU": 0}], [(A10G, 8), (L40S, 4), (L40S_X4, 2)], "test")
    assert trials_that_fit(ceiling, L40S_WORKER, workers=4) == 3
    assert trials_that_fit(ceiling, {"CPU": 1, "GPU": 1}, workers=4) == 5


def test_the_cap_on_nodes_takes_the_roomiest_kinds_first():
    # 3 nodes at most: both four-GPU nodes (8 workers) and one one-GPU node (1): 9 workers, 2 trials
    ceiling = Ceiling([], [(L40S, 4), (L40S_X4, 2)], "test", max_nodes=3)
    assert trials_that_fit(ceiling, L40S_WORKER, workers=4) == 2
    assert trials_that_fit(Ceiling([], [(L40S, 4)], "test", max_nodes=0), L40S_WORKER, 1) == 0


def test_no_limit_and_no_room():
    assert trials_that_fit(Ceiling([], [(L40S, INF)], "test"), L40S_WORKER, workers=4) == INF
    assert trials_that_fit(Ceiling([{"CPU": 2}], [], "test"), {"CPU": 1}, workers=1) == 2
    assert trials_that_fit(Ceiling([{"CPU": 2}], [], "test"), {"CPU": 1, "GPU": 1}, workers=1) == 0
    assert trials_that_fit(Ceiling([{"CPU": 2}], [], "test"), {"CPU": 0}, workers=1) == INF


def test_an_autoscaler_config_gives_its_node_types_and_caps():
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}},
            "one": {"resources": L40S, "max_workers": 4},
            "four": {"resources": L40S_X4},  # no max_workers of its own: the cluster's
        },
    }
    ceiling = autoscaler_ceiling(config, "cfg.yaml")
    assert ceiling == Ceiling(
        [{"CPU": 0}], [(L40S, 4), (L40S_X4, 3)], "node types and max_workers in cfg.yaml", 3
    )
    del config["available_node_types"]["one"]["resources"]  # filled in from the cloud at run time
    assert autoscaler_ceiling(config, "cfg.yaml") is None
    config["available_node_types"]["one"]["max_workers"] = 0  # never added: its resources do not matter
    assert autoscaler_ceiling(config, "cfg.yaml").growable == [({}, 0), (L40S_X4, 3)]


def test_the_local_providers_node_type_leaves_the_ceiling_unknown():
    """`ray up clusters/local.yaml` writes one node type for the head and the workers alike, with the
    resources Ray detects on each machine: nothing to count from."""
    from ray.autoscaler._private.local.config import prepare_local

    config, _ = prepare_local(yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text()))
    assert autoscaler_ceiling(config, "local.yaml") is None


@pytest.fixture
def hub_reachable(monkeypatch):
    """As in test_sweep.py: hf:// weight refs count as downloadable (validation never downloads)."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)


def test_the_truncation_sweep_on_the_aws_cluster_runs_trials_side_by_side(
    tmp_path, monkeypatch, hub_reachable
):
    """The issue's case: a fresh clusters/aws.yaml cluster has no GPU node, so sizing by the resources
    present ran the 4-trial truncation sweep one trial at a time. Its autoscaler config holds more."""
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(ROOT / "sweeps" / "truncation.yaml", env={})
    config = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    ceiling = autoscaler_ceiling(config, "aws.yaml")
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: ceiling)
    workers, per_worker = capacity.trial_workers(sweep)
    accelerator = next(key for key in per_worker if key.startswith("accelerator_type:"))
    # with at most one trial's workers per GPU of the trial's accelerator type (the cap is not reached)
    gpus = sum(
        spec["resources"]["GPU"] * spec["max_workers"]
        for spec in config["available_node_types"].values()
        if accelerator in spec.get("resources", {})
    )
    concurrency, why = capacity.concurrency(sweep, say=print)
    assert concurrency == min(sweep.trial_count(), gpus // workers) > 1
    assert why == f"node types and max_workers in aws.yaml: room for {gpus // workers}"


SWEEP = tiny_sweep(
    {"train.lr": {"grid": [1e-3, 1e-2, 3e-2]}, "train.seed": {"grid": [0, 1]}},  # 6 trials
    base={"scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1, "fake_gpu": 1}}},
)
NODE = {"CPU": 1, "fake_gpu": 1}


@pytest.mark.parametrize(
    "ceiling, tune, expected",
    [
        (None, {}, (6, "all trials: this node cannot see how far the cluster grows")),
        (Ceiling([{"CPU": 0}], [(NODE, 5)], "the config"), {}, (2, "the config: room for 2")),
        (Ceiling([{"CPU": 0}], [(NODE, INF)], "the config"), {}, (6, "the config: no limit")),
        (Ceiling([NODE, NODE], [], "the nodes now"), {}, (1, "the nodes now: room for 1")),
        (Ceiling([NODE], [], "the nodes now"), {}, (1, "the nodes now: no room for a trial yet")),
        (None, {"max_concurrent_trials": 3}, (3, "tune.max_concurrent_trials")),
        (Ceiling([{"CPU": 0}], [(NODE, 5)], "the config"), {"max_concurrent_trials": 4}, (4, "tune.max")),
    ],
    ids=["unknown", "bounded", "unlimited", "fixed", "fixed-too-small", "set", "set-beats-cluster"],
)
def test_concurrency_and_why(tmp_path, monkeypatch, ceiling, tune, expected):
    sweep = parse_sweep({**SWEEP, "tune": {**SWEEP["tune"], **tune}}, tmp_path, env={})
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: ceiling)
    notes = []
    concurrency, why = capacity.concurrency(sweep, notes.append)
    assert (concurrency, why[: len(expected[1])]) == expected
    assert bool(notes) == why.endswith("no room for a trial yet")


def test_a_trial_no_node_type_can_hold_is_refused(tmp_path, monkeypatch):
    sweep = parse_sweep(SWEEP, tmp_path, env={})
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: Ceiling([{"CPU": 0}], [({"CPU": 8}, 4)], "cfg"))
    with pytest.raises(
        UserError, match=r"^one trial needs 2 workers x .* more than the cluster can ever hold"
    ):
        capacity.concurrency(sweep, print)


def test_node_types_declared_in_the_environment(tmp_path, monkeypatch):
    declared = '{"gpu": {"resources": {"CPU": 1, "fake_gpu": 1}, "max_workers": 3}}'
    assert capacity.declared_ceiling(declared) == Ceiling(
        [], [({"CPU": 1.0, "fake_gpu": 1.0}, 3)], "node types in ALIGNPROP_NODE_TYPES"
    )
    assert capacity.declared_ceiling(None) is None
    for broken in ('{"gpu": {"max_workers": 3}}', "[1, 2]", '{"gpu": {"resources": {"CPU": "x"}'):
        with pytest.raises(UserError, match=r"^ALIGNPROP_NODE_TYPES must map each node type to"):
            capacity.declared_ceiling(broken)
    # what the sweep does with it: 2 workers a trial, 3 nodes of one worker each
    monkeypatch.setenv("ALIGNPROP_NODE_TYPES", declared)
    monkeypatch.setattr(capacity, "reported_ceiling", lambda: None)
    sweep = parse_sweep(SWEEP, tmp_path, env={})
    assert capacity.concurrency(sweep, print) == (1, "node types in ALIGNPROP_NODE_TYPES: room for 1")


def test_the_cluster_config_reported_to_ray(monkeypatch):
    from ray._private.state import state
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    config = ClusterConfig(
        node_group_configs=[
            NodeGroupConfig(name="a", resources={"CPU": 4, "GPU": 1}, max_count=2),
            NodeGroupConfig(name="b", resources={"CPU": 8}, max_count=-1),
        ]
    )
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    ceiling = capacity.reported_ceiling()
    assert ceiling.growable == [({"CPU": 4, "GPU": 1}, 2), ({"CPU": 8}, INF)]
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    assert capacity.reported_ceiling() is None


# --- a cluster that scales from zero -------------------------------------------------------------------

MAX_NODES = 2


def autoscaler_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider, in the shape of its example config (which the Ray wheel lacks)."""
    return {
        "cluster_name": "fake-zero",
        "max_workers": MAX_NODES,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "fake-gpu": {
                "resources": {"CPU": 1, "fake_gpu": 1, "object_store_memory": 100 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


# After the sweep: the cluster's nodes and where Ray Train's worker actors ran (the state API keeps dead
# actors), read through the state API of the cluster at RAY_ADDRESS and printed as JSON.
CLUSTER_FACTS = """
import json
from ray.util.state import list_actors, list_nodes
nodes = [{"id": n.node_id, "resources": n.resources_total} for n in list_nodes(detail=True, limit=100)]
workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
print(json.dumps({"nodes": nodes, "worker_nodes": [a.node_id for a in workers]}))
"""


@pytest.fixture
def cluster_from_zero():
    """A Ray head with no fake_gpu whose autoscaler may add MAX_NODES nodes that have one; yields the
    environment of a driver for it (RAY_ADDRESS)."""
    with start_cluster_from_zero({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}) as env:
        yield env


@contextlib.contextmanager
def start_cluster_from_zero(extra_env: dict[str, str] | None = None):
    """The cluster of `cluster_from_zero`, its every process started with `extra_env` set.

    The head, and with it every node the autoscaler adds, runs in a session of its own, and is ended by
    signalling that session's processes, never with `ray stop` (which would end every Ray instance on the
    machine, the test session's included).
    """
    import ray.util

    state = Path(tempfile.mkdtemp(prefix="apl-as-", dir="/tmp"))  # short: Ray's socket paths < 108 bytes
    address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    config = state / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(address)))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to run without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # Ray 2.60 turns token authentication on by itself where ~/.ray/auth_token exists (a `ray.init()`
        # elsewhere may have written it); this throwaway loopback cluster does without, for every client.
        "RAY_AUTH_MODE": "disabled",
        **(extra_env or {}),
    }
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={address.rsplit(':', 1)[1]}",
        # CPUs no trial can use (their workers need fake_gpu), only so that the head's raylet starts the
        # trials' driver and controller processes two at a time instead of one by one
        "--num-cpus=2",
        f"--autoscaling-config={config}",
        f"--temp-dir={state / 'ray'}",
        "--object-store-memory=100000000",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    with open(state / "head.log", "w") as log:
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        check = [str(bin_dir / "ray"), "health-check", "--address", address]
        while subprocess.run(check, env=env, capture_output=True).returncode:
            log = (state / "head.log").read_text()
            assert head.poll() is None and time.monotonic() < deadline, log[-3000:]
            time.sleep(1)
        yield {**env, "RAY_ADDRESS": address}
    finally:
        _end_cluster(head)
        shutil.rmtree(state, ignore_errors=True)


def _end_cluster(head: subprocess.Popen) -> None:
    """End every process of the cluster. They all run in the session `start_new_session` opened for the
    head (Ray's worker processes get process groups of their own, not sessions): SIGTERM to each, then
    SIGKILL to what is left after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
        deadline = time.monotonic() + grace
        for pid in _session(head.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while _session(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    head.wait()


def _session(sid: int) -> list[int]:
    pids = []
    for pid in psutil.pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
    return pids


def child_runs(uri: str, experiment: str = "smoke") -> list:
    """The MLflow runs of a sweep's trials (smoke.yaml's experiment unless told)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], "tags.`mlflow.parentRunId` != ''", max_results=100)


def training_windows(uri: str) -> list[tuple[int, int]]:
    """(first, last) timestamp in ms of the per-step metrics of each trial's MLflow run, logged by the
    trial's rank-0 Train worker as it trains."""
    from mlflow import MlflowClient

    client, windows = MlflowClient(uri), []
    for run in child_runs(uri):
        stamps = [
            m.timestamp for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)
        ]
        windows.append((min(stamps), max(stamps)))
    return windows


@pytest.mark.ray
@pytest.mark.own_ray
def test_a_sweep_grows_the_cluster_from_zero_and_runs_trials_side_by_side(cluster_from_zero, tmp_path):
    env = cluster_from_zero
    sets = {
        "name": "from-zero",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage.path": str(tmp_path / "runs"),
        "scaling.resources_per_worker": "{CPU: 1, fake_gpu: 1}",
        # 12 steps: trials side by side show as overlapping training, and 3 steps (about 3 s each) missed
        # each other on a loaded box though both nodes held a trial (CI, 2026-12-08: windows 0-2.8 s, 2.9-8.2 s)
        "train.steps": 12,
        "train.eval_every": 12,
        "train.checkpoint_every": 12,
        "sampling.steps": 4,
        "model.resolution": 32,
        "stop.collapse": "null",  # the point here is placement, not the trials' fate
        # all 4 at once asked for, room for 2 once both nodes are up: the other 2 wait for room through
        # several of Ray Train's 15 s tries (the fixture's), under the setting that bounded a trial's first
        # start before issue 22 (3 of its 4 trials errored): the short form of tests/test_oversubscribed.py
        "tune.max_concurrent_trials": 4,
        "failure.wait_for_workers_s": 30,
    }
    command = [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(ROOT / "sweeps" / "smoke.yaml")]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    sweep = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-4000:]
    table = out[out.index("\ntrial ") :].splitlines()
    # a trial's status, then maybe a selection note after it
    assert sum(" completed" in line for line in table) == 4, "\n".join(table)

    facts = subprocess.run(
        [sys.executable, "-c", CLUSTER_FACTS], env=env, capture_output=True, text=True, timeout=120
    )
    assert facts.returncode == 0, facts.stderr[-3000:]
    cluster = json.loads(facts.stdout.strip().splitlines()[-1])
    added = {n["id"] for n in cluster["nodes"] if n["resources"].get("fake_gpu")}
    assert len(added) >= 2, cluster["nodes"]
    assert added == set(cluster["worker_nodes"]), cluster  # Train workers ran on every added node
    windows = sorted(training_windows(sets["tracking.uri"]))
    assert len(windows) == 4
    assert any(b[0] < a[1] for a, b in itertools.combinations(windows, 2)), windows
    assert most_at_once(windows) == MAX_NODES, windows  # side by side, never more than the nodes
    assert "up to 4 at a time (tune.max_concurrent_trials)" in out, out[:2000]
    # the trials that waited said so on the console and in MLflow (tag alignprop.placement)
    assert "waiting for resources: the cluster has no room yet for 1 worker(s)" in out, out[-4000:]
    placed = [run.data.tags.get("alignprop.placement", "") for run in child_runs(sets["tracking.uri"])]
    assert sum(tag.startswith("placed after ") for tag in placed) >= 4 - MAX_NODES, placed
