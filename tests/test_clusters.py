"""Every cluster config under clusters/ passes Ray's own launcher validation; KubeRay manifests carry what
the operator needs. Fast, offline, starts no Ray.

How `ray up` checks a launcher config (ray.autoscaler._private.commands._bootstrap_config):
  1. util.prepare_config: merges the provider's defaults.yaml (read from disk; for `local`, prepare_local
     builds the single node type from head_ip/worker_ips), merges setup commands, checks the docker
     section, fills per-type min/max_workers. No provider code, no network.
  2. provider.fillout_available_node_types_resources: on AWS, boto3 `describe_instance_types` to fill
     missing `resources` (network; errors are only logged).
  3. util.validate_config: the JSON schema (ray-schema.json, additionalProperties: false, so unknown or
     misspelt keys fail) plus semantic checks (head_node_type exists, sum of min_workers <= max_workers).
  4. provider.bootstrap_config: IAM role, key pair, subnets, security group (network).
We run 1 and 3 and skip the network steps. Skipping 2 changes nothing for our files: the schema requires
`resources` on every node type, and aws.yaml declares them all, so there is nothing for it to fill. A
guard makes any socket connection during validation fail the test.

KubeRay manifests go through what Ray's KubeRay autoscaler derives from them
(`_derive_autoscaling_config_from_ray_cr`, the same validate_config at its end), so both kinds of cluster
are compared with the shipped configs in one form: node types and the resources each offers. Every
shipped experiment and sweep must fit one node type of each (GPU count per node, and the GPU model, hence
its memory, where a config names one in scaling.accelerator_type).
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from alignprop_ray.config import load_experiment, read_yaml
from alignprop_ray.sweep.capacity import NODE_TYPES_ENV, trial_resources
from alignprop_ray.sweep.config import is_sweep, load_sweep
from tests.helpers import load_shipped_sweep

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = "2.60.0"
GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
PROJECT_IMAGE = "alignprop-ray"  # clusters/Dockerfile, pushed as <registry>/alignprop-ray:<tag>
ENV_VARS = ("ALIGNPROP_TRACKING_URI", "ALIGNPROP_STORAGE_PATH")
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
COLD_NODE_S = 600  # instance boot + ~15 GB image pull + `ray start`: several minutes
# GPU model (Ray's accelerator_type name) and count per instance type, from the EC2 instance type pages.
INSTANCE_GPUS = {
    "m5.2xlarge": (None, 0),
    "g5.xlarge": ("A10G", 1),
    "g6e.xlarge": ("L40S", 1),
    "g6e.12xlarge": ("L40S", 4),
    "p4de.24xlarge": ("A100-80G", 8),
}
# Memory per GPU model in GB (NVIDIA data sheets).
GPU_MEMORY_GB = {"A10G": 24, "L4": 24, "L40S": 48, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141}
ACCELERATOR = "accelerator_type:"  # prefix of the Ray resource a node of that GPU model advertises
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))
FIT_CLUSTERS = ("aws.yaml", "kuberay/raycluster.yaml")  # the clusters every shipped config must fit
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_yaml() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".yaml", ".yml"))


def _is_launcher(path: Path) -> bool:
    docs = _documents(path)
    return len(docs) == 1 and "provider" in docs[0]


LAUNCHER = [p for p in _all_yaml() if _is_launcher(p)]
MANIFESTS = [p for p in _all_yaml() if not _is_launcher(p)]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during config validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ray_validate(config: dict) -> dict:
    """What `ray up` checks, minus its network steps (module docstring)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- the folder itself


def test_every_yaml_is_a_launcher_config_or_a_kubernetes_manifest():
    assert LAUNCHER and MANIFESTS
    for path in MANIFESTS:
        for doc in _documents(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path


def test_expected_files_exist():
    for name in ("aws.yaml", "local.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert (CLUSTERS / name).is_file(), name


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_docs_mention_every_cluster_file():
    docs = (ROOT / "docs" / "clusters.md").read_text()
    for path in CLUSTERS.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".sh", ""):
            assert str(path.relative_to(ROOT)) in docs, f"docs/clusters.md does not mention {path}"


# ---------------------------------------------------------------- launcher configs: Ray's validation


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_passes_ray_validation(path, no_network):
    prepared = ray_validate(_documents(path)[0])
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_sets_every_command_list(path):
    # Ray fills missing keys from its defaults.yaml, whose setup_commands install a Ray nightly wheel.
    missing = [key for key in COMMAND_LISTS if key not in _documents(path)[0]]
    assert not missing, f"{path.name} would inherit Ray's default {missing}"


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_pins_ray_and_exports_our_env(path):
    config = _documents(path)[0]
    text = path.read_text()
    if _runs_project_image(config):  # Ray comes pinned in the image (test_project_image_...)
        assert "--no-deps" in " ".join(config["setup_commands"]), "nodes must not reinstall dependencies"
    else:
        assert f'"ray[default,serve,train,tune]=={RAY_VERSION}"' in " ".join(config["setup_commands"])
    for var in ENV_VARS:
        assert var in text, f"{path.name} never sets {var}"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ALIGNPROP_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    assert "mlflow_server.sh start" in head and "--serve-artifacts" in head


def _runs_project_image(config: dict) -> bool:
    image = config.get("docker", {}).get("image", "")
    return image.rsplit("/", 1)[-1].startswith(PROJECT_IMAGE + ":")


# Each bad copy of aws.yaml must be rejected: proof that the validation above can fail.
def _unknown_top_level_key(c):
    c["max_worker"] = 4


def _wrong_type(c):
    c["max_workers"] = "eight"


def _unknown_docker_key(c):
    c["docker"]["imag"] = GPU_IMAGE


def _node_type_without_resources(c):
    del c["available_node_types"]["gpu-1xa10g"]["resources"]


def _fractional_resource(c):
    c["available_node_types"]["gpu-1xa10g"]["resources"]["GPU"] = 0.5


def _missing_head_type(c):
    c["head_node_type"] = "no-such-type"


def _min_workers_over_global_max(c):
    c["available_node_types"]["gpu-1xa10g"]["min_workers"] = 9


@pytest.mark.parametrize(
    "break_it, error",
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_wrong_type, jsonschema.ValidationError),
        (_unknown_docker_key, jsonschema.ValidationError),
        (_node_type_without_resources, jsonschema.ValidationError),
        (_fractional_resource, jsonschema.ValidationError),
        (_missing_head_type, ValueError),
        (_min_workers_over_global_max, ValueError),
    ],
    ids=lambda v: getattr(v, "__name__", "").lstrip("_"),
)
def test_broken_aws_config_is_rejected(break_it, error, no_network):
    config = _load("aws.yaml")
    break_it(config)
    with pytest.raises(error):
        ray_validate(config)


def test_local_config_without_worker_ips_is_rejected():
    config = _load("local.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises(Exception, match="worker_ips"):
        ray_validate(config)


# ---------------------------------------------------------------- aws.yaml: the choices the issue asks for


HEAD_MEMORY_GIB = {"m5.xlarge": 16, "m5.2xlarge": 32}  # EC2 instance type pages
MLFLOW_SERVER_MIB = 1024  # the AWS head's MLflow server, 4 workers: a bound, not a measurement


def most_trials_at_once(cluster: str, monkeypatch) -> int:
    """The most trials any shipped sweep runs at once on `cluster` (its own concurrency rule)."""
    from alignprop_ray.sweep import capacity

    if cluster == "aws.yaml":
        ceiling = capacity.autoscaler_ceiling(_load("aws.yaml"), "aws.yaml")
    else:
        [doc] = _documents(CLUSTERS / cluster)
        head = _ray_containers(_cluster_spec(doc))[0]
        ceiling = capacity.declared_ceiling(_env(head)[NODE_TYPES_ENV]["value"])
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: ceiling)
    counts = [
        capacity.concurrency(load_shipped_sweep(path), print)[0]
        for path in SHIPPED
        if is_sweep(read_yaml(path)) and fitting_types(trial_needs(path), cluster_node_types(cluster))
    ]
    return max(counts)


@pytest.mark.parametrize("cluster", ["aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_the_head_holds_the_trials_the_shipped_sweeps_run_at_once(
    cluster, hub_reachable, in_tmp, monkeypatch
):
    """Head memory >= what the sweep shares (driver, Ray's daemons) + what each running trial keeps there
    (its driver, Train controller and per-run actors), both as measured by bench/head_memory.py and
    committed in bench/head_memory.json, times the most trials a shipped sweep runs at once there."""
    import json

    measured = json.loads((ROOT / "bench" / "head_memory.json").read_text())["now"]
    trials = most_trials_at_once(cluster, monkeypatch)
    need_mib = measured["shared_mib"] + measured["per_trial_mib"] * trials
    if cluster == "aws.yaml":
        config = _load(cluster)
        head_gib = HEAD_MEMORY_GIB[
            config["available_node_types"][config["head_node_type"]]["node_config"]["InstanceType"]
        ]
        need_mib += MLFLOW_SERVER_MIB  # the AWS head also serves MLflow
    else:
        [doc] = _documents(CLUSTERS / cluster)
        limit = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ]
        head_gib = int(limit["memory"].removesuffix("Gi"))
    assert head_gib * 1024 >= need_mib, (cluster, trials, need_mib)


def test_aws_head_takes_no_training_work():
    config = _load("aws.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"


def _worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _accelerators(resources: dict) -> list[str]:
    return [key.removeprefix(ACCELERATOR) for key in resources if key.startswith(ACCELERATOR)]


def test_aws_gpu_workers_scale_from_zero_and_advertise_their_real_gpus():
    config = _load("aws.yaml")
    for name, node_type in _worker_types(config).items():
        assert node_type.get("min_workers", 0) == 0, name
        model, count = INSTANCE_GPUS[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["GPU"] == count, name
        # the GPU model is what the autoscaler matches a config's accelerator_type against
        assert _accelerators(node_type["resources"]) == [model], name
    spot = [w for w in _worker_types(config).values() if "InstanceMarketOptions" in w["node_config"]]
    assert spot and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in spot)


def test_aws_gpu_node_types_hand_their_gpus_to_the_container():
    config = _load("aws.yaml")
    for name, node_type in config["available_node_types"].items():
        options = node_type.get("docker", {}).get("worker_run_options", [])
        wants_gpus = node_type["resources"].get("GPU", 0) > 0
        assert ("--gpus all" in options) == wants_gpus, name
    assert "--gpus all" not in config["docker"].get("run_options", []), "the head has no GPU"


def test_aws_runs_the_project_image_on_every_node():
    """A new GPU node pulls the image with PyTorch and the project in it instead of pip-installing them."""
    config = _load("aws.yaml")
    docker = config["docker"]
    assert _runs_project_image(config)
    assert not {"head_image", "worker_image"} & docker.keys()
    assert not any("worker_image" in t.get("docker", {}) for t in config["available_node_types"].values())
    registry = docker["image"].rsplit("/", 1)[0]
    login = " ".join(config["initialization_commands"])  # on the host, before the pull
    assert "docker login" in login and registry in login
    assert not re.search(r"\btorch\b", " ".join(config["setup_commands"]))
    assert ray.__version__ == RAY_VERSION, "bump the cluster images, rayVersion and pins with Ray"


def test_project_images_agree_everywhere():
    tags = {_load("aws.yaml")["docker"]["image"].rsplit("/", 1)[1]}
    for doc in _manifests("Deployment") + _manifests("RayCluster") + _manifests("RayJob"):
        for container in _all_containers(doc):
            tags.add(container["image"].rsplit("/", 1)[1])
    assert len(tags) == 1 and tags.pop().startswith(PROJECT_IMAGE + ":")


def test_aws_config_renders_for_another_region_from_one_value(tmp_path, no_network):
    out = tmp_path / "aws-eu.yaml"
    command = [sys.executable, str(CLUSTERS / "render_aws.py"), "eu-west-1", "--zones", "a,c"]
    command += [
        "--account",
        "123456789012",
        "--bucket",
        "b",
        "--rds-endpoint",
        "db.example",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, timeout=60)
    text = out.read_text()
    assert "us-west-2" not in text and not re.search(r"YOUR_(ACCOUNT_ID|BUCKET|RDS_ENDPOINT)", text)
    config = yaml.safe_load(text)
    assert config["provider"]["region"] == "eu-west-1"
    assert config["provider"]["availability_zone"] == "eu-west-1a,eu-west-1c"
    assert config["docker"]["image"].startswith("123456789012.dkr.ecr.eu-west-1.amazonaws.com/")
    assert "--env AWS_DEFAULT_REGION=eu-west-1" in config["docker"]["run_options"]
    assert text.count("eu-west-1") == 7  # 6 places, the zones' line naming two zones
    ray_validate(config)
    # the shipped file is its own rendering for its region; bad input: one line, exit 2, nothing written
    same = subprocess.run(
        [sys.executable, str(CLUSTERS / "render_aws.py"), "us-west-2", "--zones", "a,b,c,d"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.stdout == (CLUSTERS / "aws.yaml").read_text()
    bad = subprocess.run(
        [sys.executable, str(CLUSTERS / "render_aws.py"), "europe", "--out", str(tmp_path / "no.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not an AWS region" in bad.stderr
    assert not (tmp_path / "no.yaml").exists()


def test_the_quota_advice_is_what_the_shipped_sweeps_run_at_once(hub_reachable, in_tmp, monkeypatch):
    """docs/clusters.md asks for the vCPUs of the nodes that the shipped GPU sweeps' concurrency on
    aws.yaml makes the autoscaler add, per EC2 quota (G and VT: g5, g6e; P: p4de)."""
    from alignprop_ray.sweep import capacity

    config = _load("aws.yaml")
    ceiling = capacity.autoscaler_ceiling(config, "aws.yaml")
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: ceiling)
    family = {"g5": "G and VT", "g6e": "G and VT", "p4de": "P"}
    kinds = {
        frozenset(t["resources"].items()): t["node_config"]["InstanceType"]
        for t in config["available_node_types"].values()
    }
    needed: dict[str, int] = {}
    for path in SHIPPED:
        if not is_sweep(read_yaml(path)) or not trial_needs(path).get("GPU"):
            continue
        sweep = load_shipped_sweep(path)
        at_once, _ = capacity.concurrency(sweep, print)
        workers, per_worker = capacity.trial_workers(sweep)
        by_quota: dict[str, int] = {}
        for resources, count in capacity.nodes_to_hold(ceiling, per_worker, workers, at_once):
            quota = family[kinds[frozenset(resources.items())].split(".")[0]]
            by_quota[quota] = by_quota.get(quota, 0) + int(resources["CPU"]) * count  # vCPUs = CPU here
        for quota, vcpus in by_quota.items():
            needed[quota] = max(needed.get(quota, 0), vcpus)
    assert needed == {"G and VT": 112, "P": 96}
    docs = " ".join((ROOT / "docs" / "clusters.md").read_text().split())
    for quota, vcpus in needed.items():
        assert re.search(rf'"Running On-Demand {quota} instances" [^"]*?at {vcpus} vCPUs', docs), quota


def test_aws_train_waits_for_a_cold_node():
    options = " ".join(_load("aws.yaml")["docker"]["run_options"])
    found = re.search(rf"--env {START_TIMEOUT_VAR}=(\d+)", options)
    assert found and int(found.group(1)) >= COLD_NODE_S


def test_aws_opens_only_ssh_to_the_internet():
    provider = _load("aws.yaml")["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        public = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        if {"0.0.0.0/0", "::/0"} & set(public):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule


def test_aws_mlflow_store_outlives_the_cluster():
    """Runs in RDS PostgreSQL (created once, apart from the cluster), artifacts in the checkpoints' bucket;
    nothing on the head that `ray down` would delete."""
    config = _load("aws.yaml")
    head = " ".join(config["head_start_ray_commands"])
    [(flags, through_script)] = mlflow_servers(head)
    store = urlsplit(flag(flags, "--backend-store-uri"))
    assert through_script and "--serve-artifacts" in flags and flag(flags, "--host") == "0.0.0.0"
    assert store.scheme == "postgresql+psycopg" and store.netloc.endswith("@YOUR_RDS_ENDPOINT:5432")
    assert store.password is None, "the password comes from PGPASSWORD, not the command line"
    parameter = re.search(r"PGPASSWORD=\$\(.*get_parameter\(\s*Name='([^']+)'", head)
    assert parameter, "PGPASSWORD must come from the SSM parameter"
    artifacts = re.fullmatch(r"s3://([^/]+)/.+", flag(flags, "--artifacts-destination"))
    storage = re.search(r"ALIGNPROP_STORAGE_PATH=s3://([^/\s]+)/", " ".join(config["docker"]["run_options"]))
    assert artifacts and storage and artifacts.group(1) == storage.group(1)
    assert not config["docker"].get("head_run_options"), "no state on the head's disk"
    # the docs create what the config names
    docs = (ROOT / "docs" / "clusters.md").read_text()
    assert "aws rds create-db-instance" in docs and "--deletion-protection" in docs
    assert f"--name {parameter.group(1)}" in docs
    assert "YOUR_RDS_ENDPOINT" in docs and "ssm:GetParameter" in docs


# ---------------------------------------------------------------- KubeRay manifests


def _manifests(kind: str) -> list[dict]:
    return [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == kind]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _all_containers(doc: dict) -> list[dict]:
    if doc["kind"] in ("RayCluster", "RayJob"):
        return _ray_containers(_cluster_spec(doc))
    return doc["spec"]["template"]["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def kuberay_node_types(doc: dict) -> dict[str, dict]:
    """The node types Ray's KubeRay autoscaler derives from a RayCluster or RayJob (and validates)."""
    ray_cr = {"metadata": {"namespace": "default", **doc["metadata"]}, "spec": _cluster_spec(doc)}
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must take no training work"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"], "no worker groups"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        # KubeRay passes rayStartParams to `ray start` as strings; other types are rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert gpus and int(gpus) >= 1, group["groupName"]
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
    for container in _ray_containers(spec):
        env = _env(container)
        assert set(ENV_VARS) <= env.keys(), container["name"]
        assert int(env[START_TIMEOUT_VAR]["value"]) >= COLD_NODE_S, container["name"]


def test_kuberay_raycluster():
    clusters = _manifests("RayCluster")
    assert clusters
    for doc in clusters:
        assert doc["apiVersion"] == "ray.io/v1"
        check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_the_truncation_sweep():
    jobs = _manifests("RayJob")
    assert jobs
    for doc in jobs:
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"]
        assert spec["entrypoint"] == "alignprop-ray sweep sweeps/truncation.yaml"
        assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict)
        check_ray_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_worker_groups_advertise_the_gpus_of_the_nodes_they_select():
    for doc in _manifests("RayCluster") + _manifests("RayJob"):
        derived = kuberay_node_types(doc)
        for group in _cluster_spec(doc)["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            model, count = INSTANCE_GPUS[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
            resources = derived[group["groupName"]]["resources"]
            assert resources["GPU"] == count and _accelerators(resources) == [model], group["groupName"]


def test_the_package_pins_the_cluster_images_ray_and_the_sweep_warns_on_another():
    import tomllib

    from alignprop_ray.sweep.launch import ray_version_note

    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[default,serve,train,tune]=={RAY_VERSION}" in requirements
    assert ray.__version__ == RAY_VERSION
    assert ray_version_note(RAY_VERSION, requirements) is None
    note = ray_version_note("2.61.0", requirements)
    assert note.startswith(f"warning: Ray 2.61.0 runs here, the cluster image runs Ray {RAY_VERSION} ")
    assert note.endswith(f"pip install 'ray[default,serve,train,tune]=={RAY_VERSION}'")


def test_kuberay_declares_its_worker_groups_to_the_sweep():
    """ALIGNPROP_NODE_TYPES (the sweep's view of how far a KubeRay cluster grows) is each worker group as
    KubeRay's autoscaler derives it: its CPUs, GPUs and GPU model, and maxReplicas."""
    for doc in _manifests("RayCluster") + _manifests("RayJob"):
        derived = {k: v for k, v in kuberay_node_types(doc).items() if k != "headgroup"}
        for container in _ray_containers(_cluster_spec(doc)):
            declared = yaml.safe_load(_env(container)[NODE_TYPES_ENV]["value"])
            assert declared.keys() == derived.keys(), container["name"]
            for name, spec in declared.items():
                assert spec["max_workers"] == derived[name]["max_workers"], name
                offered = {k: v for k, v in derived[name]["resources"].items() if k != "memory"}
                assert spec["resources"] == offered, name


def test_the_rayjob_runs_as_many_trials_at_once_as_its_pods_hold(hub_reachable, in_tmp, monkeypatch):
    """2 pods of 4 L40S, a truncation trial takes 4: 2 at a time (all 4 at once before, 2 of them failing
    while they waited)."""
    from alignprop_ray.sweep import capacity

    [job] = _manifests("RayJob")
    head = _ray_containers(_cluster_spec(job))[0]
    ceiling = capacity.declared_ceiling(_env(head)[NODE_TYPES_ENV]["value"])
    monkeypatch.setattr(capacity, "cluster_ceiling", lambda: ceiling)
    sweep = load_sweep(ROOT / job["spec"]["entrypoint"].split()[-1], env={})
    assert capacity.concurrency(sweep, print) == (2, f"node types in {NODE_TYPES_ENV}: room for 2")


def test_project_image_is_built_from_the_pinned_ray_image_with_the_mlflow_drivers():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(GPU_IMAGE)}$", dockerfile, re.MULTILINE)
    install = next(line for line in dockerfile.splitlines() if "ray[default," in line)
    assert install.startswith("RUN pip install")
    assert f'"ray[default,serve,train,tune]=={RAY_VERSION}"' in install
    # S3 artifacts; the PostgreSQL driver the store URIs name (postgresql+psycopg://)
    assert "boto3" in install and '"psycopg[binary]' in install


def dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined."""
    text = (CLUSTERS / "Dockerfile").read_text().replace("\\\n", "")
    return [line[len("RUN ") :] for line in text.splitlines() if line.startswith("RUN ")]


def test_the_image_pins_the_tests_torch_and_checks_its_cuda_build_against_the_base_image(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^TORCH_PINS \?= (.+)$", makefile, re.MULTILINE).group(1).split()
    [torch_run] = [run for run in dockerfile_runs() if "download.pytorch.org" in run]
    assert all(f'"{pin}"' in torch_run for pin in pins), (pins, torch_run)
    assert "${TORCH_CUDA}" in torch_run and re.search(
        r"^ARG TORCH_CUDA=cu\d+$", (CLUSTERS / "Dockerfile").read_text(), re.M
    )
    # the build's check, run against a stand-in torch: the same CUDA major version passes, another fails
    check = shlex.split(torch_run.split("&&", 1)[1])
    assert check[:2] == ["python", "-c"]
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "__version__ = '2.14.1+cu128'\nclass version:\n    cuda = '12.8'\n"
    )
    for image_cuda, passes in (("12.9.1", True), ("12.1.0", True), ("13.0.0", False), ("", False)):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "CUDA_VERSION": image_cuda}
        run = subprocess.run([sys.executable, "-c", check[2]], env=env, capture_output=True, text=True)
        assert (run.returncode == 0) == passes, (image_cuda, run.stderr)
        if not passes:
            assert "set --build-arg TORCH_CUDA" in run.stderr


def test_gpu_nodes_check_that_torch_sees_their_gpus_before_taking_work():
    first = _load("aws.yaml")["worker_start_ray_commands"][0]  # every AWS worker type has GPUs
    assert first.startswith("python -c") and "torch.cuda.is_available()" in first
    for doc in _manifests("RayCluster") + _manifests("RayJob"):
        for group in _cluster_spec(doc)["workerGroupSpecs"]:
            [container] = group["template"]["spec"]["containers"]
            probe = container["startupProbe"]["exec"]["command"]
            assert probe[:2] == ["python", "-c"] and "torch.cuda.is_available()" in probe[2], group[
                "groupName"
            ]


def test_kuberay_mlflow_service_matches_the_tracking_uri():
    services = {doc["metadata"]["name"]: doc for doc in _manifests("Service")}
    for doc in _manifests("RayCluster") + _manifests("RayJob"):
        for container in _ray_containers(_cluster_spec(doc)):
            uri = _env(container)["ALIGNPROP_TRACKING_URI"]["value"]
            host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
            assert host in services, f"no Service named {host}"
            assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


def test_kuberay_mlflow_store_is_postgresql_on_its_own_volume():
    """The runs live in a PostgreSQL StatefulSet with a volume claim, outside every Ray cluster; MLflow
    reaches it through its Service with the StatefulSet's user, database and password."""
    [mlflow] = [
        c
        for d in _manifests("Deployment")
        for c in _all_containers(d)
        if c["command"][:2] == ["mlflow", "server"]
    ]
    flags = mlflow["command"][2:]
    store = urlsplit(flag(flags, "--backend-store-uri"))
    assert store.scheme == "postgresql+psycopg" and store.password is None
    assert "--serve-artifacts" in flags and flag(flags, "--artifacts-destination").startswith("s3://")
    services = {d["metadata"]["name"]: d for d in _manifests("Service")}
    selector = services[store.hostname]["spec"]["selector"]
    [database] = [d for d in _manifests("StatefulSet") if d["spec"]["selector"]["matchLabels"] == selector]
    assert store.port in [p["port"] for p in services[store.hostname]["spec"]["ports"]]
    claims = database["spec"]["volumeClaimTemplates"]
    [postgres] = _all_containers(database)
    assert {m["name"] for m in postgres["volumeMounts"]} & {c["metadata"]["name"] for c in claims}
    env = _env(postgres)
    assert (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]) == (store.username, store.path[1:])
    secret = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert _env(mlflow)["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert not _manifests("PersistentVolumeClaim"), "no SQLite volume left behind"


# ---------------------------------------------------------------- every shipped config fits a node type


def trial_needs(path: Path) -> dict[str, float]:
    """What one trial of a sweep (or one run of an experiment) asks Ray for, as the sweep counts it."""
    if is_sweep(read_yaml(path)):
        return trial_resources(load_shipped_sweep(path))
    return trial_resources(SimpleNamespace(reference=load_experiment(path, env={}), domains=[]))


def cluster_node_types(name: str) -> dict[str, dict]:
    """Resources per node type, as the autoscaler of that cluster sees them."""
    if name.startswith("kuberay/"):
        [doc] = _documents(CLUSTERS / name)
        return {k: v["resources"] for k, v in kuberay_node_types(doc).items()}
    prepared = ray_validate(_load(name))
    return {k: v["resources"] for k, v in prepared["available_node_types"].items()}


def fitting_types(need: dict[str, float], node_types: dict[str, dict]) -> list[str]:
    """Node types one node of which holds all of `need`: a trial's workers on one node (PACK), so that
    data-parallel ranks sync over the node's own links."""
    return [name for name, offer in node_types.items() if all(offer.get(k, 0) >= v for k, v in need.items())]


@pytest.fixture
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("cluster", FIT_CLUSTERS)
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_fits_a_node_type(path, cluster, hub_reachable, in_tmp):
    need = trial_needs(path)
    if need.get("GPU"):
        # a GPU config names its GPU model: the memory its batch was sized for is otherwise unchecked
        assert _accelerators(need), f"{path.name}: set scaling.accelerator_type"
    assert fitting_types(need, cluster_node_types(cluster)), f"{path.name} needs {need}; {cluster} has none"


def test_the_rayjob_fits_the_sweep_it_runs(hub_reachable):
    for doc in _manifests("RayJob"):
        sweep = ROOT / doc["spec"]["entrypoint"].split()[-1]
        node_types = {k: v["resources"] for k, v in kuberay_node_types(doc).items()}
        assert fitting_types(trial_needs(sweep), node_types), doc["metadata"]["name"]


@pytest.mark.parametrize(
    "override",
    [
        "scaling.num_workers=8",
        "scaling.accelerator_type=H100",
        "scaling.resources_per_worker={GPU: 1, CPU: 13}",
    ],
)
def test_fit_check_rejects_a_trial_no_node_type_holds(override, hub_reachable):
    need = trial_resources(load_sweep(ROOT / "sweeps" / "truncation.yaml", [override], env={}))
    for cluster in FIT_CLUSTERS:
        assert not fitting_types(need, cluster_node_types(cluster)), (override, cluster)


def test_stated_gpu_memory_matches_the_gpu_model():
    """`accelerator_type: L40S  # 48 GB` in a shipped config: the comment must be true of the model."""
    for path in SHIPPED:
        for model, gb in re.findall(r"accelerator_type:\s*([\w-]+)\s*#\s*(\d+) GB", path.read_text()):
            assert GPU_MEMORY_GB[model] == int(gb), f"{path.name}: {model} has {GPU_MEMORY_GB[model]} GB"
    named = {m for path in SHIPPED for m in re.findall(r"accelerator_type:\s*([\w-]+)", path.read_text())}
    assert named and named <= GPU_MEMORY_GB.keys()


# ---------------------------------------------------------------- MLflow servers: SQLite gets one worker

SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}


def mlflow_servers(command: str) -> list[tuple[list[str], bool]]:
    """Each MLflow server a shell command line starts: (its flags, whether through mlflow_server.sh)."""
    lexer = shlex.shlex(command.replace("\\\n", " "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split, lexer.commenters = True, ""
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens):
        if token == "mlflow" and tokens[i + 1 : i + 2] == ["server"]:
            first, script = i + 2, False
        elif token.endswith("mlflow_server.sh") and tokens[i + 1 : i + 2] == ["start"]:
            first, script = i + 3, True  # after STATE_DIR
        else:
            continue
        found.append((list(itertools.takewhile(lambda t: t not in SHELL_OPERATORS, tokens[first:])), script))
    return found


def flag(flags: list[str], *names: str) -> str | None:
    for i, item in enumerate(flags):
        if item in names and i + 1 < len(flags):
            return flags[i + 1]
        for name in names:
            if item.startswith(name + "="):
                return item.split("=", 1)[1]
    return None


def sqlite_with_many_workers(flags: list[str], script: bool) -> bool:
    """A server on SQLite (MLflow's default store) that may run more than one worker process."""
    store = flag(flags, "--backend-store-uri") or "sqlite:///mlflow.db"
    workers = flag(flags, "--workers", "-w")
    if not store.startswith("sqlite:"):
        return False
    return workers != "1" and not (script and workers is None)  # the script adds --workers 1


def _shell_commands() -> dict[str, list[str]]:
    """Every command that may start an MLflow server: launcher command lists, scripts (but the server
    script itself), manifests' containers, and the shell blocks of docs/clusters.md."""
    found: dict[str, list[str]] = {}
    for path in LAUNCHER:
        config = _documents(path)[0]
        found[path.name] = [c for key in COMMAND_LISTS for c in config.get(key, [])]
    for path in CLUSTERS.glob("*.sh"):
        if path.name != "mlflow_server.sh":
            found[path.name] = [path.read_text().replace("\\\n", " ")]
    for path in MANIFESTS:
        found[path.name] = [
            shlex.join(c.get("command", []) + c.get("args", []))
            for doc in _documents(path)
            if doc["kind"] in ("Deployment", "StatefulSet", "RayCluster", "RayJob")
            for c in _all_containers(doc)
        ]
    docs = (ROOT / "docs" / "clusters.md").read_text()
    found["docs/clusters.md"] = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", docs, re.S)]
    return found


def _servers(commands: list[str]) -> list[tuple[list[str], bool]]:
    lines = [line for command in commands for line in command.splitlines()]
    return [
        s
        for line in lines
        if "mlflow" in line and not line.lstrip().startswith("#")
        for s in mlflow_servers(line)
    ]


def test_every_sqlite_mlflow_server_runs_one_worker():
    servers = {source: _servers(commands) for source, commands in _shell_commands().items()}
    bad = {}
    for source, found in servers.items():
        if many := [flags for flags, script in found if sqlite_with_many_workers(flags, script)]:
            bad[source] = many
    assert not bad, f"SQLite MLflow servers that may run more than one worker: {bad}"
    # the scan sees the servers it is meant to see: SQLite on one machine, PostgreSQL on the clouds
    stores = {
        src: {(flag(f, "--backend-store-uri") or "sqlite:").split(":")[0] for f, _ in found}
        for src, found in servers.items()
    }
    assert stores["local.yaml"] == stores["local_loopback.sh"] == {"sqlite"}
    assert stores["aws.yaml"] == stores["shared.yaml"] == {"postgresql+psycopg"}


@pytest.mark.parametrize(
    "command, many",
    [
        ("mlflow server --backend-store-uri sqlite:///m.db --port 5000", True),
        ("mlflow server --port 5000", True),  # MLflow's default store is SQLite
        ("mlflow server -w 1 --backend-store-uri=sqlite:///m.db", False),
        ("x; bash clusters/mlflow_server.sh start /tmp/s --backend-store-uri sqlite:///m.db && y", False),
        ("bash clusters/mlflow_server.sh start /tmp/s --backend-store-uri sqlite:///m.db --workers 4", True),
        ("mlflow server --backend-store-uri 'postgresql+psycopg://u@h:5432/db?sslmode=require' -w 8", False),
    ],
)
def test_sqlite_worker_check_tells_them_apart(command, many):
    [(flags, script)] = mlflow_servers(command)
    assert sqlite_with_many_workers(flags, script) is many


# ---------------------------------------------------------------- docs: what a new user needs first


def test_docs_name_the_kuberay_version_the_manifests_need():
    """RayJob's spec.backoffLimit appeared in KubeRay 1.2; docs and manifests must ask for that much."""
    docs = re.findall(r"KubeRay operator \(?>= ?(\d+)\.(\d+)", (ROOT / "docs" / "clusters.md").read_text())
    manifests = [re.search(r"KubeRay operator >= (\d+)\.(\d+)", p.read_text()) for p in MANIFESTS]
    versions = {tuple(map(int, v)) for v in docs} | {tuple(map(int, m.groups())) for m in manifests if m}
    assert docs and len(versions) == 1 and versions.pop() >= (1, 2)


# AWS's quota for each GPU instance family that aws.yaml launches (Service Quotas, "Amazon EC2").
EC2_QUOTAS = {"g": "Running On-Demand G and VT instances", "p": "Running On-Demand P instances"}


def test_the_first_time_setup_in_the_docs_builds_what_the_shipped_files_use():
    """The setup steps of docs/clusters.md against the files they prepare for: the image the nodes run is the
    one it builds and the repository it creates, every secret a manifest reads is one it creates (with the key
    read), every GPU family aws.yaml launches has its EC2 quota named, and the database volume the manifests
    claim without a storage class has the default StorageClass the docs ask for."""
    docs = (ROOT / "docs" / "clusters.md").read_text()
    shipped = "\n".join(p.read_text() for p in [CLUSTERS / "aws.yaml", *MANIFESTS])
    images = set(re.findall(r"image: \S+/(alignprop-ray:[\w.-]+)", shipped))
    built = set(re.findall(r"docker build -f (\S+) -t \S+/(alignprop-ray:[\w.-]+) \.", docs))
    assert images and {tag for _, tag in built} == images, (images, built)
    assert all((ROOT / dockerfile).is_file() for dockerfile, _ in built)
    assert "aws ecr create-repository --repository-name alignprop-ray " in docs
    read = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: (\w+)\}", shipped))
    created = set(re.findall(r"kubectl create secret generic ([\w-]+) --from-literal=(\w+)=", docs))
    assert read and read <= created, (read, created)
    families = {
        node["node_config"]["InstanceType"][0] for node in _load("aws.yaml")["available_node_types"].values()
    }
    for family in families & set(EC2_QUOTAS):
        assert f'"{EC2_QUOTAS[family]}"' in docs, family
    claims = [
        claim
        for doc in _documents(CLUSTERS / "kuberay" / "shared.yaml")
        for claim in doc.get("spec", {}).get("volumeClaimTemplates", [])
    ]
    assert claims and all("storageClassName" not in claim["spec"] for claim in claims)
    assert "a default StorageClass" in docs
