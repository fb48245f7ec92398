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
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = "2.60.0"
GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
ENV_VARS = ("ALIGNPROP_TRACKING_URI", "ALIGNPROP_STORAGE_PATH")
# GPUs per AWS instance type, from the EC2 instance type pages.
AWS_GPUS = {"g5.xlarge": 1, "g5.12xlarge": 4, "p4d.24xlarge": 8}
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
    assert f'"ray[default,train,tune]=={RAY_VERSION}"' in " ".join(config["setup_commands"])
    for var in ENV_VARS:
        assert var in text, f"{path.name} never sets {var}"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ALIGNPROP_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    assert "mlflow_server.sh start" in head and "--serve-artifacts" in head


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


def test_aws_head_takes_no_training_work():
    config = _load("aws.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"


def test_aws_gpu_workers_scale_from_zero_with_true_gpu_counts():
    config = _load("aws.yaml")
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert {w["node_config"]["InstanceType"] for w in workers.values()} >= set(AWS_GPUS)
    for name, node_type in workers.items():
        assert node_type.get("min_workers", 0) == 0, name
        gpus = AWS_GPUS[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["GPU"] == gpus, name
    spot = [w for w in workers.values() if "InstanceMarketOptions" in w["node_config"]]
    assert spot and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in spot)


def test_aws_image_is_pinned_and_matches_installed_ray():
    docker = _load("aws.yaml")["docker"]
    assert docker["image"] == GPU_IMAGE
    assert docker["head_image"] == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    assert ray.__version__ == RAY_VERSION, "bump the cluster images, rayVersion and pins with Ray"


def test_aws_opens_only_ssh_to_the_internet():
    provider = _load("aws.yaml")["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        public = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        if {"0.0.0.0/0", "::/0"} & set(public):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule


def test_aws_mlflow_and_checkpoints_share_one_bucket():
    config = _load("aws.yaml")
    head = " ".join(config["head_start_ray_commands"])
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in head
    assert "--host 0.0.0.0" in head
    artifacts = re.search(r"--artifacts-destination s3://([^/\s]+)/", head)
    storage = re.search(r"ALIGNPROP_STORAGE_PATH=s3://([^/\s]+)/", " ".join(config["docker"]["run_options"]))
    assert artifacts and storage and artifacts.group(1) == storage.group(1)
    # The database must sit on the head's host disk, mounted into the container.
    assert any(":/home/ray/mlflow" in opt for opt in config["docker"]["head_run_options"])


# ---------------------------------------------------------------- KubeRay manifests


def _manifests(kind: str) -> list[dict]:
    return [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == kind]


def _ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


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
        names = {e["name"] for e in container.get("env", [])}
        assert set(ENV_VARS) <= names, container["name"]


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


def test_kuberay_images_are_built_from_the_pinned_ray_image():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(GPU_IMAGE)}$", dockerfile, re.MULTILINE)
    assert f'"ray[default,train,tune]=={RAY_VERSION}"' in dockerfile


def test_kuberay_mlflow_service_matches_the_tracking_uri():
    services = {doc["metadata"]["name"]: doc for doc in _manifests("Service")}
    for spec in [d["spec"] for d in _manifests("RayCluster")] + [
        d["spec"]["rayClusterSpec"] for d in _manifests("RayJob")
    ]:
        for container in _ray_containers(spec):
            uri = next(e["value"] for e in container["env"] if e["name"] == "ALIGNPROP_TRACKING_URI")
            host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
            assert host in services, f"no Service named {host}"
            assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
