"""Served rewards (issue 29): a sweep of 4 concurrent trials on the tiny model scoring with a real-size
reward, local (a copy in every trial's worker) vs served (one Ray Serve replica for the whole sweep).

    flock /tmp/alignprop-ray.lock .venv/bin/python bench/served_rewards.py [--steps 4] [--out bench/results.json]

The reward is `aesthetic` on open_clip ViT-B-32 at random init (`init: random`: no download; the score
means nothing, the model's size and compute are real). Each side runs in a fresh private Ray instance of
trials + 1 logical CPUs (a Train worker of 1 CPU per trial, the replica's 1 CPU), whatever the cores.
Measured:

* reward copies: the RSS one copy adds to a fresh process (torch and open_clip already imported), and the
  processes that hold one (every trial's worker, or the replica); the RSS of those processes, sampled every
  0.5 s during each sweep (peak of their sum);
* step time: `perf/step_seconds` of every trial's steps after its first, median and range per side;
* equality, float32: the reward and dR/dpixels of 4 images at 64 px, and the LoRA gradient of one
  AlignProp step of the tiny model, served vs local (largest absolute difference, and relative to the
  largest local value).

Prints one JSON object; with --out, merges it into that results file under "served_rewards" (bench/report.py
renders it as section 7 of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARD = {"arch": "ViT-B-32", "init": "random", "objective": "target", "target": 10.0}
SERVE = {"num_cpus": 1, "max_replicas": 1, "max_batch_size": 8}
LRS = [0.001, 0.002, 0.005, 0.01]

COPY_RSS = """
import gc, json, psutil, torch
torch.set_num_threads(1)
import open_clip
from alignprop_ray.rewards.mixture import build_term
from alignprop_ray.rewards.spec import parse_reward_spec
term = parse_reward_spec({"aesthetic": %r})[0]["aesthetic"]
gc.collect(); before = psutil.Process().memory_info().rss
reward = build_term("aesthetic", term, torch.device("cpu"), torch.float32)
gc.collect(); after = psutil.Process().memory_info().rss
params = sum(p.numel() for p in reward.parameters())
print(json.dumps({"copy_rss": after - before, "parameters": params}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
    }.items():
        os.environ.setdefault(key, value)
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load()
    result = {"trials": len(LRS), "steps": args.steps, "reward": REWARD, "serve": SERVE}
    result["copy"] = json.loads(
        subprocess.run(
            [sys.executable, "-c", COPY_RSS % REWARD], check=True, capture_output=True, text=True
        ).stdout.splitlines()[-1]
    )
    with tempfile.TemporaryDirectory(prefix="served-bench-") as tmp:
        for side in ("local", "served"):
            result[side] = run_side(side, Path(tmp) / side, args.steps)
    result.update(started=started, load_start=load_start, load_end=_load())
    print(json.dumps(result, indent=2))
    if args.out:
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged["served_rewards"] = result
        path.write_text(json.dumps(merged, indent=1))  # as bench/run.py writes it


def run_side(side: str, tmp: Path, steps: int) -> dict:
    """One sweep in a fresh Ray instance; on the served side also the equality check (its own pool)."""
    import ray

    from alignprop_ray.compat import ray_init_private
    from alignprop_ray.sweep.config import parse_sweep
    from alignprop_ray.sweep.launch import run_sweep

    reward = {"aesthetic": {**REWARD, **({"serve": SERVE} if side == "served" else {})}}
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = parse_sweep(sweep_data(reward, steps, side), tmp, [f"tracking.uri={uri}"], env={})
    ray_init_private(num_cpus=len(LRS) + 1, logging_level=logging.WARNING, log_to_driver=False)
    try:
        sampler = RssSampler()
        began = time.perf_counter()
        with sampler:
            outcome = run_sweep(sweep, say=lambda line: None)
        out = {"sweep_seconds": time.perf_counter() - began, **sampler.summary()}
        out["statuses"] = [row["status"] for row in outcome.rows]
        out["step_seconds"] = step_seconds(uri)
        if side == "served":
            out["equality"] = equality(reward)
    finally:
        ray.shutdown()
    return out


def sweep_data(reward: dict, steps: int, side: str) -> dict:
    base = {
        "model": {"pretrained": "tiny", "resolution": 64},
        "sampling": {"steps": 4},
        "truncation": "full",
        "reward": reward,
        "prompts": {"train": "tiny", "eval": "tiny", "eval_seeds": 2},
        "train": {"steps": steps, "batch_size": 2, "eval_every": steps, "checkpoint_every": steps},
        "scaling": {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        "tracking": {"experiment": f"served-bench-{side}"},
        "storage": {"path": "runs"},
    }
    return {
        "name": f"served-bench-{side}",
        "base": base,
        "space": {"train.lr": {"grid": LRS}},
        "tune": {"algorithm": "grid", "max_concurrent_trials": len(LRS)},
    }


class RssSampler:
    """RSS of the Train workers and the reward replicas, every 0.5 s while the block runs."""

    KINDS = {"workers": "RayTrainWorker", "replica": "ServeReplica:alignprop-reward"}

    def __init__(self):
        self.samples: list[dict[str, list[int]]] = []
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            sample: dict[str, list[int]] = {kind: [] for kind in self.KINDS}
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(proc.info["cmdline"] or [])[:120]
                for kind, mark in self.KINDS.items():
                    if title.startswith("ray::") and mark in title and proc.info["memory_info"]:
                        sample[kind].append(proc.info["memory_info"].rss)
            self.samples.append(sample)

    def summary(self) -> dict:
        def peak(kind: str) -> int:
            return max((sum(s[kind]) for s in self.samples), default=0)

        return {
            "processes": {kind: max((len(s[kind]) for s in self.samples), default=0) for kind in self.KINDS},
            "peak_rss": {kind: peak(kind) for kind in self.KINDS},
            "peak_rss_total": max((sum(map(sum, s.values())) for s in self.samples), default=0),
            "peak_rss_one_worker": max((max(s["workers"], default=0) for s in self.samples), default=0),
        }


def step_seconds(uri: str) -> dict:
    """perf/step_seconds of every trial's steps after its first."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    values = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if "mlflow.parentRunId" in run.data.tags:
                history = client.get_metric_history(run.info.run_id, "perf/step_seconds")
                values += [m.value for m in history if m.step > 1]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def equality(reward: dict) -> dict:
    """Served vs local, float32: reward and dR/dpixels of 4 images, and one AlignProp step's LoRA gradient."""
    import torch

    from alignprop_ray.config import parse_experiment
    from alignprop_ray.rewards.mixture import build_reward, build_term
    from alignprop_ray.rewards.remote import score_with_pixel_gradient
    from alignprop_ray.serving.client import served_reward
    from alignprop_ray.serving.pool import reward_pool
    from alignprop_ray.serving.specs import served_terms

    torch.manual_seed(0)
    cfg = parse_experiment(sweep_data(reward, 1, "served")["base"], ROOT, env={}, check_files=False)
    served = served_terms(cfg)
    term = served[0].term
    out = {}
    with reward_pool(served, say=lambda line: None):
        images, prompts = torch.rand(4, 3, 64, 64), ["a", "b", "c", "d"]
        local = build_term("aesthetic", term, torch.device("cpu"), torch.float32)
        values, grads = score_with_pixel_gradient(local, images, prompts, True)
        remote = served_reward("aesthetic", term)
        pixels = images.clone().requires_grad_(True)
        remote_values = remote(pixels, prompts)
        (remote_grads,) = torch.autograd.grad(remote_values.sum(), pixels)
        out["reward"] = _difference(remote_values.detach(), values)
        out["pixel_gradient"] = _difference(remote_grads, grads)
        lora = []
        for served_builder in (None, served_reward):
            mixture = build_reward(reward, device="cpu", dtype=torch.float32, served=served_builder)
            lora.append(lora_gradient(mixture))
        out["lora_gradient"] = _difference(lora[1], lora[0])
    return out


def lora_gradient(mixture):
    """The LoRA gradient of one AlignProp step (K = T = 4) of the tiny model at 64 px, batch 2."""
    import torch

    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.step import Batch, Learner
    from alignprop_ray.train.build import engine_settings

    cfg = ExperimentConfig(reward={"saturation": 1.0}, sampling={"steps": 4})
    lora, sampler, optim = engine_settings(cfg)
    parts = load_parts("tiny")
    params = attach_lora(parts.denoiser, lora, seed=0)
    with torch.no_grad():  # a non-zero update, so the gradient reaches both LoRA factors
        generator = torch.Generator().manual_seed(0)
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    learner = Learner(parts, params, mixture, sampler, optim, resolution=64)
    learner.train_step([Batch(["a cat", "a dog"], [1, 2])], [4])
    return torch.cat([p.grad.flatten() for p in learner.params])


def _difference(a, b) -> dict:
    diff = float((a.float() - b.float()).abs().max())
    scale = float(b.abs().max())
    return {"max_abs": diff, "max_rel": diff / scale if scale else 0.0, "largest": scale}


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
