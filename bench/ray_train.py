"""Ray Train on the tiny model: per-step wall time with 1 and 2 workers, or the same steps in-process.

    python bench/ray_train.py ray --workers 1 2 --steps 16      # one Ray instance, runs in the given order
    python bench/ray_train.py inprocess --steps 16              # the engine alone, no Ray, no MLflow

`ray` runs `alignprop_ray.train.launch.run_training` (Ray Train TorchTrainer, rank-0 MLflow logging to
SQLite, a Ray report every step) on sweeps/tiny.yaml with fixed K; the wall time of a step is the gap
between rank 0's MLflow timestamps of consecutive steps, so it holds everything a step costs in steady
state: generation, backward, gradient all-reduce, metrics, MLflow logging, the Ray report barrier.
`inprocess` builds the same learner (alignprop_ray.train.build.build_learner) in this process with one
thread, as each Ray worker has, and times `train_step` on the same planned batches.
Steps 1-2 (warm-up) and the last step (which also evaluates and checkpoints) are left out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
SKIP_FIRST = 2  # warm-up steps left out of the steady state


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["ray", "inprocess"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, run in this order")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--k", type=int, default=5, help="fixed K (of the yaml's T=10)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="what-if: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the Train controller "
        "(alignprop-ray sets 0.1 s; Ray's default is 2 s)",
    )
    p.add_argument("--out", default=None)
    return p.parse_args()


def config(tmp: str, steps: int, k: int, workers: int):
    from alignprop_ray.config import load_experiment

    return load_experiment(
        ROOT / "sweeps" / "tiny.yaml",
        [
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"storage.path={tmp}/runs",
            f"train.steps={steps}",
            f"truncation=fixed:{k}",
            f"scaling.num_workers={workers}",
            "prompts.eval=tiny",
            # no evaluation or checkpoint inside the measured steps (both still happen after the last step)
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "failure.max_failures=0",
        ],
    )


def run_ray(args) -> dict:
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from alignprop_ray.train.launch import run_training

    if args.poll_interval is not None:  # Ray hands it from this process to the controller at fit()
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.poll_interval)
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    init_s, runs = time.perf_counter() - t0, []
    try:
        for i, workers in enumerate(args.workers):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = config(tmp, args.steps, args.k, workers)
                started = time.perf_counter()
                outcome = run_training(cfg, name=f"bench-{i}-{workers}w")
                total = time.perf_counter() - started
                runs.append(
                    {
                        "workers": workers,
                        "total_s": total,
                        **step_times(cfg, outcome.run_id),
                        "images_per_step": workers * cfg.train.batch_size * cfg.train.grad_accum,
                    }
                )
    finally:
        ray.shutdown()
    return {"mode": "ray", "ray_init_s": init_s, "runs": runs}


def step_times(cfg, run_id: str) -> dict:
    """Steady-state step intervals from rank 0's MLflow timestamps, and the logged in-worker step time."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "train/loss")}
    inside = {m.step: m.value for m in client.get_metric_history(run_id, "perf/step_seconds")}
    last = cfg.train.steps
    steady = range(SKIP_FIRST + 1, last)  # step s's interval ends when step s is logged
    intervals = [(stamps[s] - stamps[s - 1]) / 1000 for s in steady]
    return {
        "interval_s": common.summary(intervals),
        "train_step_s": common.summary([inside[s] for s in steady]),
    }


def run_inprocess(args) -> dict:
    common.set_threads(1)  # what each Ray worker gets (Ray sets OMP_NUM_THREADS to its 1 CPU)
    import torch

    from alignprop_ray.prompts import load_prompts
    from alignprop_ray.train.build import build_learner, plan_training_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(tmp, args.steps, args.k, 1)
    learner = build_learner(cfg, torch.device("cpu"))
    prompts = load_prompts(cfg.prompts.train)

    def step(i):
        learner.train_step(*plan_training_step(cfg, prompts, i))

    # the same steps as the Ray run's steady state: steps SKIP_FIRST .. steps-2 (0-based)
    times = common.time_steps(step, SKIP_FIRST, args.steps - 1 - SKIP_FIRST)
    return {
        "mode": "inprocess",
        "threads": torch.get_num_threads(),
        "step_s": common.summary(times),
        "images_per_step": cfg.train.batch_size * cfg.train.grad_accum,
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_ray(args) if args.mode == "ray" else run_inprocess(args)
    result["config"] = {
        "steps": args.steps,
        "k": args.k,
        "yaml": "sweeps/tiny.yaml",
        "poll_interval": args.poll_interval,
    }
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
