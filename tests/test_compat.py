"""Each private third-party access in alignprop_ray/compat.py, exercised on the installed versions: an
upgrade that moves one of them fails here first, by name."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignprop_ray import compat


def test_ray_instances_are_found_in_the_process_table_and_a_stale_record_is_not_joined(tmp_path, monkeypatch):
    """Ray 2.60 finds a local instance by its raylet's command line (`--gcs-address=...`), and `ray start`
    records its address in <RAY_TMPDIR>/ray/ray_current_cluster. A stand-in raylet process (its argv[0] names
    it, as Ray's check reads it) makes an instance appear, then vanish when it exits; the recorded address
    counts only while it is served."""
    address = "127.0.0.1:1"  # port 1: no real GCS listens there
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    assert address not in compat.ray_local_instances()
    assert compat.ray_started_cluster_address() is None  # the record outlived its cluster: not joined
    code = "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(60)"
    raylet = subprocess.Popen(
        ["alignprop-test-raylet", "-c", code, f"--gcs-address={address}"],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert raylet.stdout.readline() == "up\n"
        assert address in compat.ray_local_instances()  # read afresh, not from Ray's cache
        assert compat.ray_started_cluster_address() == address
    finally:
        raylet.kill()
        raylet.wait()
    assert address not in compat.ray_local_instances()
    assert compat.ray_started_cluster_address() is None


def test_a_private_instance_is_found_through_the_environment_it_hands_its_processes(monkeypatch):
    """What compat.ray_init_private relies on (its own test, starting two instances, is in
    test_ray_isolation.py): Ray takes the GCS port of a new head node from RAY_GCS_SERVER_PORT, and its
    address lookup for address None/"auto", which its state API makes, takes RAY_ADDRESS before looking
    for instances on the machine."""
    from ray._private import ray_constants, services

    assert ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE == "RAY_GCS_SERVER_PORT"
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["10.0.0.1:1", "10.0.0.2:2"])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)  # no `ray start` cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.9.8.7:4321")
    assert services.canonicalize_bootstrap_address_or_die(None) == "10.9.8.7:4321"
    assert services.canonicalize_bootstrap_address_or_die("auto") == "10.9.8.7:4321"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConnectionError, match="Found multiple active Ray instances"):
        services.canonicalize_bootstrap_address_or_die(None)


def test_ray_train_report_logger_is_found_and_quieted():
    from ray.train.v2._internal.execution import context

    compat.quiet_ray_train_report_logs()
    assert logging.getLogger(context.__file__).level == logging.WARNING


def test_open_clip_architectures_are_found_on_disk():
    import open_clip

    assert compat.open_clip_arch_exists("ViT-L-14-quickgelu")
    assert "ViT-L-14-quickgelu" in open_clip.list_models()
    assert not compat.open_clip_arch_exists("no-such-arch")


def test_open_clip_takes_a_config_dict():
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    compat.open_clip_register_config("alignprop-compat-test", config)
    model = open_clip.create_model("alignprop-compat-test", pretrained=None)
    assert model.visual.output_dim == 16


def test_mlflow_image_file_names_give_their_step(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("compat", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    for step in (0, 7):
        client.log_image(run_id, image, key="eval/images", step=step)
    client.log_image(run_id, image, key="other", step=3)
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    steps = sorted(s for n in names if (s := compat.mlflow_logged_image_step(n, "eval/images")) is not None)
    assert steps == [0, 7]
    assert [compat.mlflow_logged_image_step(n, "other") for n in names].count(3) == 1


def test_mlflow_latest_metric_steps_are_the_last_step_of_each_key(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("steps")).info.run_id
    for step, value in [(3, 1.0), (1, 5.0), (7, 0.5), (2, 9.0)]:  # out of order: the last step wins
        client.log_metric(run_id, "a", value, step=step)
    client.log_metric(run_id, "b", 1.0, step=0)
    assert compat.mlflow_latest_metric_steps(client, run_id) == {"a": 7, "b": 0}


def test_ray_train_trainer_without_dataset_actor_hands_workers_no_datasets(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.data_integration.interfaces import DatasetShardMetadata

    trainer = compat.ray_train_trainer_without_dataset_actor()(
        lambda config: None,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="compat", storage_path=str(tmp_path)),
    )
    callbacks = trainer._create_default_callbacks()
    assert not any(isinstance(c, DatasetsCallback) for c in callbacks)
    providers = [
        c.before_init_train_context([1, 2]) for c in callbacks if type(c).__name__ == "NoDatasetsCallback"
    ]
    assert len(providers) == 1 and len(providers[0]["dataset_shard_provider"]) == 2
    try:
        providers[0]["dataset_shard_provider"][0].get_dataset_shard(DatasetShardMetadata("train", 0))
    except KeyError as err:
        assert "this run was given none" in str(err)
    else:
        raise AssertionError("a provider without datasets handed out a shard")


def test_ray_trains_torch_backend_framework_and_rank_variables_are_found():
    from ray.train.torch import TorchConfig

    assert compat.ray_train_torch_framework() == TorchConfig().framework
    import ray.train.torch.config as ray_torch_config

    assert callable(ray_torch_config._set_torch_distributed_env_vars)  # needs a Train context to run


def _backend_functions_on_a_worker(port: int) -> dict:
    import torch.distributed as dist

    seen = {"address_and_port": compat.ray_train_address_and_port()}
    compat.ray_train_init_torch_process_group("gloo", 0, 1, f"tcp://127.0.0.1:{port}", 30)
    try:
        seen["group"] = (dist.is_initialized(), dist.get_backend(), dist.get_world_size())
    finally:
        compat.ray_train_shutdown_torch(destroy_process_group=True)
    seen["after_shutdown"] = dist.is_initialized()
    with compat.ray_train_torch_device_context():  # no CUDA here: it does nothing
        pass
    return seen


@pytest.mark.ray
def test_ray_trains_torch_backend_functions_run_on_a_worker(ray_session):
    """What train/backend.py runs on each worker, taken from `ray.train.torch.config`, in a Ray task (they ask
    the Ray worker for its devices): this node's address and a free port, a one-process gloo group set up and
    destroyed, the device context entered."""
    from tests.helpers import free_port

    run = ray_session.remote(num_cpus=1)(_backend_functions_on_a_worker)
    seen = ray_session.get(run.remote(free_port()), timeout=300)
    address, port = seen["address_and_port"]
    assert address and 0 < port < 65536
    assert seen["group"] == (True, "gloo", 1) and seen["after_shutdown"] is False


def test_ray_train_controller_states_and_start_failures_are_read():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.controller import state

    controller_callback, worker_group_callback = compat.ray_train_controller_callback_bases()
    assert hasattr(controller_callback, "after_controller_state_update")
    assert hasattr(worker_group_callback, "before_worker_group_start")
    assert hasattr(worker_group_callback, "before_init_train_context")
    timeout = WorkerGroupStartupTimeoutError(num_workers=2)
    rescheduling = state.ReschedulingState(ControllerError(timeout))
    assert compat.ray_train_state_name(rescheduling) == "RESCHEDULING"
    assert compat.ray_train_state_name(state.RunningState()) == "RUNNING"
    assert compat.ray_train_start_failure(rescheduling) is timeout
    assert compat.ray_train_startup_timed_out(timeout)
    assert compat.ray_train_start_failure(state.RunningState()) is None


def test_importing_the_package_keeps_mlflows_telemetry_thread_from_starting():
    """MLflow's telemetry thread races os.environ (alignprop_ray/__init__.py); outside a test or CI
    environment MLflow starts it at import, unless the package has switched it off first."""
    # what mlflow.telemetry.utils reads as "switched off" (its CI list: the two variables set here)
    ci = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    env = {k: v for k, v in os.environ.items() if k not in ci}
    probe = "from mlflow.telemetry.client import get_telemetry_client; print(get_telemetry_client() is None)"

    def started(first: str) -> bool:
        done = subprocess.run(
            [sys.executable, "-c", f"{first}import mlflow; {probe}"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1] == "False"

    assert started("")  # MLflow alone starts it here (the test would say nothing otherwise)
    assert not started("import alignprop_ray; ")


def test_peft_adapters_are_switched_off_without_touching_requires_grad():
    """peft 0.21: a LoRA layer with `_disable_adapters` set computes its base layer alone. A small peft
    model whose adapter moves its output: inside the block it gives the output of the layer without the
    adapter, every LoRA weight still requires grad, and after the block the adapter is back."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    base = torch.nn.Linear(4, 4)
    base.load_state_dict(model[0].state_dict())
    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"), model
    )
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    with torch.no_grad():
        for p in lora:
            p.normal_()
    x = torch.randn(3, 4)
    adapted = model(x)
    assert not torch.allclose(adapted, base(x))
    with compat.peft_adapters_disabled(model):
        assert torch.equal(model(x), base(x))
        assert all(p.requires_grad for p in lora)
    assert torch.equal(model(x), adapted)


@pytest.mark.ray
def test_ray_logs_dir_holds_the_worker_logs(ray_session):
    logs = compat.ray_logs_dir()
    assert logs.is_dir() and (logs / "raylet.out").exists()
