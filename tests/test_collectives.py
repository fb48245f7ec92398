"""The workers' collectives under the process group that GPU workers get, as far as a CPU can build it.

On GPUs Ray Train sets up the process group our trainer asks for (Ray's own default there is NCCL
alone). NCCL only takes CUDA tensors; a CPU cannot create NCCL, but `cuda:gloo` rejects CPU tensors
exactly as NCCL does ("No backend type associated with device type cpu"). So the test takes the backend
string of the trainer built for a GPU experiment, binds gloo wherever it says nccl, and runs one real
training step, one evaluation and the end-of-run sync check on 2 processes under that process group.
"""

from pathlib import Path

import pytest

from alignprop_ray.config import load_experiment
from tests.helpers import run_ranks, tiny_run

ROOT = Path(__file__).resolve().parents[1]
GPU_DEFAULT = "nccl"  # what Ray Train picks for GPU workers when the trainer names no backend


def experiment(tmp, use_gpu: bool):
    return load_experiment(
        ROOT / "sweeps" / "tiny.yaml",
        tiny_run(
            tmp,
            f"scaling.use_gpu={str(use_gpu).lower()}",
            "model.resolution=32",
            "sampling.steps=3",
            "truncation=fixed:2",
            "train.batch_size=1",
            "prompts.eval_seeds=2",
        ),
    )


def gpu_process_group(tmp) -> str:
    """The backend our trainer gives GPU workers, with gloo standing in for NCCL (cuda-bound either way)."""
    from alignprop_ray.train.launch import build_trainer

    backend = build_trainer(experiment(tmp, use_gpu=True), "probe", {}).backend_config.backend
    backend = backend or GPU_DEFAULT
    items = [item if ":" in item else f"cuda:{item}" for item in backend.split(",")]
    return ",".join(item.replace(":nccl", ":gloo") for item in items)


def test_gpu_process_group_keeps_cpu_collectives_off_nccl(tmp_path):
    backend = gpu_process_group(tmp_path)
    assert "cpu:gloo" in backend.split(","), backend


def test_cpu_workers_use_gloo(tmp_path):
    from alignprop_ray.train.launch import build_trainer

    assert build_trainer(experiment(tmp_path, False), "probe", {}).backend_config.backend == "gloo"


def train_one_step(rank: int, port: int, backend: str, tmp: str) -> tuple:
    """One rank: a training step, an evaluation and the sync check under `backend`."""
    import torch
    import torch.distributed as dist

    from alignprop_ray.train.build import build_learner, plan_training_step
    from alignprop_ray.train.evaluate import evaluate
    from alignprop_ray.train.loop import check_workers_in_sync

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = experiment(tmp, use_gpu=False)  # CPU tensors throughout, as the stats and gathers are on GPUs
    learner = build_learner(cfg, torch.device("cpu"))
    batches, ks = plan_training_step(cfg, ["a cat", "a dog"], 0, rank, 2)
    step = learner.train_step(batches, ks)  # stats all-reduce + gradient averaging
    metrics = evaluate(learner, cfg, ["a red car"], 1, step, None)  # all_gather_object of eval shards
    digests = check_workers_in_sync(learner)  # all_gather_object of the LoRA digests
    dist.destroy_process_group()
    return step.updated, metrics["eval/reward"], digests


@pytest.mark.slow
def test_training_collectives_run_under_the_gpu_process_group(tmp_path):
    backend = gpu_process_group(tmp_path)
    try:
        (updated0, reward0, digests0), (updated1, reward1, digests1) = run_ranks(
            train_one_step, 2, backend, str(tmp_path)
        )
    except AssertionError as err:
        raise AssertionError(f"under the process group {backend!r}: {err}") from None
    assert updated0 and updated1
    assert reward0 == pytest.approx(reward1)  # every rank holds the gathered evaluation
    assert digests0 == digests1 and len(set(digests0)) == 1
